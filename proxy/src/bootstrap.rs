//! The bootstrap file: who this proxy is (node), where its xDS comes from, where the
//! admin endpoint listens, how many runtime threads it runs. Read once at start; every
//! error names the file and the field. The format is documented in `docs/proxy.md`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A bootstrap file that cannot be used; the message names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading bootstrap {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bootstrap {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bootstrap {path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// The parsed, validated bootstrap.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub node: NodeConfig,
    pub xds: XdsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Runtime threads; 1 runs a current-thread runtime.
    #[serde(default = "one")]
    pub workers: usize,
    /// Where listeners that the hub marks `bind_to_port: false` (the sidecar outbound
    /// listeners) are bound, so that applications can use the proxy explicitly.
    #[serde(default)]
    pub listeners: ListenersConfig,
    /// Mutual TLS on the xDS connection to the router or hub (`xds.address` is then
    /// `https://`): our certificate, its key, and the bundle the server is checked against.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: String,
    /// Sent as node metadata `tributary.io/env`.
    pub environment: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub cluster: String,
    /// Extra string metadata (e.g. `tributary.io/sidecar`, `tributary.io/gateway`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Delta,
    Sotw,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// `http://host:port` of the router or a hub (`http://[::1]:15010` for IPv6);
    /// `https://host:port` with `tls`.
    pub address: String,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 15000)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenersConfig {
    /// Bind `bind_to_port: false` listeners on this address at their own port. When
    /// absent, such listeners are accepted but not bound (they need transparent mode).
    #[serde(default)]
    pub outbound_address: Option<IpAddr>,
    /// Bind every listener on this port instead of its own (0: an ephemeral port,
    /// for tests; the bound ports are listed at `/listeners` on the admin endpoint).
    #[serde(default)]
    pub port_override: Option<u16>,
    /// Seconds a removed listener's connections may take to finish (default 10).
    #[serde(default)]
    pub drain_timeout: Option<f64>,
    /// Serve plaintext HTTP/1.1 downstream connections with the hand-written fast path
    /// (`false`: every connection through hyper). Default on; `docs/proxy.md`.
    #[serde(default)]
    pub http1_fast_path: Option<bool>,
}

/// The proxy's own mTLS to the router or hub. The files are read at every connection
/// attempt, so a certificate renewed on disk is used on the next connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Our certificate chain, PEM, leaf first (its SPIFFE id names our identity).
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The trust bundle, PEM: the roots the server's chain must end at.
    pub ca: PathBuf,
    /// The SPIFFE trust domain the server must be of; default: our certificate's.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// The exact SPIFFE id the server must present; default: any `hub/*` or
    /// `router/*` id of the trust domain.
    #[serde(default)]
    pub server_id: Option<String>,
}

/// A SPIFFE trust domain as the hub's `--trust-domain` accepts it.
fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

impl Bootstrap {
    /// Reads and validates the bootstrap at `path`.
    pub fn load(path: &Path) -> Result<Bootstrap, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates bootstrap `text` (read from `path`, for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Bootstrap, Error> {
        let b: Bootstrap = serde_yaml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |field, message: String| Error::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        if b.node.id.is_empty() {
            return Err(invalid("node.id", "must not be empty".into()));
        }
        if b.node.environment.is_empty() {
            return Err(invalid(
                "node.environment",
                "must not be empty: the hub serves a proxy its environment's config".into(),
            ));
        }
        let uri: hyper::Uri = b.xds.address.parse().map_err(|e| {
            invalid(
                "xds.address",
                format!(
                    "{:?} is not a URI ({e}); expected e.g. http://127.0.0.1:15010 or http://[::1]:15010",
                    b.xds.address
                ),
            )
        })?;
        let expected = if b.tls.is_some() { "https" } else { "http" };
        if uri.scheme_str() != Some(expected) || uri.authority().is_none() {
            let why = if b.tls.is_some() {
                "with `tls`, the connection is mutual TLS"
            } else {
                "https needs a `tls` block (cert, key, ca)"
            };
            return Err(invalid(
                "xds.address",
                format!(
                    "{:?}: expected {expected}://HOST:PORT ({why})",
                    b.xds.address
                ),
            ));
        }
        if b.workers == 0 {
            return Err(invalid("workers", "must be at least 1".into()));
        }
        if let Some(tls) = &b.tls {
            for (field, p) in [
                ("tls.cert", &tls.cert),
                ("tls.key", &tls.key),
                ("tls.ca", &tls.ca),
            ] {
                if p.as_os_str().is_empty() {
                    return Err(invalid(field, "must name a PEM file".into()));
                }
            }
            if let Some(td) = &tls.trust_domain
                && !valid_trust_domain(td)
            {
                return Err(invalid(
                    "tls.trust_domain",
                    format!(
                        "{td:?}: expected lowercase [a-z0-9.-_], non-empty (e.g. tributary.local)"
                    ),
                ));
            }
            if let Some(id) = &tls.server_id {
                let domain = id
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.split_once('/'))
                    .map(|(d, _)| d);
                match domain {
                    Some(d) if valid_trust_domain(d) => {
                        if let Some(td) = &tls.trust_domain
                            && td != d
                        {
                            return Err(invalid(
                                "tls.server_id",
                                format!(
                                    "{id:?} is of trust domain {d:?}, but tls.trust_domain is {td:?}"
                                ),
                            ));
                        }
                    }
                    _ => {
                        return Err(invalid(
                            "tls.server_id",
                            format!(
                                "{id:?}: expected a SPIFFE id, e.g. spiffe://tributary.local/router/mesh"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "node:\n  id: bench-proxy-0\n  environment: prod\n  zone: z1\n  region: r1\n  cluster: bench\n  metadata: {}\nxds:\n  address: http://127.0.0.1:15010\n  protocol: delta\nadmin:\n  address: 127.0.0.1:15000\nworkers: 1\n";

    #[test]
    fn the_documented_example_parses() {
        let b = Bootstrap::parse(Path::new("b.yaml"), EXAMPLE).unwrap();
        assert_eq!(b.node.id, "bench-proxy-0");
        assert_eq!(b.node.zone, "z1");
        assert_eq!(b.xds.protocol, Protocol::Delta);
        assert_eq!(b.workers, 1);
        assert_eq!(b.admin.address.port(), 15000);
    }

    #[test]
    fn ipv6_hub_and_sotw() {
        let text = EXAMPLE
            .replace("http://127.0.0.1:15010", "http://[::1]:15010")
            .replace("delta", "sotw")
            .replace("127.0.0.1:15000", "\"[::1]:15000\"");
        let b = Bootstrap::parse(Path::new("b.yaml"), &text).unwrap();
        assert_eq!(b.xds.protocol, Protocol::Sotw);
        assert!(b.admin.address.is_ipv6());
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = Bootstrap::parse(Path::new("b.yaml"), &EXAMPLE.replace("http://", "ftp://"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.yaml") && e.contains("xds.address"), "{e}");
        let e = Bootstrap::parse(
            Path::new("b.yaml"),
            &EXAMPLE.replace("workers: 1", "workers: 0"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`workers`"), "{e}");
        let e = Bootstrap::parse(Path::new("b.yaml"), &EXAMPLE.replace("zone:", "zoen:"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zoen"), "{e}");
    }

    #[test]
    fn tls_needs_https_and_https_needs_tls() {
        let tls = "tls:\n  cert: /pki/cert.pem\n  key: /pki/key.pem\n  ca: /pki/ca.pem\n";
        let text = format!("{}{tls}", EXAMPLE.replace("http://", "https://"));
        let b = Bootstrap::parse(Path::new("b.yaml"), &text).unwrap();
        let t = b.tls.unwrap();
        assert_eq!(t.cert, Path::new("/pki/cert.pem"));
        assert_eq!((t.trust_domain, t.server_id), (None, None));
        // tls with http://, https:// without tls: each refused, saying why.
        let e = Bootstrap::parse(Path::new("b.yaml"), &format!("{EXAMPLE}{tls}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("xds.address") && e.contains("https://HOST:PORT"),
            "{e}"
        );
        let e = Bootstrap::parse(Path::new("b.yaml"), &EXAMPLE.replace("http://", "https://"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("xds.address") && e.contains("needs a `tls` block"),
            "{e}"
        );
    }

    #[test]
    fn tls_fields_are_checked() {
        let base = EXAMPLE.replace("http://", "https://");
        let with =
            |extra: &str| format!("{base}tls:\n  cert: c.pem\n  key: k.pem\n  ca: ca.pem\n{extra}");
        let b = Bootstrap::parse(
            Path::new("b.yaml"),
            &with("  trust_domain: td.test\n  server_id: spiffe://td.test/router/mesh\n"),
        )
        .unwrap();
        let t = b.tls.unwrap();
        assert_eq!(t.trust_domain.as_deref(), Some("td.test"));
        assert_eq!(t.server_id.as_deref(), Some("spiffe://td.test/router/mesh"));
        for (extra, field) in [
            ("  trust_domain: TD\n", "tls.trust_domain"),
            ("  server_id: https://x/y\n", "tls.server_id"),
            (
                "  trust_domain: td.test\n  server_id: spiffe://other.test/hub/h\n",
                "tls.server_id",
            ),
            ("  cert2: x\n", "cert2"),
        ] {
            let e = Bootstrap::parse(Path::new("b.yaml"), &with(extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains("b.yaml") && e.contains(field), "{extra}: {e}");
        }
    }
}

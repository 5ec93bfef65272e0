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
    /// Certificates for xDS mTLS. Not implemented yet: a bootstrap naming it is refused.
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
    /// `http://host:port` of the router or a hub (`http://[::1]:15010` for IPv6).
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
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
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(invalid(
                "xds.address",
                format!(
                    "{:?}: expected http://HOST:PORT (https needs `tls`, not implemented yet)",
                    b.xds.address
                ),
            ));
        }
        if b.workers == 0 {
            return Err(invalid("workers", "must be at least 1".into()));
        }
        if b.tls.is_some() {
            return Err(invalid(
                "tls",
                "xDS mTLS is not implemented yet in tributary-proxy; remove `tls`".into(),
            ));
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
}

//! The identity commands and the hub's identity flags.
//!
//! | command | API |
//! |---|---|
//! | `tributary token create --identity ID --ttl 1h [--uses N] [--cluster C]` | `POST /v1/tokens` |
//! | `tributary token revoke ID` | `DELETE /v1/tokens/{id}` |
//! | `tributary ca status` | `GET /v1/ca` |
//! | `tributary ca rotate --root [--trust-window 24h] [--overlap 48h]` / `--intermediate CLUSTER\|mesh [--overlap DURATION]` | `POST /v1/ca/rotate` |
//! | `tributary ca promote` | `POST /v1/ca/promote` |
//! | `tributary ca finish-rotation [--intermediate CLUSTER\|mesh]` | `POST /v1/ca/finish-rotation` |
//! | `tributary ca revoke --serial HEX [--intermediate NAME]` | `POST /v1/ca/revoke` |
//! | `tributary cert request --server URL [--ca BUNDLE] (--token T \| --k8s-token-file F --cluster C) --out DIR [--renew]` | `POST /v1/certificates` (the CSR listener, `--csr-addr`) |

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use super::SpiffeId;
use super::api::IdentityConfig;
use super::ca::{CaConfig, SuppliedRoot};
use super::client::{
    Credential, CsrServer, keep_renewed, request_certificate_from, write_atomically,
};
use crate::http_client;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (expected e.g. 24h, 30m)"))
}

/// The hub's identity flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HubIdentityArgs {
    /// Lifetime of the certificates the CA issues (peers renew at half of it).
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_lifetime: Duration,
    /// Lifetime of an intermediate (one per remote cluster, and the mesh's); replaced
    /// automatically when less than two certificate lifetimes remain.
    #[arg(long, default_value = "30days", value_parser = duration)]
    pub ca_intermediate_lifetime: Duration,
    /// Lifetime of a root the CA generates (when the store holds none).
    #[arg(long, default_value = "10years", value_parser = duration)]
    pub ca_root_lifetime: Duration,
    /// A root certificate (PEM) to use instead of generating one; with --ca-root-key.
    #[arg(long, requires = "ca_root_key")]
    pub ca_root_cert: Option<PathBuf>,
    /// The PKCS#8 PEM key of --ca-root-cert.
    #[arg(long, requires = "ca_root_cert")]
    pub ca_root_key: Option<PathBuf>,
    /// A DNS name or IP address put into hub and router certificates (repeatable), for
    /// clients that check the name they dialled.
    #[arg(long = "serving-san")]
    pub serving_sans: Vec<String>,
    /// YAML listing the remote clusters whose service-account tokens the CSR API
    /// reviews: clusters: [{id, kubeconfig, default_env?, audiences?}].
    #[arg(long, env = "TRIBUTARY_TOKEN_REVIEW_CLUSTERS")]
    pub token_review_clusters: Option<PathBuf>,
    /// Where peers without a certificate get their first one: the CSR API alone,
    /// over TLS with the hub's certificate and no client certificate asked for
    /// (repeatable; `[::]:19003` is dual-stack; loopback only with --insecure).
    #[arg(long = "csr-addr", default_value = super::csr_listener::DEFAULT_CSR_ADDR, env = "TRIBUTARY_CSR_ADDR", value_delimiter = ',')]
    pub csr_addrs: Vec<std::net::SocketAddr>,
    /// Largest request body the CSR listener reads (413 past it).
    #[arg(long, default_value_t = super::csr_listener::DEFAULT_MAX_BODY_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=(16 << 20)))]
    pub csr_max_body_bytes: usize,
    /// Largest CSR (PEM) the CSR listener accepts (413 past it).
    #[arg(long, default_value_t = super::csr_listener::DEFAULT_MAX_CSR_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(256..=(1 << 20)))]
    pub csr_max_csr_bytes: usize,
    /// Certificate requests the CSR listener handles at once; more are answered 503.
    #[arg(long, default_value_t = super::csr_listener::DEFAULT_MAX_CONCURRENT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub csr_max_concurrent: usize,
    /// The most one request to the CSR listener may take (408 after).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub csr_request_timeout: Duration,
    /// Connections the CSR listener keeps open at once; one more is closed at once.
    #[arg(long, default_value_t = super::csr_listener::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub csr_max_connections: usize,
    /// A connection to the CSR listener must send a request's headers within this
    /// (counted from its opening, or its last answer), or it is closed.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub csr_header_read_timeout: Duration,
}

impl HubIdentityArgs {
    /// The CA's config for the mesh's trust domain (the global `--trust-domain`).
    pub fn into_config(self, trust_domain: String) -> anyhow::Result<IdentityConfig> {
        let root = match (&self.ca_root_cert, &self.ca_root_key) {
            (Some(c), Some(k)) => Some(SuppliedRoot::read(c, k)?),
            _ => None,
        };
        Ok(IdentityConfig {
            ca: CaConfig {
                trust_domain,
                cert_lifetime: self.cert_lifetime,
                intermediate_lifetime: self.ca_intermediate_lifetime,
                root_lifetime: self.ca_root_lifetime,
                serving_sans: self.serving_sans,
                root,
            },
            review_clusters: match &self.token_review_clusters {
                Some(p) => super::tokenreview::read_clusters(p)?,
                None => Vec::new(),
            },
            csr: super::csr_listener::CsrListenerConfig {
                addrs: self.csr_addrs,
                max_body_bytes: self.csr_max_body_bytes,
                max_csr_bytes: self.csr_max_csr_bytes,
                max_concurrent: self.csr_max_concurrent,
                request_timeout: self.csr_request_timeout,
                max_connections: self.csr_max_connections,
                header_read_timeout: self.csr_header_read_timeout,
            },
        })
    }
}

/// `tributary token ...`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
    /// The hub's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:19001",
        env = "TRIBUTARY_ADMIN_ADDR"
    )]
    admin: String,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Create a join token for one identity; the token is printed once (stdout).
    Create {
        /// The SPIFFE id a certificate issued with the token carries.
        #[arg(long)]
        identity: String,
        /// How long the token may be used.
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: Duration,
        /// How many certificates it may be used for (default: single use).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The remote cluster whose intermediate signs (an agent's: its own cluster).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Revoke a join token (by its id, the part before the dot).
    Revoke { id: String },
}

/// `tributary ca ...`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
    /// The hub's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:19001",
        env = "TRIBUTARY_ADMIN_ADDR"
    )]
    admin: String,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// The root, the roots being rotated out and the intermediates (JSON).
    Status,
    /// Rotate the root in phases (the new root trusted for --trust-window, then
    /// signing while the old one stays trusted for --overlap), or one intermediate.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["root", "intermediate"])))]
    Rotate {
        #[arg(long)]
        root: bool,
        /// A remote cluster id, or `mesh`.
        #[arg(long)]
        intermediate: Option<String>,
        /// How long the new root is trusted before it signs (default 24h; --root
        /// only; 0s: at once).
        #[arg(long)]
        trust_window: Option<String>,
        /// How long the old root stays in the trust bundle once the new one signs
        /// (--root; default 48h), or how long certificates of the old intermediate
        /// stay accepted before it is revoked (--intermediate; default one
        /// --cert-lifetime of the hub, 24h by default).
        #[arg(long)]
        overlap: Option<String>,
    },
    /// End a root rotation's trust window now: the new root signs from now on.
    Promote,
    /// Remove the roots being rotated out from the trust bundle now; with
    /// --intermediate, revoke that signer's previous intermediates now.
    FinishRotation {
        /// A remote cluster id, or `mesh`.
        #[arg(long)]
        intermediate: Option<String>,
    },
    /// Revoke one leaf certificate (a decommissioned cluster's agent, a leaked
    /// workload key) by its serial: it joins the CRLs pushed to every hop.
    Revoke {
        /// The certificate's serial number, hex (`openssl x509 -noout -serial -in
        /// cert.pem`; `serial=` and `:` allowed).
        #[arg(long)]
        serial: String,
        /// The signer that issued it: a remote cluster id, or `mesh` (default: the
        /// serial is listed by every intermediate's CRL).
        #[arg(long)]
        intermediate: Option<String>,
    },
}

/// `tributary cert ...`.
#[derive(Debug, clap::Args)]
pub struct CertArgs {
    #[command(subcommand)]
    command: CertCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CertCommand {
    /// Get a certificate from the CSR API and write cert.pem, key.pem and ca.pem.
    #[command(group(clap::ArgGroup::new("credential").required(true).args(["token", "k8s_token_file"])))]
    Request {
        /// The hub's CSR listener (--csr-addr), e.g. https://hub.example:19003 (with
        /// --ca), or http://127.0.0.1:19003 for an --insecure hub.
        #[arg(long, env = "TRIBUTARY_CA_SERVER")]
        server: String,
        /// The CA bundle (PEM) the hub's certificate must chain to: TLS without a
        /// client certificate. With --renew, later requests trust the bundle the CA
        /// handed out last (DIR/ca.pem), so they follow a root rotation.
        #[arg(long, env = "TRIBUTARY_CA_BUNDLE")]
        ca: Option<PathBuf>,
        /// The SPIFFE trust domain the hub's certificate must be of.
        #[arg(long, default_value = super::tls::DEFAULT_TRUST_DOMAIN, env = "TRIBUTARY_TRUST_DOMAIN")]
        trust_domain: String,
        /// A join token.
        #[arg(long, env = "TRIBUTARY_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A service-account token file (re-read at each renewal), e.g.
        /// /var/run/secrets/tokens/tributary; with --cluster.
        #[arg(long, requires = "cluster")]
        k8s_token_file: Option<PathBuf>,
        /// The remote cluster whose API server reviews --k8s-token-file.
        #[arg(long)]
        cluster: Option<String>,
        /// The identity to ask for (refused unless the credential proves it).
        #[arg(long)]
        identity: Option<String>,
        /// Where to write the files (swapped atomically through a ..data symlink).
        #[arg(long)]
        out: PathBuf,
        /// Keep running and renew at half-life.
        #[arg(long)]
        renew: bool,
    },
}

async fn call(
    admin: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let body = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body)?
    };
    let (status, resp) = http_client::request(admin, method, path, &body).await?;
    let value: serde_json::Value = if resp.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&resp)
            .with_context(|| format!("{method} {admin}{path}: the answer is not JSON"))?
    };
    if !(200..300).contains(&status) {
        let msg = value["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        anyhow::bail!("{method} {admin}{path}: HTTP {status}: {msg}");
    }
    Ok(value)
}

pub async fn token(args: TokenArgs) -> anyhow::Result<()> {
    match args.command {
        TokenCommand::Create {
            identity,
            ttl,
            uses,
            cluster,
        } => {
            let body = serde_json::json!({
                "identity": identity,
                "ttl": humantime::format_duration(ttl).to_string(),
                "uses": uses,
                "cluster": cluster,
            });
            let created = call(&args.admin, "POST", "/v1/tokens", &body).await?;
            eprintln!(
                "join token {} for {}: expires {}, {} use(s); it is shown only now",
                created["id"].as_str().unwrap_or_default(),
                created["identity"].as_str().unwrap_or_default(),
                created["expires"].as_str().unwrap_or_default(),
                created["uses"]
            );
            println!("{}", created["token"].as_str().unwrap_or_default());
        }
        TokenCommand::Revoke { id } => {
            let id = id.split('.').next().unwrap_or_default().to_string();
            call(
                &args.admin,
                "DELETE",
                &format!("/v1/tokens/{id}"),
                &serde_json::Value::Null,
            )
            .await?;
            eprintln!("join token {id} revoked");
        }
    }
    Ok(())
}

pub async fn ca(args: CaArgs) -> anyhow::Result<()> {
    let out = match args.command {
        CaCommand::Status => call(&args.admin, "GET", "/v1/ca", &serde_json::Value::Null).await?,
        CaCommand::Rotate {
            root,
            intermediate,
            trust_window,
            overlap,
        } => {
            if trust_window.is_some() && !root {
                anyhow::bail!(
                    "--trust-window applies to --root only: a new intermediate is trusted at once \
                     (it chains to the same root)"
                );
            }
            let body = serde_json::json!({
                "root": root,
                "intermediate": intermediate,
                "trust_window": trust_window,
                "overlap": overlap,
            });
            let body = serde_json::Value::Object(
                body.as_object()
                    .unwrap()
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            call(&args.admin, "POST", "/v1/ca/rotate", &body).await?
        }
        CaCommand::Promote => {
            call(
                &args.admin,
                "POST",
                "/v1/ca/promote",
                &serde_json::Value::Null,
            )
            .await?
        }
        CaCommand::FinishRotation { intermediate } => {
            let body = match intermediate {
                Some(name) => serde_json::json!({ "intermediate": name }),
                None => serde_json::Value::Null,
            };
            call(&args.admin, "POST", "/v1/ca/finish-rotation", &body).await?
        }
        CaCommand::Revoke {
            serial,
            intermediate,
        } => {
            let mut body = serde_json::json!({ "serial": serial });
            if let Some(name) = intermediate {
                body["intermediate"] = name.into();
            }
            call(&args.admin, "POST", "/v1/ca/revoke", &body).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub async fn cert(args: CertArgs) -> anyhow::Result<()> {
    let CertCommand::Request {
        server,
        ca,
        trust_domain,
        token,
        k8s_token_file,
        cluster,
        identity,
        out,
        renew,
    } = args.command;
    let credential = match (token, k8s_token_file, cluster) {
        (Some(t), None, _) => Credential::JoinToken(t),
        (None, Some(f), Some(c)) => Credential::Kubernetes {
            cluster: c,
            token_file: f,
        },
        _ => anyhow::bail!("expected --token, or --k8s-token-file with --cluster"),
    };
    let identity = identity
        .map(|s| SpiffeId::parse(&s).map_err(|e| anyhow::anyhow!("--identity: {e}")))
        .transpose()?;
    let install = |o: &super::client::Obtained| {
        write_atomically(&out, o)?;
        eprintln!(
            "{}: wrote {} (until {})",
            o.spiffe_id,
            out.display(),
            humantime::format_rfc3339_seconds(o.cert.not_after)
        );
        Ok(())
    };
    let mut server = CsrServer::new(&server, ca, &trust_domain)?;
    if !renew {
        let o = request_certificate_from(&server, &credential, identity.as_ref()).await?;
        return install(&o);
    }
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_tx.send(true);
    });
    // A join token is spent by the first certificate: renewals need a credential
    // that lasts (a service-account token, or the certificate itself once the hub
    // authenticates renewals over mTLS).
    let mut first = true;
    let bundle = out.join(super::client::CA_FILE);
    keep_renewed(
        || {
            let again = !std::mem::replace(&mut first, false);
            if again && server.ca.is_some() {
                // The bundle of the last answer: it holds a new root during a rotation.
                server.ca = Some(bundle.clone());
            }
            let (server, credential, identity) =
                (server.clone(), credential.clone(), identity.clone());
            async move {
                if again && matches!(credential, Credential::JoinToken(_)) {
                    tracing::warn!(
                        "renewing with the join token: it must allow more than one use (--uses)"
                    );
                }
                request_certificate_from(&server, &credential, identity.as_ref()).await
            }
        },
        install,
        None,
        stop,
    )
    .await
}

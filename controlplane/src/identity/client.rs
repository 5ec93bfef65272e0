//! The client side of the CSR API: generate a key, send a CSR with a credential, write
//! the result where Envoy's and gRPC's file watchers pick it up, and renew it at
//! half-life ([`keep_renewed`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::sync::watch;

use super::IssuedCertificate;
use super::SpiffeId;
use super::api::{CertificateRequest, CertificateResponse, KubernetesCredential};

/// How a peer proves who it is to the CSR API.
#[derive(Clone)]
pub enum Credential {
    /// A join token (`tributary token create`).
    JoinToken(String),
    /// A Kubernetes service-account token, read from `token_file` at each request
    /// (projected tokens are rotated by the kubelet), reviewed by `cluster`'s API server.
    Kubernetes {
        cluster: String,
        token_file: PathBuf,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::JoinToken(t) => {
                write!(
                    f,
                    "JoinToken({}.…)",
                    t.split('.').next().unwrap_or_default()
                )
            }
            Credential::Kubernetes {
                cluster,
                token_file,
            } => write!(f, "Kubernetes({cluster}, {})", token_file.display()),
        }
    }
}

/// A certificate obtained from the CSR API, with the key generated for it.
#[derive(Clone, Debug)]
pub struct Obtained {
    pub spiffe_id: String,
    pub cert: IssuedCertificate,
    pub trust_bundle_pem: String,
}

/// A fresh P-256 key and a CSR for it; with `identity`, the CSR names it as its URI
/// SAN (the CA refuses the CSR if the credential proves another one).
pub fn new_csr(identity: Option<&SpiffeId>) -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate().context("generating a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = identity {
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    }
    let csr = params.serialize_request(&key).context("signing the CSR")?;
    Ok((key, csr.pem().context("encoding the CSR")?))
}

/// Where the CSR API is, and how the hub is checked: the hub's CSR listener
/// (`--csr-addr`) over TLS, its certificate checked against a CA bundle (a peer
/// without a certificate presents none), or plaintext to an `--insecure` hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsrServer {
    /// `host:port` or `[v6]:port`.
    pub addr: String,
    /// The bundle the hub's certificate must chain to; `None`: plaintext.
    pub ca: Option<PathBuf>,
    /// The trust domain the hub's SPIFFE id must be of.
    pub trust_domain: String,
}

impl CsrServer {
    /// From a URL: `https://host:port` needs `ca`; `http://host:port` is plaintext
    /// and takes none; without a scheme, TLS when `ca` is given.
    pub fn new(url: &str, ca: Option<PathBuf>, trust_domain: &str) -> anyhow::Result<Self> {
        let (tls, addr) = match (url.split_once("://"), &ca) {
            (Some(("https", rest)), Some(_)) => (true, rest),
            (Some(("https", _)), None) => anyhow::bail!(
                "--server {url}: TLS needs the CA bundle the hub's certificate chains to (--ca FILE)"
            ),
            (Some(("http", _)), Some(ca)) => anyhow::bail!(
                "--server {url} is plaintext but --ca {} is given: use https://, or drop --ca for an --insecure hub",
                ca.display()
            ),
            (Some(("http", rest)), None) => (false, rest),
            (Some((scheme, _)), _) => {
                anyhow::bail!("--server {url}: expected https:// or http://, not {scheme}://")
            }
            (None, ca) => (ca.is_some(), url),
        };
        Ok(Self {
            addr: addr.trim_end_matches('/').to_string(),
            ca: if tls { ca } else { None },
            trust_domain: trust_domain.to_string(),
        })
    }

    fn url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }
}

/// Requests a certificate from the CSR API at `server` (`http://host:port`,
/// plaintext: an `--insecure` hub).
pub async fn request_certificate(
    server: &str,
    credential: &Credential,
    identity: Option<&SpiffeId>,
) -> anyhow::Result<Obtained> {
    let server = CsrServer::new(server, None, super::tls::DEFAULT_TRUST_DOMAIN)?;
    request_certificate_from(&server, credential, identity).await
}

/// Requests a certificate from the CSR API at `server`: over TLS without a client
/// certificate when it names a CA bundle (read now, so a renewed bundle is used).
pub async fn request_certificate_from(
    server: &CsrServer,
    credential: &Credential,
    identity: Option<&SpiffeId>,
) -> anyhow::Result<Obtained> {
    let tls = match &server.ca {
        Some(ca) => Some(super::tls::ClientTls {
            config: std::sync::Arc::new(super::tls::Reloading::fixed(
                super::tls::server_auth_only_client_config(
                    "--ca",
                    ca,
                    &server.trust_domain,
                    super::tls::ALPN_HTTP1,
                )?,
            )),
        }),
        None => None,
    };
    let (key, csr) = new_csr(identity)?;
    let mut req = CertificateRequest {
        csr,
        join_token: None,
        kubernetes: None,
    };
    match credential {
        Credential::JoinToken(t) => req.join_token = Some(t.trim().to_string()),
        Credential::Kubernetes {
            cluster,
            token_file,
        } => {
            let token = std::fs::read_to_string(token_file).with_context(|| {
                format!("reading the service-account token {}", token_file.display())
            })?;
            req.kubernetes = Some(KubernetesCredential {
                cluster: cluster.clone(),
                token: token.trim().to_string(),
            });
        }
    }
    let body = serde_json::to_vec(&req)?;
    let server = server.url();
    let (status, resp) = crate::http_client::request_with(
        &server,
        tls.as_ref(),
        "POST",
        super::csr_listener::CSR_PATH,
        &body,
    )
    .await?;
    if status != 200 {
        let msg = serde_json::from_slice::<serde_json::Value>(&resp)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&resp).trim().to_string());
        anyhow::bail!("{server}: the CA refused the certificate request (HTTP {status}): {msg}");
    }
    let resp: CertificateResponse =
        serde_json::from_slice(&resp).with_context(|| format!("{server}: the CA's answer"))?;
    let time = |s: &str| -> anyhow::Result<SystemTime> {
        humantime::parse_rfc3339(s).with_context(|| format!("{server}: the CA's time {s:?}"))
    };
    Ok(Obtained {
        cert: IssuedCertificate {
            chain_pem: resp.chain_pem,
            key_pem: key.serialize_pem(),
            not_before: time(&resp.not_before)?,
            not_after: time(&resp.not_after)?,
        },
        spiffe_id: resp.spiffe_id,
        trust_bundle_pem: resp.trust_bundle_pem,
    })
}

/// The files [`write_atomically`] keeps in its directory.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_FILE: &str = "ca.pem";
const DATA_LINK: &str = "..data";

/// Writes `cert.pem` (the chain), `key.pem` and `ca.pem` (the trust bundle) into
/// `dir` so that a reader never sees a key from one issuance and a certificate of
/// another: the files live in a new hidden directory, `..data` is a symlink to it,
/// swapped by one `rename`, and each name is a symlink into `..data` — the layout of
/// Kubernetes' projected volumes, which Envoy's `watched_directory` and gRPC's file
/// watcher follow.
pub fn write_atomically(dir: &Path, obtained: &Obtained) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, symlink};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = format!(
        "..{}.{:08x}",
        humantime::format_rfc3339_nanos(SystemTime::now())
            .to_string()
            .replace(':', "_"),
        fastrand::u32(..)
    );
    let data = dir.join(&stamp);
    std::fs::create_dir(&data).with_context(|| format!("creating {}", data.display()))?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        use std::io::Write;
        let path = data.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    write(CERT_FILE, &obtained.cert.chain_pem, 0o644)?;
    write(KEY_FILE, &obtained.cert.key_pem, 0o600)?;
    write(CA_FILE, &obtained.trust_bundle_pem, 0o644)?;
    // Swap ..data to the new directory in one rename.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    let previous = std::fs::read_link(dir.join(DATA_LINK)).ok();
    std::fs::rename(&tmp, dir.join(DATA_LINK))
        .with_context(|| format!("replacing {}", dir.join(DATA_LINK).display()))?;
    // The visible names point into ..data (created once; replaced if they are not).
    for name in [CERT_FILE, KEY_FILE, CA_FILE] {
        let path = dir.join(name);
        let target = Path::new(DATA_LINK).join(name);
        if std::fs::read_link(&path).ok().as_deref() != Some(target.as_path()) {
            let tmp = dir.join(format!("..{name}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            symlink(&target, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
    }
    if let Some(old) = previous.filter(|p| p.as_path() != Path::new(&stamp)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// When to renew a certificate valid from `not_before` to `not_after`, measured from
/// `now`: at half its lifetime, minus up to a tenth of it (`jitter` in 0..1), so that
/// peers issued at once do not renew at once. Zero when that is past.
pub fn renew_delay(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let at = not_before + lifetime.mul_f64(0.5 - 0.1 * jitter.clamp(0.0, 1.0));
    at.duration_since(now).unwrap_or_default()
}

/// What [`keep_renewed`] did, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewEvent {
    /// A certificate was obtained and handed on; the next renewal is after `next`.
    Renewed {
        not_after: SystemTime,
        next: Duration,
    },
    /// A request failed; the next attempt is after `retry`.
    Failed { error: String, retry: Duration },
}

/// Smallest and largest wait between failed attempts.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Obtains a certificate with `fetch`, hands it to `install`, and renews it at
/// half-life for ever (until `shutdown`). A failed request is retried after 1 s,
/// doubling to 60 s. `install` failing ends the loop (the caller cannot use a
/// certificate it cannot install). Each step is reported on `events`.
pub async fn keep_renewed<F, Fut>(
    mut fetch: F,
    mut install: impl FnMut(&Obtained) -> anyhow::Result<()>,
    events: Option<tokio::sync::mpsc::Sender<RenewEvent>>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Obtained>>,
{
    let mut retry = RETRY_MIN;
    loop {
        let (event, wait) = match fetch().await {
            Ok(obtained) => {
                install(&obtained)?;
                retry = RETRY_MIN;
                let next = renew_delay(
                    obtained.cert.not_before,
                    obtained.cert.not_after,
                    SystemTime::now(),
                    fastrand::f64(),
                );
                tracing::info!(id = %obtained.spiffe_id, not_after = %humantime::format_rfc3339_seconds(obtained.cert.not_after), next = %humantime::format_duration(next), "certificate installed");
                (
                    RenewEvent::Renewed {
                        not_after: obtained.cert.not_after,
                        next,
                    },
                    next,
                )
            }
            Err(e) => {
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                tracing::warn!(error = %format!("{e:#}"), retry = ?wait, "certificate request failed");
                (
                    RenewEvent::Failed {
                        error: format!("{e:#}"),
                        retry: wait,
                    },
                    wait,
                )
            }
        };
        if let Some(tx) = &events {
            let _ = tx.send(event).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    fn obtained(lifetime: Duration, tag: &str) -> Obtained {
        let now = SystemTime::now();
        Obtained {
            spiffe_id: "spiffe://mesh.local/cluster/c1".into(),
            cert: IssuedCertificate {
                chain_pem: format!("chain {tag}\n"),
                key_pem: format!("key {tag}\n"),
                not_before: now,
                not_after: now + lifetime,
            },
            trust_bundle_pem: format!("bundle {tag}\n"),
        }
    }

    #[test]
    fn a_csr_server_is_tls_with_a_bundle_and_plaintext_without() {
        let ca = || Some(PathBuf::from("bundle.pem"));
        let s = CsrServer::new("https://hub:19003/", ca(), "td").unwrap();
        assert_eq!((s.addr.as_str(), s.ca.is_some()), ("hub:19003", true));
        assert_eq!(s.url(), "https://hub:19003");
        let s = CsrServer::new("[::1]:19003", ca(), "td").unwrap();
        assert_eq!(
            (s.addr.as_str(), s.url()),
            ("[::1]:19003", "https://[::1]:19003".into())
        );
        let s = CsrServer::new("http://127.0.0.1:19003", None, "td").unwrap();
        assert_eq!(s.url(), "http://127.0.0.1:19003");
        let err = CsrServer::new("https://hub:19003", None, "td")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ca"), "{err}");
        let err = CsrServer::new("http://hub:19003", ca(), "td")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plaintext") && err.contains("bundle.pem"),
            "{err}"
        );
        let err = CsrServer::new("ftp://hub", None, "td")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp://"), "{err}");
    }

    #[test]
    fn renewal_is_at_half_life_minus_up_to_a_tenth() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(renew_delay(t0, t0 + day, t0, 0.0), day / 2);
        assert_eq!(renew_delay(t0, t0 + day, t0, 1.0), day * 2 / 5);
        // Measured from now: an hour into the lifetime, an hour less to wait.
        let h = Duration::from_secs(3600);
        assert_eq!(renew_delay(t0, t0 + day, t0 + h, 0.0), day / 2 - h);
        // Past half-life: at once.
        assert_eq!(renew_delay(t0, t0 + day, t0 + day, 0.0), Duration::ZERO);
    }

    /// With paused time: the second request comes at 40-50% of the lifetime after
    /// the first; a failure is retried after 1 s, then 2 s; success resets that.
    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_retries_failures_with_backoff() {
        let lifetime = Duration::from_secs(1000);
        let calls = Arc::new(AtomicU32::new(0));
        let fetch = {
            let calls = calls.clone();
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    // The 2nd and 3rd requests fail.
                    if n == 1 || n == 2 {
                        anyhow::bail!("hub unreachable");
                    }
                    Ok(obtained(lifetime, &n.to_string()))
                }
            }
        };
        let (installed_tx, mut installed) = tokio::sync::mpsc::unbounded_channel();
        let install = move |o: &Obtained| {
            installed_tx
                .send((Instant::now(), o.cert.chain_pem.clone()))
                .unwrap();
            Ok(())
        };
        let (events_tx, mut events) = tokio::sync::mpsc::channel(16);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(keep_renewed(fetch, install, Some(events_tx), stop));

        let (t0, first) = installed.recv().await.unwrap();
        assert_eq!(first, "chain 0\n");
        assert!(
            matches!(events.recv().await.unwrap(), RenewEvent::Renewed { next, .. } if next >= lifetime * 2 / 5 && next <= lifetime / 2)
        );
        let e1 = events.recv().await.unwrap();
        let t_fail = Instant::now();
        let since = t_fail - t0;
        assert!(
            since >= lifetime * 2 / 5 && since <= lifetime / 2,
            "renewed after {since:?}"
        );
        assert_eq!(
            e1,
            RenewEvent::Failed {
                error: "hub unreachable".into(),
                retry: Duration::from_secs(1)
            }
        );
        assert_eq!(
            events.recv().await.unwrap(),
            RenewEvent::Failed {
                error: "hub unreachable".into(),
                retry: Duration::from_secs(2)
            }
        );
        let (t1, second) = installed.recv().await.unwrap();
        assert_eq!(second, "chain 3\n");
        assert_eq!(
            t1 - t_fail,
            Duration::from_secs(3),
            "retried after 1 s, then 2 s"
        );
        assert!(matches!(
            events.recv().await.unwrap(),
            RenewEvent::Renewed { .. }
        ));
        let _ = stop_tx.send(true);
        task.await.unwrap().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn files_are_swapped_whole_and_old_versions_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        write_atomically(&out, &obtained(Duration::from_secs(60), "a")).unwrap();
        let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap();
        assert_eq!(
            (read(CERT_FILE), read(KEY_FILE), read(CA_FILE)),
            ("chain a\n".into(), "key a\n".into(), "bundle a\n".into())
        );
        let first = std::fs::read_link(out.join(DATA_LINK)).unwrap();
        write_atomically(&out, &obtained(Duration::from_secs(60), "b")).unwrap();
        assert_eq!(
            (read(CERT_FILE), read(KEY_FILE), read(CA_FILE)),
            ("chain b\n".into(), "key b\n".into(), "bundle b\n".into())
        );
        assert!(!out.join(first).exists(), "the previous version is removed");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
        // Only the visible names and one version remain.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 5, "{names:?}");
    }
}

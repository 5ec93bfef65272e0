//! The one-command mesh's certificates: the hub's own certificate authority
//! ([`Ca`], its root generated into the mesh's store, so into `--state-dir`) issues
//! every process of the mesh its identity — each hub (`hub/<id>`), the router
//! (`router/<name>`), each agent (`cluster/<id>`), an operator for the admin APIs —
//! and a sidecar certificate per environment for the user's first proxies.
//!
//! Each identity's files are a directory `<dir>/<name>/` holding `cert.pem`, `key.pem`
//! and `ca.pem` (the trust bundle), replaced atomically the way a Kubernetes Secret
//! volume is ([`write_atomically`]): the processes' file watchers reload them. They are
//! renewed at half-life ([`MeshPki::keep_renewed`]), with the bundle of the moment (a
//! root rotation included).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use tracing::{info, warn};
use tributary_controlplane::identity::ca::{Ca, CaConfig, Signer};
use tributary_controlplane::identity::client::{
    CA_FILE, CERT_FILE, KEY_FILE, Obtained, renew_delay, write_atomically,
};
use tributary_controlplane::identity::tls::TlsFiles;
use tributary_controlplane::identity::{Identity, SpiffeId};
use tributary_store::SharedStore;

/// The mesh's certificate files and the CA that issues them.
#[derive(Debug)]
pub struct MeshPki {
    ca: Arc<Ca>,
    dir: PathBuf,
    /// Every identity issued so far, by file name, and when its certificate is valid.
    issued: Mutex<Vec<Issued>>,
    /// The directory when the mesh has no state dir (removed with the mesh).
    _temp: Option<tempfile::TempDir>,
}

#[derive(Debug, Clone)]
struct Issued {
    name: String,
    id: SpiffeId,
    /// When it was issued (the certificate itself starts a little earlier, for clocks
    /// behind): half-life is measured from here.
    issued_at: SystemTime,
    not_after: SystemTime,
}

/// The files of the identity named `name` under `dir`.
pub fn files_in(dir: &Path, name: &str) -> TlsFiles {
    let d = dir.join(name);
    TlsFiles {
        cert: d.join(CERT_FILE),
        key: d.join(KEY_FILE),
        ca: d.join(CA_FILE),
    }
}

impl MeshPki {
    /// Opens the CA in `store` (generating its root on first use) and writes
    /// certificates under `dir`, or under a temporary directory when `None`.
    pub async fn open(
        store: SharedStore,
        ca: CaConfig,
        dir: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let (dir, temp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                (d, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("tributary-mesh-pki-")
                    .tempdir()
                    .context("creating a directory for the mesh's certificates")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let ca = Ca::open(store, ca)
            .await
            .context("opening the mesh's certificate authority in its store")?;
        Ok(Self {
            ca,
            dir,
            issued: Mutex::new(Vec::new()),
            _temp: temp,
        })
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mesh's trust domain.
    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The SPIFFE id of `identity` in this mesh.
    pub fn id(&self, identity: Identity) -> SpiffeId {
        SpiffeId::new(self.trust_domain(), identity)
    }

    /// Issues `identity` a certificate into `<dir>/<name>/` and keeps it renewed.
    pub async fn issue(&self, name: &str, identity: Identity) -> anyhow::Result<TlsFiles> {
        let id = self.id(identity);
        let issued = self.write(name, &id).await?;
        let mut all = self.issued.lock().unwrap();
        all.retain(|i| i.name != name);
        all.push(issued);
        Ok(files_in(&self.dir, name))
    }

    async fn write(&self, name: &str, id: &SpiffeId) -> anyhow::Result<Issued> {
        let cert = self
            .ca
            .issue_with(id, &Signer::for_identity(&id.identity))
            .await
            .with_context(|| format!("issuing {id}"))?;
        let (issued_at, not_after) = (SystemTime::now(), cert.not_after);
        let obtained = Obtained {
            spiffe_id: id.to_string(),
            cert,
            trust_bundle_pem: self.ca.trust_file_pem_at(SystemTime::now()),
        };
        write_atomically(&self.dir.join(name), &obtained)
            .with_context(|| format!("writing the certificate of {id}"))?;
        Ok(Issued {
            name: name.to_string(),
            id: id.clone(),
            issued_at,
            not_after,
        })
    }

    /// Renews every certificate at half its lifetime, until `stop`. A renewal that
    /// fails is retried after a tenth of the lifetime (the previous files stay).
    pub async fn keep_renewed(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let due = {
                let all = self.issued.lock().unwrap();
                all.iter()
                    .map(|i| renew_delay(i.issued_at, i.not_after, SystemTime::now(), 0.0))
                    .min()
            };
            let Some(due) = due else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep(due) => {}
                () = &mut stop => return,
            }
            // A root rotated by an operator: issue under the active one, with its bundle.
            if let Err(e) = self.ca.reload().await {
                warn!(error = %e, "reloading the CA before renewing the mesh's certificates");
            }
            let now = SystemTime::now();
            let due: Vec<Issued> = self
                .issued
                .lock()
                .unwrap()
                .iter()
                .filter(|i| renew_delay(i.issued_at, i.not_after, now, 0.0).is_zero())
                .cloned()
                .collect();
            for old in due {
                match self.write(&old.name, &old.id).await {
                    Ok(new) => {
                        info!(id = %new.id, "renewed the mesh certificate");
                        let mut all = self.issued.lock().unwrap();
                        if let Some(i) = all.iter_mut().find(|i| i.name == new.name) {
                            *i = new;
                        }
                    }
                    Err(e) => {
                        warn!(id = %old.id, error = %format!("{e:#}"), "renewing a mesh certificate failed; retrying");
                        let lifetime = old
                            .not_after
                            .duration_since(old.issued_at)
                            .unwrap_or_default();
                        let mut all = self.issued.lock().unwrap();
                        if let Some(i) = all.iter_mut().find(|i| i.name == old.name) {
                            // Due again a tenth of the lifetime from now.
                            i.issued_at = now - lifetime / 2 + lifetime / 10;
                            i.not_after = i.issued_at + lifetime;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio::sync::watch;
    use tributary_controlplane::identity::tls::{self, ClientTls};
    use tributary_store::embedded::{Embedded, EmbeddedConfig};

    use super::*;

    fn not_after(files: &TlsFiles) -> SystemTime {
        let der = CertificateDer::from_pem_file(&files.cert).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64)
    }

    /// A certificate is replaced at half its lifetime, under the same identity, and a
    /// process watching its files (the hub's reloading TLS) picks the new one up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificates_are_renewed_at_half_life_and_reloaded() {
        let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        let mut ca = CaConfig::new(tls::DEFAULT_TRUST_DOMAIN);
        ca.cert_lifetime = Duration::from_secs(4);
        let pki = Arc::new(MeshPki::open(store, ca, None).await.unwrap());
        let files = pki
            .issue(
                "router",
                Identity::Router {
                    name: "mesh".into(),
                },
            )
            .await
            .unwrap();
        let first = not_after(&files);
        let client = ClientTls::load(&files, tls::DEFAULT_TRUST_DOMAIN, tls::ALPN_GRPC).unwrap();
        let mut generation = client.config.generation();
        let (stop_tx, mut stop) = watch::channel(false);
        let renewing = tokio::spawn(pki.clone().keep_renewed(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        // Renewed after ~2 s (half of 4 s), long before the old one expires: the
        // watcher reloads on each step of the directory swap, so wait for a reload
        // that read the new certificate.
        let second = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                generation.changed().await.unwrap();
                let now = not_after(&files);
                if now != first {
                    break now;
                }
            }
        })
        .await
        .expect("renewed files were reloaded within 10 s");
        assert!(second > first, "{second:?} is not later than {first:?}");
        assert!(SystemTime::now() < first, "renewed only after expiry");
        let id = tls::spiffe_id_of(
            &CertificateDer::from_pem_file(&files.cert).unwrap(),
            tls::DEFAULT_TRUST_DOMAIN,
        )
        .unwrap();
        assert_eq!(
            id.identity,
            Identity::Router {
                name: "mesh".into()
            }
        );
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), renewing)
            .await
            .expect("the renewal stops")
            .unwrap();
    }
}

//! The proxy's own mutual TLS to the hub and the router (bootstrap `tls:`), with the
//! real `tributary-proxy` binary (its log is what an operator reads) against hubs that
//! serve only mTLS (`--tls-*`, as `controlplane/tests` start them):
//!
//! - it gets its config from such a hub directly, on 127.0.0.1 and on [::1], and
//!   through the shard router (the one-command mesh's, its certificates from the
//!   mesh's CA), and routes a request with it;
//! - a hub of another CA, a server whose certificate is not a hub's or a router's, and
//!   a server other than `server_id` are refused: the reason is in the log and
//!   `/ready` stays false;
//! - a missing file, and a key that does not match its certificate, are named in the
//!   log (`/ready` false);
//! - a certificate renewed on disk is used on the next connection without a restart:
//!   an expired one is refused by the hub, its renewal makes the proxy ready.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tributary_controlplane::identity::Identity;
use tributary_controlplane::identity::testing::{TestCa, Validity, write_files};
use tributary_controlplane::identity::tls::{self, TlsFiles, Transport};
use tributary_shard_router::app::RouterConfig;
use tributary_shard_router::mesh::{Mesh, MeshConfig};

const TD: &str = tls::DEFAULT_TRUST_DOMAIN;

fn sidecar() -> Identity {
    Identity::Workload {
        env: "prod".into(),
        namespace: "default".into(),
        service_account: "default".into(),
    }
}

/// A free TCP port on `ip` (for the admin endpoint of a child process).
fn free_port(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A `tributary-proxy` child process and everything it logs.
struct ProxyProcess {
    child: Child,
    log: Arc<Mutex<String>>,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar bootstrap of prod / az1 to `xds` (`https://…` with `tls`), listeners on
/// 127.0.0.1 at ephemeral ports.
fn bootstrap_text(xds: &str, admin: SocketAddr, tls: &str) -> String {
    format!(
        "node:\n  id: tls-proxy\n  environment: prod\n  zone: az1\n  region: r1\nxds:\n  address: {xds}\nadmin:\n  address: \"{admin}\"\nlisteners:\n  outbound_address: 127.0.0.1\n  port_override: 0\n{tls}"
    )
}

fn tls_block(files: &TlsFiles, extra: &str) -> String {
    format!(
        "tls:\n  cert: {}\n  key: {}\n  ca: {}\n{extra}",
        files.cert.display(),
        files.key.display(),
        files.ca.display()
    )
}

impl ProxyProcess {
    fn start(xds: &str, tls: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let admin = free_port("127.0.0.1");
        let path = dir.path().join("bootstrap.yaml");
        std::fs::write(&path, bootstrap_text(xds, admin, tls)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tributary-proxy"))
            .arg("--bootstrap")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tributary-proxy starts");
        let log = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for reader in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        ProxyProcess {
            child,
            log,
            admin,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log has a line containing every one of `needles`.
    async fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {needles:?}; the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET `path` on the admin endpoint: (status, body); `None` while it does not answer.
    async fn admin(&self, path: &str) -> Option<(u16, String)> {
        use http_body_util::{BodyExt, Empty};
        let req = hyper::Request::get(format!("http://{}{path}", self.admin))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = client().request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn ready_status(&self) -> u16 {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some((status, _)) = self.admin("/ready").await {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the admin endpoint does not answer; the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while self.ready_status().await != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready; the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where listener `name` is bound (from `/listeners`), once it is.
    async fn listener(&self, name: &str) -> SocketAddr {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some((200, body)) = self.admin("/listeners").await {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                if let Some(a) = v[name].as_str() {
                    return a.parse().unwrap();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "listener {name} is not bound; the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The config: prod in zone az1, service `back` on port 8080 with `backend`'s endpoint.
fn config(backend: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        (
            "env.yaml",
            "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1]}\n".into(),
        ),
        ("services.yaml", service("back", 8080, "HTTP")),
        (
            "endpoints.yaml",
            endpoints("back", &[(backend, "v1", "az1")]),
        ),
    ]
}

/// A hub serving only mTLS on `host`, with a certificate of `identity` from `ca`.
async fn mtls_hub(
    ca: &TestCa,
    dir: &Path,
    host: &str,
    backend: SocketAddr,
    identity: Identity,
) -> TestHub {
    let files = ca.write(dir, "hub", identity);
    let host: std::net::IpAddr = host.parse().unwrap();
    TestHub::start_with(&config(backend), move |cfg| {
        cfg.xds_addr = SocketAddr::new(host, 0);
        cfg.admin_addr = SocketAddr::new(host, 0);
        cfg.transport = Transport::Mtls(files);
    })
    .await
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// The proxy routes a request for `back` through its outbound listener to the backend.
async fn routes_to(p: &ProxyProcess, backend: &Backend) {
    let addr = p.listener("0.0.0.0_8080").await;
    let (status, who) = get(&client(), addr, "back.prod", "/", &[]).await;
    assert_eq!((status, who.as_str()), (200, backend.name));
}

async fn direct(host: &str) {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("back-v1", Mode::Ok).await;
    let hub = mtls_hub(
        &ca,
        dir.path(),
        host,
        backend.addr,
        Identity::Hub {
            replica: "hub-1".into(),
        },
    )
    .await;
    // The hub refuses plaintext: a proxy without `tls` never becomes ready.
    let plain = ProxyProcess::start(&format!("http://{}", hub.hub.xds_addr), "");
    let me = ca.write(dir.path(), "proxy", sidecar());
    let p = ProxyProcess::start(&https(hub.hub.xds_addr), &tls_block(&me, ""));
    p.wait_ready().await;
    routes_to(&p, &backend).await;
    // The hub sees it as the sidecar its certificate says.
    let sync = hub.sync_status();
    assert!(sync.to_string().contains("tls-proxy"), "{sync}");
    plain.wait_log(&["xDS stream failed"]).await;
    assert_eq!(plain.ready_status().await, 503);
}

#[tokio::test]
async fn the_proxy_gets_its_config_from_an_mtls_only_hub_on_ipv4() {
    direct("127.0.0.1").await;
}

#[tokio::test]
async fn the_proxy_gets_its_config_from_an_mtls_only_hub_on_ipv6() {
    direct("::1").await;
}

/// Through the one-command mesh's router (mTLS on both of its hops, certificates from
/// the mesh's CA), on 127.0.0.1 and on [::1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_gets_its_config_through_the_router_over_mtls() {
    let backend = Backend::start("back-v1", Mode::Ok).await;
    let cfg_dir = tempfile::tempdir().unwrap();
    for (name, text) in config(backend.addr) {
        std::fs::write(cfg_dir.path().join(name), text).unwrap();
    }
    let mut router = RouterConfig::local();
    router.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let mesh = Mesh::start(MeshConfig {
        config: vec![cfg_dir.path().to_path_buf()],
        state_dir: None,
        hubs: 1,
        replicas_per_shard: 1,
        lease_ttl: Duration::from_secs(2),
        hub_host: "127.0.0.1".parse().unwrap(),
        router,
        agents: vec![],
        insecure: false,
        proxies: None,
    })
    .await
    .expect("the mesh starts");
    let files = mesh
        .files("proxy-prod")
        .expect("the mesh issued a prod sidecar certificate");
    for addr in mesh.router.xds_addrs.clone() {
        // The router's own id, exactly.
        let p = ProxyProcess::start(
            &https(addr),
            &tls_block(&files, &format!("  server_id: spiffe://{TD}/router/mesh\n")),
        );
        p.wait_ready().await;
        routes_to(&p, &backend).await;
    }
    mesh.shutdown().await.unwrap();
}

/// Starts a proxy against `hub` with `tls`, and waits for the error naming `needles`
/// in its log; `/ready` is false then.
async fn refused(xds: &str, tls: &str, needles: &[&str]) -> String {
    let p = ProxyProcess::start(xds, tls);
    let line = p.wait_log(needles).await;
    assert_eq!(p.ready_status().await, 503, "{}", p.log());
    assert_eq!(
        p.admin("/stats")
            .await
            .unwrap()
            .1
            .lines()
            .find(|l| l.starts_with("tributary_proxy_ready "))
            .unwrap(),
        "tributary_proxy_ready 0"
    );
    line
}

#[tokio::test]
async fn a_hub_of_another_ca_and_a_server_that_is_no_hub_are_refused() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("back-v1", Mode::Ok).await;
    let hub = mtls_hub(
        &ca,
        dir.path(),
        "127.0.0.1",
        backend.addr,
        Identity::Hub {
            replica: "hub-1".into(),
        },
    )
    .await;
    let xds = https(hub.hub.xds_addr);
    let me = ca.write(dir.path(), "proxy", sidecar());

    // Our bundle is another CA's: the hub's chain does not verify.
    let other = TestCa::new(TD);
    let wrong_ca = TlsFiles {
        ca: other.write(dir.path(), "other", sidecar()).ca,
        ..me.clone()
    };
    // (Both roots have one name: rustls finds the issuer and its signature fails.)
    refused(
        &xds,
        &tls_block(&wrong_ca, ""),
        &[
            "xDS stream failed",
            "invalid peer certificate",
            &format!(
                "the server's chain was checked against tls.ca {}",
                wrong_ca.ca.display()
            ),
        ],
    )
    .await;

    // A server that is not the one named.
    refused(
        &xds,
        &tls_block(&me, &format!("  server_id: spiffe://{TD}/router/front\n")),
        &[&format!(
            "names spiffe://{TD}/hub/hub-1; expected spiffe://{TD}/router/front (tls.server_id)"
        )],
    )
    .await;

    // A server of our CA whose certificate is a workload's, not a hub's.
    let impostor = mtls_hub(&ca, dir.path(), "127.0.0.1", backend.addr, sidecar()).await;
    refused(
        &https(impostor.hub.xds_addr),
        &tls_block(&me, ""),
        &[&format!(
            "the xDS server's certificate names spiffe://{TD}/env/prod/ns/default/sa/default; expected a hub or router of trust domain {TD}"
        )],
    )
    .await;
}

#[tokio::test]
async fn missing_files_and_a_key_of_another_certificate_are_named_in_the_log() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let xds = https(free_port("127.0.0.1"));
    let me = ca.write(dir.path(), "proxy", sidecar());
    let missing = TlsFiles {
        cert: dir.path().join("nowhere.crt"),
        ..me.clone()
    };
    refused(
        &xds,
        &tls_block(&missing, ""),
        &[&format!(
            "tls.cert {}: cannot read it",
            missing.cert.display()
        )],
    )
    .await;
    let other = ca.write(dir.path(), "other", sidecar());
    let mismatched = TlsFiles {
        key: other.key.clone(),
        ..me.clone()
    };
    refused(
        &xds,
        &tls_block(&mismatched, ""),
        &[&format!(
            "tls.key {} does not match the certificate in tls.cert {}",
            other.key.display(),
            me.cert.display()
        )],
    )
    .await;
}

/// Replaces `files` the way a renewal does: new content, renamed into place.
fn renew(files: &TlsFiles, cert: &str, key: &str) {
    for (path, text) in [(&files.key, key), (&files.cert, cert)] {
        let tmp = PathBuf::from(format!("{}.new", path.display()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

#[tokio::test]
async fn a_certificate_renewed_on_disk_is_used_on_the_next_connection() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("back-v1", Mode::Ok).await;
    let hub = mtls_hub(
        &ca,
        dir.path(),
        "127.0.0.1",
        backend.addr,
        Identity::Hub {
            replica: "hub-1".into(),
        },
    )
    .await;
    // An expired certificate: the hub refuses it.
    let (cert, key) = ca.leaf(sidecar(), Validity::Expired);
    let me = write_files(dir.path(), "proxy", &cert, &key, ca.bundle_pem());
    let p = ProxyProcess::start(&https(hub.hub.xds_addr), &tls_block(&me, ""));
    p.wait_log(&["xDS stream failed"]).await;
    assert_eq!(p.ready_status().await, 503);
    // Renewed on disk: the next connection presents it; no restart.
    let (cert, key) = ca.leaf(sidecar(), Validity::Current);
    renew(&me, &cert, &key);
    p.wait_ready().await;
    routes_to(&p, &backend).await;
}

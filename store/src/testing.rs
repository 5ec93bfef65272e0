//! Test support: a real etcd process on free loopback ports with its own data dir,
//! started and stopped by pid (used by this crate's conformance suite and by the
//! hub's store tests). Needs the `etcd` binary (Debian `etcd-server`, installed by
//! `scripts/install-peers`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Store;
use crate::etcd::{Etcd, EtcdConfig};

/// A free port on `ip` (bound and released: etcd cannot bind port 0 and say which).
pub fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("binding a free port");
    l.local_addr().map(|a: SocketAddr| a.port()).unwrap()
}

/// An etcd server for tests.
#[derive(Debug)]
pub struct EtcdServer {
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on `ip` (e.g. `127.0.0.1`, `::1`) with its data under `dir`, and
    /// waits until it answers.
    pub async fn start(dir: &Path, ip: &str) -> EtcdServer {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let client_url = format!("http://{host}:{}", free_port(ip));
        let peer_url = format!("http://{host}:{}", free_port(ip));
        let mut s = EtcdServer {
            client_url,
            peer_url,
            data_dir: dir.join("etcd-data"),
            log: dir.join("etcd.log"),
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the etcd log");
        let child = Command::new("etcd")
            .args([
                "--name",
                "test",
                "--data-dir",
                &self.data_dir.display().to_string(),
                "--listen-client-urls",
                &self.client_url,
                "--advertise-client-urls",
                &self.client_url,
                "--listen-peer-urls",
                &self.peer_url,
                "--initial-advertise-peer-urls",
                &self.peer_url,
                "--initial-cluster",
                &format!("test={}", self.peer_url),
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd (install it with scripts/install-peers)");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let store = Etcd::connect(&EtcdConfig {
            request_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            ..EtcdConfig::new(vec![self.client_url.clone()])
        })
        .await
        .expect("etcd client");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if store.get("/probe").await.is_ok() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!(
                    "etcd at {} did not become ready in 30 s; log:\n{log}",
                    self.client_url
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process (SIGKILL, by pid) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn config(&self) -> EtcdConfig {
        EtcdConfig::new(vec![self.client_url.clone()])
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

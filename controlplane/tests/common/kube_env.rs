//! A real kube-apiserver and etcd on loopback for tests: `tests/kube/kubeenv.py serve`
//! starts both (envtest style) and prints where they are. Shared by the test crates
//! that include it with `#[path = "common/kube_env.rs"] mod kube_env;`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// etcd + kube-apiserver, stopped (by the helper, on stdin EOF) when dropped.
pub struct KubeEnv {
    child: Child,
    pub kubeconfig: PathBuf,
}

impl KubeEnv {
    pub fn start() -> KubeEnv {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = Command::new("python3")
            .arg(repo.join("tests/kube/kubeenv.py"))
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect(
                "python3 runs tests/kube/kubeenv.py (install the peers: scripts/install-peers)",
            );
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("kubeenv.py did not start a kube-apiserver ({e}): {line:?}; see scripts/install-peers, which builds it")
        });
        KubeEnv {
            kubeconfig: PathBuf::from(info["kubeconfig"].as_str().unwrap()),
            child,
        }
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

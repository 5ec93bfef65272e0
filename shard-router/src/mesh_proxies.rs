//! The one-command mesh's data plane: `tributary-proxy` processes for the example
//! config, connected through the mesh's router — mutual TLS with certificates from the
//! mesh's CA, or plaintext under `--insecure`.
//!
//! - a **gateway** for every `Gateway` of the config (`gateway-<env>-<name>`): its
//!   listeners are bound where the config says (the example's `edge` of prod on
//!   127.0.0.1:18080); its certificate is the gateway's identity
//!   (`env/<env>/gateway/<name>`);
//! - a **sidecar** per environment (`sidecar-<env>`), with the environment's sidecar
//!   certificate (`proxy-<env>`): its outbound listeners (`0.0.0.0_<port>`) are bound
//!   on a loopback address of its own, `127.0.0.<n>` (the first environment's on
//!   127.0.0.1), at the service's port.
//!
//! Each proxy's bootstrap (`<name>.yaml`) and log (`<name>.log`) are in the mesh's
//! `proxies/` directory (under `--state-dir`, or a temporary one). Start-up waits until
//! every proxy's `/ready` answers 200. Every child is killed by its pid when the mesh
//! stops, or when [`Proxies`] is dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tributary_controlplane::identity::Identity;
use tributary_controlplane::identity::tls::TlsFiles;
use tributary_controlplane::model;

use crate::mesh::PROXY_NAMESPACE;
use crate::pki::MeshPki;

/// How long start-up waits for every proxy to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the mesh needs to run proxies.
#[derive(Debug, Clone)]
pub struct ProxiesConfig {
    /// The `tributary-proxy` binary (`--proxy-bin`; by default next to `tributary-mesh`).
    pub binary: PathBuf,
}

/// What one proxy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Gateway `name`; its listeners `(name, address)` as the config places them.
    Gateway {
        name: String,
        listeners: Vec<(String, SocketAddr)>,
    },
    /// A sidecar whose outbound listeners are bound on `outbound`.
    Sidecar { outbound: IpAddr },
}

/// One proxy the mesh runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySpec {
    /// Its node id, and the name of its files.
    pub name: String,
    pub environment: String,
    /// The environment's first zone: which shard's replicas serve it.
    pub zone: String,
    pub role: Role,
    /// The HTTP hosts it routes (each service's first host), for the curl commands.
    pub hosts: Vec<(String, u16)>,
}

impl ProxySpec {
    /// The SPIFFE identity of its certificate.
    pub fn identity(&self) -> Identity {
        match &self.role {
            Role::Gateway { name, .. } => Identity::Gateway {
                env: self.environment.clone(),
                name: name.clone(),
            },
            Role::Sidecar { .. } => Identity::Workload {
                env: self.environment.clone(),
                namespace: PROXY_NAMESPACE.into(),
                service_account: PROXY_NAMESPACE.into(),
            },
        }
    }

    /// The mesh's certificate directory of its identity.
    pub fn pki_name(&self) -> String {
        match &self.role {
            Role::Gateway { name, .. } => format!("gateway-{}-{name}", self.environment),
            Role::Sidecar { .. } => format!("proxy-{}", self.environment),
        }
    }
}

/// The proxies for `mesh`: a gateway per `Gateway`, a sidecar per environment.
pub fn plan(mesh: &model::Mesh) -> Vec<ProxySpec> {
    let mut out = Vec::new();
    for (i, (env_name, env)) in mesh.environments.iter().enumerate() {
        let zone = env.zones.first().cloned().unwrap_or_default();
        let http_hosts = |port_ok: &dyn Fn(&str) -> bool| -> Vec<(String, u16)> {
            env.services
                .values()
                .filter(|s| port_ok(s.canonical_host()))
                .flat_map(|s| {
                    s.ports
                        .iter()
                        .filter(|p| p.protocol.is_http() && !p.protocol.is_http2())
                        .map(|p| (s.canonical_host().to_string(), p.port))
                })
                .collect()
        };
        for gw in env.gateways.values() {
            let listeners: Vec<(String, SocketAddr)> = gw
                .listeners
                .iter()
                .filter(|l| l.tls.is_none())
                .map(|l| (l.name.clone(), SocketAddr::new(l.address, l.port)))
                .collect();
            let routed = |h: &str| gw.listeners.iter().any(|l| l.routes_host(h));
            out.push(ProxySpec {
                name: format!("gateway-{env_name}-{}", gw.name),
                environment: env_name.clone(),
                zone: zone.clone(),
                role: Role::Gateway {
                    name: gw.name.clone(),
                    listeners,
                },
                hosts: http_hosts(&routed),
            });
        }
        // 127.0.0.1, 127.0.0.2, …: each sidecar's outbound ports on an address of its own.
        let n = u8::try_from(i + 1).unwrap_or(u8::MAX);
        out.push(ProxySpec {
            name: format!("sidecar-{env_name}"),
            environment: env_name.clone(),
            zone,
            role: Role::Sidecar {
                outbound: IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)),
            },
            hosts: http_hosts(&|_: &str| true),
        });
    }
    out
}

/// YAML of one string (a JSON string is a YAML string).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The bootstrap of `spec`: xDS through the router at `xds`, its admin on `admin`, and
/// mutual TLS with `tls` (plaintext without).
pub fn bootstrap(
    spec: &ProxySpec,
    xds: SocketAddr,
    admin: SocketAddr,
    tls: Option<&TlsFiles>,
) -> String {
    let mut out = format!(
        "# Written by tributary-mesh for its {} (docs/proxy.md).\nnode:\n  id: {}\n  environment: {}\n  zone: {}\n",
        match spec.role {
            Role::Gateway { .. } => "gateway",
            Role::Sidecar { .. } => "sidecar",
        },
        quoted(&spec.name),
        quoted(&spec.environment),
        quoted(&spec.zone),
    );
    if let Role::Gateway { name, .. } = &spec.role {
        out.push_str(&format!(
            "  metadata: {{\"tributary.io/gateway\": {}}}\n",
            quoted(name)
        ));
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    out.push_str(&format!(
        "xds:\n  address: {}\nadmin:\n  address: {}\n",
        quoted(&format!("{scheme}://{xds}")),
        quoted(&admin.to_string())
    ));
    if let Role::Sidecar { outbound } = &spec.role {
        out.push_str(&format!(
            "listeners:\n  outbound_address: {}\n",
            quoted(&outbound.to_string())
        ));
    }
    if let Some(f) = tls {
        out.push_str(&format!(
            "tls:\n  cert: {}\n  key: {}\n  ca: {}\n",
            quoted(&f.cert.display().to_string()),
            quoted(&f.key.display().to_string()),
            quoted(&f.ca.display().to_string())
        ));
    }
    out
}

/// A child process, killed by its pid when dropped.
#[derive(Debug)]
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One running proxy.
#[derive(Debug)]
pub struct RunningProxy {
    pub spec: ProxySpec,
    pub admin: SocketAddr,
    pub bootstrap: PathBuf,
    pub log: PathBuf,
    child: ChildGuard,
}

impl RunningProxy {
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// The mesh's running proxies.
#[derive(Debug)]
pub struct Proxies {
    pub running: Vec<RunningProxy>,
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// A free port on 127.0.0.1 for a proxy's admin endpoint.
fn free_admin_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port for a proxy's admin")?;
    Ok(l.local_addr()?)
}

/// The last lines of `log`, for an error.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

impl Proxies {
    /// Writes each proxy's bootstrap into `dir` (a temporary directory when `None`),
    /// issues gateways their certificates (with `pki`), starts the processes and waits
    /// until all are ready.
    pub async fn start(
        cfg: &ProxiesConfig,
        specs: Vec<ProxySpec>,
        xds: SocketAddr,
        pki: Option<&MeshPki>,
        dir: Option<PathBuf>,
    ) -> anyhow::Result<Proxies> {
        if !cfg.binary.is_file() {
            anyhow::bail!(
                "tributary-proxy not found at {} (the mesh looks next to its own binary): build it with `cargo build -p tributary-proxy`, pass --proxy-bin PATH, or run with --no-proxies",
                cfg.binary.display()
            );
        }
        let (dir, temp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                (d, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("tributary-mesh-proxies-")
                    .tempdir()
                    .context("creating a directory for the proxies' bootstraps and logs")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut running = Vec::new();
        for spec in specs {
            let tls = match pki {
                None => None,
                Some(pki) => Some(pki.issue(&spec.pki_name(), spec.identity()).await?),
            };
            let admin = free_admin_port()?;
            let bootstrap_path = dir.join(format!("{}.yaml", spec.name));
            std::fs::write(&bootstrap_path, bootstrap(&spec, xds, admin, tls.as_ref()))
                .with_context(|| format!("writing {}", bootstrap_path.display()))?;
            let log = dir.join(format!("{}.log", spec.name));
            let out = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let err = out.try_clone()?;
            let child = Command::new(&cfg.binary)
                .arg("--bootstrap")
                .arg(&bootstrap_path)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .with_context(|| format!("starting {} for {}", cfg.binary.display(), spec.name))?;
            running.push(RunningProxy {
                spec,
                admin,
                bootstrap: bootstrap_path,
                log,
                child: ChildGuard(child),
            });
        }
        let mut proxies = Proxies {
            running,
            dir,
            _temp: temp,
        };
        proxies.wait_ready(READY_TIMEOUT).await?;
        Ok(proxies)
    }

    /// Waits until every proxy's `/ready` is 200; an error names the first that exited
    /// or is not ready by `timeout`, with the end of its log.
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for p in &mut self.running {
            loop {
                if let Some(status) = p.child.0.try_wait()? {
                    anyhow::bail!(
                        "{} ({}) exited with {status}; its log {}:\n{}",
                        p.spec.name,
                        p.bootstrap.display(),
                        p.log.display(),
                        tail(&p.log)
                    );
                }
                let ready = tokio::time::timeout(
                    Duration::from_secs(2),
                    tributary_controlplane::http_client::request(
                        &p.admin.to_string(),
                        "GET",
                        "/ready",
                        b"",
                    ),
                )
                .await
                .is_ok_and(|r| r.is_ok_and(|(status, _)| status == 200));
                if ready {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "{} is not ready after {timeout:?} (admin http://{}/ready); its log {}:\n{}",
                        p.spec.name,
                        p.admin,
                        p.log.display(),
                        tail(&p.log)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Kills every proxy by its pid and reaps it.
    pub fn stop(self) {
        drop(self);
    }

    /// The `curl` commands that reach the example backends through the proxies.
    pub fn curls(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.running {
            let addrs: Vec<(String, SocketAddr, Option<u16>)> = match &p.spec.role {
                Role::Gateway { listeners, .. } => listeners
                    .iter()
                    .map(|(name, a)| (format!("listener {name}"), *a, None))
                    .collect(),
                Role::Sidecar { outbound } => p
                    .spec
                    .hosts
                    .iter()
                    .map(|(_, port)| {
                        (
                            format!("outbound {port}"),
                            SocketAddr::new(*outbound, *port),
                            Some(*port),
                        )
                    })
                    .collect(),
            };
            for (what, addr, only_port) in addrs {
                for (host, port) in &p.spec.hosts {
                    if only_port.is_some_and(|o| o != *port) {
                        continue;
                    }
                    out.push(format!(
                        "curl -s -H 'Host: {host}' http://{addr}/    # {} {what}",
                        p.spec.name
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled example: a gateway per `Gateway`, a sidecar per environment on an
    /// outbound address of its own, each with the identity its certificate carries.
    #[test]
    fn the_examples_proxies_and_their_bootstraps() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        let (_, mesh) = tributary_controlplane::config::watch::load(&[dir]).unwrap();
        let specs = plan(&mesh);
        let got: Vec<(&str, &str, Identity)> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.zone.as_str(), s.identity()))
            .collect();
        let workload = |env: &str| Identity::Workload {
            env: env.into(),
            namespace: "default".into(),
            service_account: "default".into(),
        };
        let gateway = |env: &str| Identity::Gateway {
            env: env.into(),
            name: "edge".into(),
        };
        assert_eq!(
            got,
            [
                ("gateway-prod-edge", "az1", gateway("prod")),
                ("sidecar-prod", "az1", workload("prod")),
                ("gateway-staging-edge", "az1", gateway("staging")),
                ("sidecar-staging", "az1", workload("staging")),
            ]
        );
        assert_eq!(
            specs[3].role,
            Role::Sidecar {
                outbound: "127.0.0.2".parse().unwrap()
            }
        );
        // HTTP/1.1 hosts only (not gRPC ratings).
        assert_eq!(specs[1].hosts, [("reviews.prod".to_string(), 9080)]);
        let files = TlsFiles {
            cert: "/p/cert.pem".into(),
            key: "/p/key.pem".into(),
            ca: "/p/ca.pem".into(),
        };
        let xds: SocketAddr = "127.0.0.1:18000".parse().unwrap();
        let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let b = bootstrap(&specs[0], xds, admin, Some(&files));
        for want in [
            "id: \"gateway-prod-edge\"",
            "\"tributary.io/gateway\": \"edge\"",
            "address: \"https://127.0.0.1:18000\"",
            "cert: \"/p/cert.pem\"",
        ] {
            assert!(b.contains(want), "{want} not in\n{b}");
        }
        let b = bootstrap(&specs[1], xds, admin, None);
        assert!(b.contains("address: \"http://127.0.0.1:18000\""), "{b}");
        assert!(b.contains("outbound_address: \"127.0.0.1\""), "{b}");
        assert!(!b.contains("tls:"), "{b}");
    }
}

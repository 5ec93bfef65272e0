//! The proxies under test and what they are given: nginx with a generated config,
//! Envoy and `tributary-proxy` with a bootstrap pointing at our hub (ADS, so their
//! listener, route, cluster and endpoint come from the hub as in production), and the
//! plain hyper proxy (`tributary-hyperproxy`). Each is started pinned to the proxy's
//! core with one worker, and stopped by its pid.
//!
//! The hub's file config ([`hub_config`]): one Service `bench` (host `bench.prod`) whose
//! endpoint is the backend, and a Gateway `bench` whose listener is where the proxy
//! listens, routing `bench.prod` only; for the memory figure, `clusters` more Services,
//! each with one endpoint (every one an Envoy cluster with its load assignment).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procs::{Proc, http};

/// The service every request names (its Host header) and its port in the hub config.
pub const HOST: &str = "bench.prod";
pub const SERVICE_PORT: u16 = 8080;
/// The gateway (its name in the node metadata of Envoy and ours).
pub const GATEWAY: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// No proxy: the generator straight to the backend (its ceiling and baseline).
    Direct,
    Nginx,
    Envoy,
    Hyper,
    Tributary,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Nginx,
        Kind::Envoy,
        Kind::Hyper,
        Kind::Tributary,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Envoy => "envoy",
            Kind::Hyper => "hyper",
            Kind::Tributary => "tributary-proxy",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s || (s == "tributary" && *k == Kind::Tributary))
            .with_context(|| {
                format!(
                    "--proxies: {s:?} is not a proxy; expected some of direct, nginx, envoy, hyper, tributary-proxy"
                )
            })
    }

    /// Gets its config from the hub over xDS (and so has a figure with 10,000 clusters).
    pub fn uses_xds(self) -> bool {
        matches!(self, Kind::Envoy | Kind::Tributary)
    }
}

/// Binaries and placement, shared by every start.
#[derive(Debug, Clone)]
pub struct Setup {
    pub dir: PathBuf,
    pub ip: IpAddr,
    /// `taskset -c` list for the proxy under test.
    pub cpu_proxy: Option<String>,
    /// `taskset -c` list of the generator, backend and hub.
    pub cpu_generator: Option<String>,
    pub backend: SocketAddr,
    pub nginx_bin: String,
    pub envoy_bin: String,
    pub hyper_bin: PathBuf,
    pub proxy_bin: Option<PathBuf>,
}

/// A proxy that is up: where to send requests, its process, its admin address.
pub struct Running {
    pub listen: SocketAddr,
    pub proc: Option<Proc>,
    pub admin: Option<String>,
    pub argv: Vec<String>,
}

impl Running {
    pub fn pid(&self) -> Option<i32> {
        self.proc
            .as_ref()
            .and_then(|p| p.pid)
            .and_then(|p| i32::try_from(p).ok())
    }
}

/// A free port on `ip` now (the hub config and nginx need the number up front).
pub fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0))
        .with_context(|| format!("binding {ip} port 0 to find a free port"))?;
    Ok(l.local_addr()?.port())
}

/// An address as it is written in YAML (IPv6 quoted).
fn yaml_ip(ip: IpAddr) -> String {
    format!("\"{ip}\"")
}

/// The hub's config: the bench service, its endpoint (the backend), the gateway
/// listening on `listen`, and `clusters` more services with one endpoint each.
pub fn hub_config(backend: SocketAddr, listen: SocketAddr, clusters: usize) -> String {
    let head = "apiVersion: tributary.io/v1alpha1\n";
    let locality = "locality: {region: r1, zone: z1, cluster: c1}";
    let mut out = format!(
        "{head}kind: Service\nmetadata: {{name: bench, environment: prod}}\nspec:\n  hosts: [{HOST}]\n  ports:\n  - {{name: http, port: {SERVICE_PORT}, protocol: HTTP}}\n---\n\
         {head}kind: Endpoints\nmetadata: {{name: bench, environment: prod}}\nspec:\n  endpoints:\n  - {{address: {}, port: {}, {locality}}}\n---\n\
         {head}kind: Gateway\nmetadata: {{name: {GATEWAY}, environment: prod}}\nspec:\n  listeners:\n  - {{name: http, address: {}, port: {}, protocol: HTTP, hosts: [{HOST}]}}\n",
        yaml_ip(backend.ip()),
        backend.port(),
        yaml_ip(listen.ip()),
        listen.port(),
    );
    for i in 0..clusters {
        // Endpoints that nothing connects to: a proxy holds them, it never dials them.
        let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1);
        out += &format!(
            "---\n{head}kind: Service\nmetadata: {{name: svc-{i}, environment: prod}}\nspec:\n  hosts: [svc-{i}.prod]\n  ports:\n  - {{name: http, port: {SERVICE_PORT}, protocol: HTTP}}\n\
             ---\n{head}kind: Endpoints\nmetadata: {{name: svc-{i}, environment: prod}}\nspec:\n  endpoints:\n  - {{address: {ip}, port: {SERVICE_PORT}, {locality}}}\n"
        );
    }
    out
}

/// The hub's command line: `config_dir`, ephemeral ports on `ip`, no sync wait, its
/// state in `state_dir`, `--insecure` when this hub has that flag (plaintext xDS on
/// loopback), and `extra`.
pub fn hub_argv(
    hub_bin: &Path,
    config_dir: &Path,
    state_dir: &Path,
    ip: IpAddr,
    insecure: bool,
    extra: &[String],
) -> Vec<String> {
    let any = SocketAddr::new(ip, 0).to_string();
    let mut argv: Vec<String> = vec![
        hub_bin.to_string_lossy().into_owned(),
        "hub".into(),
        "--config".into(),
        config_dir.to_string_lossy().into_owned(),
        "--xds-addr".into(),
        any.clone(),
        "--admin-addr".into(),
        any.clone(),
        "--csr-addr".into(),
        any,
        "--sync-wait".into(),
        "0s".into(),
        "--state-dir".into(),
        state_dir.to_string_lossy().into_owned(),
    ];
    if insecure {
        argv.push("--insecure".into());
    }
    argv.extend(extra.iter().cloned());
    argv
}

/// Whether `tributary hub --help` lists `--insecure` (the hub may require it for
/// plaintext; older hubs do not know it).
pub fn hub_has_insecure_flag(hub_bin: &Path) -> bool {
    std::process::Command::new(hub_bin)
        .args(["hub", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--insecure"))
        .unwrap_or(false)
}

/// `taskset -c CPUS` in front of `argv` when pinning is asked for.
pub fn pinned(cpus: Option<&str>, argv: Vec<String>) -> Vec<String> {
    match cpus {
        Some(c) => ["taskset".to_string(), "-c".into(), c.into()]
            .into_iter()
            .chain(argv)
            .collect(),
        None => argv,
    }
}

/// nginx: one worker, upstream keep-alive to the backend, no access log, keep-alive
/// requests unbounded on both sides (its default closes a connection every 1,000).
pub fn nginx_conf(dir: &Path, listen: SocketAddr, backend: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    upstream backend {{
        server {backend};
        keepalive 128;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen};
        server_name {HOST};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

/// Envoy's bootstrap: a gateway node of `prod` (zone z1), ADS over Delta to the hub.
pub fn envoy_bootstrap(id: &str, xds: SocketAddr, admin_ip: IpAddr) -> serde_json::Value {
    serde_json::json!({
        "node": {
            "id": id,
            "cluster": "bench",
            "locality": {"region": "r1", "zone": "z1"},
            "metadata": {"tributary.io/env": "prod", "tributary.io/gateway": GATEWAY},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds_cluster",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": xds.ip().to_string(), "port_value": xds.port()}}}},
            ]}]},
        }]},
        "admin": {"address": {"socket_address": {"address": admin_ip.to_string(), "port_value": 0}}},
    })
}

/// `tributary-proxy --bootstrap`: the same node (a gateway of `prod`), Delta ADS.
pub fn tributary_bootstrap(id: &str, xds: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "node: {{id: {id}, environment: prod, zone: z1, region: r1, cluster: bench, metadata: {{\"tributary.io/gateway\": {GATEWAY}}}}}\n\
         xds: {{address: \"http://{xds}\", protocol: delta}}\n\
         admin: {{address: \"{admin}\"}}\n\
         workers: 1\n"
    )
}

/// Starts `kind` listening on `listen` (nginx, Envoy and ours; the hyper proxy takes a
/// free port itself), with `xds` the hub for Envoy and ours. Returns once its process
/// runs (and for Envoy, once its admin answers); the caller waits until it serves.
pub async fn start(
    kind: Kind,
    setup: &Setup,
    listen: SocketAddr,
    xds: Option<SocketAddr>,
    tag: &str,
) -> anyhow::Result<Running> {
    let name = format!("{}-{tag}", kind.name());
    let dir = setup.dir.join(&name);
    std::fs::create_dir_all(&dir)?;
    let cpus = setup.cpu_proxy.as_deref();
    let need_xds = || xds.with_context(|| format!("{} needs the hub", kind.name()));
    match kind {
        Kind::Direct => Ok(Running {
            listen: setup.backend,
            proc: None,
            admin: None,
            argv: Vec::new(),
        }),
        Kind::Nginx => {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&dir, listen, setup.backend))?;
            let argv = pinned(
                cpus,
                vec![
                    setup.nginx_bin.clone(),
                    "-p".into(),
                    dir.display().to_string(),
                    "-c".into(),
                    conf.display().to_string(),
                    "-e".into(),
                    dir.join("nginx.error.log").display().to_string(),
                ],
            );
            let proc = Proc::spawn(&name, &argv, &dir)?;
            Ok(Running {
                listen,
                proc: Some(proc),
                admin: None,
                argv,
            })
        }
        Kind::Hyper => {
            let argv = pinned(
                cpus,
                vec![
                    setup.hyper_bin.display().to_string(),
                    "--listen".into(),
                    SocketAddr::new(setup.ip, 0).to_string(),
                    "--upstream".into(),
                    setup.backend.to_string(),
                ],
            );
            let proc = Proc::start(&name, &argv, &dir)?;
            let listen = proc.addr("addr")?.parse()?;
            Ok(Running {
                listen,
                proc: Some(proc),
                admin: None,
                argv,
            })
        }
        Kind::Envoy => {
            let boot = dir.join("bootstrap.json");
            std::fs::write(
                &boot,
                serde_json::to_vec_pretty(&envoy_bootstrap(&name, need_xds()?, setup.ip))?,
            )?;
            let admin_file = dir.join("admin.txt");
            let _ = std::fs::remove_file(&admin_file);
            let argv = pinned(
                cpus,
                vec![
                    setup.envoy_bin.clone(),
                    "-c".into(),
                    boot.display().to_string(),
                    "--concurrency".into(),
                    "1".into(),
                    "--disable-hot-restart".into(),
                    "--admin-address-path".into(),
                    admin_file.display().to_string(),
                    "-l".into(),
                    "warning".into(),
                ],
            );
            let mut proc = Proc::spawn(&name, &argv, &dir)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let admin = loop {
                if let Some(status) = proc.exited() {
                    bail!("envoy exited with {status}; log: {}", proc.log.display());
                }
                if let Ok(a) = std::fs::read_to_string(&admin_file)
                    && !a.trim().is_empty()
                {
                    break a.trim().to_string();
                }
                if Instant::now() > deadline {
                    bail!(
                        "envoy's admin not up within 60 s; log: {}",
                        proc.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            Ok(Running {
                listen,
                proc: Some(proc),
                admin: Some(admin),
                argv,
            })
        }
        Kind::Tributary => {
            let bin = setup
                .proxy_bin
                .as_ref()
                .context("tributary-proxy needs --proxy-bin")?;
            let admin = SocketAddr::new(setup.ip, free_port(setup.ip)?);
            let boot = dir.join("bootstrap.yaml");
            std::fs::write(&boot, tributary_bootstrap(&name, need_xds()?, admin))?;
            let argv = pinned(
                cpus,
                vec![
                    bin.display().to_string(),
                    "--bootstrap".into(),
                    boot.display().to_string(),
                ],
            );
            let proc = Proc::spawn(&name, &argv, &dir)?;
            Ok(Running {
                listen,
                proc: Some(proc),
                admin: Some(admin.to_string()),
                argv,
            })
        }
    }
}

/// The numbers of Envoy's `/stats` lines `name: value` for `names`.
pub fn stat_values(text: &str, names: &[&str]) -> Vec<Option<u64>> {
    names
        .iter()
        .map(|n| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == *n).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .collect()
}

/// Waits until the proxy holds `clusters` clusters from the hub with none still
/// warming (Envoy's `cluster_manager` stats), or its `/ready` is true (ours: ready
/// means its first complete config is ACKed).
pub async fn wait_synced(
    kind: Kind,
    running: &mut Running,
    clusters: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let admin = running
        .admin
        .clone()
        .context("a proxy fed over xDS has an admin address")?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(p) = running.proc.as_mut()
            && let Some(status) = p.exited()
        {
            bail!(
                "{} exited with {status}; log: {}",
                kind.name(),
                p.log.display()
            );
        }
        match kind {
            Kind::Envoy => {
                let (code, body) = http(
                    &admin,
                    "GET",
                    "/stats?filter=^cluster_manager%5C.(active|warming)_clusters$",
                    b"",
                )
                .await
                .unwrap_or((0, String::new()));
                if code == 200 {
                    let v = stat_values(
                        &body,
                        &[
                            "cluster_manager.active_clusters",
                            "cluster_manager.warming_clusters",
                        ],
                    );
                    if let [Some(active), Some(0)] = v[..]
                        && active as usize >= clusters
                    {
                        return Ok(());
                    }
                    last = body;
                }
            }
            _ => {
                let (code, body) = http(&admin, "GET", "/ready", b"")
                    .await
                    .unwrap_or((0, String::new()));
                if code == 200 {
                    return Ok(());
                }
                last = format!("{code} {body}");
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not sync {clusters} clusters within {timeout:?}; last answer: {last}",
                kind.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `envoy --version` / `nginx -v` in one line, for the report.
pub fn version(kind: Kind, setup: &Setup) -> Option<String> {
    let (bin, arg) = match kind {
        Kind::Nginx => (setup.nginx_bin.clone(), "-v"),
        Kind::Envoy => (setup.envoy_bin.clone(), "--version"),
        Kind::Tributary => (setup.proxy_bin.as_ref()?.display().to_string(), "--version"),
        Kind::Hyper => return Some("hyper 1 (tributary-hyperproxy)".into()),
        Kind::Direct => return None,
    };
    let out = std::process::Command::new(bin).arg(arg).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// A program on PATH (or a path that exists).
pub fn found(bin: &str) -> bool {
    let p = Path::new(bin);
    if p.components().count() > 1 {
        return p.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(bin).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_config_names_the_backend_the_listener_and_n_more_clusters() {
        let backend: SocketAddr = "[::1]:9000".parse().unwrap();
        let listen: SocketAddr = "[::1]:18080".parse().unwrap();
        let c = hub_config(backend, listen, 3);
        assert!(c.contains("address: \"::1\", port: 9000"), "{c}");
        assert!(c.contains("address: \"::1\", port: 18080, protocol: HTTP, hosts: [bench.prod]"));
        assert_eq!(c.matches("kind: Service").count(), 4);
        assert_eq!(c.matches("kind: Endpoints").count(), 4);
        assert!(c.contains("svc-2.prod") && !c.contains("svc-3.prod"));
        // The hub's own parser accepts it: 4 services in prod and the gateway.
        let mesh = tributary_controlplane::config::parse_files([("bench.yaml", c.as_str())])
            .unwrap_or_else(|e| panic!("{e}\n{c}"));
        let prod = &mesh.environments["prod"];
        assert_eq!(prod.services.len(), 4);
        assert!(prod.gateways.contains_key(GATEWAY));
    }

    #[test]
    fn nginx_gets_one_worker_upstream_keepalive_and_no_access_log() {
        let c = nginx_conf(
            Path::new("/tmp/x"),
            "[::1]:8081".parse().unwrap(),
            "127.0.0.1:9000".parse().unwrap(),
        );
        for want in [
            "worker_processes 1;",
            "access_log off;",
            "listen [::1]:8081;",
            "server 127.0.0.1:9000;",
            "keepalive 128;",
            "proxy_set_header Connection \"\";",
        ] {
            assert!(c.contains(want), "{want} in {c}");
        }
    }

    #[test]
    fn envoy_stats_are_read_by_name() {
        let text = "cluster_manager.active_clusters: 10002\ncluster_manager.warming_clusters: 0\n";
        assert_eq!(
            stat_values(
                text,
                &[
                    "cluster_manager.active_clusters",
                    "cluster_manager.warming_clusters",
                    "absent"
                ]
            ),
            vec![Some(10002), Some(0), None]
        );
    }

    #[test]
    fn proxies_are_named_as_in_the_report() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()).unwrap(), k);
        }
        assert!(
            Kind::parse("haproxy")
                .unwrap_err()
                .to_string()
                .contains("expected some of")
        );
        let b = tributary_bootstrap(
            "bench-proxy-0",
            "127.0.0.1:5000".parse().unwrap(),
            "[::1]:5001".parse().unwrap(),
        );
        assert!(b.contains("xds: {address: \"http://127.0.0.1:5000\", protocol: delta}"));
        assert!(b.contains("admin: {address: \"[::1]:5001\"}"));
        assert!(b.contains("workers: 1"));
    }
}

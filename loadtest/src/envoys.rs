//! Real Envoy sidecars in the run (`--real-envoys N`): N Envoy processes (one worker
//! each, their own base id, admin on a free loopback port) connect to the control
//! plane under test as scoped sidecars, half over Delta and half over SotW, next to
//! the simulated clients.
//!
//! Their convergence is read from their admin endpoint: after each injection, every
//! Envoy whose scope holds a changed load assignment is polled
//! (`/config_dump?resource=dynamic_endpoint_configs&include_eds&name_regex=...`, only
//! the changed names) until each of them has the new address and not the old one.
//! A sample is the time from the injection to the *answer* of the first poll that
//! shows it, an upper bound; the change landed after the previous poll was sent, so
//! each sample's resolution (answer of the hit − send of the previous poll) is
//! recorded too.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tributary_controlplane::http_client;
use tributary_controlplane::identity::tls::TlsFiles;

use crate::mtls::Pki;

pub struct Envoy {
    pub id: String,
    pub admin: String,
    pub child: Child,
    pub log: PathBuf,
}

/// The xDS endpoint as host and port, for the bootstrap's static cluster.
fn split_hostport(addr: &str) -> anyhow::Result<(String, u16)> {
    let sa: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("xDS address {addr:?}: expected host:port"))?;
    Ok((sa.ip().to_string(), sa.port()))
}

/// The xDS cluster's transport socket with mutual TLS: the sidecar's certificate
/// and key from files, the hub checked against the bundle and by its SPIFFE id.
fn upstream_tls(files: &TlsFiles, hub_id: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [{
                    "certificate_chain": {"filename": files.cert},
                    "private_key": {"filename": files.key},
                }],
                "validation_context": {
                    "trusted_ca": {"filename": files.ca},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": hub_id}},
                    ],
                },
            },
        },
    })
}

fn bootstrap(
    id: &str,
    scope: &str,
    delta: bool,
    xds: &str,
    tls: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (host, port) = split_hostport(xds)?;
    let mut boot = serde_json::json!({
        "node": {
            "id": id,
            "cluster": "loadtest",
            "metadata": {
                "tributary.io/env": crate::scenario::ENV,
                "tributary.io/sidecar": scope,
            },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": if delta { "DELTA_GRPC" } else { "GRPC" },
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
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}},
            ]}]},
        }]},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    });
    if let Some(tls) = tls {
        boot["static_resources"]["clusters"][0]["transport_socket"] = tls;
    }
    Ok(boot)
}

/// Starts `n` Envoys against `xds`; sidecar `k` uses scope `scope_of(k)`, and with
/// `pki` connects over mutual TLS as its scope's workload identity. Returns once
/// every admin endpoint answers (not once they are synced).
pub fn start(
    n: usize,
    envoy_bin: &str,
    xds: &str,
    dir: &Path,
    cpus: Option<&str>,
    scope_of: impl Fn(usize) -> String,
    pki: Option<&Pki>,
) -> anyhow::Result<Vec<Envoy>> {
    let mut out = Vec::new();
    for k in 0..n {
        let id = format!("envoy-sidecar-{k}");
        let scope = scope_of(k);
        let delta = k % 2 == 0;
        let d = dir.join(&id);
        std::fs::create_dir_all(&d)?;
        let boot = d.join("bootstrap.json");
        let tls = match pki {
            Some(p) => Some(upstream_tls(p.scope_files(&scope)?, &p.hub_id)),
            None => None,
        };
        std::fs::write(
            &boot,
            serde_json::to_vec_pretty(&bootstrap(&id, &scope, delta, xds, tls)?)?,
        )?;
        let admin_file = d.join("admin.txt");
        let _ = std::fs::remove_file(&admin_file);
        let log = d.join("envoy.log");
        // A base id unique to this harness process and Envoy (shared memory names).
        let base_id = (std::process::id() % 10_000) * 100 + k as u32 + 1;
        let mut cmd = match cpus {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", c, envoy_bin]);
                cmd
            }
            None => Command::new(envoy_bin),
        };
        cmd.arg("-c")
            .arg(&boot)
            .args(["--base-id", &base_id.to_string(), "--concurrency", "1"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["-l", "warning", "--drain-time-s", "1"])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("envoy.stderr"))?));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {envoy_bin} for {id}"))?;
        out.push(Envoy {
            id,
            admin: String::new(),
            child,
            log,
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for e in &mut out {
        let admin_file = e.log.with_file_name("admin.txt");
        loop {
            if let Some(status) = e.child.try_wait()? {
                bail!(
                    "envoy {} exited with {status} before its admin was up; log: {}",
                    e.id,
                    e.log.display()
                );
            }
            if let Ok(a) = std::fs::read_to_string(&admin_file)
                && !a.trim().is_empty()
            {
                e.admin = a.trim().to_string();
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy {}: no admin address within 60 s; log: {}",
                    e.id,
                    e.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(out)
}

pub fn stop(envoys: Vec<Envoy>) {
    for mut e in envoys {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(e.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = e.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = e.child.kill();
                let _ = e.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// User + system CPU seconds and peak RSS of the Envoys so far.
pub fn usage(envoys: &[Envoy]) -> (f64, u64) {
    let tps = procfs::ticks_per_second() as f64;
    let mut cpu = 0.0;
    let mut peak = 0;
    for e in envoys {
        if let Ok(p) = procfs::process::Process::new(e.child.id() as i32) {
            if let Ok(s) = p.stat() {
                cpu += (s.utime + s.stime) as f64 / tps;
            }
            if let Some(hwm) = p.status().ok().and_then(|s| s.vmhwm) {
                peak = peak.max(hwm * 1024);
            }
        }
    }
    (cpu, peak)
}

/// Waits until every Envoy is LIVE (`/ready` answers 200: its clusters warmed and its
/// listeners and routes applied); returns the seconds from `t0` at which each was.
pub async fn wait_ready(
    envoys: &[Envoy],
    t0: Instant,
    timeout: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut ready: Vec<Option<f64>> = vec![None; envoys.len()];
    let deadline = Instant::now() + timeout;
    while ready.iter().any(Option::is_none) {
        for (k, e) in envoys.iter().enumerate() {
            if ready[k].is_none()
                && let Ok((200, _)) = http_client::request(&e.admin, "GET", "/ready", b"").await
            {
                ready[k] = Some(t0.elapsed().as_secs_f64());
            }
        }
        if Instant::now() > deadline {
            let late: Vec<&str> = envoys
                .iter()
                .zip(&ready)
                .filter(|(_, r)| r.is_none())
                .map(|(e, _)| e.id.as_str())
                .collect();
            bail!("envoys not ready within {timeout:?}: {late:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(ready.into_iter().flatten().collect())
}

/// One Envoy's samples of a round: (ms from injection, resolution ms) per load
/// assignment; `None` for the ones it never showed within the timeout.
pub struct Polled {
    pub samples: Vec<(f64, f64)>,
    pub lost: usize,
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Addresses per load assignment in an `/config_dump` of endpoint configs.
fn endpoint_addresses(dump: &serde_json::Value) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for c in dump["configs"].as_array().into_iter().flatten() {
        let cla = &c["endpoint_config"];
        let Some(name) = cla["cluster_name"].as_str() else {
            continue;
        };
        let addrs = cla["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["lb_endpoints"].as_array().into_iter().flatten())
            .filter_map(|e| {
                e["endpoint"]["address"]["socket_address"]["address"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        out.insert(name.to_string(), addrs);
    }
    out
}

/// Changes one Envoy waits for, grouped by a filter on the names that the admin's
/// `name_regex` matches whole names against (Envoy compiles it with RE2's default program size limit, so
/// one short regex per group, e.g. one service's clusters, rather than one long
/// alternation).
pub struct Watch {
    pub filter: String,
    /// (load assignment, new address, old address).
    pub changes: Vec<(String, String, String)>,
}

/// Polls one Envoy every `interval` until it holds every change (new address present,
/// old gone) or `timeout` passes.
pub async fn poll_round(
    admin: String,
    watches: Vec<Watch>,
    t0: Instant,
    interval: Duration,
    timeout: Duration,
) -> Polled {
    let paths: Vec<String> = watches
        .iter()
        .map(|w| {
            format!(
                "/config_dump?resource=dynamic_endpoint_configs&include_eds&name_regex={}",
                percent_encode(&w.filter)
            )
        })
        .collect();
    let mut pending: Vec<HashSet<usize>> = watches
        .iter()
        .map(|w| (0..w.changes.len()).collect())
        .collect();
    let mut prev_send = vec![t0; watches.len()];
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let deadline = t0 + timeout;
    while pending.iter().any(|p| !p.is_empty()) && Instant::now() < deadline {
        for (g, w) in watches.iter().enumerate() {
            if pending[g].is_empty() {
                continue;
            }
            let sent = Instant::now();
            match http_client::request(&admin, "GET", &paths[g], b"").await {
                Ok((200, body)) => {
                    let answered = Instant::now();
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        let held = endpoint_addresses(&v);
                        pending[g].retain(|k| {
                            let (name, new, old) = &w.changes[*k];
                            let done = held
                                .get(name)
                                .is_some_and(|a| a.contains(new) && !a.contains(old));
                            if done {
                                samples.push((
                                    answered.duration_since(t0).as_secs_f64() * 1000.0,
                                    answered.duration_since(prev_send[g]).as_secs_f64() * 1000.0,
                                ));
                            }
                            !done
                        });
                    }
                }
                Ok((code, body)) => errors.push(format!(
                    "HTTP {code}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )),
                Err(e) => errors.push(format!("{e:#}")),
            }
            prev_send[g] = sent;
        }
        if pending.iter().any(|p| !p.is_empty()) {
            tokio::time::sleep(interval).await;
        }
    }
    let lost: Vec<&str> = pending
        .iter()
        .zip(&watches)
        .flat_map(|(p, w)| p.iter().map(|k| w.changes[*k].0.as_str()))
        .collect();
    if !lost.is_empty() {
        errors.dedup();
        eprintln!(
            "\n  envoy (admin {admin}): never showed {lost:?} within {timeout:?}; admin errors: {:?}",
            &errors[..errors.len().min(3)]
        );
    }
    Polled {
        samples,
        lost: lost.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_for_envoys_name_regex() {
        let n = "outbound|8080||svc-1.ns-1.svc.cluster.local";
        assert_eq!(
            regex_escape(n),
            "outbound\\|8080\\|\\|svc-1\\.ns-1\\.svc\\.cluster\\.local"
        );
        assert_eq!(percent_encode("^(a|b)$"), "%5E%28a%7Cb%29%24");
    }

    #[test]
    fn addresses_are_read_from_an_endpoint_dump() {
        let dump = serde_json::json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump.DynamicEndpointConfig",
            "endpoint_config": {
                "cluster_name": "c1",
                "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 9080}}}},
                    {"endpoint": {"address": {"socket_address": {"address": "fd00::2", "port_value": 9080}}}},
                ]}],
            },
        }]});
        let got = endpoint_addresses(&dump);
        assert_eq!(
            got["c1"],
            vec!["10.0.0.1".to_string(), "fd00::2".to_string()]
        );
    }
}

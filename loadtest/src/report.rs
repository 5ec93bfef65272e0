//! Results: percentiles, the summary table, the JSON file and the CDF chart (SVG).

use serde::Serialize;
use serde_json::json;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Nearest-rank percentiles of millisecond samples, from an HDR histogram at
/// microsecond resolution (5 significant digits: exact up to 262 ms, within 0.001%
/// above).
pub fn percentiles(samples: &[f64]) -> Percentiles {
    let mut h = match hdrhistogram::Histogram::<u64>::new(5) {
        Ok(h) => h,
        Err(_) => return Percentiles::default(),
    };
    for ms in samples.iter().filter(|ms| ms.is_finite()) {
        // A negative sample (a clock step) counts as zero.
        let us = (ms * 1000.0).round().max(0.0) as u64;
        if h.record(us).is_err() {
            continue;
        }
    }
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len() as usize,
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// A distribution over all clients, and over sidecars and gateways apart (32
/// gateways subscribe to every load assignment: mixed in, they decide the p99).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Split {
    pub all: Percentiles,
    pub sidecars: Percentiles,
    pub gateways: Percentiles,
}

impl Split {
    pub fn of(sidecars: &[f64], gateways: &[f64]) -> Split {
        let all: Vec<f64> = sidecars.iter().chain(gateways).copied().collect();
        Split {
            all: percentiles(&all),
            sidecars: percentiles(sidecars),
            gateways: percentiles(gateways),
        }
    }
}

/// Wall time and CPU of one phase, for the control plane, the harness (simulated
/// clients and, for Tributary, the agents feeding it) and the real Envoys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub wall_s: f64,
    pub control_plane_cpu_s: f64,
    pub harness_cpu_s: f64,
    pub envoys_cpu_s: f64,
}

/// The real Envoys' figures (`--real-envoys`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EnvoyFigures {
    pub count: usize,
    /// Start to LIVE (`/ready`), per Envoy.
    pub initial_sync_ms: Percentiles,
    pub per_sample_ms: Percentiles,
    pub per_client_ms: Percentiles,
    /// Per sample: answer of the poll that showed it − send of the poll before.
    pub resolution_ms: Percentiles,
    pub poll_interval_ms: u64,
    pub lost_updates: usize,
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
}

/// One control plane's run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub name: String,
    /// 1 if this control plane ran first in its run, 2 if second.
    pub position: usize,
    /// Every (client, changed load assignment) of the rounds: injection → ACK.
    pub convergence_ms: Percentiles,
    pub per_sample_ms: Split,
    /// Per client and round: injection → the ACK by which it held every change of
    /// the round it subscribes to.
    pub per_client_ms: Split,
    /// Services added: per client, injection → it holds the new route tables (and,
    /// gateways, the new clusters and their endpoints).
    pub config_change_ms: Percentiles,
    pub config_change_per_client_ms: Split,
    pub initial_sync_s: f64,
    pub hub: HubUsage,
    pub harness: HarnessUsage,
    pub phases: std::collections::BTreeMap<String, Phase>,
    pub bytes_sent: u64,
    pub messages_sent: u64,
    /// Expected (client, change) samples that never arrived.
    pub lost_updates: usize,
    /// Resources a client held at the end that differ from the model (content check).
    pub version_mismatches: usize,
    /// Samples whose load assignment held the new address and still the old one.
    pub stale_at_sample: usize,
    pub client_errors: usize,
    /// Clients that retried their connection before a first response (as Envoy does).
    pub reconnects: usize,
    pub content_check: crate::check::ContentCheck,
    pub real_envoys: Option<EnvoyFigures>,
    /// Per process of a control plane of several (sharded scenarios: hubs, router).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<ProcFigures>>,
    /// From the start of the initial sync until every client's first connection was
    /// up (TCP; with mutual TLS, TCP and the TLS handshake).
    pub connect_s: f64,
    /// With mutual TLS: the hub's xDS handshakes in the initial sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFigures>,
    #[serde(skip)]
    pub samples: Vec<f64>,
    #[serde(skip)]
    pub client_samples: Vec<f64>,
}

/// The hub's TLS handshakes on its xDS listener during the initial sync
/// (`tributary_tls_handshakes_total{listener="xds"}`, read from its `/metrics`
/// before the clients connect and once every client has synced).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsFigures {
    pub handshakes: u64,
    pub handshake_failures: u64,
}

/// One process of a control plane of several: CPU per phase, resident memory and
/// xDS streams at each phase's end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcFigures {
    pub name: String,
    /// `hub`, `router` or `etcd`.
    pub role: String,
    /// The shards it serves (hubs).
    pub shards: Vec<String>,
    pub phases: std::collections::BTreeMap<String, ProcPhase>,
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcPhase {
    pub cpu_s: f64,
    /// `VmRSS` at the phase's end.
    pub rss_bytes: u64,
    /// xDS streams open at the phase's end (hubs: `tributary_xds_connections`; the
    /// router: `tributary_router_connections`).
    pub streams: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HubUsage {
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HarnessUsage {
    pub cpu_s: f64,
}

pub fn table(runs: &[Run]) -> String {
    let mut rows = vec![vec![
        "".to_string(),
        "conv p50".into(),
        "p90".into(),
        "p99".into(),
        "max".into(),
        "cfg-change p99".into(),
        "initial sync".into(),
        "CPU".into(),
        "peak RSS".into(),
        "sent".into(),
        "lost".into(),
    ]];
    for r in runs {
        let c = &r.convergence_ms;
        rows.push(vec![
            r.name.clone(),
            format!("{:.0} ms", c.p50),
            format!("{:.0} ms", c.p90),
            format!("{:.0} ms", c.p99),
            format!("{:.0} ms", c.max),
            format!("{:.0} ms", r.config_change_ms.p99),
            format!("{:.2} s", r.initial_sync_s),
            format!("{:.1} s", r.hub.cpu_s),
            format!("{:.0} MiB", r.hub.peak_rss_bytes as f64 / (1 << 20) as f64),
            format!(
                "{:.0} MiB / {} msgs",
                r.bytes_sent as f64 / (1 << 20) as f64,
                r.messages_sent
            ),
            format!("{}", r.lost_updates + r.version_mismatches),
        ]);
    }
    // Borderless, right-aligned, two spaces between columns, no wrapping.
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    let mut rows = rows.into_iter();
    table.set_header(rows.next().unwrap_or_default());
    table.add_rows(rows);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((if i == 0 { 0 } else { 2 }, 0));
        column.set_cell_alignment(comfy_table::CellAlignment::Right);
    }
    table.to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, smallest and largest of one figure over the runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

pub fn spread(values: Vec<f64>) -> Spread {
    Spread {
        median: median(values.clone()),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        values,
    }
}

/// Element-wise median of percentiles over the runs.
fn median_percentiles(ps: &[&Percentiles]) -> Percentiles {
    let m = |f: fn(&Percentiles) -> f64| median(ps.iter().map(|p| f(p)).collect());
    Percentiles {
        count: median(ps.iter().map(|p| p.count as f64).collect()) as usize,
        p50: m(|p| p.p50),
        p90: m(|p| p.p90),
        p99: m(|p| p.p99),
        max: m(|p| p.max),
    }
}

fn median_split(ss: &[&Split]) -> Split {
    Split {
        all: median_percentiles(&ss.iter().map(|s| &s.all).collect::<Vec<_>>()),
        sidecars: median_percentiles(&ss.iter().map(|s| &s.sidecars).collect::<Vec<_>>()),
        gateways: median_percentiles(&ss.iter().map(|s| &s.gateways).collect::<Vec<_>>()),
    }
}

/// The figures that decide the standing, each over the runs.
pub fn spreads(runs: &[&Run]) -> serde_json::Value {
    let f = |g: &dyn Fn(&Run) -> f64| spread(runs.iter().map(|r| g(r)).collect());
    let phase_cpu = |r: &Run, p: &str, who: fn(&Phase) -> f64| r.phases.get(p).map_or(0.0, who);
    json!({
        "per_sample_p99_ms": f(&|r| r.convergence_ms.p99),
        "per_sample_p99_sidecars_ms": f(&|r| r.per_sample_ms.sidecars.p99),
        "per_sample_p99_gateways_ms": f(&|r| r.per_sample_ms.gateways.p99),
        "per_client_p99_sidecars_ms": f(&|r| r.per_client_ms.sidecars.p99),
        "per_client_p99_gateways_ms": f(&|r| r.per_client_ms.gateways.p99),
        "config_change_p99_ms": f(&|r| r.config_change_ms.p99),
        "initial_sync_s": f(&|r| r.initial_sync_s),
        "rounds_cpu_s": f(&|r| phase_cpu(r, "rounds", |p| p.control_plane_cpu_s)),
        "rounds_harness_cpu_s": f(&|r| phase_cpu(r, "rounds", |p| p.harness_cpu_s)),
        "cpu_s": f(&|r| r.hub.cpu_s),
        "peak_rss_bytes": f(&|r| r.hub.peak_rss_bytes as f64),
    })
}

/// One control plane's figures over the runs: medians (peak RSS: the largest), sums
/// of every correctness count.
pub fn summary(runs: &[&Run]) -> serde_json::Value {
    let pcts = |g: fn(&Run) -> &Percentiles| {
        median_percentiles(&runs.iter().map(|r| g(r)).collect::<Vec<_>>())
    };
    let splits =
        |g: fn(&Run) -> &Split| median_split(&runs.iter().map(|r| g(r)).collect::<Vec<_>>());
    let mut phases = serde_json::Map::new();
    if let Some(first) = runs.first() {
        for name in first.phases.keys() {
            let m = |who: fn(&Phase) -> f64| {
                median(
                    runs.iter()
                        .filter_map(|r| r.phases.get(name).map(who))
                        .collect(),
                )
            };
            phases.insert(
                name.clone(),
                json!(Phase {
                    wall_s: m(|p| p.wall_s),
                    control_plane_cpu_s: m(|p| p.control_plane_cpu_s),
                    harness_cpu_s: m(|p| p.harness_cpu_s),
                    envoys_cpu_s: m(|p| p.envoys_cpu_s),
                }),
            );
        }
    }
    let sum = |g: fn(&Run) -> usize| runs.iter().map(|r| g(r)).sum::<usize>();
    let envoys: Vec<&EnvoyFigures> = runs.iter().filter_map(|r| r.real_envoys.as_ref()).collect();
    json!({
        "name": runs.first().map(|r| r.name.clone()).unwrap_or_default(),
        "runs": runs.len(),
        "convergence_ms": pcts(|r| &r.convergence_ms),
        "per_sample_ms": splits(|r| &r.per_sample_ms),
        "per_client_ms": splits(|r| &r.per_client_ms),
        "config_change_ms": pcts(|r| &r.config_change_ms),
        "config_change_per_client_ms": splits(|r| &r.config_change_per_client_ms),
        "initial_sync_s": median(runs.iter().map(|r| r.initial_sync_s).collect()),
        "hub": HubUsage {
            cpu_s: median(runs.iter().map(|r| r.hub.cpu_s).collect()),
            peak_rss_bytes: runs.iter().map(|r| r.hub.peak_rss_bytes).max().unwrap_or(0),
        },
        "harness": HarnessUsage { cpu_s: median(runs.iter().map(|r| r.harness.cpu_s).collect()) },
        "phases": phases,
        "bytes_sent": median(runs.iter().map(|r| r.bytes_sent as f64).collect()),
        "messages_sent": median(runs.iter().map(|r| r.messages_sent as f64).collect()),
        "lost_updates": sum(|r| r.lost_updates),
        "version_mismatches": sum(|r| r.version_mismatches),
        "stale_at_sample": sum(|r| r.stale_at_sample),
        "client_errors": sum(|r| r.client_errors),
        "reconnects": sum(|r| r.reconnects),
        "content_check": {
            "resources_checked": sum(|r| r.content_check.resources_checked),
            "failures": sum(|r| r.content_check.failures()),
            "equal_after_decoding": sum(|r| r.content_check.equal_after_decoding),
        },
        "real_envoys": (!envoys.is_empty()).then(|| json!({
            "count": envoys[0].count,
            "initial_sync_ms": median_percentiles(&envoys.iter().map(|e| &e.initial_sync_ms).collect::<Vec<_>>()),
            "per_sample_ms": median_percentiles(&envoys.iter().map(|e| &e.per_sample_ms).collect::<Vec<_>>()),
            "per_client_ms": median_percentiles(&envoys.iter().map(|e| &e.per_client_ms).collect::<Vec<_>>()),
            "resolution_ms": median_percentiles(&envoys.iter().map(|e| &e.resolution_ms).collect::<Vec<_>>()),
            "poll_interval_ms": envoys[0].poll_interval_ms,
            "lost_updates": envoys.iter().map(|e| e.lost_updates).sum::<usize>(),
        })),
        "spread": spreads(runs),
    })
}

/// The JSON file: the scenario and settings; our figures at the top level and the
/// peer's under `peer` (medians over the runs, as before with one run); the ratios;
/// and every run in full under `runs`.
pub fn to_json(
    scenario: &impl Serialize,
    settings: serde_json::Value,
    ours: &[&Run],
    peer: &[&Run],
    runs: serde_json::Value,
) -> serde_json::Value {
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 0.0 };
    let mut v = summary(ours);
    v["scenario"] = json!(scenario);
    v["settings"] = settings;
    if !peer.is_empty() {
        let p = summary(peer);
        let num = |v: &serde_json::Value, path: &[&str]| {
            path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0)
        };
        v["ratios"] = json!({
            "p99_convergence_peer_over_ours": ratio(num(&v, &["convergence_ms", "p99"]), num(&p, &["convergence_ms", "p99"])),
            "p99_sidecars_peer_over_ours": ratio(num(&v, &["per_sample_ms", "sidecars", "p99"]), num(&p, &["per_sample_ms", "sidecars", "p99"])),
            "p99_per_client_sidecars_peer_over_ours": ratio(num(&v, &["per_client_ms", "sidecars", "p99"]), num(&p, &["per_client_ms", "sidecars", "p99"])),
            "initial_sync_peer_over_ours": ratio(num(&v, &["initial_sync_s"]), num(&p, &["initial_sync_s"])),
            "rounds_cpu_peer_over_ours": ratio(num(&v, &["phases", "rounds", "control_plane_cpu_s"]), num(&p, &["phases", "rounds", "control_plane_cpu_s"])),
            "cpu_peer_over_ours": ratio(num(&v, &["hub", "cpu_s"]), num(&p, &["hub", "cpu_s"])),
            "peak_rss_peer_over_ours": ratio(num(&v, &["hub", "peak_rss_bytes"]), num(&p, &["hub", "peak_rss_bytes"])),
        });
        v["peer"] = p;
    }
    v["runs"] = runs;
    v
}

/// The `mtls` block of the JSON file: per mode (ours plaintext, ours with mutual TLS)
/// medians over the runs, and, when both ran, what mutual TLS costs, each figure
/// taken per run from the two modes of that run (same machine, minutes apart) and
/// then the median over the runs: p99 ratios (mTLS / plaintext), the handshakes, the
/// extra hub CPU and wall time of the initial sync and of connecting, and the CPU per
/// handshake (extra initial-sync CPU / handshakes).
pub fn mtls_json(plaintext: &[&Run], mtls: &[&Run]) -> serde_json::Value {
    let sync_cpu = |r: &Run| {
        r.phases
            .get("initial_sync")
            .map_or(0.0, |p| p.control_plane_cpu_s)
    };
    let mode = |runs: &[&Run]| -> serde_json::Value {
        if runs.is_empty() {
            return serde_json::Value::Null;
        }
        let m = |g: &dyn Fn(&Run) -> f64| median(runs.iter().map(|r| g(r)).collect());
        let mut cpu = serde_json::Map::new();
        for name in runs[0].phases.keys() {
            cpu.insert(
                name.clone(),
                json!(m(&|r| r
                    .phases
                    .get(name)
                    .map_or(0.0, |p| p.control_plane_cpu_s))),
            );
        }
        let tls: Vec<&TlsFigures> = runs.iter().filter_map(|r| r.tls.as_ref()).collect();
        json!({
            "name": runs[0].name,
            "runs": runs.len(),
            "p99_per_sample_ms": {
                "all": m(&|r| r.convergence_ms.p99),
                "sidecars": m(&|r| r.per_sample_ms.sidecars.p99),
                "gateways": m(&|r| r.per_sample_ms.gateways.p99),
            },
            "p99_per_client_ms": {
                "sidecars": m(&|r| r.per_client_ms.sidecars.p99),
                "gateways": m(&|r| r.per_client_ms.gateways.p99),
            },
            "initial_sync_s": m(&|r| r.initial_sync_s),
            "connect_s": m(&|r| r.connect_s),
            "hub_cpu_s": cpu,
            "handshakes": (!tls.is_empty()).then(|| median(tls.iter().map(|t| t.handshakes as f64).collect())),
            "handshake_failures": tls.iter().map(|t| t.handshake_failures).sum::<u64>(),
        })
    };
    let mut v = json!({
        "goal": "p99 with mutual TLS within 10% of plaintext once streams are established",
        "plaintext": mode(plaintext),
        "mtls": mode(mtls),
    });
    let pairs: Vec<(&Run, &Run)> = plaintext
        .iter()
        .copied()
        .zip(mtls.iter().copied())
        .collect();
    if pairs.is_empty() {
        return v;
    }
    let m = |g: &dyn Fn(&Run, &Run) -> f64| median(pairs.iter().map(|(p, t)| g(p, t)).collect());
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 0.0 };
    let handshakes = |t: &Run| t.tls.as_ref().map_or(0, |h| h.handshakes) as f64;
    let p99 = json!({
        "per_sample_all": m(&|p, t| ratio(p.convergence_ms.p99, t.convergence_ms.p99)),
        "per_sample_sidecars": m(&|p, t| ratio(p.per_sample_ms.sidecars.p99, t.per_sample_ms.sidecars.p99)),
        "per_sample_gateways": m(&|p, t| ratio(p.per_sample_ms.gateways.p99, t.per_sample_ms.gateways.p99)),
        "per_client_sidecars": m(&|p, t| ratio(p.per_client_ms.sidecars.p99, t.per_client_ms.sidecars.p99)),
        "per_client_gateways": m(&|p, t| ratio(p.per_client_ms.gateways.p99, t.per_client_ms.gateways.p99)),
    });
    // A ratio of 0 is a role without samples (no gateways, say): not compared.
    let ratios: Vec<f64> = p99
        .as_object()
        .into_iter()
        .flat_map(|o| o.values().filter_map(|r| r.as_f64()))
        .filter(|r| *r > 0.0)
        .collect();
    let within = !ratios.is_empty() && ratios.iter().all(|r| *r <= 1.10);
    v["p99_mtls_over_plaintext"] = p99;
    v["goal_met"] = json!(within);
    v["handshake"] = json!({
        "handshakes": m(&|_, t| handshakes(t)),
        "extra_initial_sync_cpu_s": m(&|p, t| sync_cpu(t) - sync_cpu(p)),
        "cpu_per_handshake_ms": m(&|p, t| {
            let n = handshakes(t);
            if n > 0.0 { (sync_cpu(t) - sync_cpu(p)) / n * 1000.0 } else { 0.0 }
        }),
        "extra_connect_s": m(&|p, t| t.connect_s - p.connect_s),
        "extra_initial_sync_s": m(&|p, t| t.initial_sync_s - p.initial_sync_s),
    });
    v
}

/// Per run and control plane: the split figures and CPU per phase.
pub fn details(runs: &[(usize, &Run)]) -> String {
    let mut rows = vec![vec![
        "run".to_string(),
        "".into(),
        "p99 sidecars".into(),
        "p99 gateways".into(),
        "per-client p50/p90/p99 sidecars".into(),
        "per-client p99 gw".into(),
        "cfg p99 sc/gw".into(),
        "CPU rounds cp/harness".into(),
        "CPU sync cp/harness".into(),
        "content".into(),
        "envoys p50/p99".into(),
    ]];
    for (i, r) in runs {
        let ph = |p: &str| {
            r.phases.get(p).map_or("-".to_string(), |p| {
                format!("{:.1} / {:.1} s", p.control_plane_cpu_s, p.harness_cpu_s)
            })
        };
        let pc = &r.per_client_ms.sidecars;
        rows.push(vec![
            format!("{}", i + 1),
            format!("{} ({})", r.name, r.position),
            format!("{:.0} ms", r.per_sample_ms.sidecars.p99),
            format!("{:.0} ms", r.per_sample_ms.gateways.p99),
            format!("{:.0} / {:.0} / {:.0} ms", pc.p50, pc.p90, pc.p99),
            format!("{:.0} ms", r.per_client_ms.gateways.p99),
            format!(
                "{:.0} / {:.0} ms",
                r.config_change_per_client_ms.sidecars.p99,
                r.config_change_per_client_ms.gateways.p99
            ),
            ph("rounds"),
            ph("initial_sync"),
            format!(
                "{} checked, {} bad",
                r.content_check.resources_checked,
                r.content_check.failures()
            ),
            r.real_envoys.as_ref().map_or("-".into(), |e| {
                format!("{:.0} / {:.0} ms", e.per_sample_ms.p50, e.per_sample_ms.p99)
            }),
        ]);
    }
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    let mut rows = rows.into_iter();
    table.set_header(rows.next().unwrap_or_default());
    table.add_rows(rows);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((if i == 0 { 0 } else { 2 }, 0));
        column.set_cell_alignment(comfy_table::CellAlignment::Right);
    }
    table.to_string()
}

/// Convergence CDFs as an SVG line chart (log-scaled time axis): per control plane,
/// per sample (solid) and per client (dashed), pooled over the runs.
pub fn svg(runs: &[Run]) -> String {
    let mut series: Vec<(String, bool, Vec<f64>)> = Vec::new();
    for r in runs {
        match series
            .iter_mut()
            .find(|(n, dashed, _)| *n == r.name && !dashed)
        {
            Some((_, _, v)) => v.extend_from_slice(&r.samples),
            None => series.push((r.name.clone(), false, r.samples.clone())),
        }
        match series
            .iter_mut()
            .find(|(n, dashed, _)| *n == r.name && *dashed)
        {
            Some((_, _, v)) => v.extend_from_slice(&r.client_samples),
            None => series.push((r.name.clone(), true, r.client_samples.clone())),
        }
    }
    cdf_svg(&series)
}

fn cdf_svg(series: &[(String, bool, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 420.0, 60.0, 50.0, 30.0, 20.0);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0)
        .log10()
        .floor();
    let hi = all
        .iter()
        .copied()
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let x = |ms: f64| left + (ms.max(1.0).log10() - lo) / (hi - lo) * (w - left - right);
    let y = |q: f64| h - bottom - q * (h - bottom - top);
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Convergence CDF: per sample (solid) and per client and round (dashed)</text>\n",
        w / 2.0
    );
    for d in (lo as i32)..=(hi as i32) {
        let ms = 10f64.powi(d);
        let px = x(ms);
        out += &format!(
            "<line x1=\"{px}\" y1=\"{}\" x2=\"{px}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{px}\" y=\"{}\" text-anchor=\"middle\">{ms} ms</text>\n",
            y(0.0),
            y(1.0),
            h - bottom + 18.0
        );
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let py = y(q);
        out += &format!(
            "<line x1=\"{left}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{q}</text>\n",
            w - right,
            left - 6.0,
            py + 4.0
        );
    }
    let names: Vec<&String> = {
        let mut n: Vec<&String> = series.iter().map(|(n, _, _)| n).collect();
        n.dedup();
        n
    };
    for (i, (name, dashed, samples)) in series.iter().enumerate() {
        let mut v = samples.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len().max(1) as f64;
        let step = (v.len() / 800).max(1);
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k == v.len() - 1)
            .map(|(k, ms)| format!("{:.1},{:.1}", x(*ms), y((k + 1) as f64 / n)))
            .collect();
        let k = names.iter().position(|n| *n == name).unwrap_or(0);
        let c = colors[k % colors.len()];
        let dash = if *dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            points.join(" ")
        );
        let p = percentiles(samples);
        out += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{} {} (p99 {:.0} ms, n={})</text>\n",
            left + 10.0,
            top + 20.0 + 16.0 * i as f64,
            name,
            if *dashed { "per client" } else { "per sample" },
            p.p99,
            p.count
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (log scale)</text>\n</svg>\n",
        w / 2.0,
        h - 8.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.max, p.count),
            (50.0, 90.0, 99.0, 100.0, 100)
        );
        assert_eq!(percentiles(&[]).count, 0);
    }

    #[test]
    fn percentiles_match_exact_nearest_rank_within_the_histogram_precision() {
        // A skewed spread of 10,000 samples from 0.01 ms to ~40 s.
        let v: Vec<f64> = (0..10_000u32)
            .map(|i| {
                let x = f64::from(i.wrapping_mul(2_654_435_761) % 10_000) / 10_000.0;
                0.01 + x.powi(4) * 40_000.0
            })
            .collect();
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        let exact =
            |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        let p = percentiles(&v);
        assert_eq!(p.count, 10_000);
        for (got, want) in [
            (p.p50, exact(0.5)),
            (p.p90, exact(0.9)),
            (p.p99, exact(0.99)),
            (p.max, exact(1.0)),
        ] {
            // Microsecond rounding, then 5 significant digits.
            assert!(
                (got - want).abs() <= 0.0005 + want * 1e-5,
                "{got} vs {want}"
            );
        }
        assert_eq!(percentiles(&[f64::NAN, f64::INFINITY, -3.0]).count, 1);
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    /// Per run: ratios and costs from that run's two modes, then the median.
    #[test]
    fn mtls_block_pairs_each_run_with_its_own_plaintext_run() {
        let run = |p99: f64, sync_cpu: f64, connect_s: f64, handshakes: Option<u64>| Run {
            convergence_ms: Percentiles {
                p99,
                ..Percentiles::default()
            },
            per_client_ms: Split {
                sidecars: Percentiles {
                    p99,
                    ..Percentiles::default()
                },
                ..Split::default()
            },
            connect_s,
            phases: [(
                "initial_sync".to_string(),
                Phase {
                    control_plane_cpu_s: sync_cpu,
                    ..Phase::default()
                },
            )]
            .into(),
            tls: handshakes.map(|handshakes| TlsFigures {
                handshakes,
                handshake_failures: 0,
            }),
            ..Run::default()
        };
        // Run 2 is slower in both modes: unpaired medians would mix it with run 1.
        let plain = [run(100.0, 10.0, 1.0, None), run(200.0, 20.0, 2.0, None)];
        let mtls = [
            run(105.0, 12.0, 1.5, Some(2000)),
            run(240.0, 24.0, 2.5, Some(2000)),
        ];
        let v = mtls_json(
            &plain.iter().collect::<Vec<_>>(),
            &mtls.iter().collect::<Vec<_>>(),
        );
        let f = |path: &[&str]| path.iter().fold(&v, |v, k| &v[*k]).as_f64().unwrap();
        assert!((f(&["p99_mtls_over_plaintext", "per_sample_all"]) - 1.125).abs() < 1e-9);
        assert!((f(&["p99_mtls_over_plaintext", "per_client_sidecars"]) - 1.125).abs() < 1e-9);
        // Median 1.125 > 1.10 (gateways have no samples: not compared).
        assert_eq!(v["goal_met"], json!(false));
        let close = [
            run(104.0, 12.0, 1.5, Some(2000)),
            run(210.0, 24.0, 2.5, Some(2000)),
        ];
        let v = mtls_json(
            &plain.iter().collect::<Vec<_>>(),
            &close.iter().collect::<Vec<_>>(),
        );
        assert_eq!(v["goal_met"], json!(true), "{v}");
        assert!((f(&["handshake", "extra_initial_sync_cpu_s"]) - 3.0).abs() < 1e-9);
        assert!((f(&["handshake", "cpu_per_handshake_ms"]) - 1.5).abs() < 1e-9);
        assert!((f(&["handshake", "extra_connect_s"]) - 0.5).abs() < 1e-9);
        assert_eq!(f(&["handshake", "handshakes"]), 2000.0);
        assert_eq!(f(&["mtls", "handshakes"]), 2000.0);
        assert!(v["plaintext"]["handshakes"].is_null());
        // --mtls alone: its figures, nothing to compare.
        let alone = mtls_json(&[], &mtls.iter().collect::<Vec<_>>());
        assert!(alone["plaintext"].is_null() && alone.get("handshake").is_none());
    }

    #[test]
    fn summary_table_is_right_aligned_columns() {
        let run = |name: &str, p99: f64, rss: u64| Run {
            name: name.into(),
            convergence_ms: Percentiles {
                count: 10,
                p50: 12.0,
                p90: 40.4,
                p99,
                max: 1234.0,
            },
            initial_sync_s: 2.345,
            hub: HubUsage {
                cpu_s: 10.25,
                peak_rss_bytes: rss,
            },
            bytes_sent: 5 << 20,
            messages_sent: 42,
            lost_updates: 1,
            ..Run::default()
        };
        let got = table(&[
            run("tributary", 99.0, 900 << 20),
            run("go-control-plane", 1500.0, 3 << 30),
        ]);
        let expected = [
            "                  conv p50    p90      p99      max  cfg-change p99  initial sync     CPU  peak RSS             sent  lost",
            "       tributary     12 ms  40 ms    99 ms  1234 ms            0 ms        2.35 s  10.2 s   900 MiB  5 MiB / 42 msgs     1",
            "go-control-plane     12 ms  40 ms  1500 ms  1234 ms            0 ms        2.35 s  10.2 s  3072 MiB  5 MiB / 42 msgs     1",
        ]
        .join("\n");
        // The output of the hand-written table this replaced, byte for byte.
        assert_eq!(got, expected);
    }
}

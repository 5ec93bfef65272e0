//! The benchmark's results: every run's figures per proxy, their median and min–max,
//! the ratio to nginx measured in the same run, a table for the terminal and the JSON
//! of `docs/bench/proxy.json`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

/// One run of one proxy. Figures are `None` where they do not apply or could not be
/// measured (the direct baseline has no proxy CPU or memory).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFigures {
    pub run: usize,
    /// Proxy CPU (utime + stime of its process tree) over the fixed-rate window divided
    /// by the requests completed in it.
    pub cpu_per_request_us: Option<f64>,
    /// Latency at the fixed rate, from each request's intended send time.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// The rate actually completed in the fixed-rate window.
    pub rps_at_rate: f64,
    /// How late the pacer dealt requests at the fixed rate (p99): part of every latency.
    pub pacer_lag_p99_ms: Option<f64>,
    /// Share of a core the proxy used at the fixed rate.
    pub proxy_core_at_rate: Option<f64>,
    /// Closed loop, every connection back to back.
    pub rps_saturated: Option<f64>,
    pub p99_saturated_ms: Option<f64>,
    pub cpu_per_request_saturated_us: Option<f64>,
    pub proxy_core_saturated: Option<f64>,
    /// Share of the generator's core that was busy while saturating (the generator,
    /// the backend, the loopback's kernel work, anything else); at 0.9 or more the
    /// saturated figure bounds the generator's core, not the proxy.
    pub generator_core_saturated_utilization: f64,
    pub generator_core_saturated: bool,
    /// The most of the proxy's core, and of the generator's, that other processes
    /// used in either window (from /proc/stat): above a few percent the run was
    /// disturbed by something else on the machine.
    pub proxy_core_other_load: Option<f64>,
    pub generator_core_other_load: Option<f64>,
    /// RSS once serving, before any load.
    pub rss_idle_bytes: Option<u64>,
    pub rss_after_load_bytes: Option<u64>,
    /// Failures over both phases (connect, reset, malformed), non-2xx answers, and
    /// whether the fixed rate could not be sustained (a connection's queue overflowed).
    pub errors: u64,
    pub non_2xx: u64,
    pub overloaded: bool,
    pub first_error: Option<String>,
}

/// One run of the 10,000-cluster memory figure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rss10k {
    pub run: usize,
    pub rss_bytes: Option<u64>,
    /// From the proxy's start to holding every cluster (or `/ready`).
    pub sync_seconds: Option<f64>,
    pub error: Option<String>,
}

/// Everything about one proxy in the benchmark.
#[derive(Debug, Clone, Default)]
pub struct ProxyResult {
    pub name: String,
    /// Why it was not run (not installed, no --proxy-bin, ...); `None` when it ran.
    pub not_run: Option<String>,
    pub version: Option<String>,
    pub command: Vec<String>,
    pub runs: Vec<RunFigures>,
    /// Runs that failed outright (could not start, never served), with why.
    pub failed_runs: Vec<String>,
    pub rss_10k: Vec<Rss10k>,
    /// Why there is no 10,000-cluster figure (no xDS), when there is none by design.
    pub rss_10k_null_reason: Option<String>,
}

/// Median and range of some numbers (`None` when there are none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// The figures summarized per proxy (median over runs, and their range).
const FIGURES: &[&str] = &[
    "cpu_per_request_us",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "rps_at_rate",
    "pacer_lag_p99_ms",
    "proxy_core_at_rate",
    "rps_saturated",
    "p99_saturated_ms",
    "cpu_per_request_saturated_us",
    "proxy_core_saturated",
    "generator_core_saturated_utilization",
    "proxy_core_other_load",
    "generator_core_other_load",
    "rss_idle_bytes",
    "rss_after_load_bytes",
];

impl ProxyResult {
    fn figure(&self, key: &str) -> Option<Spread> {
        spread(self.runs.iter().filter_map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|v| v.get(key).and_then(Value::as_f64))
        }))
    }

    fn rss_10k(&self) -> Option<Spread> {
        spread(
            self.rss_10k
                .iter()
                .filter_map(|r| r.rss_bytes.map(|b| b as f64)),
        )
    }

    /// CPU per request over nginx's, run by run (both measured in the same run), then
    /// the median of those ratios.
    fn vs_nginx(&self, nginx: Option<&ProxyResult>) -> Option<Spread> {
        let nginx = nginx?;
        spread(self.runs.iter().filter_map(|r| {
            let n = nginx.runs.iter().find(|n| n.run == r.run)?;
            Some(r.cpu_per_request_us? / n.cpu_per_request_us?)
        }))
    }

    fn json(&self, nginx: Option<&ProxyResult>) -> Value {
        let mut top = serde_json::Map::new();
        top.insert("ran".into(), json!(self.not_run.is_none()));
        top.insert("not_run_reason".into(), json!(self.not_run));
        top.insert("version".into(), json!(self.version));
        top.insert("command".into(), json!(self.command.join(" ")));
        let mut spreads = serde_json::Map::new();
        for key in FIGURES {
            let s = self.figure(key);
            let median = s.map(|s| {
                if key.ends_with("_bytes") {
                    json!(s.median.round() as u64)
                } else {
                    json!(s.median)
                }
            });
            top.insert((*key).into(), median.unwrap_or(Value::Null));
            spreads.insert((*key).into(), json!(s));
        }
        let rss10k = self.rss_10k();
        top.insert(
            "rss_10k_clusters_bytes".into(),
            json!(rss10k.map(|s| s.median.round() as u64)),
        );
        spreads.insert("rss_10k_clusters_bytes".into(), json!(rss10k));
        top.insert(
            "rss_10k_clusters_null_reason".into(),
            json!(match (rss10k, &self.rss_10k_null_reason) {
                (Some(_), _) => None,
                (None, Some(why)) => Some(why.clone()),
                (None, None) if self.not_run.is_some() => self.not_run.clone(),
                (None, None) => Some(
                    self.rss_10k
                        .iter()
                        .find_map(|r| r.error.clone())
                        .unwrap_or_else(|| "not measured".into())
                ),
            }),
        );
        let sync = spread(self.rss_10k.iter().filter_map(|r| r.sync_seconds));
        top.insert("sync_10k_clusters_seconds".into(), json!(sync));
        if self.name != "nginx" {
            let r = self.vs_nginx(nginx);
            top.insert(
                "cpu_per_request_vs_nginx".into(),
                json!(r.map(|s| s.median)),
            );
            spreads.insert("cpu_per_request_vs_nginx".into(), json!(r));
        }
        top.insert(
            "generator_core_saturated".into(),
            json!(self.runs.iter().any(|r| r.generator_core_saturated)),
        );
        top.insert(
            "errors".into(),
            json!(self.runs.iter().map(|r| r.errors + r.non_2xx).sum::<u64>()),
        );
        top.insert(
            "overloaded_runs".into(),
            json!(self.runs.iter().filter(|r| r.overloaded).count()),
        );
        top.insert("spread".into(), Value::Object(spreads));
        top.insert("runs".into(), json!(self.runs));
        top.insert("failed_runs".into(), json!(self.failed_runs));
        top.insert("rss_10k_clusters_runs".into(), json!(self.rss_10k));
        Value::Object(top)
    }
}

/// The whole report: `meta` (machine, command, setup, generator) and every proxy.
pub fn json(meta: Value, proxies: &[ProxyResult]) -> Value {
    let nginx = proxies.iter().find(|p| p.name == "nginx");
    let mut out = match meta {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let by_name: BTreeMap<&str, Value> = proxies
        .iter()
        .map(|p| (p.name.as_str(), p.json(nginx)))
        .collect();
    out.insert("proxies".into(), json!(by_name));
    Value::Object(out)
}

/// The terminal table: median [min–max] per figure.
pub fn table(report: &Value) -> String {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "proxy",
        "CPU/req µs",
        "vs nginx",
        "p50 ms @rate",
        "p99 ms @rate",
        "req/s @rate",
        "saturated req/s",
        "gen. core",
        "RSS idle MiB",
        "RSS 10k MiB",
        "others on proxy core",
    ]);
    let Some(proxies) = report["proxies"].as_object() else {
        return String::new();
    };
    for (name, p) in proxies {
        if !p["ran"].as_bool().unwrap_or(false) {
            t.add_row(vec![
                name.clone(),
                format!("not run: {}", p["not_run_reason"].as_str().unwrap_or("?")),
            ]);
            continue;
        }
        let cell = |key: &str, scale: f64, digits: usize| -> String {
            let s = &p["spread"][key];
            match (s["median"].as_f64(), s["min"].as_f64(), s["max"].as_f64()) {
                (Some(m), Some(lo), Some(hi)) if lo == hi => format!("{:.*}", digits, m / scale),
                (Some(m), Some(lo), Some(hi)) => format!(
                    "{:.*} [{:.*}–{:.*}]",
                    digits,
                    m / scale,
                    digits,
                    lo / scale,
                    digits,
                    hi / scale
                ),
                _ => "—".into(),
            }
        };
        let gen_core = p["spread"]["generator_core_saturated_utilization"]["median"]
            .as_f64()
            .map_or("—".into(), |u| {
                format!(
                    "{:.0}%{}",
                    u * 100.0,
                    if p["generator_core_saturated"].as_bool() == Some(true) {
                        " (saturated)"
                    } else {
                        ""
                    }
                )
            });
        let mib = (1u64 << 20) as f64;
        t.add_row(vec![
            name.clone(),
            cell("cpu_per_request_us", 1.0, 2),
            cell("cpu_per_request_vs_nginx", 1.0, 2),
            cell("p50_ms", 1.0, 3),
            cell("p99_ms", 1.0, 3),
            cell("rps_at_rate", 1.0, 0),
            cell("rps_saturated", 1.0, 0),
            gen_core,
            cell("rss_idle_bytes", mib, 1),
            if p["rss_10k_clusters_bytes"].is_null() {
                "null".into()
            } else {
                cell("rss_10k_clusters_bytes", mib, 1)
            },
            p["spread"]["proxy_core_other_load"]["max"]
                .as_f64()
                .map_or("—".into(), |o| format!("≤ {:.1}%", o * 100.0)),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(run: usize, cpu: f64, rss: u64) -> RunFigures {
        RunFigures {
            run,
            cpu_per_request_us: Some(cpu),
            p50_ms: Some(0.2),
            p99_ms: Some(1.0),
            rps_at_rate: 20_000.0,
            rps_saturated: Some(80_000.0),
            rss_idle_bytes: Some(rss),
            ..RunFigures::default()
        }
    }

    #[test]
    fn medians_and_ranges_over_runs() {
        assert_eq!(spread([]), None);
        assert_eq!(
            spread([3.0, 1.0, 2.0]),
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(spread([4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(spread([f64::NAN, 1.0]).unwrap().median, 1.0);
    }

    #[test]
    fn the_json_has_every_figure_per_proxy_and_the_ratio_to_nginx_of_the_same_run() {
        let nginx = ProxyResult {
            name: "nginx".into(),
            runs: vec![run(0, 8.0, 6 << 20), run(1, 10.0, 6 << 20)],
            rss_10k_null_reason: Some("nginx has no xDS".into()),
            ..ProxyResult::default()
        };
        let ours = ProxyResult {
            name: "tributary-proxy".into(),
            // Run 0: 2x nginx's 8; run 1: 1x nginx's 10. Against the median of nginx
            // alone (9) the ratios would be different: the ratio is per run.
            runs: vec![run(0, 16.0, 10 << 20), run(1, 10.0, 12 << 20)],
            rss_10k: vec![Rss10k {
                run: 0,
                rss_bytes: Some(50 << 20),
                sync_seconds: Some(1.5),
                error: None,
            }],
            ..ProxyResult::default()
        };
        let absent = ProxyResult {
            name: "envoy".into(),
            not_run: Some("envoy not found on PATH".into()),
            ..ProxyResult::default()
        };
        let r = json(
            json!({"benchmark": "proxy", "command": "x"}),
            &[nginx, ours, absent],
        );
        assert_eq!(r["benchmark"], "proxy");
        let p = &r["proxies"];
        for name in ["nginx", "tributary-proxy", "envoy"] {
            for key in [
                "cpu_per_request_us",
                "p50_ms",
                "p99_ms",
                "rps_saturated",
                "rss_idle_bytes",
                "rss_10k_clusters_bytes",
                "spread",
                "runs",
            ] {
                assert!(p[name].get(key).is_some(), "{name}.{key} in {r:#}");
            }
        }
        assert_eq!(p["tributary-proxy"]["cpu_per_request_us"], 13.0);
        assert_eq!(p["tributary-proxy"]["cpu_per_request_vs_nginx"], 1.5);
        assert_eq!(
            p["tributary-proxy"]["spread"]["cpu_per_request_vs_nginx"]["max"],
            2.0
        );
        assert_eq!(p["tributary-proxy"]["rss_idle_bytes"], 11 << 20);
        assert_eq!(p["tributary-proxy"]["rss_10k_clusters_bytes"], 50 << 20);
        assert!(p["tributary-proxy"]["rss_10k_clusters_null_reason"].is_null());
        assert!(p["nginx"].get("cpu_per_request_vs_nginx").is_none());
        assert!(p["nginx"]["rss_10k_clusters_bytes"].is_null());
        assert_eq!(
            p["nginx"]["rss_10k_clusters_null_reason"],
            "nginx has no xDS"
        );
        assert_eq!(p["envoy"]["ran"], false);
        assert!(p["envoy"]["cpu_per_request_us"].is_null());
        assert_eq!(
            p["envoy"]["rss_10k_clusters_null_reason"],
            "envoy not found on PATH"
        );
        let t = table(&r);
        assert!(t.contains("not run: envoy not found on PATH"), "{t}");
        assert!(t.contains("13.00 [10.00–16.00]"), "{t}");
    }
}

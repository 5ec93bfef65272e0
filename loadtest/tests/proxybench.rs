//! The proxy benchmark's smoke mode, so that the harness does not rot: the generator,
//! the backend and the plain hyper proxy over IPv6 loopback, for a fraction of a
//! second. It checks that requests flow and the report has its shape; it asserts no
//! figure (timings belong to docs/benchmarks.md, not to tests).

use std::process::Command;

#[test]
fn the_smoke_mode_runs_the_hyper_proxy_and_reports_every_figure() {
    let dir = std::env::temp_dir().join(format!("proxybench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("proxy.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tributary-proxybench"))
        .args(["--smoke", "--proxies", "direct,hyper,tributary-proxy"])
        .args(["--ip", "::1", "--cpu-proxy", "", "--cpu-generator", ""])
        .args(["--hyper-bin", env!("CARGO_BIN_EXE_tributary-hyperproxy")])
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["setup"]["ip"], "::1");
    assert!(r["command"].as_str().unwrap().contains("--smoke"));
    let hyper = &r["proxies"]["hyper"];
    assert_eq!(hyper["ran"], true, "{r:#}");
    assert_eq!(hyper["runs"].as_array().unwrap().len(), 1);
    assert_eq!(hyper["errors"], 0);
    for key in [
        "cpu_per_request_us",
        "p50_ms",
        "p99_ms",
        "rps_saturated",
        "rss_idle_bytes",
        "cpu_per_request_vs_nginx",
    ] {
        assert!(hyper.get(key).is_some(), "hyper.{key} in {r:#}");
    }
    // Requests went through it and it has a process to measure.
    assert!(hyper["rps_at_rate"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(hyper["rps_saturated"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(hyper["rss_idle_bytes"].as_u64().unwrap() > 0, "{r:#}");
    assert!(hyper["cpu_per_request_us"].is_number(), "{r:#}");
    assert!(hyper["rss_10k_clusters_bytes"].is_null());
    assert!(
        hyper["rss_10k_clusters_null_reason"]
            .as_str()
            .unwrap()
            .contains("no xDS")
    );
    // The baseline has no proxy; ours, without --proxy-bin, is recorded as not run.
    assert!(r["proxies"]["direct"]["rps_saturated"].as_f64().unwrap() > 0.0);
    assert!(r["proxies"]["direct"]["cpu_per_request_us"].is_null());
    let ours = &r["proxies"]["tributary-proxy"];
    assert_eq!(ours["ran"], false);
    assert!(
        ours["not_run_reason"]
            .as_str()
            .unwrap()
            .contains("--proxy-bin")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

//! `tributary-proxybench`: HTTP/1.1 proxies side by side in one run —
//! `tributary-proxy`, Envoy (`--concurrency 1`), nginx (one worker) and a plain hyper
//! reverse proxy — with the generator straight to the backend as the baseline.
//!
//! Placement: the proxy under test on `--cpu-proxy` (core 0), this generator, the
//! backend and the hub on `--cpu-generator` (core 1). Each run takes every proxy in
//! turn (the order rotates between runs, so drift hits all of them), and for each:
//! start it and wait until a request through it succeeds (Envoy and ours get their
//! listener, route, cluster and endpoint from our hub over Delta ADS); read its idle
//! RSS; the fixed rate (open loop, `--rate` over `--connections`, latency from each
//! request's intended time) with its CPU per request; saturation (closed loop); stop it.
//! Then, for the proxies fed over xDS, the memory with `--clusters` more services from
//! a second hub. Figures: median and min–max over `--runs`; docs/benchmarks.md "Proxy".
//!
//! `tributary-proxybench backend` is the backend (a subcommand, so that it is its own
//! process with its own CPU figure).

mod backend;
mod load;
mod measure;
mod proxies;
mod report;
mod schedule;

// The process helpers of the load test (start, ready file, stop by pid, RSS); this
// binary uses part of them.
#[allow(dead_code)]
#[path = "../../procs.rs"]
mod procs;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

use crate::load::{Probe, Target};
use crate::procs::Proc;
use crate::proxies::{Kind, Running, Setup};
use crate::report::{ProxyResult, Rss10k, RunFigures};

#[derive(Debug, Parser)]
#[command(
    name = "tributary-proxybench",
    about = "HTTP/1.1 proxy benchmark: tributary-proxy, Envoy, nginx and a plain hyper proxy in one run"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Proxies to run, comma-separated, in this order in the first run (some of direct,
    /// nginx, envoy, hyper, tributary-proxy). One that is not installed (or, for ours,
    /// has no --proxy-bin) is recorded as not run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,nginx,envoy,hyper,tributary-proxy"
    )]
    proxies: Vec<String>,
    /// `tributary-proxy`; without it ours is recorded as not run.
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// The hub (default: `tributary` next to this binary).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// Extra hub flag (repeatable), e.g. --hub-arg=--debounce-quiet=10ms.
    #[arg(long = "hub-arg", allow_hyphen_values = true)]
    hub_args: Vec<String>,
    #[arg(long, default_value = "envoy")]
    envoy_bin: String,
    #[arg(long, default_value = "nginx")]
    nginx_bin: String,
    /// The plain hyper proxy (default: `tributary-hyperproxy` next to this binary).
    #[arg(long)]
    hyper_bin: Option<PathBuf>,
    /// Loopback address everything binds and connects to (127.0.0.1 or ::1).
    #[arg(long, default_value = "127.0.0.1")]
    ip: IpAddr,
    /// Keep-alive connections from the generator.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The fixed rate, requests per second over all connections (open loop).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Open loop: send in bursts once per this many microseconds (0: every request at
    /// its own time, evenly spaced). 1000 is what a generator with millisecond timers
    /// (wrk2) does; proxies then spend less CPU per request (docs/benchmarks.md).
    #[arg(long, default_value_t = 0)]
    tick_us: u64,
    /// Warm-up before each measured window, seconds (fixed rate and saturation).
    #[arg(long, default_value_t = 3.0)]
    warmup_s: f64,
    /// The fixed-rate window, seconds (long enough for CPU ticks of 10 ms to be precise).
    #[arg(long, default_value_t = 10.0)]
    measure_s: f64,
    /// The saturation window, seconds.
    #[arg(long, default_value_t = 5.0)]
    saturate_s: f64,
    /// Runs; each takes every proxy once, the order rotating between runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Services (each an Envoy cluster with one endpoint) for the memory figure; 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    clusters: usize,
    /// Longest wait for a proxy to hold --clusters clusters.
    #[arg(long, default_value_t = 300)]
    sync_timeout_s: u64,
    /// The backend's response body, bytes.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// CPUs of the proxy under test (`taskset -c` list); empty: no pinning.
    #[arg(long, default_value = "0")]
    cpu_proxy: String,
    /// CPUs of this generator, the backend and the hub; empty: no pinning.
    #[arg(long, default_value = "1")]
    cpu_generator: String,
    /// Tiny durations, one run, 20 clusters, 2,000 req/s: checks that the harness
    /// works, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Write the report as JSON (docs/bench/proxy.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Working directory for configs and logs (default: a fresh one under the temp
    /// dir, removed at the end unless --keep).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The backend: answers every request with a fixed body.
    Backend {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
        #[arg(long)]
        ready_file: PathBuf,
    },
}

/// The effective settings, after --smoke.
#[derive(Debug, Clone)]
struct Settings {
    connections: usize,
    rate: u64,
    tick: Duration,
    warmup: Duration,
    measure: Duration,
    saturate: Duration,
    runs: usize,
    clusters: usize,
}

impl Settings {
    fn from_args(a: &Args) -> anyhow::Result<Settings> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                bail!("--{name} {v}: expected seconds, a number ≥ 0")
            }
        };
        if a.connections == 0 || a.rate == 0 || a.runs == 0 {
            bail!(
                "--connections {}, --rate {}, --runs {}: each must be at least 1",
                a.connections,
                a.rate,
                a.runs
            );
        }
        if a.smoke {
            return Ok(Settings {
                connections: a.connections.min(8),
                rate: 2_000,
                tick: Duration::from_micros(a.tick_us),
                warmup: Duration::from_millis(200),
                measure: Duration::from_millis(500),
                saturate: Duration::from_millis(300),
                runs: 1,
                clusters: a.clusters.min(20),
            });
        }
        Ok(Settings {
            connections: a.connections,
            rate: a.rate,
            tick: Duration::from_micros(a.tick_us),
            warmup: secs("warmup-s", a.warmup_s)?,
            measure: secs("measure-s", a.measure_s)?,
            saturate: secs("saturate-s", a.saturate_s)?,
            runs: a.runs,
            clusters: a.clusters,
        })
    }
}

fn main() -> anyhow::Result<()> {
    tributary_controlplane::config::init_logging("warn");
    let args = Args::parse();
    if let Some(Cmd::Backend {
        listen,
        body_bytes,
        ready_file,
    }) = &args.cmd
    {
        return backend::run(*listen, *body_bytes, ready_file);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// A binary next to this one (the release and debug builds put them together).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

fn cpus(list: &str) -> Option<&str> {
    (!list.is_empty()).then_some(list)
}

/// Pins this process (every thread it has now; later ones inherit) to `cpus`.
fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset -a -p -c {cpus} (this process): {status}");
    }
    Ok(())
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let settings = Settings::from_args(&args)?;
    let kinds = args
        .proxies
        .iter()
        .map(|s| Kind::parse(s.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(c) = cpus(&args.cpu_generator) {
        pin_self(c)?;
    }
    let dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tributary-proxybench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("--work-dir {}", dir.display()))?;
    let result = bench_in(&args, &settings, &kinds, &dir).await;
    if !args.keep && args.work_dir.is_none() && result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs and configs: {}", dir.display());
    }
    result
}

async fn bench_in(
    args: &Args,
    settings: &Settings,
    kinds: &[Kind],
    dir: &Path,
) -> anyhow::Result<()> {
    let gen_cpus = cpus(&args.cpu_generator);
    let backend = Proc::start(
        "backend",
        &proxies::pinned(
            gen_cpus,
            vec![
                std::env::current_exe()?.display().to_string(),
                "backend".into(),
                "--listen".into(),
                SocketAddr::new(args.ip, 0).to_string(),
                "--body-bytes".into(),
                args.body_bytes.to_string(),
            ],
        ),
        dir,
    )?;
    let setup = Setup {
        dir: dir.to_path_buf(),
        ip: args.ip,
        cpu_proxy: cpus(&args.cpu_proxy).map(str::to_string),
        cpu_generator: gen_cpus.map(str::to_string),
        backend: backend.addr("addr")?.parse()?,
        nginx_bin: args.nginx_bin.clone(),
        envoy_bin: args.envoy_bin.clone(),
        hyper_bin: match &args.hyper_bin {
            Some(p) => p.clone(),
            None => sibling("tributary-hyperproxy")?,
        },
        proxy_bin: args.proxy_bin.clone(),
    };
    let hub_bin = match &args.hub_bin {
        Some(p) => p.clone(),
        None => sibling("tributary")?,
    };
    let mut results: Vec<ProxyResult> = kinds
        .iter()
        .map(|&k| ProxyResult {
            name: k.name().to_string(),
            not_run: why_not(k, &setup, &hub_bin),
            version: proxies::version(k, &setup),
            rss_10k_null_reason: match k {
                Kind::Nginx | Kind::Hyper => Some(format!(
                    "{} has no xDS client: it cannot be given clusters by the hub",
                    k.name()
                )),
                Kind::Direct => Some("no proxy".into()),
                _ => None,
            },
            ..ProxyResult::default()
        })
        .collect();
    let insecure = proxies::hub_has_insecure_flag(&hub_bin);
    // The listener the hub gives Envoy and ours (nginx listens there too).
    let listen = SocketAddr::new(args.ip, proxies::free_port(args.ip)?);
    let need_hub = kinds
        .iter()
        .zip(&results)
        .any(|(k, r)| k.uses_xds() && r.not_run.is_none());
    let hub = if need_hub {
        Some(start_hub(
            "hub", &hub_bin, dir, &setup, listen, 0, insecure, args, gen_cpus,
        )?)
    } else {
        None
    };
    let hub_xds = hub
        .as_ref()
        .map(|h| h.addr("xds").and_then(|a| Ok(a.parse()?)))
        .transpose()?;
    let backend_pid = backend.pid.and_then(|p| i32::try_from(p).ok());
    for run in 0..settings.runs {
        for i in 0..kinds.len() {
            let ix = (i + run) % kinds.len();
            let kind = kinds[ix];
            if results[ix].not_run.is_some() {
                continue;
            }
            eprintln!("run {run}: {}", kind.name());
            match one_run(kind, run, &setup, listen, hub_xds, settings, backend_pid).await {
                Ok((figures, argv)) => {
                    results[ix].command = argv;
                    results[ix].runs.push(figures);
                }
                Err(e) => {
                    eprintln!("run {run}: {}: {e:#}", kind.name());
                    results[ix].failed_runs.push(format!("run {run}: {e:#}"));
                }
            }
        }
    }
    drop(hub);
    if settings.clusters > 0 {
        memory_with_clusters(
            args,
            settings,
            kinds,
            &mut results,
            &setup,
            &hub_bin,
            insecure,
        )
        .await?;
    }
    drop(backend);
    let report = report::json(meta(args, settings, &setup), &results);
    println!("{}", report::table(&report));
    if let Some(path) = &args.json {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("--json {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // The figures are written either way; a run that failed or saw errors fails the
    // command, so that the smoke mode catches a harness or a proxy that rotted.
    let failures: Vec<String> = results
        .iter()
        .flat_map(|r| {
            let errors: u64 = r.runs.iter().map(|f| f.errors + f.non_2xx).sum();
            let first = r.runs.iter().find_map(|f| f.first_error.clone());
            r.failed_runs
                .iter()
                .map(move |f| format!("{}: {f}", r.name))
                .chain((errors > 0).then(|| {
                    format!(
                        "{}: {errors} failed requests (first: {})",
                        r.name,
                        first.unwrap_or_else(|| "non-2xx answers".into())
                    )
                }))
        })
        .collect();
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Why `kind` cannot run here (its binary is missing), or `None`.
fn why_not(kind: Kind, setup: &Setup, hub_bin: &Path) -> Option<String> {
    let missing_hub = || {
        (!hub_bin.is_file()).then(|| {
            format!(
                "the hub {} is missing (build it, or --hub-bin)",
                hub_bin.display()
            )
        })
    };
    match kind {
        Kind::Direct => None,
        Kind::Nginx => (!proxies::found(&setup.nginx_bin)).then(|| {
            format!(
                "{} not found (Debian: apt-get install nginx-light)",
                setup.nginx_bin
            )
        }),
        Kind::Envoy => (!proxies::found(&setup.envoy_bin))
            .then(|| format!("{} not found (scripts/install-peers)", setup.envoy_bin))
            .or_else(missing_hub),
        Kind::Hyper => (!setup.hyper_bin.is_file()).then(|| {
            format!(
                "{} is missing (cargo build -p tributary-loadtest)",
                setup.hyper_bin.display()
            )
        }),
        Kind::Tributary => match &setup.proxy_bin {
            None => Some("--proxy-bin not given (tributary-proxy is not built here)".into()),
            Some(p) if !p.is_file() => Some(format!("--proxy-bin {}: no such file", p.display())),
            Some(_) => missing_hub(),
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn start_hub(
    name: &str,
    hub_bin: &Path,
    dir: &Path,
    setup: &Setup,
    listen: SocketAddr,
    clusters: usize,
    insecure: bool,
    args: &Args,
    cpus: Option<&str>,
) -> anyhow::Result<Proc> {
    let config = dir.join(format!("{name}-config"));
    std::fs::create_dir_all(&config)?;
    std::fs::write(
        config.join("bench.yaml"),
        proxies::hub_config(setup.backend, listen, clusters),
    )?;
    let state = dir.join(format!("{name}-state"));
    let _ = std::fs::remove_dir_all(&state);
    let argv = proxies::pinned(
        cpus,
        proxies::hub_argv(hub_bin, &config, &state, setup.ip, insecure, &args.hub_args),
    );
    Proc::start(name, &argv, dir)
}

/// Until a request through the proxy is answered 200 (its listener, route and
/// upstream all work), or `timeout`.
async fn wait_serving(
    kind: Kind,
    running: &mut Running,
    target: &Target,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
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
        let last = match load::probe(target).await {
            Ok(200) => return Ok(()),
            Ok(code) => format!("answered {code}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{} did not serve {} within {timeout:?}: {last}",
                kind.name(),
                target.addr
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// RSS once it stops moving (two readings 200 ms apart within 1%, at most 5 s).
async fn settled_rss(pid: i32) -> u64 {
    let mut last = measure::tree_rss_bytes(pid);
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = measure::tree_rss_bytes(pid);
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

async fn one_run(
    kind: Kind,
    run: usize,
    setup: &Setup,
    listen: SocketAddr,
    hub_xds: Option<SocketAddr>,
    s: &Settings,
    backend_pid: Option<i32>,
) -> anyhow::Result<(RunFigures, Vec<String>)> {
    let mut running = proxies::start(kind, setup, listen, hub_xds, &format!("run{run}")).await?;
    let target = Target::get(running.listen, proxies::HOST, "/");
    wait_serving(kind, &mut running, &target, Duration::from_secs(60)).await?;
    let pid = running.pid();
    let rss_idle_bytes = match pid {
        Some(p) => Some(settled_rss(p).await),
        None => None,
    };
    let probe = Probe {
        proxy: pid,
        generator: std::process::id() as i32,
        backend: backend_pid,
        proxy_cpu: setup.cpu_proxy.as_deref().and_then(measure::single_cpu),
        generator_cpu: setup.cpu_generator.as_deref().and_then(measure::single_cpu),
    };
    let at_rate = load::fixed_rate(
        &target,
        probe,
        s.rate,
        s.tick,
        s.connections,
        s.warmup,
        s.measure,
    )
    .await?;
    let sat = load::saturate(
        &target,
        probe,
        s.connections,
        s.warmup.min(Duration::from_secs(1)),
        s.saturate,
    )
    .await?;
    let rss_after_load_bytes = pid.map(measure::tree_rss_bytes);
    let gen_busy = sat.generator_core_busy();
    let other = [
        at_rate.proxy_core_other_load(),
        sat.proxy_core_other_load(),
        at_rate.generator_core_other_load(),
        sat.generator_core_other_load(),
    ];
    let max_other = |pair: &[Option<f64>]| pair.iter().flatten().copied().reduce(f64::max);
    let rps_saturated = sat.rps();
    let figures = RunFigures {
        run,
        cpu_per_request_us: pid.and(at_rate.proxy_cpu_per_request_us()),
        p50_ms: ms(&at_rate.latency_us, 0.5),
        p99_ms: ms(&at_rate.latency_us, 0.99),
        p999_ms: ms(&at_rate.latency_us, 0.999),
        rps_at_rate: at_rate.rps(),
        pacer_lag_p99_ms: ms(&at_rate.pacer_lag_us, 0.99),
        proxy_core_at_rate: pid.map(|_| at_rate.proxy_core_utilization()),
        rps_saturated: Some(rps_saturated),
        p99_saturated_ms: ms(&sat.latency_us, 0.99),
        cpu_per_request_saturated_us: pid.and(sat.proxy_cpu_per_request_us()),
        proxy_core_saturated: pid.map(|_| sat.proxy_core_utilization()),
        generator_core_saturated_utilization: gen_busy,
        // The generator's core counts as saturated above 90% busy: it, not the proxy,
        // then bounds the saturated rate.
        generator_core_saturated: gen_busy >= 0.9,
        proxy_core_other_load: max_other(&other[..2]),
        generator_core_other_load: max_other(&other[2..]),
        rss_idle_bytes,
        rss_after_load_bytes,
        errors: at_rate.errors + sat.errors,
        non_2xx: at_rate.non_2xx + sat.non_2xx,
        // Not sustained: a queue overflowed, or under 95% of the rate completed.
        overloaded: at_rate.overloaded || at_rate.rps() < 0.95 * s.rate as f64,
        first_error: at_rate.first_error.or(sat.first_error),
    };
    if let Some(o) = figures.proxy_core_other_load.filter(|&o| o > 0.05) {
        eprintln!(
            "  warning: {:.0}% of the proxy's core went to other processes: this run's figures are disturbed",
            o * 100.0
        );
    }
    eprintln!(
        "  cpu/req {:?} us, p50 {:?} ms, p99 {:?} ms at {:.0} req/s; saturated {:.0} req/s (generator core {:.0}% busy); rss idle {:?}",
        figures.cpu_per_request_us,
        figures.p50_ms,
        figures.p99_ms,
        figures.rps_at_rate,
        rps_saturated,
        gen_busy * 100.0,
        figures.rss_idle_bytes
    );
    if let Some(p) = running.proc.take() {
        p.stop();
    }
    Ok((figures, running.argv))
}

/// The memory with `clusters` more services: a hub holding them, then each proxy fed
/// over xDS in turn (rotating between runs), its RSS once it holds them all.
async fn memory_with_clusters(
    args: &Args,
    s: &Settings,
    kinds: &[Kind],
    results: &mut [ProxyResult],
    setup: &Setup,
    hub_bin: &Path,
    insecure: bool,
) -> anyhow::Result<()> {
    let xds_kinds: Vec<usize> = (0..kinds.len())
        .filter(|&i| kinds[i].uses_xds() && results[i].not_run.is_none())
        .collect();
    if xds_kinds.is_empty() {
        return Ok(());
    }
    let listen = SocketAddr::new(args.ip, proxies::free_port(args.ip)?);
    let hub = start_hub(
        "hub-10k",
        hub_bin,
        &setup.dir,
        setup,
        listen,
        s.clusters,
        insecure,
        args,
        cpus(&args.cpu_generator),
    )?;
    let xds: SocketAddr = hub.addr("xds")?.parse()?;
    for run in 0..s.runs {
        for i in 0..xds_kinds.len() {
            let ix = xds_kinds[(i + run) % xds_kinds.len()];
            let kind = kinds[ix];
            eprintln!("run {run}: {} with {} clusters", kind.name(), s.clusters);
            let started = Instant::now();
            let r = async {
                let mut running =
                    proxies::start(kind, setup, listen, Some(xds), &format!("10k-run{run}"))
                        .await?;
                // Its own cluster and the bench service's are there too.
                proxies::wait_synced(
                    kind,
                    &mut running,
                    s.clusters,
                    Duration::from_secs(args.sync_timeout_s),
                )
                .await?;
                let synced = started.elapsed().as_secs_f64();
                let pid = running.pid().context("the proxy's pid")?;
                let rss = settled_rss(pid).await;
                if let Some(p) = running.proc.take() {
                    p.stop();
                }
                anyhow::Ok((rss, synced))
            }
            .await;
            results[ix].rss_10k.push(match r {
                Ok((rss, synced)) => {
                    eprintln!("  rss {rss} bytes, synced in {synced:.1} s");
                    Rss10k {
                        run,
                        rss_bytes: Some(rss),
                        sync_seconds: Some(synced),
                        error: None,
                    }
                }
                Err(e) => {
                    eprintln!("  {e:#}");
                    Rss10k {
                        run,
                        error: Some(format!("{e:#}")),
                        ..Rss10k::default()
                    }
                }
            });
        }
    }
    hub.stop();
    Ok(())
}

/// The machine, the command and the setup, for the report.
fn meta(args: &Args, s: &Settings, setup: &Setup) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|x| x.1.trim().to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .ok();
    // The machine's CPUs, not this process's (it is pinned to one).
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    json!({
        "benchmark": "proxy",
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": {"cpus": cpus, "model": model, "kernel": kernel},
        "setup": {
            "http": "HTTP/1.1 keep-alive",
            "request": format!("GET / HTTP/1.1, Host: {}", proxies::HOST),
            "response_body_bytes": args.body_bytes,
            "connections": s.connections,
            "rate_rps": s.rate,
            "tick_us": s.tick.as_micros(),
            "warmup_s": s.warmup.as_secs_f64(),
            "measure_s": s.measure.as_secs_f64(),
            "saturate_s": s.saturate.as_secs_f64(),
            "runs": s.runs,
            "clusters": s.clusters,
            "ip": setup.ip.to_string(),
            "cpu_proxy": args.cpu_proxy,
            "cpu_generator_backend_hub": args.cpu_generator,
            "smoke": args.smoke,
            "backend": "tributary-proxybench backend: Rust, one thread, a pre-built response, on the generator's core",
            "latency": "open loop: from each request's intended send time (no coordinated omission)",
            "cpu_per_request": "utime+stime of the proxy's process tree (/proc/PID/stat) over the fixed-rate window / requests completed in it",
            "rss": "VmRSS summed over the proxy's process tree (nginx: master + worker)",
        },
    })
}

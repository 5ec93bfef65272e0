//! The load generator: HTTP/1.1 keep-alive connections on this (current-thread)
//! runtime, hand-written request bytes, responses parsed with `httparse`.
//!
//! - **Open loop** ([`fixed_rate`]): a pacer thread deals request times from the
//!   [`Schedule`] to the connections' bounded queues; a connection sends each one when
//!   it is due, or as soon as its previous response is in if it is late, and its
//!   latency is measured from the *intended* time (no coordinated omission). A queue
//!   that overflows means the proxy cannot sustain the rate: the run stops and says so.
//! - **Closed loop** ([`saturate`]): every connection sends its next request as soon as
//!   the previous answer is in.
//!
//! Both count completions and read the CPU of the processes involved at the start and
//! the end of the measured window (after the warm-up), so that CPU per request divides
//! the CPU of exactly that window by the requests completed in it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::measure;
use crate::schedule::Schedule;

/// Where requests go and what they are.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The whole request, e.g. `GET / HTTP/1.1\r\nHost: bench.prod\r\n\r\n`.
    pub request: Arc<[u8]>,
}

impl Target {
    pub fn get(addr: SocketAddr, host: &str, path: &str) -> Target {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        Target {
            addr,
            request: request.into_bytes().into(),
        }
    }
}

/// The processes whose CPU a window accounts.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The proxy under test and its descendants (none: the direct baseline).
    pub proxy: Option<i32>,
    /// This process (the generator and its pacer thread).
    pub generator: i32,
    /// The backend, on the generator's core.
    pub backend: Option<i32>,
    /// The proxy's core and the generator's (when each is pinned to one CPU), whose
    /// whole busy time tells whether something else ran there.
    pub proxy_cpu: Option<usize>,
    pub generator_cpu: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    completed: u64,
    proxy: u64,
    generator: u64,
    backend: u64,
    proxy_core: u64,
    generator_core: u64,
}

impl Probe {
    fn sample(&self, completed: &AtomicU64) -> Sample {
        let single = |pid: Option<i32>| {
            pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
                .and_then(|t| measure::ticks_of_stat(&t).ok())
                .unwrap_or(0)
        };
        let cores = measure::cpu_busy_ticks();
        let core = |c: Option<usize>| c.and_then(|c| cores.get(c).copied()).unwrap_or(0);
        Sample {
            proxy_core: core(self.proxy_cpu),
            generator_core: core(self.generator_cpu),
            at: Instant::now(),
            completed: completed.load(Ordering::Relaxed),
            proxy: self.proxy.map_or(0, measure::tree_ticks),
            generator: single(Some(self.generator)),
            backend: single(self.backend),
        }
    }
}

/// What one measured window gave.
#[derive(Debug)]
pub struct Window {
    /// Requests completed inside the window.
    pub requests: u64,
    pub seconds: f64,
    /// CPU ticks over the window: the proxy (tree), this generator, the backend.
    pub proxy_ticks: u64,
    pub generator_ticks: u64,
    pub backend_ticks: u64,
    /// Busy ticks of the proxy's core and of the generator's core, everything counted.
    pub proxy_core_ticks: Option<u64>,
    pub generator_core_ticks: Option<u64>,
    /// Latency in microseconds of the requests intended (open loop) or sent (closed
    /// loop) inside the window.
    pub latency_us: Histogram<u64>,
    /// How late the pacer dealt requests, microseconds (open loop only).
    pub pacer_lag_us: Histogram<u64>,
    /// Failed exchanges (connect, reset, malformed answer) over the whole run.
    pub errors: u64,
    /// Answers other than 2xx over the whole run.
    pub non_2xx: u64,
    /// Connections opened again after the peer closed one.
    pub reconnects: u64,
    /// Open loop: a connection's queue overflowed, so the rate was not sustained.
    pub overloaded: bool,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Window {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// CPU microseconds per request of the proxy.
    pub fn proxy_cpu_per_request_us(&self) -> Option<f64> {
        measure::cpu_per_request_us(
            0,
            self.proxy_ticks,
            measure::ticks_per_second(),
            self.requests,
        )
    }

    /// Share of one core used by the generator and the backend together (they share
    /// one): near 1.0 means the generator's core, not the proxy, was the limit.
    pub fn generator_core_utilization(&self) -> f64 {
        let ticks = (self.generator_ticks + self.backend_ticks) as f64;
        ticks / measure::ticks_per_second() as f64 / self.seconds.max(1e-9)
    }

    /// Share of the proxy's core used by anything but the proxy (None: not pinned to
    /// one core, or the direct baseline).
    pub fn proxy_core_other_load(&self) -> Option<f64> {
        let busy = self.proxy_core_ticks?;
        Some(measure::other_load(
            busy,
            self.proxy_ticks,
            measure::ticks_per_second(),
            self.seconds,
        ))
    }

    /// Share of the generator's core used by anything but the generator and backend.
    pub fn generator_core_other_load(&self) -> Option<f64> {
        let busy = self.generator_core_ticks?;
        let own = self.generator_ticks + self.backend_ticks;
        Some(measure::other_load(
            busy,
            own,
            measure::ticks_per_second(),
            self.seconds,
        ))
    }

    /// Share of the generator's core busy with anything (it and the backend, the
    /// loopback's softirqs, and intruders); falls back to the processes' own CPU.
    pub fn generator_core_busy(&self) -> f64 {
        match self.generator_core_ticks {
            Some(t) => t as f64 / measure::ticks_per_second() as f64 / self.seconds.max(1e-9),
            None => self.generator_core_utilization(),
        }
    }

    pub fn proxy_core_utilization(&self) -> f64 {
        self.proxy_ticks as f64 / measure::ticks_per_second() as f64 / self.seconds.max(1e-9)
    }
}

fn histogram() -> Histogram<u64> {
    // 1 us .. 100 s at 3 significant figures.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One keep-alive connection and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

/// An answer: its status and whether the peer will close the connection.
struct Answer {
    status: u16,
    close: bool,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
        })
    }

    async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Answer> {
        self.stream.write_all(request).await?;
        loop {
            if let Some((len, answer)) = parse_response(&self.buf)? {
                self.buf.advance(len);
                return Ok(answer);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the peer closed the connection before answering");
            }
        }
    }
}

/// One request on a fresh connection, answered within 2 s: its status (readiness).
pub async fn probe(target: &Target) -> anyhow::Result<u16> {
    let limit = Duration::from_secs(2);
    let mut c = tokio::time::timeout(limit, Conn::open(target.addr))
        .await
        .context("connecting took over 2 s")??;
    let a = tokio::time::timeout(limit, c.exchange(&target.request))
        .await
        .context("no answer within 2 s")??;
    Ok(a.status)
}

/// A complete response at the start of `buf`: its length (head and body) and what it
/// said; `None` while incomplete. Bodies need a Content-Length (every proxy here sends
/// one for the backend's fixed body); chunked answers are refused, by name.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(usize, Answer)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf).context("parsing an HTTP/1.1 response")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp.code.unwrap_or(0);
    let mut body: Option<usize> = None;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok());
            body = Some(v.context("Content-Length is not a number")?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a chunked response (Transfer-Encoding) where a Content-Length was expected");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let body = match (body, status) {
        (Some(n), _) => n,
        (None, 100..=199 | 204 | 304) => 0,
        (None, _) => bail!("a {status} response without Content-Length"),
    };
    if buf.len() < head + body {
        return Ok(None);
    }
    Ok(Some((head + body, Answer { status, close })))
}

/// A connection's tallies over a run.
#[derive(Debug)]
struct Tally {
    latency_us: Histogram<u64>,
    errors: u64,
    non_2xx: u64,
    reconnects: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency_us: histogram(),
            errors: 0,
            non_2xx: 0,
            reconnects: 0,
            first_error: None,
        }
    }

    /// One request on `conn` (opened or re-opened as needed); true if answered.
    async fn one(&mut self, conn: &mut Option<Conn>, target: &Target) -> bool {
        if conn.is_none() {
            match Conn::open(target.addr).await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    self.fail(e);
                    return false;
                }
            }
        }
        let c = conn.as_mut().expect("opened above");
        match c.exchange(&target.request).await {
            Ok(a) => {
                if !(200..300).contains(&a.status) {
                    self.non_2xx += 1;
                }
                if a.close {
                    *conn = None;
                    self.reconnects += 1;
                }
                true
            }
            Err(e) => {
                *conn = None;
                self.fail(e);
                false
            }
        }
    }

    fn fail(&mut self, e: anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }
}

/// The measured window of a run: samples at its start and end.
async fn sample_window(
    probe: Probe,
    completed: Arc<AtomicU64>,
    from: Instant,
    to: Instant,
) -> (Sample, Sample) {
    tokio::time::sleep_until(from.into()).await;
    let a = probe.sample(&completed);
    tokio::time::sleep_until(to.into()).await;
    let b = probe.sample(&completed);
    (a, b)
}

fn window(
    probe: Probe,
    (a, b): (Sample, Sample),
    tallies: Vec<Tally>,
    pacer_lag_us: Histogram<u64>,
    overloaded: bool,
) -> Window {
    let mut w = Window {
        requests: b.completed - a.completed,
        seconds: (b.at - a.at).as_secs_f64(),
        proxy_ticks: b.proxy.saturating_sub(a.proxy),
        generator_ticks: b.generator.saturating_sub(a.generator),
        backend_ticks: b.backend.saturating_sub(a.backend),
        proxy_core_ticks: probe
            .proxy_cpu
            .filter(|_| probe.proxy.is_some())
            .map(|_| b.proxy_core.saturating_sub(a.proxy_core)),
        generator_core_ticks: probe
            .generator_cpu
            .map(|_| b.generator_core.saturating_sub(a.generator_core)),
        latency_us: histogram(),
        pacer_lag_us,
        errors: 0,
        non_2xx: 0,
        reconnects: 0,
        overloaded,
        first_error: None,
    };
    for t in tallies {
        w.latency_us
            .add(&t.latency_us)
            .expect("histograms of the same bounds");
        w.errors += t.errors;
        w.non_2xx += t.non_2xx;
        w.reconnects += t.reconnects;
        if w.first_error.is_none() {
            w.first_error = t.first_error;
        }
    }
    w
}

/// How long connections may take to answer what was already sent once a run ends.
const DRAIN: Duration = Duration::from_secs(10);

/// Open loop: `rate` requests per second over `connections` for `warmup + measure`;
/// the window is the last `measure`.
pub async fn fixed_rate(
    target: &Target,
    probe: Probe,
    rate: u64,
    tick: Duration,
    connections: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Window> {
    let schedule = Schedule {
        rate,
        connections,
        tick,
    };
    // A queue deeper than a second of a connection's share means the proxy is not
    // keeping up: stop rather than pile up work.
    let depth = usize::try_from(rate / connections as u64)
        .unwrap_or(1)
        .max(16);
    let completed = Arc::new(AtomicU64::new(0));
    let mut queues = Vec::with_capacity(connections);
    let mut tasks = tokio::task::JoinSet::new();
    // Connections are opened before the clock starts, so that connecting is not
    // counted as latency.
    let start = Instant::now() + Duration::from_millis(200);
    let (from, to) = (start + warmup, start + warmup + measure);
    for _ in 0..connections {
        let (tx, mut rx) = mpsc::channel::<Instant>(depth);
        queues.push(tx);
        let target = target.clone();
        let completed = completed.clone();
        let mut conn = Conn::open(target.addr).await.ok();
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while let Some(intended) = rx.recv().await {
                if tally.one(&mut conn, &target).await {
                    let done = Instant::now();
                    completed.fetch_add(1, Ordering::Relaxed);
                    if intended >= from && intended < to {
                        tally.latency_us.saturating_record(micros(done - intended));
                    }
                }
            }
            tally
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pacer = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pace(schedule, start, to, queues, &stop))?
    };
    let samples = sample_window(probe, completed, from, to).await;
    stop.store(true, Ordering::Relaxed);
    let (pacer_lag_us, overloaded) = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    let tallies = join_all(tasks).await?;
    Ok(window(probe, samples, tallies, pacer_lag_us, overloaded))
}

/// The pacer: deals each request to its connection's queue when it is due, until
/// `end` (or `stop`); returns its lateness histogram and whether a queue overflowed.
fn pace(
    schedule: Schedule,
    start: Instant,
    end: Instant,
    queues: Vec<mpsc::Sender<Instant>>,
    stop: &AtomicBool,
) -> (Histogram<u64>, bool) {
    let mut lag = histogram();
    let mut next: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end || stop.load(Ordering::Relaxed) {
            return (lag, false);
        }
        if now >= start {
            let due = schedule.due_by(now - start);
            while next < due {
                let intended = start + schedule.due(next);
                if intended >= end {
                    return (lag, false);
                }
                match queues[schedule.connection(next)].try_send(intended) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => return (lag, true),
                    Err(mpsc::error::TrySendError::Closed(_)) => return (lag, false),
                }
                lag.saturating_record(micros(now - intended));
                next += 1;
            }
        }
        let wake = start + schedule.due(next);
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
}

/// Closed loop: every connection sends back to back for `warmup + measure`.
pub async fn saturate(
    target: &Target,
    probe: Probe,
    connections: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Window> {
    let completed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now() + Duration::from_millis(200);
    let (from, to) = (start + warmup, start + warmup + measure);
    for _ in 0..connections {
        let target = target.clone();
        let completed = completed.clone();
        let mut conn = Conn::open(target.addr).await.ok();
        tasks.spawn(async move {
            let mut tally = Tally::new();
            tokio::time::sleep_until(start.into()).await;
            loop {
                let sent = Instant::now();
                if sent >= to {
                    break;
                }
                if tally.one(&mut conn, &target).await {
                    completed.fetch_add(1, Ordering::Relaxed);
                    if sent >= from {
                        tally.latency_us.saturating_record(micros(sent.elapsed()));
                    }
                } else {
                    // A refused connection must not spin: the next try waits a moment.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tally
        });
    }
    let samples = sample_window(probe, completed, from, to).await;
    let tallies = join_all(tasks).await?;
    Ok(window(probe, samples, tallies, histogram(), false))
}

/// Every connection's tally, once each has answered what it was sent (at most
/// [`DRAIN`]; a connection still waiting then counts as an error).
async fn join_all(mut tasks: tokio::task::JoinSet<Tally>) -> anyhow::Result<Vec<Tally>> {
    let deadline = tokio::time::Instant::now() + DRAIN;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(t)) => out.push(t?),
            Ok(None) => return Ok(out),
            Err(_) => {
                let mut t = Tally::new();
                t.errors = tasks.len() as u64;
                t.first_error = Some(format!(
                    "{} connections had no answer {DRAIN:?} after the run ended",
                    tasks.len()
                ));
                tasks.abort_all();
                out.push(t);
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_complete_only_with_its_whole_body() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello";
        for cut in 0..r.len() {
            assert!(parse_response(&r[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let (len, a) = parse_response(r).unwrap().unwrap();
        assert_eq!((len, a.status, a.close), (r.len(), 200, false));
        // The next response's bytes are left for the next exchange.
        let mut two = r.to_vec();
        two.extend_from_slice(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        let (len, _) = parse_response(&two).unwrap().unwrap();
        let (_, b) = parse_response(&two[len..]).unwrap().unwrap();
        assert_eq!((b.status, b.close), (503, true));
    }

    #[test]
    fn answers_the_generator_cannot_frame_are_errors_that_say_why() {
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let e = parse_response(chunked).err().unwrap().to_string();
        assert!(e.contains("chunked"), "{e}");
        let e = parse_response(b"HTTP/1.1 200 OK\r\n\r\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("without Content-Length"), "{e}");
        // HTTP/1.0 closes unless told otherwise.
        let (_, a) = parse_response(b"HTTP/1.0 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(a.close);
    }
}

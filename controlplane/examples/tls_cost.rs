//! What mutual TLS costs the hub, measured on its own: the CPU of one full handshake
//! of the hub's xDS listener (its `ServerConfig`, as `tributary hub --tls-cert ...`
//! builds it: ECDSA P-256 certificates of a test root, client certificate required
//! and checked, SPIFFE id read) against a client that resumes nothing (a proxy
//! starting cold, as the load test's clients are), and the CPU of encrypting and
//! decrypting bulk data once the session is up (records of 16 KiB, as the hub
//! writes its pushes).
//!
//! Both ends run in memory on one thread (no sockets): each side's time is the time
//! spent in its own rustls calls, so the figures are CPU per handshake and per MiB,
//! without the network or the scheduler. Used by `docs/benchmarks.md` ("Mutual TLS
//! cost") to split the extra CPU of an mTLS initial sync into handshakes and bulk
//! encryption.
//!
//! ```sh
//! cargo build --release -p tributary-controlplane --example tls_cost
//! ./target/release/examples/tls_cost --handshakes 2000 --mib 256
//! ```

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use tributary_controlplane::identity::Identity;
use tributary_controlplane::identity::testing::TestCa;
use tributary_controlplane::identity::tls::{self, DEFAULT_TRUST_DOMAIN};

#[derive(Parser, Debug)]
struct Args {
    /// Full handshakes to time (after 50 untimed ones).
    #[arg(long, default_value_t = 2000)]
    handshakes: usize,
    /// MiB of application data to encrypt and decrypt.
    #[arg(long, default_value_t = 256)]
    mib: usize,
}

/// Time spent in each side's rustls calls.
#[derive(Default, Clone, Copy)]
struct Sides {
    server: Duration,
    client: Duration,
}

/// Moves what `from` has to send into `to`; the time of each side's calls is added
/// to its clock (`write_tls` to the sender's, `read_tls` + `process_new_packets` to
/// the receiver's).
fn pump(
    from: &mut dyn FnMut(&mut Vec<u8>) -> usize,
    to: &mut dyn FnMut(&[u8]),
    from_clock: &mut Duration,
    to_clock: &mut Duration,
) -> bool {
    let mut buf = Vec::new();
    let t = Instant::now();
    let n = from(&mut buf);
    *from_clock += t.elapsed();
    if n == 0 {
        return false;
    }
    let t = Instant::now();
    to(&buf);
    *to_clock += t.elapsed();
    true
}

/// Hands the TLS bytes `wire` to `conn` and processes them.
fn feed<D>(conn: &mut rustls::ConnectionCommon<D>, mut wire: &[u8], what: &str) {
    while !wire.is_empty() {
        conn.read_tls(&mut wire).unwrap();
        conn.process_new_packets().expect(what);
    }
}

/// A full handshake between a new server and a new client connection, each side's
/// time added to its clock in `clocks`; until both are done and nothing is in flight
/// (the server's session tickets, sent after the client's Finished, are part of its
/// handshake).
fn connect(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    clocks: &mut Sides,
) -> (ServerConnection, ClientConnection) {
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).expect("server connection");
    clocks.server += t.elapsed();
    let t = Instant::now();
    let name = ServerName::try_from("hub.tributary.invalid").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).expect("client connection");
    clocks.client += t.elapsed();
    loop {
        let c_to_s = pump(
            &mut |buf| c.write_tls(buf).unwrap(),
            &mut |bytes| feed(&mut s, bytes, "the hub accepts the client"),
            &mut clocks.client,
            &mut clocks.server,
        );
        let s_to_c = pump(
            &mut |buf| s.write_tls(buf).unwrap(),
            &mut |bytes| feed(&mut c, bytes, "the client accepts the hub"),
            &mut clocks.server,
            &mut clocks.client,
        );
        if !c_to_s && !s_to_c && !c.is_handshaking() && !s.is_handshaking() {
            return (s, c);
        }
    }
}

/// One full handshake's time on each side.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Sides {
    let mut clocks = Sides::default();
    let (s, _) = connect(server, client, &mut clocks);
    assert!(
        s.peer_certificates().is_some(),
        "the client presented a certificate"
    );
    clocks
}

/// (server encrypt, client decrypt) time for `mib` MiB written as 16 KiB writes, and
/// the cipher suite negotiated.
fn bulk(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>, mib: usize) -> (Sides, String) {
    let (mut s, mut c) = connect(server, client, &mut Sides::default());
    let chunk = vec![0x5au8; 16 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    let mut clocks = Sides::default();
    for _ in 0..mib * 64 {
        let t = Instant::now();
        s.writer().write_all(&chunk).unwrap();
        let mut wire = Vec::with_capacity(chunk.len() + 64);
        s.write_tls(&mut wire).unwrap();
        clocks.server += t.elapsed();
        let t = Instant::now();
        let mut got = 0;
        feed(&mut c, &wire, "the client decrypts");
        while got < chunk.len() {
            got += c.reader().read(&mut plain).unwrap();
        }
        clocks.client += t.elapsed();
    }
    let suite = s
        .negotiated_cipher_suite()
        .map_or("none".to_string(), |c| format!("{:?}", c.suite()));
    (clocks, suite)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(label: &str, mut times: Vec<Duration>) {
    times.sort();
    let total: Duration = times.iter().sum();
    println!(
        "  {label:<28} mean {:>7.1} µs   p50 {:>7.1} µs   p99 {:>7.1} µs",
        total.as_secs_f64() * 1e6 / times.len() as f64,
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(DEFAULT_TRUST_DOMAIN);
    let hub = ca.write(
        dir.path(),
        "hub",
        Identity::Hub {
            replica: "hub".into(),
        },
    );
    let proxy = ca.write(
        dir.path(),
        "proxy",
        Identity::Workload {
            env: "prod".into(),
            namespace: "loadtest".into(),
            service_account: "app-0".into(),
        },
    );
    let server = Arc::new(tls::server_config(
        &hub,
        DEFAULT_TRUST_DOMAIN,
        tls::ALPN_GRPC,
    )?);
    let mut client = tls::client_config(&proxy, DEFAULT_TRUST_DOMAIN, tls::ALPN_GRPC)?;
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);

    println!(
        "full mTLS handshakes of the hub's xDS listener config ({} timed), ECDSA P-256, X25519, TLS 1.3:",
        args.handshakes
    );
    for _ in 0..50 {
        handshake(&server, &client);
    }
    let runs: Vec<Sides> = (0..args.handshakes)
        .map(|_| handshake(&server, &client))
        .collect();
    report(
        "hub (server) per handshake",
        runs.iter().map(|r| r.server).collect(),
    );
    report(
        "client per handshake",
        runs.iter().map(|r| r.client).collect(),
    );
    // The same without the two TLS 1.3 session tickets rustls sends by default after
    // each full handshake (what they cost the hub; a cold client never uses them).
    let mut no_tickets = (*server).clone();
    no_tickets.send_tls13_tickets = 0;
    let no_tickets = Arc::new(no_tickets);
    let runs: Vec<Sides> = (0..args.handshakes)
        .map(|_| handshake(&no_tickets, &client))
        .collect();
    report(
        "hub, no session tickets",
        runs.iter().map(|r| r.server).collect(),
    );
    report(
        "client, no session tickets",
        runs.iter().map(|r| r.client).collect(),
    );

    let (b, suite) = bulk(&server, &client, args.mib);
    let per_mib = |d: Duration| d.as_secs_f64() * 1e3 / args.mib as f64;
    println!(
        "bulk data, {} MiB in 16 KiB writes ({suite} records):",
        args.mib
    );
    println!(
        "  hub encrypts                 {:>7.3} ms per MiB",
        per_mib(b.server)
    );
    println!(
        "  client decrypts              {:>7.3} ms per MiB",
        per_mib(b.client)
    );
    Ok(())
}

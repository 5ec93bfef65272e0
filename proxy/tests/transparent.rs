//! Transparent sidecar mode in a network namespace this test creates (`unshare -rn`:
//! a user and network namespace, so no privileges are needed): iptables / ip6tables
//! `-t nat OUTPUT REDIRECT` send the application's connections to the proxy's
//! `virtualOutbound` (port 15001, as the hub generates it), and the proxy serves each
//! by its original destination (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`): a service
//! port the hub has an outbound listener for is routed by that listener's route table
//! to the service's endpoint; any other destination is passed through to itself
//! (`PassthroughCluster`). IPv4 and IPv6.
//!
//! The application is told apart from the proxy by its source address (it binds
//! 10.97.0.1 / fd00:97::1; only those are captured), where a real sidecar excludes
//! the proxy's uid: in one process there is one uid.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tributary_proxy::bootstrap::Bootstrap;

const CHILD: &str = "TRIBUTARY_TEST_IN_NETNS";
const NAME: &str = "captured_connections_are_served_by_their_original_destination";

/// The application's own addresses: only connections from these are captured.
const APP_V4: &str = "10.97.0.1";
const APP_V6: &str = "fd00:97::1";
/// Service addresses that nothing listens on at the service port (a "VIP").
const VIP_V4: &str = "10.96.0.10";
const VIP_V6: &str = "fd00:96::10";
/// Hosts outside the mesh, reached by passthrough.
const EXT_V4: &str = "10.96.0.20";
const EXT_V6: &str = "fd00:96::20";

#[test]
fn captured_connections_are_served_by_their_original_destination() {
    if std::env::var_os(CHILD).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(in_namespace());
        return;
    }
    match Command::new("unshare").args(["-rn", "true"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: this machine does not permit network namespaces (`unshare -rn true`: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: `unshare` (util-linux) cannot run here: {e}");
            return;
        }
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .arg("-rn")
        .arg(&exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "in the namespace:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the test ran in the namespace:\n{text}"
    );
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e} (iptables: apt-get install iptables)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace's addresses and the capture rules.
fn network() {
    run("ip", &["link", "set", "lo", "up"]);
    for a in [APP_V4, VIP_V4, EXT_V4] {
        run("ip", &["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    for a in [APP_V6, VIP_V6, EXT_V6] {
        run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ],
        );
    }
    for (tool, src) in [("iptables", APP_V4), ("ip6tables", APP_V6)] {
        run(
            tool,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-s",
                src,
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        );
    }
}

/// A TCP server outside the mesh: answers each connection with its name and the peer
/// address it saw, then closes.
async fn external(addr: SocketAddr, name: &'static str) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = s
                    .write_all(format!("{name} saw {}", peer.ip()).as_bytes())
                    .await;
            });
        }
    });
}

/// Connects from the application's address `from` to `to`.
async fn app_connect(from: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let from: IpAddr = from.parse().unwrap();
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(TIMEOUT, socket.connect(to))
        .await
        .expect("connect within the timeout")
}

async fn read_all(mut s: tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("the answer within the timeout")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/1.1 GET from the application to `to` with `Host: host`: the whole answer.
async fn app_get(from: &str, to: SocketAddr, host: &str) -> String {
    let mut s = app_connect(from, to).await.expect("captured connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_all(s).await.to_ascii_lowercase()
}

async fn in_namespace() {
    network();
    let reviews = Backend::start("reviews", Mode::Ok).await;
    external(SocketAddr::new(EXT_V4.parse().unwrap(), 9000), "ext-v4").await;
    external(SocketAddr::new(EXT_V6.parse().unwrap(), 9000), "ext-v6").await;
    let hub = TestHub::start(&[
        ("services.yaml", service("reviews", 8080, "HTTP")),
        (
            "endpoints.yaml",
            endpoints("reviews", &[(reviews.addr, "v1", "z1")]),
        ),
    ])
    .await;
    // A sidecar as the hub configures it: no outbound address, no port override;
    // virtualOutbound binds its own port, 15001.
    let text = format!(
        "node:\n  id: sidecar-0\n  environment: prod\n  zone: z1\n  region: r1\nxds:\n  address: http://{}\nadmin:\n  address: 127.0.0.1:0\n",
        hub.hub.xds_addr
    );
    let proxy = start_proxy(Bootstrap::parse(Path::new("sidecar.yaml"), &text).unwrap()).await;
    ready(&proxy).await;
    let outbound = tokio::time::timeout(TIMEOUT, proxy.listener_addr("virtualOutbound"))
        .await
        .unwrap_or_else(|_| panic!("virtualOutbound is not bound: {}", hub.sync_status()));
    assert_eq!(outbound.port(), 15001);

    // Everything the hub generates for a sidecar is honoured: nothing NACKed.
    let status = hub.sync_status().to_string();
    assert!(!status.contains("use_original_dst"), "{status}");
    assert!(!status.contains("ORIGINAL_DST"), "{status}");
    let (_, dump) = admin(&proxy, "/config_dump").await;
    assert!(dump.contains("PassthroughCluster"), "{dump}");

    // The control: uncaptured, nothing answers at the service address.
    let direct = tokio::net::TcpStream::connect(SocketAddr::new(VIP_V4.parse().unwrap(), 8080));
    assert!(
        direct.await.is_err(),
        "nothing listens at {VIP_V4}:8080 without capture"
    );

    // A service port: the listener 0.0.0.0_8080 routes by Host to the endpoint.
    for (from, vip) in [(APP_V4, VIP_V4), (APP_V6, VIP_V6)] {
        let to = SocketAddr::new(vip.parse().unwrap(), 8080);
        let answer = app_get(from, to, "reviews.prod").await;
        assert!(answer.starts_with("http/1.1 200"), "{to}: {answer}");
        assert!(answer.contains("x-backend: reviews"), "{to}: {answer}");
        // An unknown host on that port: the listener's route table answers 404, so
        // the connection did go through the mesh's listener, not passthrough.
        let answer = app_get(from, to, "unknown.prod").await;
        assert!(answer.starts_with("http/1.1 404"), "{to}: {answer}");
    }
    assert_eq!(
        reviews.hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one request per family reached the endpoint"
    );

    // Any other destination: passed through to itself, by the proxy (the server sees
    // the proxy's connection, not the application's address).
    for (from, ext, name) in [(APP_V4, EXT_V4, "ext-v4"), (APP_V6, EXT_V6, "ext-v6")] {
        let to = SocketAddr::new(ext.parse().unwrap(), 9000);
        let s = app_connect(from, to).await.expect("captured connect");
        let answer = read_all(s).await;
        assert!(
            answer.starts_with(&format!("{name} saw ")),
            "{to}: {answer}"
        );
        assert!(
            !answer.ends_with(&format!("saw {from}")),
            "{to}: the connection went through the proxy: {answer}"
        );
    }
    let (_, stats) = admin(&proxy, "/stats").await;
    assert!(
        stats.contains("tributary_proxy_upstream_requests_total{cluster=\"PassthroughCluster\"} 2"),
        "{stats}"
    );
}

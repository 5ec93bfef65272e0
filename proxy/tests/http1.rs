//! HTTP/1.1 framing through the proxy, byte by byte: chunked bodies streamed both
//! ways, pipelining, a response delimited by the upstream's close, `100-continue`,
//! HEAD and 204, upgrades handed to hyper's path, malformed and oversized heads,
//! upstream failures. Each case runs with the fast path (`src/http1.rs`) and with
//! it off (hyper's path), which must behave the same.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tributary_proxy::Proxy;
use tributary_proxy::bootstrap::Bootstrap;
use tributary_proxy::cluster::{
    Assignment, Cluster, ClusterDef, EndpointDef, LbPolicy, Limits, LocalityEndpoints,
};
use tributary_proxy::config::{
    ClusterChoice, Codec, ListenerConfig, NetworkFilter, PathMatch, RetryPolicy, Route,
    RouteAction, RouteTable, Snapshot, VirtualHost, Xfcc,
};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A proxy whose listener `l` routes everything to one cluster `c` of `backend`, with
/// the route timeout `timeout`; `fast` turns the HTTP/1.1 fast path on or off.
async fn proxy(fast: bool, backend: SocketAddr, timeout: Duration) -> (Proxy, SocketAddr) {
    proxy_with(fast, &[backend], timeout, Limits::default(), None).await
}

/// As [`proxy`], with the cluster's `backends` (round robin), circuit breakers and
/// the route's retry policy.
async fn proxy_with(
    fast: bool,
    backends: &[SocketAddr],
    timeout: Duration,
    limits: Limits,
    retry: Option<RetryPolicy>,
) -> (Proxy, SocketAddr) {
    let text = format!(
        "node: {{id: p, environment: prod}}\nxds: {{address: \"http://127.0.0.1:1\"}}\nadmin: {{address: \"127.0.0.1:0\"}}\nlisteners: {{port_override: 0, http1_fast_path: {fast}}}\n"
    );
    let b = Bootstrap::parse(Path::new("test.yaml"), &text).unwrap();
    let proxy = Proxy::serve(&b).await.unwrap();
    let def = ClusterDef {
        name: "c".into(),
        eds_name: None,
        static_assignment: Some(Assignment {
            priorities: vec![vec![LocalityEndpoints {
                zone: "z1".into(),
                weight: 1,
                endpoints: backends
                    .iter()
                    .map(|&address| EndpointDef {
                        address,
                        weight: 1,
                        healthy: true,
                    })
                    .collect(),
            }]],
            overprovisioning: 140,
        }),
        original_dst: false,
        lb: LbPolicy::RoundRobin,
        locality_weighted: false,
        http2: false,
        connect_timeout: Duration::from_secs(1),
        outlier: None,
        limits,
        tls: None,
    };
    let cluster = Arc::new(Cluster::new(def, proxy.shared.metrics.cluster("c")));
    let table = RouteTable {
        name: "r".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            routes: vec![Route {
                path: PathMatch::Prefix("/".into()),
                headers: vec![],
                grpc: false,
                action: RouteAction {
                    clusters: ClusterChoice::One("c".into()),
                    timeout: Some(timeout),
                    retry,
                },
            }],
        }],
        exact: HashMap::new(),
        suffixes: vec![],
        prefixes: vec![],
        any: Some(0),
    };
    proxy.shared.snapshot.store(Arc::new(Snapshot {
        routes: [("r".into(), Arc::new(table))].into(),
        clusters: [("c".into(), cluster)].into(),
    }));
    let listener = ListenerConfig {
        name: "l".into(),
        address: "127.0.0.1:0".parse().unwrap(),
        bind_to_port: true,
        use_original_dst: false,
        filter: NetworkFilter::Http {
            route_config: "r".into(),
            codec: Codec::Auto,
            inline: None,
            xfcc: Xfcc::Sanitize,
        },
        tls: None,
    };
    proxy
        .shared
        .listeners
        .send_replace([("l".into(), listener)].into());
    let addr = tokio::time::timeout(TIMEOUT, proxy.listener_addr("l"))
        .await
        .unwrap();
    (proxy, addr)
}

/// A request as a backend received it: its head (as sent) and its body (decoded).
#[derive(Debug, Clone)]
struct Received {
    head: String,
    body: Vec<u8>,
}

impl Received {
    fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
}

/// A scripted backend: `script` serves each accepted connection.
async fn backend<F, Fut>(script: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(script(stream));
        }
    });
    addr
}

/// Reads until `buf` holds a complete head; returns its length, or `None` at EOF.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut chunk))
            .await
            .expect("bytes within the timeout")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(TIMEOUT, s.read(&mut chunk))
        .await
        .expect("bytes within the timeout")
    {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Every field line `name` of `head` combined (RFC 9110 §5.3), `None` without one.
fn combined(head: &str, name: &str) -> Option<String> {
    let values: Vec<&str> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Whether `head`'s final transfer coding is chunked.
fn chunked(head: &str) -> bool {
    combined(head, "transfer-encoding").is_some_and(|v| {
        v.rsplit(',')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
    })
}

/// Reads one message body framed as `head` says (`until_close` when it has no
/// framing), decoding chunks; `on_chunk` sees each chunk's data as it arrives.
async fn read_body(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &str,
    until_close: bool,
    mut on_chunk: impl FnMut(&[u8]),
) -> Vec<u8> {
    let mut body = Vec::new();
    if chunked(head) {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(fill(s, buf).await, "chunked body cut short");
            };
            let line = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        buf.drain(..i + 2);
                        if i == 0 {
                            return body;
                        }
                        continue;
                    }
                    assert!(fill(s, buf).await, "trailers cut short");
                }
            }
            while buf.len() < size + 2 {
                assert!(fill(s, buf).await, "chunk cut short");
            }
            on_chunk(&buf[..size]);
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(n) = header(head, "content-length") {
        let n: usize = n.parse().unwrap();
        while buf.len() < n {
            assert!(fill(s, buf).await, "body cut short");
        }
        body.extend(buf.drain(..n));
        body
    } else if until_close {
        while fill(s, buf).await {}
        body.append(buf);
        body
    } else {
        body
    }
}

/// Reads one request at the backend.
async fn receive(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let n = read_head(s, buf).await?;
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    buf.drain(..n);
    let body = read_body(s, buf, &head, false, |_| {}).await;
    Some(Received { head, body })
}

/// A response as the client received it.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

async fn answer(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Answer {
    answer_with(s, buf, head_request, |_| {}).await
}

async fn answer_with(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
    on_chunk: impl FnMut(&[u8]),
) -> Answer {
    let n = read_head(s, buf).await.expect("a response head");
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    buf.drain(..n);
    let status: u16 = head[9..12].parse().unwrap();
    let body = if head_request || status == 204 || status == 304 || status == 100 {
        Vec::new()
    } else {
        read_body(s, buf, &head, false, on_chunk).await
    };
    Answer { status, head, body }
}

/// Whether the peer closed the connection (EOF, or a reset).
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(TIMEOUT, s.read(&mut b))
            .await
            .expect("EOF within the timeout"),
        Ok(0) | Err(_)
    )
}

/// A backend that answers every request 200 with `path:body`, and reports each.
async fn echo() -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = backend(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(r) = receive(&mut s, &mut buf).await {
                let mut body = r.path().as_bytes().to_vec();
                body.push(b':');
                body.extend_from_slice(&r.body);
                let _ = tx.send(r);
                let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                    .into_bytes();
                out.extend_from_slice(&body);
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, rx)
}

const BOTH: [bool; 2] = [true, false];

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    for fast in BOTH {
        let (b, mut seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyzGET /3 HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        for want in ["/1:", "/2:xyz", "/3:"] {
            let a = answer(&mut c, &mut buf, false).await;
            assert_eq!(
                (a.status, String::from_utf8(a.body).unwrap()),
                (200, want.into()),
                "fast={fast}"
            );
        }
        let paths: Vec<String> = (0..3)
            .map(|_| seen.try_recv().unwrap().path().to_string())
            .collect();
        assert_eq!(paths, ["/1", "/2", "/3"], "fast={fast}");
    }
}

#[tokio::test]
async fn chunked_request_and_response_bodies_are_streamed_not_buffered() {
    for fast in BOTH {
        // The backend reports the request's first chunk as soon as it arrives, and
        // answers in two chunks, the second only once the client has the first.
        let (first_in, mut first_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
        let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
        let b = backend(move |mut s| {
            let first_in = first_in.clone();
            let release_rx = release_rx.clone();
            async move {
                let mut buf = Vec::new();
                let n = read_head(&mut s, &mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                buf.drain(..n);
                assert!(header(&head, "transfer-encoding").is_some(), "{head}");
                let mut chunks = Vec::new();
                let mut reported = false;
                let body = read_body(&mut s, &mut buf, &head, false, |d| {
                    chunks.push(d.to_vec());
                    if !reported {
                        reported = true;
                        let _ = first_in.send(d.to_vec());
                    }
                })
                .await;
                assert_eq!(body, b"hello world");
                s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
                    .await
                    .unwrap();
                release_rx.lock().await.recv().await;
                s.write_all(b"2\r\nef\r\n0\r\n\r\n").await.unwrap();
            }
        })
        .await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
        // The first chunk reaches the backend before the client sends the rest.
        let first = tokio::time::timeout(TIMEOUT, first_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, b"hello", "fast={fast}");
        c.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let mut firsts = 0;
        let a = answer_with(&mut c, &mut buf, false, |d| {
            if firsts == 0 {
                assert_eq!(d, b"abcd");
                // The backend holds its last chunk until the client has the first.
                let _ = release_tx.send(());
            }
            firsts += 1;
        })
        .await;
        assert_eq!((a.status, a.body), (200, b"abcdef".to_vec()), "fast={fast}");
    }
}

#[tokio::test]
async fn a_response_without_length_ends_with_the_upstream_close_and_the_client_keeps_its_connection()
 {
    for fast in BOTH {
        let b = backend(|mut s| async move {
            let mut buf = Vec::new();
            let r = receive(&mut s, &mut buf).await.unwrap();
            let body = format!("no length for {}", r.path());
            s.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n{body}").as_bytes(),
            )
            .await
            .unwrap();
            // Closing is the end of the body.
        })
        .await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        for path in ["/a", "/b"] {
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let a = answer(&mut c, &mut buf, false).await;
            assert_eq!(a.status, 200, "fast={fast}");
            assert_eq!(
                header(&a.head, "transfer-encoding"),
                Some("chunked"),
                "{}",
                a.head
            );
            assert_eq!(
                a.body,
                format!("no length for {path}").as_bytes(),
                "fast={fast}"
            );
        }
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    for fast in BOTH {
        let (b, mut seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        let interim = answer(&mut c, &mut buf, false).await;
        assert_eq!(interim.status, 100, "fast={fast}: {}", interim.head);
        c.write_all(b"12345").await.unwrap();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(
            (a.status, a.body),
            (200, b"/x:12345".to_vec()),
            "fast={fast}"
        );
        assert_eq!(seen.recv().await.unwrap().body, b"12345");
    }
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_and_the_connection_goes_on() {
    for fast in BOTH {
        let b = backend(|mut s| async move {
            let mut buf = Vec::new();
            while let Some(r) = receive(&mut s, &mut buf).await {
                let out: &[u8] = match r.path() {
                    "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                    "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
                    "/304" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
                    _ => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast",
                };
                s.write_all(out).await.unwrap();
            }
        })
        .await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\nGET /204 HTTP/1.1\r\nHost: a\r\n\r\nGET /304 HTTP/1.1\r\nHost: a\r\n\r\nGET /end HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let a = answer(&mut c, &mut buf, true).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            header(&a.head, "content-length"),
            Some("10"),
            "fast={fast}: {}",
            a.head
        );
        assert_eq!(answer(&mut c, &mut buf, false).await.status, 204);
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(a.status, 304);
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!((a.status, a.body), (200, b"last".to_vec()), "fast={fast}");
    }
}

#[tokio::test]
async fn an_upgrade_request_is_handed_to_hyper_with_the_bytes_already_read() {
    // hyper's client sends header names lower-case; the fast path keeps their case:
    // what the backend sees says which path carried each request.
    for fast in BOTH {
        let (b, mut seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        c.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\nX-Case: 1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut c, &mut buf, false).await.status, 200);
        // An upgrade and a request pipelined behind it, in one write.
        c.write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\nX-Case: 2\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\nX-Case: 3\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut c, &mut buf, false).await.body, b"/2:");
        assert_eq!(answer(&mut c, &mut buf, false).await.body, b"/3:");
        let heads: Vec<String> = (0..3).map(|_| seen.try_recv().unwrap().head).collect();
        let cased: Vec<bool> = heads.iter().map(|h| h.contains("X-Case:")).collect();
        if fast {
            assert_eq!(cased, [true, false, false], "{heads:?}");
        } else {
            assert_eq!(cased, [false, false, false], "{heads:?}");
        }
        // The upgrade itself is not forwarded (hop-by-hop).
        assert!(
            !heads[1].to_ascii_lowercase().contains("upgrade"),
            "{}",
            heads[1]
        );
    }
}

#[tokio::test]
async fn malformed_requests_are_answered_400_and_the_connection_closed() {
    for fast in BOTH {
        let (b, _seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        for bad in [
            &b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
        ] {
            let (mut c, a) = send_raw(addr, bad).await;
            assert_eq!(
                a.status,
                400,
                "fast={fast}: {}",
                String::from_utf8_lossy(bad)
            );
            assert!(closed(&mut c).await, "fast={fast}");
        }
    }
}

#[tokio::test]
async fn a_broken_chunked_request_body_is_answered_400_and_closed() {
    let (b, _seen) = echo().await;
    let (_p, addr) = proxy(true, b, Duration::from_secs(15)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(answer(&mut c, &mut buf, false).await.status, 400);
    assert!(closed(&mut c).await);
}

#[tokio::test]
async fn too_many_header_fields_are_answered_431_and_the_connection_closed() {
    for fast in BOTH {
        let (b, _seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut req = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..120 {
            req.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&req).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            answer(&mut c, &mut buf, false).await.status,
            431,
            "fast={fast}"
        );
        assert!(closed(&mut c).await, "fast={fast}");
    }
}

#[tokio::test]
async fn a_header_section_over_60_kib_is_answered_431_on_the_fast_path() {
    let (b, _seen) = echo().await;
    let (_p, addr) = proxy(true, b, Duration::from_secs(15)).await;
    let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nx-big: ".to_vec();
    req.extend(std::iter::repeat_n(b'v', 64 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let mut c = TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before it has read everything.
    let _ = c.write_all(&req).await;
    let mut buf = Vec::new();
    assert_eq!(answer(&mut c, &mut buf, false).await.status, 431);
    assert!(closed(&mut c).await);
}

#[tokio::test]
async fn upstream_failures_are_answered_503_and_504() {
    for fast in BOTH {
        // Closes every connection without answering.
        let rude = backend(|mut s| async move {
            let mut buf = Vec::new();
            let _ = read_head(&mut s, &mut buf).await;
        })
        .await;
        let (_p, addr) = proxy(fast, rude, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(
            (a.status, a.body),
            (503, b"upstream reset before headers".to_vec()),
            "fast={fast}"
        );

        // Never answers: the route's timeout.
        let (hold_tx, _hold) = tokio::sync::watch::channel(());
        let silent = backend(move |mut s| {
            let mut hold = hold_tx.subscribe();
            async move {
                let mut buf = Vec::new();
                let _ = read_head(&mut s, &mut buf).await;
                let _ = hold.changed().await;
            }
        })
        .await;
        let (_p, addr) = proxy(fast, silent, Duration::from_millis(200)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(
            (a.status, a.body),
            (504, b"upstream request timeout".to_vec()),
            "fast={fast}"
        );

        // Nothing listens: a connect failure.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        let (_p, addr) = proxy(fast, gone_addr, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(
            (a.status, a.body),
            (503, b"upstream connect error".to_vec()),
            "fast={fast}"
        );
    }
}

/// hyper's path keeps one route timer per connection (`http::RouteTimer`), as the
/// fast path does: on one keep-alive connection, a request that times out right
/// after one that was answered (the timer kept, registered for the earlier
/// deadline), and again after that, is answered 504 never before the route's timeout
/// and soon after it; over h2c, two streams at once (one with the connection's timer,
/// one with its own) both are.
#[tokio::test]
async fn the_route_timeout_fires_on_time_with_a_timer_kept_per_connection() {
    let timeout = Duration::from_secs(1);
    let (hold_tx, _hold) = tokio::sync::watch::channel(());
    // Answers `/fast` at once and never answers `/slow`.
    let b = backend(move |mut s| {
        let mut hold = hold_tx.subscribe();
        async move {
            let mut buf = Vec::new();
            while let Some(r) = receive(&mut s, &mut buf).await {
                if r.path() == "/slow" {
                    let _ = hold.changed().await;
                    return;
                }
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    let on_time = |what: &str, status: u16, took: Duration| {
        assert_eq!(status, 504, "{what}");
        assert!(
            took >= timeout,
            "{what}: 504 after {took:?}, before {timeout:?}"
        );
        assert!(took < timeout * 3, "{what}: 504 only after {took:?}");
    };
    let (_p, addr) = proxy(false, b, timeout).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/fast", "/slow", "/fast", "/slow", "/slow"] {
        if path == "/slow" {
            // 40 ms after an answered request: within the slack (1/16 of the
            // timeout), so the timer registered for that one's deadline is kept,
            // fires 40 ms ahead of this one's and must wait out the rest. (After a
            // timed-out one, the timer has fired and is registered anew.)
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let started = tokio::time::Instant::now();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let a = answer(&mut c, &mut buf, false).await;
        if path == "/fast" {
            assert_eq!(a.status, 200, "{}", a.head);
        } else {
            on_time(&format!("HTTP/1.1 {path}"), a.status, started.elapsed());
            assert_eq!(a.body, b"upstream request timeout");
        }
    }

    // h2c: two streams at once on one connection.
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap()),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        hyper::Request::get(format!("http://a{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let r = sender.send_request(get("/fast")).await.unwrap();
    assert_eq!(r.status(), 200);
    let started = tokio::time::Instant::now();
    let (one, two) = tokio::join!(
        sender.clone().send_request(get("/slow")),
        sender.send_request(get("/slow"))
    );
    let took = started.elapsed();
    for r in [one, two] {
        on_time("h2c", r.unwrap().status().as_u16(), took);
    }
}

#[tokio::test]
async fn connection_close_is_honoured_and_the_upstream_connection_is_reused() {
    for fast in BOTH {
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel::<()>();
        let b = backend(move |mut s| {
            let _ = accepted_tx.send(());
            async move {
                let mut buf = Vec::new();
                while let Some(_r) = receive(&mut s, &mut buf).await {
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        })
        .await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut buf = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            buf.clear();
            let a = answer(&mut c, &mut buf, false).await;
            assert_eq!(a.status, 200);
            assert_eq!(
                header(&a.head, "connection"),
                Some("close"),
                "fast={fast}: {}",
                a.head
            );
            assert!(closed(&mut c).await, "fast={fast}");
        }
        // One pooled upstream connection carried all three.
        assert!(accepted.try_recv().is_ok());
        assert!(
            accepted.try_recv().is_err(),
            "fast={fast}: a second upstream connection"
        );
    }
}

/// An idle keep-alive connection is closed by the proxy once it has waited 30 s for a
/// request head (hyper's `header_read_timeout`), after a request and before any:
/// idle clients do not hold a socket, a task and a buffer each for ever. (The fast
/// path waited for ever; hyper's path did for a connection that never sent a byte,
/// while its version was sniffed.) Both paths at once, so the test takes ~30 s.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_head_timeout() {
    async fn idle_closed(fast: bool) {
        let (b, _seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let started = tokio::time::Instant::now();
        let mut used = TcpStream::connect(addr).await.unwrap();
        let mut never = TcpStream::connect(addr).await.unwrap();
        used.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        assert_eq!(answer(&mut used, &mut buf, false).await.status, 200);
        for (what, s) in [("after a request", &mut used), ("before any", &mut never)] {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(45), s.read(&mut b))
                .await
                .unwrap_or_else(|_| {
                    panic!("fast={fast}: an idle connection {what} is still open after 45 s")
                });
            assert!(matches!(r, Ok(0) | Err(_)), "fast={fast}: {r:?}");
        }
        assert!(
            started.elapsed() >= Duration::from_secs(29),
            "fast={fast}: closed after {:?}, before the head timeout",
            started.elapsed()
        );
    }
    tokio::join!(idle_closed(true), idle_closed(false));
}

/// Writes `body` as the client's request body (in pieces, chunked or not) from its
/// own task, so that the test reads the response meanwhile; then closes the client's
/// sending side (a half-close: the response is still read).
fn upload<W>(mut w: W, head: String, body: Vec<u8>, chunked: bool)
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if w.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in body.chunks(64 * 1024) {
            let r = if chunked {
                let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
                c.extend_from_slice(piece);
                c.extend_from_slice(b"\r\n");
                w.write_all(&c).await
            } else {
                w.write_all(piece).await
            };
            if r.is_err() {
                return;
            }
        }
        if chunked && w.write_all(b"0\r\n\r\n").await.is_err() {
            return;
        }
        let _ = w.shutdown().await;
    });
}

/// What one read of `r` brings, within [`TIMEOUT`]; `what` if the stream ended.
async fn read_more<R: tokio::io::AsyncRead + Unpin>(r: &mut R, what: &str) -> Vec<u8> {
    let mut chunk = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(TIMEOUT, r.read(&mut chunk))
        .await
        .expect("body bytes within the timeout")
        .unwrap();
    assert!(n > 0, "{what}");
    chunk.truncate(n);
    chunk
}

/// The request head of an upload of `len` bytes to `path`: chunked, or with its length.
fn upload_head(path: &str, chunked: bool, len: usize) -> String {
    if chunked {
        format!("POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    } else {
        format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n")
    }
}

/// The body of an upload: 8 MiB that are not all alike.
fn big_body() -> Vec<u8> {
    (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect()
}

/// An upstream that sends its response head before it has read the request body, as
/// a streaming echo does, then echoes each piece of the body as it reads it.
async fn streaming_echo() -> SocketAddr {
    backend(|mut s| async move {
        let mut buf = Vec::new();
        let Some(n) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        buf.drain(..n);
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        // Echo as it comes: each piece read goes back as one chunk at once.
        let (mut r, mut w) = s.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let echo = tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let mut c = format!("{:x}\r\n", d.len()).into_bytes();
                c.extend_from_slice(&d);
                c.extend_from_slice(b"\r\n");
                if w.write_all(&c).await.is_err() {
                    return;
                }
            }
            let _ = w.write_all(b"0\r\n\r\n").await;
        });
        let mut pending = buf;
        if chunked(&head) {
            // Decode chunk by chunk, echoing the data.
            loop {
                let line_end = loop {
                    if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    pending.extend_from_slice(&read_more(&mut r, "body cut short").await);
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&pending[..line_end]).unwrap(), 16)
                        .unwrap();
                pending.drain(..line_end + 2);
                while pending.len() < size + 2 {
                    pending.extend_from_slice(&read_more(&mut r, "chunk cut short").await);
                }
                if size == 0 {
                    break;
                }
                tx.send(pending[..size].to_vec()).unwrap();
                pending.drain(..size + 2);
            }
        } else {
            let mut left: usize = header(&head, "content-length").unwrap().parse().unwrap();
            let k = left.min(pending.len());
            if k > 0 {
                tx.send(pending[..k].to_vec()).unwrap();
            }
            left -= k;
            while left > 0 {
                let mut chunk = read_more(&mut r, "body cut short").await;
                chunk.truncate(left);
                let n = chunk.len();
                tx.send(chunk).unwrap();
                left -= n;
            }
        }
        drop(tx);
        echo.await.unwrap();
    })
    .await
}

/// One 8 MiB upload over `stream` (HTTP/1.1, chunked or with its length) to the
/// [`streaming_echo`] behind the proxy, the response read while the upload goes on
/// and the client's side closed once it is sent: the whole body must come back.
async fn echo_upload_h1<S>(stream: S, chunked_upload: bool, what: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let body = big_body();
    let head = upload_head("/echo", chunked_upload, body.len());
    let (mut r, w) = tokio::io::split(stream);
    upload(w, head, body.clone(), chunked_upload);
    // The response, read while the upload goes on (every read has a timeout).
    let mut stream_buf = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(TIMEOUT, r.read(&mut chunk))
                .await
                .expect("response bytes within the timeout")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            stream_buf.extend_from_slice(&chunk[..n]);
            if stream_buf.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "{what}: no whole response within 60 s");
    let n = stream_buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&stream_buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
    assert!(chunked(&head), "{what}: {head}");
    assert!(
        stream_buf.ends_with(b"\r\n0\r\n\r\n"),
        "{what}: the response ended after {} bytes: {head}",
        stream_buf.len()
    );
    // Decode the echo.
    let mut rest = &stream_buf[n..];
    let mut echoed = Vec::new();
    loop {
        let i = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap(), 16).unwrap();
        rest = &rest[i + 2..];
        if size == 0 {
            break;
        }
        echoed.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    assert!(
        echoed == body,
        "{what}: echoed {} of {} bytes",
        echoed.len(),
        body.len()
    );
    // The client sent all it had and closed its side: the proxy closes the
    // connection once the response is out.
    let mut b = [0u8; 1];
    let end = tokio::time::timeout(TIMEOUT, r.read(&mut b))
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection is still open after the response"));
    assert!(matches!(end, Ok(0) | Err(_)), "{what}: {end:?}");
}

/// As [`echo_upload_h1`] over HTTP/2 (prior knowledge, or ALPN over TLS): the body
/// sent in 64 KiB frames from its own task, with `content-length` or without.
async fn echo_upload_h2<S>(stream: S, with_length: bool, what: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: HTTP/2 handshake: {e}"));
    tokio::spawn(conn);
    let body = big_body();
    let (tx, rx) =
        mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>(4);
    let pieces = body.clone();
    tokio::spawn(async move {
        for piece in pieces.chunks(64 * 1024) {
            let frame = hyper::body::Frame::data(bytes::Bytes::copy_from_slice(piece));
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
    });
    let mut req = hyper::Request::post("http://a/echo");
    if with_length {
        req = req.header("content-length", body.len());
    }
    let req = req
        .body(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let response = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no response head within the timeout"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(response.status(), 200, "{what}");
    let mut received = response.into_body();
    let mut echoed = Vec::new();
    while let Some(frame) = tokio::time::timeout(TIMEOUT, received.frame())
        .await
        .unwrap_or_else(|_| panic!("{what}: response bytes within the timeout"))
    {
        let frame = frame.unwrap_or_else(|e| {
            panic!(
                "{what}: the response failed after {} bytes: {e}",
                echoed.len()
            )
        });
        if let Ok(d) = frame.into_data() {
            echoed.extend_from_slice(&d);
        }
    }
    assert!(
        echoed == body,
        "{what}: echoed {} of {} bytes",
        echoed.len(),
        body.len()
    );
}

/// An upstream that sends its response head before it has read the request body, as
/// a streaming echo does, then echoes each piece of the body as it reads it, while
/// the client closes its sending side once its body is sent: both paths go on
/// forwarding the body while they relay the response (the fast path stopped sending
/// the body once the head came, and both sides then waited for ever; hyper's path
/// took the client's half-close for a client gone and cut the response, after
/// ~0.5–1.7 MB of the 8 MiB echo). Plaintext here; TLS and HTTP/2 in
/// [`an_upload_streams_back_over_tls_and_http2`].
#[tokio::test]
async fn an_upload_goes_on_while_an_early_response_streams_back() {
    let b = streaming_echo().await;
    for fast in BOTH {
        let (_p, addr) = proxy(fast, b, Duration::from_secs(60)).await;
        for chunked_upload in [false, true] {
            let s = TcpStream::connect(addr).await.unwrap();
            echo_upload_h1(
                s,
                chunked_upload,
                &format!("fast={fast} chunked={chunked_upload}"),
            )
            .await;
        }
    }
}

/// A listener's TLS for the tests: a certificate from a test CA (in the proxy's
/// secrets as `srv`), no client certificate asked for, ALPN h2 and http/1.1; and a
/// client's TLS that trusts that CA and offers `alpn`.
fn test_tls(
    proxy: &Proxy,
    alpn: &[&str],
) -> (
    tributary_proxy::tls::TlsContext,
    Vec<tributary_proxy::tls::ClientTls>,
) {
    use tributary_controlplane::identity::test_issuer::TestIssuer;
    use tributary_controlplane::identity::{CertificateIssuer, SpiffeId};
    use tributary_proto::envoy::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, Secret, TlsCertificate, secret,
    };
    use tributary_proxy::tls::{ClientTls, Pattern, SanMatcher, SecretSet, TlsContext, Validation};
    let inline = |s: &str| {
        Some(DataSource {
            specifier: Some(Specifier::InlineString(s.to_string())),
            ..Default::default()
        })
    };
    let ca = TestIssuer::new("test root", Duration::from_secs(3600)).unwrap();
    let cert = ca
        .issue(&SpiffeId::parse("spiffe://td.test/env/prod/ns/default/sa/srv").unwrap())
        .unwrap();
    let mut secrets = SecretSet {
        generation: 1,
        ..Default::default()
    };
    for s in [
        Secret {
            name: "srv".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&cert.chain_pem),
                private_key: inline(&cert.key_pem),
                ..Default::default()
            })),
        },
        Secret {
            name: "roots".into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&ca.trust_bundle_pem()),
                    ..Default::default()
                },
            )),
        },
    ] {
        let v = tributary_proxy::tls::secret(&s).unwrap();
        secrets.secrets.insert(s.name, v);
    }
    let secrets = Arc::new(arc_swap::ArcSwap::from_pointee(secrets));
    proxy.shared.secrets.store(secrets.load_full());
    let server = TlsContext {
        certificate: Some("srv".into()),
        validation: None,
        alpn: vec!["h2".into(), "http/1.1".into()],
        require_client_certificate: false,
        sni: None,
    };
    let clients = alpn
        .iter()
        .map(|a| {
            ClientTls::new(
                TlsContext {
                    certificate: None,
                    validation: Some(Validation {
                        trust: "roots".into(),
                        san: vec![SanMatcher {
                            uri: true,
                            pattern: Pattern::Exact(
                                "spiffe://td.test/env/prod/ns/default/sa/srv".into(),
                            ),
                            ignore_case: false,
                        }],
                    }),
                    alpn: vec![a.to_string()],
                    require_client_certificate: false,
                    sni: None,
                },
                secrets.clone(),
            )
        })
        .collect();
    (server, clients)
}

/// [`an_upload_goes_on_while_an_early_response_streams_back`] on hyper's other ways
/// in: HTTP/1.1 over TLS (the client closes with `close_notify` and a FIN once its
/// body is sent), HTTP/2 over TLS (ALPN) and h2c (prior knowledge, handed from the
/// fast path to hyper), with and without a length.
#[tokio::test]
async fn an_upload_streams_back_over_tls_and_http2() {
    let b = streaming_echo().await;
    let (p, plain) = proxy(true, b, Duration::from_secs(60)).await;
    let (server, clients) = test_tls(&p, &["http/1.1", "h2"]);
    let mut listener = p.shared.listeners.borrow()["l"].clone();
    listener.name = "tls".into();
    listener.tls = Some(server);
    p.shared.listeners.send_modify(|l| {
        l.insert("tls".into(), listener);
    });
    let tls = tokio::time::timeout(TIMEOUT, p.listener_addr("tls"))
        .await
        .unwrap();
    for with_length in [true, false] {
        let s = tls_stream(&clients[0], tls).await;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        echo_upload_h1(
            s,
            !with_length,
            &format!("TLS HTTP/1.1 length={with_length}"),
        )
        .await;
        let s = tls_stream(&clients[1], tls).await;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        echo_upload_h2(s, with_length, &format!("TLS h2 length={with_length}")).await;
        let s = TcpStream::connect(plain).await.unwrap();
        echo_upload_h2(s, with_length, &format!("h2c length={with_length}")).await;
    }
}

async fn tls_stream(
    tls: &tributary_proxy::tls::ClientTls,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(TIMEOUT, tls.connect(tcp, addr.ip()))
        .await
        .expect("a TLS handshake within the timeout")
        .expect("the proxy's certificate is accepted")
}

/// An upstream that answers at once (413 with its whole body) and then reads the
/// whole upload: the client gets the whole answer and its connection is closed after
/// it (its body was not all forwarded: the proxy said `connection: close`), without
/// waiting on anything.
#[tokio::test]
async fn an_early_complete_answer_is_relayed_and_the_connection_closed() {
    for fast in BOTH {
        let b = backend(|mut s| async move {
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
                .await;
            // Reads whatever comes until the proxy closes.
            let mut chunk = vec![0u8; 64 * 1024];
            while let Ok(Ok(n)) = tokio::time::timeout(TIMEOUT, s.read(&mut chunk)).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(60)).await;
        for chunked_upload in [false, true] {
            let body = big_body();
            let head = upload_head("/up", chunked_upload, body.len());
            let (mut r, w) = TcpStream::connect(addr).await.unwrap().into_split();
            upload(w, head, body, chunked_upload);
            let mut got = Vec::new();
            let whole = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    let mut chunk = [0u8; 4096];
                    match r.read(&mut chunk).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                    if got.ends_with(b"too big!") {
                        break;
                    }
                }
            })
            .await;
            assert!(whole.is_ok(), "fast={fast}: no answer within 30 s");
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.starts_with("HTTP/1.1 413") && text.ends_with("too big!"),
                "fast={fast} chunked={chunked_upload}: {text}"
            );
            if fast {
                assert!(text.contains("connection: close"), "{text}");
                let mut b = [0u8; 1];
                let end = tokio::time::timeout(TIMEOUT, r.read(&mut b))
                    .await
                    .expect("closed within the timeout");
                assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
            }
        }
    }
}

/// `max_connections: 1` and two endpoints that close each connection once they have
/// answered on it (keep-alive, then gone): the slot of a pooled connection the
/// upstream closed comes back at once, so a request to the other endpoint, and one
/// that hyper's path serves, do not wait for it (the fast path's idle pool held it
/// until that connection was next picked or 60 s old).
#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_gives_its_slot_back() {
    for fast in BOTH {
        let one_shot = || {
            backend(|mut s| async move {
                let mut buf = Vec::new();
                if receive(&mut s, &mut buf).await.is_some() {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
                // Closes the idle keep-alive connection.
            })
        };
        let backends = [one_shot().await, one_shot().await];
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (p, addr) = proxy_with(fast, &backends, Duration::from_secs(10), limits, None).await;
        for (i, req) in [
            "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /3 HTTP/1.1\r\nHost: a\r\n\r\n",
            // Absolute-form: served by hyper's path, under the same limit.
            "GET http://a/4 HTTP/1.1\r\nHost: a\r\n\r\n",
        ]
        .into_iter()
        .enumerate()
        {
            let started = tokio::time::Instant::now();
            let (_, a) = send_raw(addr, req.as_bytes()).await;
            assert_eq!(
                (a.status, a.body),
                (200, b"ok".to_vec()),
                "fast={fast}: request {i}: {}",
                a.head
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "fast={fast}: request {i} took {:?}",
                started.elapsed()
            );
        }
        let stats = p
            .shared
            .snapshot
            .load()
            .clusters
            .get("c")
            .unwrap()
            .stats
            .overflow
            .get();
        assert_eq!(stats, 0, "fast={fast}: overflows");
    }
}

/// Opens a connection to `addr`, writes `raw` and reads the answer.
async fn send_raw(addr: SocketAddr, raw: &[u8]) -> (TcpStream, Answer) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(raw).await.unwrap();
    let a = answer(&mut c, &mut Vec::new(), false).await;
    (c, a)
}

/// Opens a connection to `addr` and sends `GET path` on it.
async fn get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    c
}

/// With `max_connections: 1`: sends `/held` (which the backend answers only once
/// `gate` gets a permit), then `/next`, which must wait while the only connection is
/// busy, and be answered within 5 s once `/held`'s answer has ended. Both answers.
async fn next_waits_for_held(
    addr: SocketAddr,
    gate: &tokio::sync::Semaphore,
    fast: bool,
) -> (Answer, Answer) {
    let mut held = get(addr, "/held").await;
    let mut next = get(addr, "/next").await;
    let mut b = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), next.read(&mut b))
            .await
            .is_err(),
        "fast={fast}: answered while the only connection was busy"
    );
    gate.add_permits(1);
    let a = answer(&mut held, &mut Vec::new(), false).await;
    assert_eq!(a.status, 200, "fast={fast}: {}", a.head);
    let released = tokio::time::Instant::now();
    let n = answer(&mut next, &mut Vec::new(), false).await;
    assert_eq!(n.status, 200, "fast={fast}: {}", n.head);
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "fast={fast}: the waiting request took {:?} after the busy connection turned idle",
        released.elapsed()
    );
    (a, n)
}

/// `max_connections: 1` and two endpoints that keep their connections open (round
/// robin alternates between them): a request that needs a connection to the other
/// endpoint closes the idle one instead of waiting for its idle timeout (60 s, the
/// fast path's and hyper's pools alike); and one that waits while the only
/// connection is busy gets the slot as soon as that connection's answer has ended.
#[tokio::test]
async fn an_idle_connection_to_one_endpoint_gives_its_slot_to_another() {
    for fast in BOTH {
        // Answers `/held` only once the test lets it.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let named = |name: &'static str| {
            let gate = gate.clone();
            backend(move |mut s| {
                let gate = gate.clone();
                async move {
                    let mut buf = Vec::new();
                    while let Some(r) = receive(&mut s, &mut buf).await {
                        if r.path() == "/held" {
                            gate.acquire().await.unwrap().forget();
                        }
                        let out = format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{name}");
                        if s.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            })
        };
        let backends = [named("a").await, named("b").await];
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (p, addr) = proxy_with(fast, &backends, Duration::from_secs(30), limits, None).await;
        let mut last = Vec::new();
        for i in 0..4 {
            let started = tokio::time::Instant::now();
            let mut c = get(addr, &format!("/{i}")).await;
            let a = answer(&mut c, &mut Vec::new(), false).await;
            assert_eq!(a.status, 200, "fast={fast}: request {i}: {}", a.head);
            assert_ne!(a.body, last, "fast={fast}: round robin alternates");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "fast={fast}: request {i} waited {:?} for the other endpoint's idle connection",
                started.elapsed()
            );
            last = a.body;
        }

        // The only connection busy: the next request (to the other endpoint) waits
        // until that connection's answer ends, and no longer.
        let (a, n) = next_waits_for_held(addr, &gate, fast).await;
        assert_ne!(n.body, a.body, "fast={fast}: the other endpoint");
        let overflow = p.shared.snapshot.load().clusters["c"].stats.overflow.get();
        assert_eq!(overflow, 0, "fast={fast}: overflows");
    }
}

/// `max_connections: 1` and one endpoint: a request that waits while the only
/// connection is busy goes on, as soon as that answer ends, on that same connection
/// (neither waits for a slot the idle connection holds, nor closes it to open
/// another).
#[tokio::test]
async fn a_request_waiting_for_the_only_connection_takes_it_when_it_turns_idle() {
    for fast in BOTH {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let b = {
            let (gate, accepted) = (gate.clone(), accepted.clone());
            backend(move |mut s| {
                let gate = gate.clone();
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let mut buf = Vec::new();
                    while let Some(r) = receive(&mut s, &mut buf).await {
                        if r.path() == "/held" {
                            gate.acquire().await.unwrap().forget();
                        }
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            })
            .await
        };
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (_p, addr) = proxy_with(fast, &[b], Duration::from_secs(30), limits, None).await;
        next_waits_for_held(addr, &gate, fast).await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "fast={fast}: one upstream connection for both"
        );
    }
}

/// Several `Host` fields, or a `Host` other than the authority of an absolute-form
/// target: which one routes would be ambiguous, so 400 (RFC 9112 §3.2); the first
/// one routed.
#[tokio::test]
async fn several_hosts_or_a_host_other_than_the_target_are_answered_400() {
    for fast in BOTH {
        let (b, mut seen) = echo().await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        for (req, want) in [
            ("GET /1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (
                "GET /2 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nhost: a\r\n\r\n",
                400,
            ),
            ("GET http://b/3 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET http://a/4 HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            ("GET http://A:80/5 HTTP/1.1\r\nHost: a:80\r\n\r\n", 200),
        ] {
            let (_, a) = send_raw(addr, req.as_bytes()).await;
            assert_eq!(a.status, want, "fast={fast}: {req:?}: {}", a.head);
        }
        let paths: Vec<String> = std::iter::from_fn(|| seen.try_recv().ok())
            .map(|r| r.path().to_string())
            .collect();
        assert_eq!(paths, ["/4", "/5"], "fast={fast}");
    }
}

fn retry_on_5xx() -> RetryPolicy {
    RetryPolicy {
        num_retries: 1,
        on_5xx: true,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        status_codes: vec![],
        per_try_timeout: None,
    }
}

/// On a route that retries (which buffers the body, up to 1 MiB), a request whose
/// declared body is larger is answered 413 before the client is told to send it: no
/// `100 Continue` first (the client would send megabytes for nothing).
#[tokio::test]
async fn expect_100_continue_over_the_retry_buffer_is_refused_before_the_body() {
    for fast in BOTH {
        let (b, _seen) = echo().await;
        let (_p, addr) = proxy_with(
            fast,
            &[b],
            Duration::from_secs(15),
            Limits::default(),
            Some(retry_on_5xx()),
        )
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2000000\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(a.status, 413, "fast={fast}: {}", a.head);
        assert!(closed(&mut c).await, "fast={fast}");

        // Within the limit: 100, then the body, then the answer.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"PUT /y HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        assert_eq!(answer(&mut c, &mut buf, false).await.status, 100);
        c.write_all(b"abc").await.unwrap();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!((a.status, a.body), (200, b"/y:abc".to_vec()), "fast={fast}");
    }
}

/// `Transfer-Encoding: gzip, chunked`: the coding is the content's and goes on, only
/// `chunked` is re-framed (streamed and, on a route that retries, buffered); a final
/// coding other than `chunked` leaves the length unknown: 400 (RFC 9112 §6.3).
#[tokio::test]
async fn transfer_codings_before_chunked_are_kept_and_another_final_coding_is_400() {
    for fast in BOTH {
        for retry in [None, Some(retry_on_5xx())] {
            let (b, mut seen) = echo().await;
            let (_p, addr) = proxy_with(
                fast,
                &[b],
                Duration::from_secs(15),
                Limits::default(),
                retry.clone(),
            )
            .await;
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"POST /z HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                .await
                .unwrap();
            let mut buf = Vec::new();
            let a = answer(&mut c, &mut buf, false).await;
            assert_eq!(
                (a.status, a.body),
                (200, b"/z:hello".to_vec()),
                "fast={fast}"
            );
            let r = seen.recv().await.unwrap();
            let te = combined(&r.head, "transfer-encoding").unwrap_or_default();
            let codings: Vec<String> = te
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect();
            assert_eq!(
                codings,
                ["gzip", "chunked"],
                "fast={fast} retry={}: {}",
                retry.is_some(),
                r.head
            );
            assert!(header(&r.head, "content-length").is_none(), "{}", r.head);

            for bad in [
                &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nxyz"[..],
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
            ] {
                let (_, a) = send_raw(addr, bad).await;
                assert_eq!(
                    a.status,
                    400,
                    "fast={fast}: {}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
    }
}

/// A response's codings other than `chunked` reach the client too.
#[tokio::test]
async fn response_transfer_codings_before_chunked_are_kept() {
    for fast in BOTH {
        let b = backend(|mut s| async move {
            let mut buf = Vec::new();
            while receive(&mut s, &mut buf).await.is_some() {
                if s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
        .await;
        let (_p, addr) = proxy(fast, b, Duration::from_secs(15)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!((a.status, a.body), (200, b"abc".to_vec()), "fast={fast}");
        assert_eq!(
            combined(&a.head, "transfer-encoding").map(|v| v.to_ascii_lowercase()),
            Some("gzip, chunked".into()),
            "fast={fast}: {}",
            a.head
        );
    }
}

/// Request trailers are checked like header fields (a malformed one: 400), and those
/// a recipient must not take from trailers (framing, routing, hop-by-hop) are left
/// out; the others go on. hyper's path forwards only trailers the request's
/// `Trailer` field announces, so this is the fast path's.
#[tokio::test]
async fn request_trailers_are_checked_and_forbidden_ones_dropped() {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // The backend has the last chunk (the trailer section may still be on its way).
    let (last_tx, mut last_rx) = mpsc::unbounded_channel::<()>();
    let b = backend(move |mut s| {
        let tx = tx.clone();
        let last_tx = last_tx.clone();
        async move {
            let mut signalled = false;
            let mut buf = Vec::new();
            let Some(n) = read_head(&mut s, &mut buf).await else {
                return;
            };
            buf.drain(..n);
            // The raw body, up to the end of the trailer section.
            let end = loop {
                if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                    break i + 5;
                }
                if let Some(i) = buf.windows(5).position(|w| w == b"\r\n0\r\n")
                    && let Some(j) = buf[i + 5..].windows(4).position(|w| w == b"\r\n\r\n")
                {
                    break i + 5 + j + 4;
                }
                if !signalled && buf.windows(5).any(|w| w == b"\r\n0\r\n") {
                    signalled = true;
                    let _ = last_tx.send(());
                }
                if !fill(&mut s, &mut buf).await {
                    return;
                }
            };
            let _ = tx.send(String::from_utf8_lossy(&buf[..end]).to_string());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let (_p, addr) = proxy(true, b, Duration::from_secs(15)).await;
    // The whole body at once (it goes with the head), and in two writes (the
    // trailer section split, streamed).
    let body: &[u8] = b"5\r\nhello\r\n0\r\nx-checksum: 1234\r\nContent-Length: 5\r\nhost: evil\r\nTransfer-Encoding: chunked\r\nx-last: 2\r\n\r\n";
    for split in [body.len(), body.len() - 20] {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        c.write_all(&body[..split]).await.unwrap();
        if split < body.len() {
            // The chunks went upstream before the rest of the trailers is sent.
            tokio::time::timeout(TIMEOUT, last_rx.recv())
                .await
                .expect("the last chunk upstream within the timeout")
                .unwrap();
            c.write_all(&body[split..]).await.unwrap();
        }
        let mut buf = Vec::new();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(a.status, 200, "{}", a.head);
        let raw = tokio::time::timeout(TIMEOUT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        while last_rx.try_recv().is_ok() {}
        assert_eq!(
            raw, "5\r\nhello\r\n0\r\nx-checksum: 1234\r\nx-last: 2\r\n\r\n",
            "split at {split}"
        );
    }
    for bad in [
        &b"5\r\nhello\r\n0\r\nx bad: 1\r\n\r\n"[..],
        b"5\r\nhello\r\n0\r\n: no name\r\n\r\n",
        b"5\r\nhello\r\n0\r\nno-colon\r\n\r\n",
        b"5\r\nhello\r\n0\r\nx-ctl: a\x01b\r\n\r\n",
        b"5\r\nhello\r\n0\r\nx-fold: a\r\n folded\r\n\r\n",
    ] {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        c.write_all(bad).await.unwrap();
        let mut buf = Vec::new();
        let a = answer(&mut c, &mut buf, false).await;
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(bad));
        assert!(closed(&mut c).await);
    }
}

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
    ClusterChoice, Codec, ListenerConfig, NetworkFilter, PathMatch, Route, RouteAction, RouteTable,
    Snapshot, VirtualHost, Xfcc,
};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A proxy whose listener `l` routes everything to one cluster `c` of `backend`, with
/// the route timeout `timeout`; `fast` turns the HTTP/1.1 fast path on or off.
async fn proxy(fast: bool, backend: SocketAddr, timeout: Duration) -> (Proxy, SocketAddr) {
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
                endpoints: vec![EndpointDef {
                    address: backend,
                    weight: 1,
                    healthy: true,
                }],
            }]],
            overprovisioning: 140,
        }),
        original_dst: false,
        lb: LbPolicy::RoundRobin,
        locality_weighted: false,
        http2: false,
        connect_timeout: Duration::from_secs(1),
        outlier: None,
        limits: Limits::default(),
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
                    retry: None,
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
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
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
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(bad).await.unwrap();
            let mut buf = Vec::new();
            let a = answer(&mut c, &mut buf, false).await;
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
/// request head (hyper's `header_read_timeout`), after a request and, on the fast
/// path, before any: idle clients do not hold a socket, a task and a buffer each for
/// ever. (The fast path waited for ever. hyper's path does not time out a connection
/// that never sent a byte: a known gap of that path, left as it is.) Both paths at
/// once, so the test takes ~30 s.
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
        let mut idle = vec![("after a request", &mut used)];
        if fast {
            idle.push(("before any", &mut never));
        }
        for (what, s) in idle {
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

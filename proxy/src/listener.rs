//! Listeners from LDS: binds, accepts, and hands each connection to its network filter
//! (the HTTP connection manager or the TCP proxy).
//!
//! The manager watches the listener set that the xDS client publishes. A listener whose
//! address stays keeps its socket and its connections; a change of its filter applies
//! to new connections. A removed listener (or one whose address changed) **drains**:
//! it stops accepting at once, its HTTP connections finish the requests in flight and
//! close (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY), and whatever is still open after
//! the drain timeout is closed.
//!
//! **Transparent mode** (Envoy's model): a listener with `use_original_dst` (the
//! sidecar's `virtualOutbound`, where iptables REDIRECT sends captured connections)
//! reads each connection's original destination (`SO_ORIGINAL_DST`,
//! `IP6T_SO_ORIGINAL_DST`) and hands the connection to the listener configured at that
//! address — exact, else the wildcard of that port, which is how the sidecar's
//! `0.0.0.0_{port}` listeners (not bound: `bind_to_port: false`) receive traffic. With
//! no such listener, its own filter chain serves it (the TCP proxy to the
//! `ORIGINAL_DST` `PassthroughCluster`, which connects to the original destination).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::Shared;
use crate::bootstrap::ListenersConfig;
use crate::config::{Codec, ListenerConfig, NetworkFilter};
use crate::tls::ServerTls;

/// A listener that is accepting: from its socket if it is bound, and connections
/// handed to it by an original-destination listener.
struct Running {
    config: ListenerConfig,
    filter: Arc<ArcSwap<NetworkFilter>>,
    tls: Arc<ArcSwapOption<ServerTls>>,
    stop: watch::Sender<bool>,
    handoff: mpsc::Sender<Handoff>,
}

/// A connection redirected to an original-destination listener, handed to the
/// listener of its original destination.
struct Handoff {
    stream: TcpStream,
    original_dst: SocketAddr,
}

/// The listeners that take hand-offs, by configured address. The manager is the one
/// writer (it swaps the whole map when the listener set changes); the
/// original-destination listeners read it per connection without a lock.
type Handoffs = Arc<ArcSwap<HashMap<SocketAddr, mpsc::Sender<Handoff>>>>;

/// Hand-offs queued per listener before its accept loop takes them; beyond it a
/// captured connection is closed (load shed, logged).
const HANDOFF_QUEUE: usize = 1024;

/// Where a listener is bound, if at all (`bind_to_port: false` without an outbound address).
pub fn bind_address(l: &ListenerConfig, cfg: &ListenersConfig) -> Option<SocketAddr> {
    let mut addr = if l.bind_to_port {
        l.address
    } else {
        SocketAddr::new(cfg.outbound_address?, l.address.port())
    };
    if let Some(p) = cfg.port_override {
        addr.set_port(p);
    }
    Some(addr)
}

/// Runs the listener manager until the listener set's sender is dropped.
pub async fn manage(shared: Arc<Shared>, cfg: ListenersConfig, drain: Duration) {
    let mut rx = shared.listeners.subscribe();
    let mut running: BTreeMap<Arc<str>, Running> = BTreeMap::new();
    let handoffs: Handoffs = Arc::default();
    loop {
        let wanted = rx.borrow_and_update().clone();
        // Removed, moved to another address, or in or out of transparent mode: drain.
        let stale: Vec<Arc<str>> = running
            .iter()
            .filter(|(name, r)| {
                wanted.get(*name).is_none_or(|w| {
                    bind_address(w, &cfg) != bind_address(&r.config, &cfg)
                        || w.use_original_dst != r.config.use_original_dst
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(r) = running.remove(&name) {
                tracing::info!(listener = %name, "listener removed: draining");
                let _ = r.stop.send(true);
                shared.bound.send_modify(|b| {
                    b.remove(&name);
                });
            }
        }
        for (name, l) in &wanted {
            if let Some(r) = running.get_mut(name) {
                if r.config != *l {
                    r.filter.store(Arc::new(l.filter.clone()));
                    if r.config.tls != l.tls {
                        r.tls.store(server_tls(l));
                    }
                    r.config = l.clone();
                }
                continue;
            }
            // Not bound (`bind_to_port: false` without an outbound address): it still
            // serves the connections an original-destination listener hands it.
            let socket = match bind_address(l, &cfg) {
                None => None,
                Some(addr) => match bind(addr, l.use_original_dst) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(listener = %name, %addr, error = %e, "cannot bind listener");
                        continue;
                    }
                },
            };
            let local = socket.as_ref().and_then(|s| s.local_addr().ok());
            let filter = Arc::new(ArcSwap::from_pointee(l.filter.clone()));
            let tls = Arc::new(ArcSwapOption::new(server_tls(l)));
            let (stop, stopped) = watch::channel(false);
            let (handoff, handed) = mpsc::channel(HANDOFF_QUEUE);
            tokio::spawn(accept(
                shared.clone(),
                name.clone(),
                Incoming {
                    socket,
                    handed,
                    transparent: l.use_original_dst.then(|| handoffs.clone()),
                },
                (filter.clone(), tls.clone()),
                stopped,
                drain,
                cfg.http1_fast_path != Some(false),
            ));
            if let Some(local) = local {
                tracing::info!(listener = %name, address = %local, "listening");
                shared.bound.send_modify(|b| {
                    b.insert(name.clone(), local);
                });
            }
            running.insert(
                name.clone(),
                Running {
                    config: l.clone(),
                    filter,
                    tls,
                    stop,
                    handoff,
                },
            );
        }
        // First by name wins where two listeners share an address.
        let mut table = HashMap::new();
        for r in running.values().filter(|r| !r.config.use_original_dst) {
            table
                .entry(r.config.address)
                .or_insert_with(|| r.handoff.clone());
        }
        handoffs.store(Arc::new(table));
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn server_tls(l: &ListenerConfig) -> Option<Arc<ServerTls>> {
    l.tls.clone().map(|t| Arc::new(ServerTls::new(t)))
}

/// Serves one downstream connection (plaintext or after its TLS handshake) with the
/// listener's network filter, in the connection's task (in the listener's set, so a
/// drain that times out closes it): HTTP under the listener's graceful shutdown,
/// TCP proxied.
async fn serve<S>(
    shared: Arc<Shared>,
    filter: &NetworkFilter,
    stream: S,
    alpn: Option<&[u8]>,
    client_cert: Option<hyper::http::HeaderValue>,
    original_dst: Option<SocketAddr>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match filter {
        NetworkFilter::Http {
            route_config,
            codec,
            inline,
            xfcc,
        } => {
            let downstream = Arc::new(crate::http::Downstream {
                route_config: route_config.clone(),
                inline: inline.as_ref().map(|i| i.table.clone()),
                xfcc: *xfcc,
                client_cert,
            });
            serve_http(shared, downstream, stream, alpn, *codec, watcher).await;
        }
        NetworkFilter::Tcp { cluster } => {
            drop(watcher);
            crate::tcp::proxy(shared, cluster.clone(), stream, original_dst).await;
        }
    }
}

/// Serves one downstream connection with hyper's HTTP/1.1 and HTTP/2 server, under
/// the listener's graceful shutdown. The HTTP/1.1 fast path ([`crate::http1`]) hands
/// it the connections it does not serve itself.
pub(crate) async fn serve_http<S>(
    shared: Arc<Shared>,
    downstream: Arc<crate::http::Downstream>,
    stream: S,
    alpn: Option<&[u8]>,
    codec: Codec,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // One route timer per connection, kept from one request to the next.
    let timer = Arc::new(crate::http::RouteTimer::default());
    let service = hyper::service::service_fn(move |req| {
        crate::http::handle(shared.clone(), downstream.clone(), timer.clone(), req)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // ALPN decides the protocol over TLS; the codec otherwise.
    let http1_only = match (alpn, codec) {
        (Some(b"h2"), _) | (None, Codec::Http2) => {
            builder = builder.http2_only();
            false
        }
        (Some(b"http/1.1"), _) | (None, Codec::Http1) => {
            builder = builder.http1_only();
            true
        }
        _ => false,
    };
    builder.http1().timer(hyper_util::rt::TokioTimer::new());
    // A client that has sent its whole request may close its side (a half-close, as
    // `shutdown(SHUT_WR)` or a dropped write half does) and still read the response,
    // as on the fast path. Without this hyper took that FIN, mid-response, for the
    // client gone and closed the connection, cutting a response that streams back
    // while the upload goes on (an echo) once the client had written its last byte.
    builder.http1().half_close(true);
    // hyper's `header_read_timeout` (30 s) runs once HTTP/1.1 is chosen; sniffing the
    // version (or HTTP/2's preface) waits for a first byte without one: a client that
    // never sends one is closed after the same time.
    let stream = FirstByte {
        deadline: (!http1_only).then(|| Box::pin(tokio::time::sleep(crate::http1::HEAD_TIMEOUT))),
        inner: stream,
    };
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "downstream connection ended");
    }
}

/// A downstream stream whose first byte must come before `deadline` (then the
/// deadline is dropped); reading fails with `TimedOut` after it.
struct FirstByte<S> {
    inner: S,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByte<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        match (&r, &mut this.deadline) {
            (_, None) => {}
            (Poll::Ready(_), d) => *d = None,
            (Poll::Pending, Some(d)) => {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
                }
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByte<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves one plaintext downstream connection: with the HTTP/1.1 fast path when it is
/// on (`stop` is the listener's drain signal) and the HTTP connection manager may
/// speak HTTP/1.1, otherwise with [`serve`].
async fn serve_plain(
    shared: Arc<Shared>,
    filter: &NetworkFilter,
    stream: TcpStream,
    original_dst: Option<SocketAddr>,
    fast_path: Option<watch::Receiver<bool>>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    if let (
        Some(stop),
        NetworkFilter::Http {
            route_config,
            codec: codec @ (Codec::Auto | Codec::Http1),
            inline,
            xfcc,
        },
    ) = (fast_path, filter)
    {
        let downstream = Arc::new(crate::http::Downstream {
            route_config: route_config.clone(),
            inline: inline.as_ref().map(|i| i.table.clone()),
            xfcc: *xfcc,
            client_cert: None,
        });
        crate::http1::serve(shared, downstream, *codec, stream, stop, watcher).await;
        return;
    }
    serve(shared, filter, stream, None, None, original_dst, watcher).await;
}

/// Binds `addr`. An original-destination listener on `0.0.0.0` is bound dual-stack
/// (`[::]`, `IPV6_V6ONLY` off) so that connections ip6tables redirects reach it too
/// (the hub generates one IPv4 address for `virtualOutbound`); on a host without IPv6
/// it falls back to `0.0.0.0`.
fn bind(addr: SocketAddr, original_dst: bool) -> std::io::Result<TcpListener> {
    if original_dst && addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        match bind_dual_stack(addr.port()) {
            Ok(l) => return Ok(l),
            Err(e) => {
                tracing::info!(%addr, error = %e, "no dual-stack socket: accepting IPv4 only");
            }
        }
    }
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    // As Envoy's `enable_reuse_port` default: sidecars sharing a network namespace
    // (Envoy and this proxy, or two proxies) can each bind the hub's fixed ports,
    // such as `virtualOutbound`'s 15001.
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn bind_dual_stack(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) as plain IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Where `stream` was going before NAT redirected it here (`SO_ORIGINAL_DST` for
/// IPv4, including IPv4 on a dual-stack socket; `IP6T_SO_ORIGINAL_DST` for IPv6);
/// `None` when it was not redirected (its original destination is the proxy itself)
/// or conntrack does not know it.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = canonical(stream.local_addr().ok()?);
    let socket = socket2::SockRef::from(stream);
    let dst = if local.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let dst = canonical(dst.ok()?.as_socket()?);
    (dst != local).then_some(dst)
}

/// The listener for original destination `dst`, as Envoy finds it: the listener at
/// exactly `dst`, else the wildcard listener of its port in its family (`0.0.0.0` or
/// `[::]`). Then, unlike Envoy (which passes such a connection through), an IPv6
/// destination takes the `0.0.0.0` listener of its port: the hub generates the
/// sidecar's outbound listeners as `0.0.0.0_{port}` only, and they are never bound,
/// so their address family says nothing about the traffic they serve.
fn handoff_target<V>(table: &HashMap<SocketAddr, V>, dst: SocketAddr) -> Option<&V> {
    let v4_any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), dst.port());
    let v6_any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), dst.port());
    table.get(&dst).or_else(|| {
        if dst.is_ipv4() {
            table.get(&v4_any)
        } else {
            table.get(&v6_any).or_else(|| table.get(&v4_any))
        }
    })
}

/// Where a listener's connections come from.
struct Incoming {
    /// Its socket, if it is bound.
    socket: Option<TcpListener>,
    /// Connections handed to it by an original-destination listener.
    handed: mpsc::Receiver<Handoff>,
    /// For an original-destination listener: the listeners it hands connections to.
    transparent: Option<Handoffs>,
}

impl Incoming {
    /// The next connection this listener serves, with its original destination when
    /// it was redirected; `None` when an accepted connection was handed to another
    /// listener (or failed).
    async fn next(&mut self) -> Option<(TcpStream, Option<SocketAddr>)> {
        let accept = async {
            match &self.socket {
                Some(s) => s.accept().await,
                None => std::future::pending().await,
            }
        };
        let stream = tokio::select! {
            accepted = accept => accepted.ok()?.0,
            Some(h) = self.handed.recv() => return Some((h.stream, Some(h.original_dst))),
        };
        let Some(handoffs) = &self.transparent else {
            return Some((stream, None));
        };
        let Some(dst) = original_dst(&stream) else {
            return Some((stream, None));
        };
        if let Some(target) = handoff_target(&handoffs.load(), dst) {
            if let Err(e) = target.try_send(Handoff {
                stream,
                original_dst: dst,
            }) {
                tracing::warn!(original_dst = %dst, error = %e, "cannot hand the connection over: closing it");
            }
            return None;
        }
        Some((stream, Some(dst)))
    }
}

async fn accept(
    shared: Arc<Shared>,
    name: Arc<str>,
    mut incoming: Incoming,
    (filter, tls): (Arc<ArcSwap<NetworkFilter>>, Arc<ArcSwapOption<ServerTls>>),
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    fast_path: bool,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut tcp = JoinSet::new();
    // The drain signal, for the HTTP/1.1 fast path's connections.
    let drain_signal = stop.clone();
    loop {
        tokio::select! {
            accepted = incoming.next() => {
                let Some((stream, original_dst)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let filter = filter.load_full();
                if let Some(server) = tls.load_full() {
                    // The handshake runs in the connection's own task, with the
                    // secrets of now: a rotation applies to the next handshake.
                    let shared = shared.clone();
                    let watcher = graceful.watcher();
                    tcp.spawn(async move {
                        let secrets = shared.secrets.load_full();
                        match server.accept(&secrets, stream).await {
                            Ok(a) => serve(shared, &filter, a.stream, a.alpn.as_deref(), a.client_cert, original_dst, watcher).await,
                            Err(e) => tracing::debug!(error = %e, "downstream TLS handshake failed"),
                        }
                    });
                } else {
                    let shared = shared.clone();
                    let watcher = graceful.watcher();
                    let fast_path = fast_path.then(|| drain_signal.clone());
                    tcp.spawn(async move { serve_plain(shared, &filter, stream, original_dst, fast_path, watcher).await });
                }
            }
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = tcp.join_next(), if !tcp.is_empty() => {}
        }
    }
    drop(incoming);
    let http = tokio::time::timeout(drain, graceful.shutdown());
    let tcp_done = tokio::time::timeout(drain, async { while tcp.join_next().await.is_some() {} });
    let (h, t) = tokio::join!(http, tcp_done);
    if h.is_err() || t.is_err() {
        tracing::info!(listener = %name, "drain timeout: closing remaining connections");
    } else {
        tracing::info!(listener = %name, "drained");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn original_destination_finds_exact_then_wildcard_listener() {
        let table: HashMap<SocketAddr, &str> = [
            (a("0.0.0.0:8080"), "any4_8080"),
            (a("10.0.0.1:8080"), "exact"),
            (a("[::]:9090"), "any6_9090"),
            (a("0.0.0.0:9090"), "any4_9090"),
        ]
        .into();
        let find = |dst| handoff_target(&table, a(dst)).copied();
        assert_eq!(find("10.0.0.1:8080"), Some("exact"));
        assert_eq!(find("10.0.0.2:8080"), Some("any4_8080"));
        // IPv6: its own family's wildcard first, then the hub's 0.0.0.0 listener.
        assert_eq!(find("[fd00::1]:9090"), Some("any6_9090"));
        assert_eq!(find("[fd00::1]:8080"), Some("any4_8080"));
        // IPv4 never takes an IPv6 listener (Envoy's rule).
        assert_eq!(find("10.0.0.2:9090"), Some("any4_9090"));
        let v6_only: HashMap<SocketAddr, &str> = [(a("[::]:7070"), "any6")].into();
        assert_eq!(handoff_target(&v6_only, a("10.0.0.1:7070")), None);
        // No listener on the port: the original-destination listener serves it itself.
        assert_eq!(find("10.0.0.1:1234"), None);
    }

    #[test]
    fn mapped_addresses_are_canonical() {
        assert_eq!(canonical(a("[::ffff:10.0.0.1]:80")), a("10.0.0.1:80"));
        assert_eq!(canonical(a("[fd00::1]:80")), a("[fd00::1]:80"));
    }
}

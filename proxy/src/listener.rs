//! Listeners from LDS: binds, accepts, and hands each connection to its network filter
//! (the HTTP connection manager or the TCP proxy).
//!
//! The manager watches the listener set that the xDS client publishes. A listener whose
//! address stays keeps its socket and its connections; a change of its filter applies
//! to new connections. A removed listener (or one whose address changed) **drains**:
//! it stops accepting at once, its HTTP connections finish the requests in flight and
//! close (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY), and whatever is still open after
//! the drain timeout is closed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Shared;
use crate::bootstrap::ListenersConfig;
use crate::config::{Codec, ListenerConfig, NetworkFilter};
use crate::tls::ServerTls;

/// A listener that is bound and accepting.
struct Running {
    config: ListenerConfig,
    filter: Arc<ArcSwap<NetworkFilter>>,
    tls: Arc<ArcSwapOption<ServerTls>>,
    stop: watch::Sender<bool>,
}

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
    loop {
        let wanted = rx.borrow_and_update().clone();
        // Removed, or moved to another address: drain.
        let stale: Vec<Arc<str>> = running
            .iter()
            .filter(|(name, r)| {
                wanted
                    .get(*name)
                    .is_none_or(|w| bind_address(w, &cfg) != bind_address(&r.config, &cfg))
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
            let Some(addr) = bind_address(l, &cfg) else {
                continue;
            };
            let socket = match bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(listener = %name, %addr, error = %e, "cannot bind listener");
                    continue;
                }
            };
            let local = socket.local_addr().unwrap_or(addr);
            let filter = Arc::new(ArcSwap::from_pointee(l.filter.clone()));
            let tls = Arc::new(ArcSwapOption::new(server_tls(l)));
            let (stop, stopped) = watch::channel(false);
            tokio::spawn(accept(
                shared.clone(),
                name.clone(),
                socket,
                (filter.clone(), tls.clone()),
                stopped,
                drain,
            ));
            tracing::info!(listener = %name, address = %local, "listening");
            shared.bound.send_modify(|b| {
                b.insert(name.clone(), local);
            });
            running.insert(
                name.clone(),
                Running {
                    config: l.clone(),
                    filter,
                    tls,
                    stop,
                },
            );
        }
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
            let service = hyper::service::service_fn(move |req| {
                crate::http::handle(shared.clone(), downstream.clone(), req)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // ALPN decides the protocol over TLS; the codec otherwise.
            match (alpn, codec) {
                (Some(b"h2"), _) | (None, Codec::Http2) => builder = builder.http2_only(),
                (Some(b"http/1.1"), _) | (None, Codec::Http1) => builder = builder.http1_only(),
                _ => {}
            }
            builder.http1().timer(hyper_util::rt::TokioTimer::new());
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "downstream connection ended");
            }
        }
        NetworkFilter::Tcp { cluster } => {
            drop(watcher);
            crate::tcp::proxy(shared, cluster.clone(), stream).await;
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept(
    shared: Arc<Shared>,
    name: Arc<str>,
    socket: TcpListener,
    (filter, tls): (Arc<ArcSwap<NetworkFilter>>, Arc<ArcSwapOption<ServerTls>>),
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut tcp = JoinSet::new();
    loop {
        tokio::select! {
            accepted = socket.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
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
                            Ok(a) => serve(shared, &filter, a.stream, a.alpn.as_deref(), a.client_cert, watcher).await,
                            Err(e) => tracing::debug!(error = %e, "downstream TLS handshake failed"),
                        }
                    });
                } else {
                    let shared = shared.clone();
                    let watcher = graceful.watcher();
                    tcp.spawn(async move { serve(shared, &filter, stream, None, None, watcher).await });
                }
            }
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = tcp.join_next(), if !tcp.is_empty() => {}
        }
    }
    drop(socket);
    let http = tokio::time::timeout(drain, graceful.shutdown());
    let tcp_done = tokio::time::timeout(drain, async { while tcp.join_next().await.is_some() {} });
    let (h, t) = tokio::join!(http, tcp_done);
    if h.is_err() || t.is_err() {
        tracing::info!(listener = %name, "drain timeout: closing remaining connections");
    } else {
        tracing::info!(listener = %name, "drained");
    }
}

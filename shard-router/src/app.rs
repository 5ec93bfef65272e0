//! Assembles a router: binds its xDS listeners (one or more, IPv4 and IPv6) and its
//! admin port, follows membership in the store, and serves each connection over
//! HTTP/2 with the [`Relay`] behind a `tower` admission limit.
//!
//! [`Router::start`] returns once everything is bound, with the bound addresses (tests
//! bind port 0); [`Router::shutdown`] ends every relayed stream with `UNAVAILABLE`,
//! stops accepting and drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceBuilder;
use tracing::{info, warn};
use tributary_controlplane::identity::tls::{
    self, ClientTls, ServerTls, TlsConn, TlsMetrics, Transport,
};
use tributary_controlplane::identity::{Identity, SpiffeId};
use tributary_store::SharedStore;

use crate::admin::{self, AdminState};
use crate::metrics::RouterMetrics;
use crate::relay::{ClientConn, ClientIdentity, Conn, Relay, RelayLimits};
use crate::table::Table;

/// Everything a router needs to start. Built by `main` from flags, or by tests.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// xDS listeners (`--listen`, repeatable: e.g. `127.0.0.1:18010` and `[::1]:18010`).
    pub listen: Vec<SocketAddr>,
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`, `/status/routes`).
    pub admin_addr: SocketAddr,
    pub limits: RelayLimits,
    /// Most streams being routed at once (reading their first request and connecting
    /// to a replica) (`--max-pending-streams`); the rest wait: a reconnect storm is
    /// admitted through this.
    pub max_pending_streams: usize,
    /// Mutual TLS on the xDS listeners and to the replicas, with one certificate of a
    /// `Router` identity (`--tls-cert`, `--tls-key`, `--tls-ca`); or plaintext on
    /// loopback (`--insecure`).
    pub transport: Transport,
    /// The SPIFFE trust domain of every peer (`--trust-domain`).
    pub trust_domain: String,
}

impl RouterConfig {
    /// Port 0 on 127.0.0.1, for tests.
    pub fn local() -> Self {
        Self {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            limits: RelayLimits::default(),
            max_pending_streams: 1024,
            transport: Transport::Insecure,
            trust_domain: tls::DEFAULT_TRUST_DOMAIN.to_string(),
        }
    }
}

/// Why a router's certificate cannot be its identity.
fn router_identity(files: &tls::TlsFiles, trust_domain: &str) -> anyhow::Result<SpiffeId> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|mut certs| certs.next().transpose())
        .with_context(|| format!("reading --tls-cert {}", files.cert.display()))?
        .with_context(|| {
            format!(
                "--tls-cert {} holds no PEM certificate",
                files.cert.display()
            )
        })?;
    let id = tls::spiffe_id_of(&leaf, trust_domain)
        .with_context(|| format!("--tls-cert {}", files.cert.display()))?;
    match id.identity {
        Identity::Router { .. } => Ok(id),
        _ => anyhow::bail!(
            "--tls-cert {} names {id}; a router needs a router identity (spiffe://{trust_domain}/router/NAME): hubs believe the proxy identity a router forwards only from a router (e.g. `tributary cert request --identity router/NAME`)",
            files.cert.display()
        ),
    }
}

/// Connections that may read their first request at once, per `--max-pending-streams`
/// (each holds at most `--max-first-request-bytes` plus 64 KiB while it reads).
pub const FIRST_READS_PER_PENDING_STREAM: usize = 4;

/// A running router.
#[derive(Debug)]
pub struct Router {
    /// The bound xDS listeners, in `--listen` order.
    pub xds_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub table: Arc<Table>,
    pub metrics: Arc<RouterMetrics>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Router {
    pub async fn start(cfg: RouterConfig, store: SharedStore) -> anyhow::Result<Router> {
        if cfg.listen.is_empty() {
            anyhow::bail!("no xDS listener: give --listen at least once (e.g. 127.0.0.1:18010)");
        }
        for addr in &cfg.listen {
            cfg.transport
                .check_bind("--listen", *addr)
                .map_err(anyhow::Error::msg)?;
        }
        let (server_tls, upstream_tls) = match &cfg.transport {
            Transport::Insecure => (None, None),
            Transport::Mtls(files) => {
                let id = router_identity(files, &cfg.trust_domain)?;
                info!(%id, "serving mutual TLS and connecting to replicas as this router");
                (
                    Some(ServerTls::load(files, &cfg.trust_domain, tls::ALPN_GRPC)?),
                    Some(ClientTls::load(files, &cfg.trust_domain, tls::ALPN_GRPC)?),
                )
            }
        };
        let mut registry = Registry::default();
        let metrics = Arc::new(RouterMetrics::new(&mut registry));
        let tls_metrics = TlsMetrics::new(&mut registry);
        let table = Arc::new(Table::new());
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the xDS address --listen {addr}"))?;
            listeners.push(l);
        }
        let admin_listener = TcpListener::bind(cfg.admin_addr).await.with_context(|| {
            format!("binding the admin address --admin-addr {}", cfg.admin_addr)
        })?;
        let xds_addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let admin_addr = admin_listener.local_addr()?;

        tasks.spawn({
            let (table, metrics, stop) = (table.clone(), metrics.clone(), stop.clone());
            async move {
                crate::membership::follow(store, table, metrics, stop).await;
                Ok(())
            }
        });

        // One admission limit shared by every listener and connection.
        let limit = tower::limit::GlobalConcurrencyLimitLayer::new(cfg.max_pending_streams.max(1));
        let relay = Relay::new(table.clone(), metrics.clone(), cfg.limits, upstream_tls);
        // Connections reading their first request at once, shared by every listener.
        let first_reads = Arc::new(tokio::sync::Semaphore::new(
            FIRST_READS_PER_PENDING_STREAM * cfg.max_pending_streams.max(1),
        ));
        for listener in listeners {
            let incoming = match &server_tls {
                None => Incoming::Plain(listener),
                Some(t) => Incoming::Tls {
                    conns: tls::accept_tls(listener, t.clone(), tls_metrics.clone(), "xds"),
                    trust_domain: cfg.trust_domain.clone(),
                },
            };
            tasks.spawn(accept(
                incoming,
                relay.clone(),
                limit.clone(),
                first_reads.clone(),
                stop.clone(),
            ));
        }

        let state = AdminState {
            registry: Arc::new(registry),
            table: table.clone(),
        };
        tasks.spawn({
            let mut stop = stop.clone();
            async move {
                axum::serve(admin_listener, admin::router(state))
                    .with_graceful_shutdown(async move {
                        stopped(&mut stop).await;
                    })
                    .await
                    .context("admin server")
            }
        });
        tasks.spawn({
            let (transport, addrs, mut stop) =
                (cfg.transport.clone(), xds_addrs.clone(), stop.clone());
            async move {
                // Lasts until the stop, under mutual TLS too (without warning).
                transport
                    .warn_while_insecure("the shard router", addrs, async move {
                        stopped(&mut stop).await
                    })
                    .await;
                Ok(())
            }
        });
        info!(xds = ?xds_addrs, %admin_addr, "router ready");
        Ok(Router {
            xds_addrs,
            admin_addr,
            table,
            metrics,
            shutdown,
            tasks,
        })
    }

    /// Ends every relayed stream with `UNAVAILABLE`, stops accepting and waits
    /// (boundedly) for the connections to close.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.table.close_all();
        let _ = self.shutdown.send(true);
        tributary_controlplane::app::drain(&mut self.tasks, Duration::from_secs(10)).await
    }

    /// Runs until `signal` resolves or a task fails.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            _ = signal => {
                info!("shutting down");
                self.shutdown().await
            }
            Some(r) = self.tasks.join_next() => match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("a router task ended unexpectedly")),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.into()),
            },
        }
    }
}

/// Where an xDS listener's connections come from: accepted plaintext, or
/// handshaken over mutual TLS (by [`tls::accept_tls`], a bounded number at a time).
pub(crate) enum Incoming {
    Plain(TcpListener),
    Tls {
        conns: tokio::sync::mpsc::Receiver<std::io::Result<TlsConn>>,
        trust_domain: String,
    },
}

/// One accepted connection, with its client's certified identity.
enum Accepted {
    Plain(tokio::net::TcpStream, SocketAddr),
    Tls(Box<TlsConn>, SocketAddr, SpiffeId),
}

impl Incoming {
    /// The next connection; `None` when the listener is gone.
    async fn next(&mut self) -> Option<Accepted> {
        match self {
            Incoming::Plain(listener) => loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        return Some(Accepted::Plain(tcp, peer));
                    }
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        warn!(error = %e, "accepting an xDS connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
            Incoming::Tls {
                conns,
                trust_domain,
            } => loop {
                // Failed handshakes were logged and counted by `accept_tls`.
                let Ok(conn) = conns.recv().await? else {
                    continue;
                };
                let (tcp, session) = conn.get_ref();
                let Ok(peer) = tcp.peer_addr() else { continue };
                // The verifier has checked the SPIFFE id already; this only reads it.
                match tls::peer_id(session.peer_certificates(), trust_domain) {
                    Ok(id) => return Some(Accepted::Tls(Box::new(conn), peer, id)),
                    Err(e) => warn!(%peer, error = %e, "a client without a usable identity"),
                }
            },
        }
    }
}

/// Accepts connections until `stop`; each, in its own task, has its first stream read
/// by `relay`, is routed by it behind the admission limit (at most
/// `--max-pending-streams` connections being routed, connecting to their replica, at
/// once), and is then relayed or served until it ends or `stop`.
pub(crate) async fn accept(
    mut incoming: Incoming,
    relay: Relay,
    limit: tower::limit::GlobalConcurrencyLimitLayer,
    first_reads: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = incoming.next() => match a {
                Some(a) => a,
                None => break,
            },
            () = stopped(&mut stop) => break,
        };
        let conn = match accepted {
            Accepted::Plain(tcp, peer) => ClientConn {
                io: Conn::Plain(tcp),
                peer,
                identity: ClientIdentity(None),
            },
            Accepted::Tls(tls, peer, id) => ClientConn {
                io: Conn::Tls(tls),
                peer,
                identity: ClientIdentity(Some(id)),
            },
        };
        let (relay, limit, stop) = (relay.clone(), limit.clone(), stop.clone());
        let first_reads = first_reads.clone();
        conns.spawn(async move {
            // What reading first requests may hold at once is bounded too: a
            // connection waits here holding only its socket.
            let Ok(reading) = first_reads.acquire_owned().await else {
                return;
            };
            let first = relay.read_first(conn).await;
            drop(reading);
            let svc = ServiceBuilder::new().layer(limit).service(relay);
            let routed = match tower::ServiceExt::oneshot(svc, first).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            routed.run(stop).await;
        });
        // Reap finished connection tasks so the set stays as large as the live ones.
        while conns.try_join_next().is_some() {}
    }
    while tokio::time::timeout(Duration::from_secs(6), conns.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    conns.abort_all();
    Ok(())
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures_util::StreamExt as _;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use prost::Message;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tributary_controlplane::membership::{Assignment, ReplicaInfo, Shard, ShardAssignment};
    use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
    use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};

    use super::*;
    use crate::first::Dialect;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// A replica that answers any stream with data for as long as it may send: counts
    /// the bytes its HTTP/2 connection took from it.
    async fn endless_replica(taken: Arc<AtomicUsize>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let taken = taken.clone();
                let svc = hyper::service::service_fn(move |_req| {
                    let taken = taken.clone();
                    async move {
                        let chunks = futures_util::stream::repeat_with(move || {
                            taken.fetch_add(16 << 10, Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(
                                vec![0u8; 16 << 10],
                            )))
                        });
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(StreamBody::new(chunks))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    /// A replica that answers every stream at once and never reads its request body;
    /// its HTTP/2 windows are the protocol's initial 65,535 bytes.
    async fn deaf_replica() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let svc =
                    hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| {
                        // The body is kept, unread, for as long as the response lasts.
                        let body = req.into_body();
                        let chunks = futures_util::stream::pending::<
                            Result<Frame<Bytes>, std::convert::Infallible>,
                        >();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(StreamBody::new(futures_util::StreamExt::map(
                                        chunks,
                                        move |c| {
                                            let _unread = &body;
                                            c
                                        },
                                    )))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .initial_stream_window_size(65_535)
                        .initial_connection_window_size(65_535)
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    /// A replica that answers every stream at once (headers, then nothing) and reads
    /// its request body as it comes, as a hub does.
    async fn listening_replica() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let svc =
                    hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| {
                        let mut body = req.into_body();
                        tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(StreamBody::new(futures_util::stream::pending::<
                                        Result<Frame<Bytes>, std::convert::Infallible>,
                                    >()))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        // Every stream the router relays (hyper's default is 200).
                        .max_concurrent_streams(None)
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    /// A router for one shard `prod/az1` whose one replica is at `replica`.
    async fn router_for(replica: SocketAddr, limits: RelayLimits) -> SocketAddr {
        let shard = Shard {
            environment: "prod".into(),
            zone: "az1".into(),
        };
        let table = Arc::new(Table::new());
        let replicas = BTreeMap::from([(
            "r".to_string(),
            ReplicaInfo {
                id: "r".into(),
                xds_addr: replica.to_string(),
                admin_addr: String::new(),
                shards: vec![shard.clone()],
                streams: 0,
                started_unix: 0.0,
            },
        )]);
        let assignment = Assignment {
            shards: vec![ShardAssignment {
                shard,
                replicas: vec!["r".into()],
            }],
            ..Default::default()
        };
        table.apply(&replicas, &assignment);
        let metrics = Arc::new(RouterMetrics::new(&mut Registry::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let router = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        // Runs as long as the test's runtime.
        std::mem::forget(stop_tx);
        tokio::spawn(accept(
            Incoming::Plain(listener),
            Relay::new(table, metrics, limits, None),
            tower::limit::GlobalConcurrencyLimitLayer::new(1024),
            Arc::new(tokio::sync::Semaphore::new(4096)),
            stop,
        ));
        router
    }

    /// An HTTP/2 client connection to `router` (hyper's defaults), driven in the
    /// background.
    async fn h2_client<B>(router: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = tokio::net::TcpStream::connect(router).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    /// A gRPC-framed Delta request of a node of `prod/az1`.
    fn first_request(id: &str) -> Bytes {
        let first = DeltaDiscoveryRequest {
            node: Some(Node {
                id: id.into(),
                locality: Some(Locality {
                    zone: "az1".into(),
                    ..Default::default()
                }),
                metadata: Some(Struct {
                    fields: [(
                        "tributary.io/env".to_string(),
                        Value {
                            kind: Some(Kind::StringValue("prod".into())),
                        },
                    )]
                    .into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(first.len() as u32).to_be_bytes());
        framed.extend_from_slice(&first);
        Bytes::from(framed)
    }

    /// Until `counter` stops moving for 500 ms (a window's worth moves in
    /// microseconds on loopback), within 10 s; its last value.
    async fn until_still(counter: &AtomicUsize, what: &str) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last = (counter.load(Ordering::Relaxed), tokio::time::Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = counter.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, tokio::time::Instant::now());
            } else if last.1.elapsed() >= Duration::from_millis(500) {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} is still moving ({now} bytes): nothing bounds the stream"
            );
        }
    }

    /// A client that keeps sending while its replica reads nothing can send no more
    /// than the replica's HTTP/2 window (plus what the sockets and one read hold):
    /// flow control runs end to end through the router, which adds no window of its
    /// own. (Under the HTTP/2 relay, hyper's default 1 MiB windows once let such a
    /// client park 1 MiB per stream in the router: 1,064,960 bytes left the client
    /// here.) The router's own share, at most one read per direction, is what
    /// `tests/stream_memory.rs` bounds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_whose_replica_reads_nothing_sends_no_more_than_the_replicas_window() {
        let limits = RelayLimits::default();
        let router = router_for(deaf_replica().await, limits).await;

        let sent = Arc::new(AtomicUsize::new(0));
        let mut send = h2_client(router).await;
        let body = futures_util::stream::once(futures_util::future::ready(Ok::<
            _,
            std::convert::Infallible,
        >(Frame::data(
            first_request("chatty"),
        ))))
        .chain(futures_util::stream::repeat_with({
            let sent = sent.clone();
            move || {
                sent.fetch_add(16 << 10, Ordering::Relaxed);
                Ok(Frame::data(Bytes::from(vec![0u8; 16 << 10])))
            }
        }));
        let req = hyper::Request::post(format!("http://{router}{}", Dialect::DELTA_PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(StreamBody::new(body))
            .unwrap();
        let response = send.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);

        let parked = until_still(&sent, "the client's upload").await;
        // The replica's window (HTTP/2 flow control runs from the client to the
        // replica, through the router) + what one read of the router took + a frame
        // in the client's hand, and a chunk of slack.
        let bound = 65_535 + crate::relay::CHUNK + 3 * (16 << 10);
        assert!(
            parked <= bound,
            "{parked} bytes left a client whose replica reads nothing (bound {bound})"
        );
    }

    /// A client that never reads what it is sent (HTTP/2's default 64 KiB windows)
    /// is sent no more than its window: the replica can hand over only what the
    /// client's window allows (plus its own send buffer), through a router that adds
    /// no window of its own. (Under the HTTP/2 relay, hyper's defaults once let the
    /// router take 2 MiB from the replica per stream: 2.1 MB left it here.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_is_sent_no_more_than_its_window() {
        let taken = Arc::new(AtomicUsize::new(0));
        let replica = endless_replica(taken.clone()).await;
        let limits = RelayLimits::default();
        let router = router_for(replica, limits).await;

        // The client: one Delta stream, its first request, then nothing read.
        let tcp = tokio::net::TcpStream::connect(router).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let first = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "slow".into(),
                locality: Some(Locality {
                    zone: "az1".into(),
                    ..Default::default()
                }),
                metadata: Some(Struct {
                    fields: [(
                        "tributary.io/env".to_string(),
                        Value {
                            kind: Some(Kind::StringValue("prod".into())),
                        },
                    )]
                    .into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(first.len() as u32).to_be_bytes());
        framed.extend_from_slice(&first);
        let req = hyper::Request::post(format!("http://{router}{}", Dialect::DELTA_PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(framed)))
            .unwrap();
        let response = send.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);

        // Wait until the replica can hand over nothing more: no progress for 500 ms
        // (a window's worth moves in microseconds on loopback), within 10 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last = (taken.load(Ordering::Relaxed), tokio::time::Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = taken.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, tokio::time::Instant::now());
            } else if last.1.elapsed() >= Duration::from_millis(500) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replica is still sending ({now} bytes): nothing bounds the stream"
            );
        }
        // Client window + what one read of the router took + the replica's send
        // buffer, and a chunk of slack for each.
        let bound = 65_535 + crate::relay::CHUNK + (400 << 10) + 4 * (16 << 10);
        assert!(
            last.0 <= bound,
            "{} bytes left the replica for a client that reads nothing (bound {bound})",
            last.0
        );
        // The client can still read what it was sent.
        let mut body = response.into_body();
        let f = body.frame().await.unwrap().unwrap();
        assert!(f.into_data().is_ok());
    }

    /// One HTTP/2 frame: its 9-byte header, then `payload`.
    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A client that multiplexes `n` Delta streams on one connection, its bytes
    /// written at once: the connection preface, then per stream its HEADERS and one
    /// DATA frame with its first request (the stream stays open, as ADS streams do).
    /// HPACK: the first stream's headers enter the dynamic table, later streams
    /// index them.
    fn multiplexing_client(n: u32) -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x4, 0, 0, &[]));
        let literal = |block: &mut Vec<u8>, prefix: u8, name: &str, value: &str| {
            block.push(prefix);
            if prefix == 0x40 {
                block.push(name.len() as u8);
                block.extend_from_slice(name.as_bytes());
            }
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        };
        for i in 0..n {
            let stream = 2 * i + 1;
            // :method POST, :scheme http (static table).
            let mut block = vec![0x83, 0x86];
            if i == 0 {
                // Incremental indexing: :path (static name 4), :authority (1),
                // content-type and te.
                literal(&mut block, 0x44, "", Dialect::DELTA_PATH);
                literal(&mut block, 0x41, "", "router");
                literal(&mut block, 0x40, "content-type", "application/grpc");
                literal(&mut block, 0x40, "te", "trailers");
            } else {
                // The dynamic table, newest first: te 62, content-type 63,
                // :authority 64, :path 65.
                block.extend_from_slice(&[0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62]);
            }
            // END_HEADERS, not END_STREAM.
            out.extend(h2_frame(0x1, 0x4, stream, &block));
            out.extend(h2_frame(0x0, 0, stream, &first_request(&format!("s{i}"))));
        }
        out
    }

    /// A client multiplexing hundreds of streams on one connection, whose frames reach
    /// the router at once, has every stream answered (by the replica its first stream
    /// was routed to), and its connection is not closed. (Under the HTTP/2 relay, the
    /// connection's window was once one stream's, 64 KiB, and h2 bounds the small DATA
    /// frames it buffers unread by half the connection window: 400 first requests of
    /// ~50 bytes exceeded it and h2 closed the connection with `GOAWAY
    /// ENHANCE_YOUR_CALM too_many_data_frames`, failing every stream of the client.)
    #[tokio::test]
    async fn a_client_multiplexing_hundreds_of_streams_has_each_answered_and_keeps_its_connection()
    {
        const N: u32 = 400;
        let limits = RelayLimits::default();
        let router = router_for(listening_replica().await, limits).await;
        let mut tcp = tokio::net::TcpStream::connect(router).await.unwrap();
        tcp.write_all(&multiplexing_client(N)).await.unwrap();

        // Read the router's frames until every stream has its response headers.
        let mut answered = std::collections::BTreeSet::new();
        let mut buf = Vec::new();
        let read = async {
            while answered.len() < N as usize {
                let mut chunk = [0u8; 16 << 10];
                let got = tcp.read(&mut chunk).await.unwrap();
                assert!(
                    got > 0,
                    "the router closed the connection; {} of {N} streams answered",
                    answered.len()
                );
                buf.extend_from_slice(&chunk[..got]);
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, flags, stream) = (
                        buf[3],
                        buf[4],
                        u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    );
                    let payload = &buf[9..9 + len];
                    match kind {
                        // The replica's headers, relayed; a trailers-only answer
                        // (END_STREAM) would be a refusal.
                        0x1 if flags & 0x1 == 0 => {
                            answered.insert(stream);
                        }
                        0x1 => panic!("stream {stream} was refused (a trailers-only answer)"),
                        0x3 => panic!(
                            "the router reset stream {stream} (error {:?})",
                            &payload[..4]
                        ),
                        0x7 => panic!(
                            "the router closed the connection: GOAWAY error {} {:?}, {} of {N} streams answered",
                            u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                            String::from_utf8_lossy(&payload[8..]),
                            answered.len()
                        ),
                        _ => {}
                    }
                    buf.drain(..9 + len);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("every stream answered within 30 s");
        assert_eq!(answered, (0..N).map(|i| 2 * i + 1).collect());
    }

    /// A client that opens its first stream and never sends its first request gets
    /// `DEADLINE_EXCEEDED` at `--first-request-timeout`, answered by the router itself;
    /// one that opens no stream is closed then; one that does not speak HTTP/2 is
    /// closed at once. Nothing of any of them reaches a replica.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_without_a_first_request_is_answered_or_closed() {
        let limits = RelayLimits {
            first_request_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let taken = Arc::new(AtomicUsize::new(0));
        let router = router_for(endless_replica(taken.clone()).await, limits).await;

        // Timed from before the connection: the router's clock starts at its accept.
        let started = tokio::time::Instant::now();
        let mut send = h2_client(router).await;
        let req = hyper::Request::post(format!("http://{router}{}", Dialect::DELTA_PATH))
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, std::convert::Infallible>,
            >()))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(started.elapsed() >= limits.first_request_timeout);
        assert_eq!(response.headers()["grpc-status"], "4", "{response:?}");
        let message = response.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("--first-request-timeout"), "{message}");

        // Silent: the router's connection preface (an empty SETTINGS frame), then the
        // end of the connection.
        let started = tokio::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(router).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut got))
            .await
            .expect("closed within 5 s")
            .unwrap();
        assert!(started.elapsed() >= limits.first_request_timeout);
        assert_eq!(got, crate::wire::ROUTER_SETTINGS);

        // Not HTTP/2.
        let mut http1 = tokio::net::TcpStream::connect(router).await.unwrap();
        http1
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let started = tokio::time::Instant::now();
        http1.read_to_end(&mut got).await.unwrap();
        assert!(started.elapsed() < limits.first_request_timeout);
        assert_eq!(got, crate::wire::ROUTER_SETTINGS);
        assert_eq!(taken.load(Ordering::Relaxed), 0);
    }
}

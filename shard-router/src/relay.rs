//! The relay: a `tower::Service` over client connections that routes each by the
//! node of its first ADS request, then copies bytes between the client and a replica.
//!
//! For each connection it sends the router's connection preface, reads the client's
//! first frames until the first stream's first gRPC message is whole ([`FirstStream`];
//! [`Relay::read_first`], outside the admission limit), decodes only the node from it
//! ([`crate::first::node_of`]), asks the [`Table`] for a replica and connects to it
//! (the service, behind the limit). Every byte read so far is then replayed to the replica
//! and the rest copied both ways as it comes ([`Relayed`]); nothing after the first
//! message is decoded, in either direction, and the router holds no HTTP/2 state: an
//! idle relayed connection costs two sockets and a small task, with no buffer (bytes
//! pass through one scratch buffer per thread; only bytes a peer is not taking yet are
//! held, per connection). The edits to the client's frames are in [`ClientFrames`].
//!
//! A connection is routed once, by its first stream: every stream on it goes to the
//! same replica. Envoy and gRPC's xDS clients open one ADS stream per connection to
//! their xDS server, each for one node; a replica refuses a node of a shard it does
//! not serve.
//!
//! When the replica leaves the shard (the table's gone signal), its connection fails
//! or closes, or the router stops, the router ends the client's open streams with
//! `UNAVAILABLE` trailers naming why (at a frame boundary of the replica's bytes, see
//! [`crate::wire::ServerFrames::ending`]) and closes the connection; the client
//! reconnects through the router and lands on a live replica. A
//! connection whose first stream the router does not relay (the directory API, which
//! it serves itself, or a refused stream) is served here over HTTP/2 ([`Local`]): a
//! refused stream gets a trailers-only gRPC error naming what was missing or unknown
//! and which shards exist, and its connection is then closed, so that the client's
//! next attempt is routed afresh.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tonic::Status;
use tracing::{Instrument, debug, info, info_span, warn};
use tributary_controlplane::identity::SpiffeId;
use tributary_controlplane::identity::tls::ClientTls;
use tributary_proto::directory::v1::directory_server::DirectoryServer;

use crate::directory::DirectoryService;
use crate::first::{Dialect, FirstRequestError};
use crate::metrics::{ReplicaLabels, RouterMetrics, ShardLabel};
use crate::table::{Refusal, Route, Table};
use crate::wire::{
    ClientFrames, FirstStream, HeaderBlockError, OpenStreams, PeekError, Peeked, ROUTER_SETTINGS,
    ServerFrames,
};

/// The refusal reason of a connection whose client's header block the router cannot
/// pass on (it would end inside a field, under mutual TLS: see [`ClientFrames`]).
const HEADER_BLOCK: &str = "header_block";

/// Paths of the directory API, which the router serves itself.
pub const DIRECTORY_PREFIX: &str = "/tributary.directory.v1.Directory/";

/// Who the client of a connection is: the SPIFFE id its certificate carries, `None`
/// on a plaintext (`--insecure`) listener. Under mutual TLS the relay forwards it to
/// the replica with each stream's headers ([`ClientFrames`]).
#[derive(Debug, Clone, Default)]
pub struct ClientIdentity(pub Option<SpiffeId>);

/// `--max-first-request-bytes`'s default: an xDS client's first request is its node
/// and a few names, a few KiB (Envoy's, with its extension list, ~10 KiB).
pub const DEFAULT_MAX_FIRST_REQUEST_BYTES: usize = 1 << 20;

/// Bounds of the relay (flags of `tributary-router`).
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Largest first request read (`--max-first-request-bytes`).
    pub max_first_request_bytes: usize,
    /// How long a client may take to send its first request (`--first-request-timeout`).
    pub first_request_timeout: Duration,
    /// How long connecting to a replica may take (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// How long a replica the relay could not reach is avoided for new streams
    /// (`--avoid-unreachable-for`).
    pub avoid_unreachable_for: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_first_request_bytes: DEFAULT_MAX_FIRST_REQUEST_BYTES,
            first_request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            avoid_unreachable_for: Duration::from_secs(10),
        }
    }
}

/// A connection, plaintext or over TLS (the client's: a TLS server stream; the
/// replica's: a TLS client stream).
#[derive(Debug)]
pub enum Conn<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client's connection to the router.
pub type ClientIo = Conn<tokio_rustls::server::TlsStream<TcpStream>>;
/// The router's connection to a replica.
pub type ReplicaIo = Conn<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for Conn<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An accepted client connection, with its client's certified identity.
#[derive(Debug)]
pub struct ClientConn {
    pub io: ClientIo,
    pub peer: SocketAddr,
    pub identity: ClientIdentity,
}

/// What routing a connection came to.
#[derive(Debug)]
pub enum Routed {
    /// Relay it to a replica.
    Replica(Relayed),
    /// Serve it here: the directory API, or a refusal.
    Local(Local),
    /// Nothing to answer on (not HTTP/2, or gone before its first stream): closed.
    Closed,
}

impl Routed {
    /// Relays or serves the connection until it ends, or until `stop`.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        match self {
            Routed::Replica(r) => r.run(stop).await,
            Routed::Local(l) => l.serve(stop).await,
            Routed::Closed => {}
        }
    }
}

/// Shared by every connection.
#[derive(Debug)]
struct Inner {
    /// The directory API, served here rather than relayed.
    directory: DirectoryServer<DirectoryService>,
    table: Arc<Table>,
    metrics: Arc<RouterMetrics>,
    limits: RelayLimits,
    /// The router's own mutual TLS to the replicas; `None`: plaintext.
    upstream_tls: Option<ClientTls>,
}

/// The relay service (one clone per connection; they share everything).
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl Relay {
    /// `upstream_tls`: the router's own mutual TLS to the replicas; `None`: plaintext.
    pub fn new(
        table: Arc<Table>,
        metrics: Arc<RouterMetrics>,
        limits: RelayLimits,
        upstream_tls: Option<ClientTls>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                directory: DirectoryServer::new(DirectoryService::new(table.clone())),
                table,
                metrics,
                limits,
                upstream_tls,
            }),
        }
    }
}

impl Relay {
    /// Sends the router's connection preface and reads the connection's first stream
    /// (within `--first-request-timeout`). Outside the admission limit: a client
    /// that is slow to send its first request holds no routing slot.
    pub async fn read_first(&self, mut conn: ClientConn) -> FirstRead {
        let mut head = BytesMut::new();
        let mut first = FirstStream::new(self.inner.limits.max_first_request_bytes);
        let read = tokio::time::timeout(
            self.inner.limits.first_request_timeout,
            Inner::read_first(&mut conn.io, &mut head, &mut first),
        )
        .await
        .unwrap_or(if first.has_stream() {
            Read::TimedOut
        } else {
            Read::Silent
        });
        FirstRead { conn, head, read }
    }
}

/// A connection whose first stream the router has read (or tried to): what
/// [`Relay`] routes.
#[derive(Debug)]
pub struct FirstRead {
    conn: ClientConn,
    /// Every byte the client sent so far.
    head: BytesMut,
    read: Read,
}

impl tower::Service<FirstRead> for Relay {
    type Response = Routed;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Routed, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, first: FirstRead) -> Self::Future {
        let inner = self.inner.clone();
        // Routing runs in a span that names the connection once its node is read.
        let span = info_span!(
            "route",
            peer = %first.conn.peer,
            node = tracing::field::Empty,
            shard = tracing::field::Empty,
            replica = tracing::field::Empty
        );
        Box::pin(async move { Ok(inner.route(first).await) }.instrument(span))
    }
}

type Refused = (&'static str, Status);

fn refusal(r: Refusal) -> Refused {
    let reason = match &r {
        Refusal::Invalid(_) => "invalid_node",
        Refusal::NotFound(_) => "unknown_shard",
        Refusal::Unavailable(_) => "no_live_replica",
    };
    (reason, Status::new(r.code(), r.to_string()))
}

fn bad_first_request(e: FirstRequestError) -> Refused {
    let reason = match e {
        FirstRequestError::TooLarge { .. } => "first_request_too_large",
        FirstRequestError::Ended => "no_first_request",
        _ => "bad_first_request",
    };
    (reason, Status::invalid_argument(e.to_string()))
}

/// How reading a connection's first stream ended.
#[derive(Debug)]
enum Read {
    Peeked(Peeked),
    Broken(PeekError),
    /// The client closed (or broke) its connection first.
    Gone,
    /// No whole first request within `--first-request-timeout`, on a stream begun.
    TimedOut,
    /// No stream begun within `--first-request-timeout`.
    Silent,
}

impl Inner {
    /// Serves `conn` here: the directory API, or the refusal of its first stream.
    fn local(
        self: &Arc<Self>,
        conn: ClientConn,
        head: BytesMut,
        refused: Option<Refused>,
    ) -> Routed {
        let refused = refused.map(|(reason, status)| {
            self.metrics.refuse(reason);
            info!(code = ?status.code(), message = status.message(), "stream refused");
            status
        });
        Routed::Local(Local {
            conn,
            head,
            refused,
            inner: self.clone(),
        })
    }

    async fn route(self: Arc<Self>, first: FirstRead) -> Routed {
        let FirstRead { conn, head, read } = first;
        let peeked = match read {
            Read::Silent => {
                // No stream to answer on: a client that said nothing.
                self.metrics.refuse("first_request_timeout");
                info!("closing a connection that opened no stream within --first-request-timeout");
                return Routed::Closed;
            }
            Read::TimedOut => {
                let status = Status::deadline_exceeded(format!(
                    "no whole first request within --first-request-timeout ({})",
                    humantime::format_duration(self.limits.first_request_timeout)
                ));
                return self.local(conn, head, Some(("first_request_timeout", status)));
            }
            Read::Gone => {
                self.metrics.refuse("no_first_request");
                debug!("the client closed its connection before its first request");
                return Routed::Closed;
            }
            Read::Broken(e) => {
                self.metrics.refuse("not_grpc");
                info!(error = %e, "closing a connection the router cannot read");
                return Routed::Closed;
            }
            Read::Peeked(p) => p,
        };
        let (dialect, node) = match peeked {
            Peeked::Other { path } if path.starts_with(DIRECTORY_PREFIX) => {
                return self.local(conn, head, None);
            }
            Peeked::Other { path } => {
                let status = Status::unimplemented(format!(
                    "the shard router relays {} and {} (and serves {DIRECTORY_PREFIX}) only, not {path}",
                    Dialect::SOTW_PATH,
                    Dialect::DELTA_PATH,
                ));
                return self.local(conn, head, Some(("unknown_method", status)));
            }
            Peeked::Ads { dialect, node } => (dialect, node),
        };
        let mut node = match node {
            Ok(node) => node,
            Err(e) => return self.local(conn, head, Some(bad_first_request(e))),
        };
        // The bytes read so far go first, with the same edits as the rest: checked
        // before anything is routed or connected.
        let forwarded = conn.identity.0.as_ref().map(|id| id.to_string());
        let mut frames = ClientFrames::new(forwarded.as_deref());
        let (mut up, mut open) = (Half::default(), OpenStreams::default());
        up.shutdown = true;
        if let Err(e) = frames.feed(&head, Some(&mut up.pending), &mut open) {
            self.metrics.refuse(HEADER_BLOCK);
            info!(error = %e, "closing a connection the router cannot relay");
            return Routed::Closed;
        }
        // A certified workload or gateway that claims no environment is routed by the
        // one its certificate names (the replica checks any claim against it).
        if node.environment.is_none()
            && let Some(env) = conn
                .identity
                .0
                .as_ref()
                .and_then(|id| id.identity.environment())
        {
            node.environment = Some(env.to_string());
        }
        let span = tracing::Span::current();
        span.record("node", node.id.as_str());
        let route = match self.table.route(&node) {
            Ok(route) => route,
            Err(r) => return self.local(conn, head, Some(refusal(r))),
        };
        let shard = route.shard.to_string();
        span.record("shard", shard.as_str());
        span.record("replica", &*route.replica);
        self.metrics
            .routed
            .get_or_create(&ShardLabel {
                shard: shard.clone(),
            })
            .inc();
        debug!(node = %node.id, %shard, replica = %route.replica, protocol = dialect.name(), "routed");
        let Route {
            replica,
            addr,
            mut gone,
            ..
        } = route;
        let label = format!("replica {replica} ({addr}) of shard {shard}");
        let connected = tokio::select! {
            c = self.connect(addr) => c,
            _ = gone.wait_for(|g| *g) => {
                let status = Status::unavailable(format!("{label} left its shard while connecting; reconnect"));
                return self.local(conn, head, Some(("replica_left", status)));
            }
        };
        let replica_io = match connected {
            Ok(io) => io,
            Err(e) => {
                warn!(%replica, %addr, error = %e, "cannot reach the replica; avoiding it for new streams");
                self.metrics.upstream_failures.inc();
                self.table
                    .avoid(&replica, addr, self.limits.avoid_unreachable_for);
                let status = Status::unavailable(format!("cannot reach {label}: {e}; reconnect"));
                return self.local(conn, head, Some(("replica_unreachable", status)));
            }
        };
        let gauge = self
            .metrics
            .connections
            .get_or_create(&ReplicaLabels {
                replica: replica.to_string(),
                shard,
            })
            .clone();
        gauge.inc();
        Routed::Replica(Relayed {
            client: conn.io,
            replica: replica_io,
            frames,
            up,
            open,
            gone,
            name: replica,
            addr,
            inner: self.clone(),
            _guard: StreamGuard(gauge),
        })
    }

    /// Sends the router's connection preface, then reads into `head` until the first
    /// stream is known.
    async fn read_first(io: &mut ClientIo, head: &mut BytesMut, first: &mut FirstStream) -> Read {
        if io.write_all(&ROUTER_SETTINGS).await.is_err() || io.flush().await.is_err() {
            return Read::Gone;
        }
        loop {
            head.reserve(4096);
            match io.read_buf(head).await {
                Ok(0) | Err(_) => return Read::Gone,
                Ok(_) => {}
            }
            match first.advance(head) {
                Ok(None) => {}
                Ok(Some(p)) => return Read::Peeked(p),
                Err(e) => return Read::Broken(e),
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<ReplicaIo> {
        let timeout = self.limits.connect_timeout;
        let connecting = async {
            match &self.upstream_tls {
                None => {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    Ok(Conn::Plain(tcp))
                }
                Some(tls) => tls
                    .connect(&addr.to_string())
                    .await
                    .map(|s| Conn::Tls(Box::new(s)))
                    .map_err(|e| io::Error::new(e.kind(), format!("mutual TLS: {e}"))),
            }
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection within --connect-timeout ({})",
                        humantime::format_duration(timeout)
                    ),
                ))
            })
    }
}

/// Decrements a replica's connection gauge when the relayed connection ends.
#[derive(Debug)]
struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A client's connection relayed to a replica.
#[derive(Debug)]
pub struct Relayed {
    client: ClientIo,
    replica: ReplicaIo,
    frames: ClientFrames,
    /// Client to replica: starts with the bytes read to route it.
    up: Half,
    /// The streams those bytes opened, and later ones.
    open: OpenStreams,
    gone: watch::Receiver<bool>,
    /// The replica's id and address.
    name: Arc<str>,
    addr: SocketAddr,
    inner: Arc<Inner>,
    _guard: StreamGuard,
}

/// How long the router tries to hand a client the end of its relayed connection.
const ENDING_TIMEOUT: Duration = Duration::from_secs(1);

impl Relayed {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let Relayed {
            mut client,
            mut replica,
            mut frames,
            mut up,
            mut open,
            mut gone,
            name,
            addr,
            inner,
            _guard,
        } = self;
        let mut server_frames = ServerFrames::default();
        let mut down = Half::default();
        let splice = Splice {
            client: &mut client,
            replica: &mut replica,
            frames: &mut frames,
            server_frames: &mut server_frames,
            open: &mut open,
            up: &mut up,
            down: &mut down,
        };
        let label = format!("replica {name} ({addr})");
        let why = tokio::select! {
            // The router's own stop first: its shutdown also closes every route.
            biased;
            () = crate::app::stopped(&mut stop) => "the shard router is shutting down; reconnect".to_string(),
            end = splice => match end {
                Ok(Closed::Client) => {
                    debug!(replica = %name, "the client closed its relayed connection");
                    return;
                }
                Err(Failed::Client(e)) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        inner.metrics.refuse(HEADER_BLOCK);
                        info!(replica = %name, error = %e, "closing a relayed connection whose client's frames the router cannot pass on");
                    } else {
                        debug!(replica = %name, error = %e, "the client's connection failed");
                    }
                    return;
                }
                Ok(Closed::Replica) => {
                    // Not avoided: a replica also closes a connection whose client
                    // broke HTTP/2, and one that is gone is avoided at the next
                    // connect.
                    info!(replica = %name, %addr, "the replica closed a relayed connection; its client reconnects");
                    inner.metrics.upstream_failures.inc();
                    format!("{label} closed the connection; reconnect")
                }
                Err(Failed::Replica(e)) => {
                    warn!(replica = %name, %addr, error = %e, "the connection to the replica failed; its client reconnects, and the replica is avoided for new streams");
                    inner.metrics.upstream_failures.inc();
                    inner.table.avoid(&name, addr, inner.limits.avoid_unreachable_for);
                    format!("the connection to {label} broke ({e}); reconnect")
                }
            },
            _ = gone.wait_for(|g| *g) => {
                inner.metrics.ended_by_membership.inc();
                info!(replica = %name, "the replica left its shard: ending its relayed connection so that the client reconnects");
                format!("{label} left its shard (lease expired, shut down, or the assignment moved the shard); reconnect through the router")
            }
        };
        drop(replica);
        // Ends the client's open streams with UNAVAILABLE naming why, where the
        // replica's bytes stopped between two frames (else the connection just
        // closes), then the connection.
        let _ = tokio::time::timeout(ENDING_TIMEOUT, async {
            if down.pending.is_empty() && server_frames.at_boundary() {
                let ending =
                    server_frames.ending(&open, frames.opened(), tonic::Code::Unavailable, &why);
                client.write_all(&ending).await?;
                client.flush().await?;
            }
            client.shutdown().await
        })
        .await;
    }
}

/// Bytes read from one side and not yet taken by the other.
#[derive(Debug, Default)]
struct Half {
    pending: Vec<u8>,
    flush: bool,
    eof: bool,
    /// Shut the writer down at the reader's end (client to replica); the other way,
    /// the router may still end the client's streams itself.
    shutdown: bool,
}

/// What the relay copies through: one buffer per thread, used within one poll.
struct Scratch {
    read: Box<[u8]>,
    edited: Vec<u8>,
}

/// The most read from a socket at once.
pub(crate) const CHUNK: usize = 16 << 10;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        read: vec![0; CHUNK].into_boxed_slice(),
        edited: Vec::new(),
    });
}

/// Which side of a relayed connection failed.
#[derive(Debug)]
enum Failed {
    Client(io::Error),
    Replica(io::Error),
}

/// How a direction's frames are followed (and the client's edited).
enum Follow<'a> {
    Client(&'a mut ClientFrames, &'a mut OpenStreams),
    Server(&'a mut ServerFrames, &'a mut OpenStreams),
}

/// Copies `r` to `w` until `r` ends and `w` is shut down. Reads go into the thread's
/// scratch buffer and are written at once; only what `w` does not take now is kept
/// (in `half`), and read no more until it is taken. `Err(true)`: reading failed.
fn poll_copy<R, W>(
    cx: &mut Context<'_>,
    mut r: Pin<&mut R>,
    mut w: Pin<&mut W>,
    half: &mut Half,
    mut follow: Follow<'_>,
) -> Poll<Result<(), (bool, io::Error)>>
where
    R: AsyncRead + ?Sized,
    W: AsyncWrite + ?Sized,
{
    let write_zero = || (false, io::Error::from(io::ErrorKind::WriteZero));
    loop {
        while !half.pending.is_empty() {
            let n = ready!(w.as_mut().poll_write(cx, &half.pending)).map_err(|e| (false, e))?;
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            half.pending.drain(..n);
        }
        if half.pending.capacity() > 0 {
            // Nothing held while idle.
            half.pending = Vec::new();
        }
        if half.flush {
            ready!(w.as_mut().poll_flush(cx)).map_err(|e| (false, e))?;
            half.flush = false;
        }
        if half.eof {
            if half.shutdown {
                ready!(w.as_mut().poll_shutdown(cx)).map_err(|e| (false, e))?;
            }
            return Poll::Ready(Ok(()));
        }
        let read = SCRATCH.with(|s| {
            let Scratch { read, edited } = &mut *s.borrow_mut();
            let mut buf = ReadBuf::new(read);
            ready!(r.as_mut().poll_read(cx, &mut buf)).map_err(|e| (true, e))?;
            let got = buf.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(true));
            }
            let invalid =
                |e: HeaderBlockError| (true, io::Error::new(io::ErrorKind::InvalidData, e));
            let data: &[u8] = match &mut follow {
                Follow::Client(f, open) if f.edits() => {
                    edited.clear();
                    f.feed(got, Some(edited), open).map_err(invalid)?;
                    &edited[..]
                }
                Follow::Client(f, open) => {
                    f.feed(got, None, open).map_err(invalid)?;
                    got
                }
                Follow::Server(f, open) => {
                    f.feed(got, open);
                    got
                }
            };
            let mut off = 0;
            while off < data.len() {
                match w.as_mut().poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                    Poll::Ready(Ok(n)) => off += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((false, e))),
                    Poll::Pending => break,
                }
            }
            half.pending.extend_from_slice(&data[off..]);
            half.flush = true;
            Poll::Ready(Ok(false))
        });
        if ready!(read)? {
            half.eof = true;
        }
    }
}

/// Both directions of a relayed connection; ends when either side has closed and
/// what it sent is passed on, or when either fails.
struct Splice<'a> {
    client: &'a mut ClientIo,
    replica: &'a mut ReplicaIo,
    frames: &'a mut ClientFrames,
    server_frames: &'a mut ServerFrames,
    open: &'a mut OpenStreams,
    up: &'a mut Half,
    down: &'a mut Half,
}

/// Which side closed a relayed connection first.
#[derive(Debug)]
enum Closed {
    Client,
    Replica,
}

impl Future for Splice<'_> {
    type Output = Result<Closed, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let up = poll_copy(
            cx,
            Pin::new(&mut *this.client),
            Pin::new(&mut *this.replica),
            this.up,
            Follow::Client(this.frames, this.open),
        );
        match up {
            Poll::Ready(Ok(())) => return Poll::Ready(Ok(Closed::Client)),
            Poll::Ready(Err((true, e))) => return Poll::Ready(Err(Failed::Client(e))),
            Poll::Ready(Err((false, e))) => return Poll::Ready(Err(Failed::Replica(e))),
            Poll::Pending => {}
        }
        match poll_copy(
            cx,
            Pin::new(&mut *this.replica),
            Pin::new(&mut *this.client),
            this.down,
            Follow::Server(this.server_frames, this.open),
        ) {
            // The replica closed its connection (all it sent is passed on): the
            // client must reconnect.
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Closed::Replica)),
            Poll::Ready(Err((true, e))) => Poll::Ready(Err(Failed::Replica(e))),
            Poll::Ready(Err((false, e))) => Poll::Ready(Err(Failed::Client(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A connection the router serves itself over HTTP/2: the directory API, or the
/// refusal of its first stream.
#[derive(Debug)]
pub struct Local {
    conn: ClientConn,
    /// The client's bytes read so far.
    head: BytesMut,
    /// Why its first stream was refused, if it was.
    refused: Option<Status>,
    inner: Arc<Inner>,
}

impl Local {
    async fn serve(self, mut stop: watch::Receiver<bool>) {
        let Local {
            conn,
            head,
            refused,
            inner,
        } = self;
        // Without an identity to add, nothing is scanned and the frames cannot fail.
        let mut frames = ClientFrames::new(None);
        let (mut out, mut open) = (Vec::new(), OpenStreams::default());
        if frames.feed(&head, Some(&mut out), &mut open).is_err() {
            return;
        }
        let io = Replayed {
            io: conn.io,
            out,
            at: 0,
            frames,
            open,
        };
        // A refused connection is closed once its refusal is out, and at the latest
        // after REFUSED_LINGER (a first stream that never completes its headers, or
        // was reset, is never answered).
        let refused_deadline = refused.is_some();
        let answered = Arc::new(Notify::new());
        let svc = hyper::service::service_fn({
            let answered = answered.clone();
            move |req: hyper::Request<hyper::body::Incoming>| {
                let (inner, refused, answered) = (inner.clone(), refused.clone(), answered.clone());
                async move {
                    let path = req.uri().path();
                    if path.starts_with(DIRECTORY_PREFIX) {
                        let mut directory = inner.directory.clone();
                        return tower::Service::call(&mut directory, req).await;
                    }
                    let status = match refused {
                        Some(status) => status,
                        None => Status::failed_precondition(format!(
                            "the shard router routes a connection by its first stream; this one serves {DIRECTORY_PREFIX}: open {path} on a connection of its own"
                        )),
                    };
                    answered.notify_one();
                    Ok::<_, Infallible>(status.into_http())
                }
            }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "a connection served by the router ended with an error");
                }
                return;
            }
            () = answered.notified() => conn.as_mut().graceful_shutdown(),
            () = tokio::time::sleep(REFUSED_LINGER), if refused_deadline => conn.as_mut().graceful_shutdown(),
            () = crate::app::stopped(&mut stop) => conn.as_mut().graceful_shutdown(),
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    }
}

/// A client's connection served here: the bytes read to route it first, then the
/// rest, through [`ClientFrames`] (which drops the acknowledgement of the router's
/// own SETTINGS: the local HTTP/2 server sends its own).
struct Replayed {
    io: ClientIo,
    out: Vec<u8>,
    at: usize,
    frames: ClientFrames,
    open: OpenStreams,
}

/// How long a connection whose first stream was refused stays open at most.
const REFUSED_LINGER: Duration = Duration::from_secs(5);

impl AsyncRead for Replayed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.at == this.out.len() {
            this.out.clear();
            this.at = 0;
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.frames
                .feed(read.filled(), Some(&mut this.out), &mut this.open)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        let n = buf.remaining().min(this.out.len() - this.at);
        buf.put_slice(&this.out[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

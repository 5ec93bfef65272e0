//! The router's connections to hub replicas: plaintext (an `--insecure` router, whose
//! hubs are `--insecure` too), or mutual TLS with the router's own certificate (a
//! `Router` SPIFFE id: the identity under which a hub believes the proxy identity the
//! router forwards in `x-tributary-peer-id`).
//!
//! TLS is the hub's own client side ([`ClientTls`]: reloaded when the files change,
//! the replica checked by its `Hub` SPIFFE id rather than by the address dialled).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tributary_controlplane::identity::tls::ClientTls;

/// A connector for the relay's HTTP/2 client.
#[derive(Debug, Clone)]
pub struct Upstream {
    http: HttpConnector,
    tls: Option<ClientTls>,
    connect_timeout: Duration,
}

impl Upstream {
    /// Dials replicas in plaintext when `tls` is `None`, else over mutual TLS;
    /// connecting (TCP and handshake) may take `connect_timeout`.
    pub fn new(tls: Option<ClientTls>, connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        Self {
            http,
            tls,
            connect_timeout,
        }
    }
}

/// A connection to a replica.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(io) => io.connected(),
            // The replica speaks HTTP/2 only (ALPN h2).
            UpstreamIo::Tls(_) => Connected::new().negotiated_h2(),
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Upstream {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &self.tls {
            None => tower::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into),
            Some(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match &self.tls {
            None => {
                let connecting = tower::Service::call(&mut self.http, uri);
                Box::pin(async move { Ok(UpstreamIo::Plain(connecting.await?)) })
            }
            Some(tls) => {
                let connecting = tower::Service::call(&mut tls.connector(), uri.clone());
                let timeout = self.connect_timeout;
                Box::pin(async move {
                    match tokio::time::timeout(timeout, connecting).await {
                        Ok(Ok(io)) => Ok(UpstreamIo::Tls(Box::new(io))),
                        Ok(Err(e)) => Err(format!("mutual TLS to {uri}: {e}").into()),
                        Err(_) => Err(format!(
                            "mutual TLS to {uri}: no connection and handshake within --connect-timeout ({})",
                            humantime::format_duration(timeout)
                        )
                        .into()),
                    }
                })
            }
        }
    }
}

//! Runs [`XdsState`] over an ADS stream to the router or a hub, and reconnects with
//! exponential backoff and jitter (reset once a stream has received a response).
//! With the bootstrap's `tls`, each connection attempt reads the certificate files
//! afresh and runs mutual TLS ([`super::tls`]).

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

use super::XdsState;
use super::tls::{Connector, XdsTls};
use crate::Shared;

/// Requests waiting to be sent on one stream (a response yields at most five).
const OUTBOX: usize = 64;

/// Why a stream ended (all are retried). Messages carry the whole chain of causes
/// (a refused certificate is several layers below tonic's "transport error").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {address}: {}", chain(.source))]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("connecting to {address}: {source}")]
    Tls {
        address: String,
        source: super::tls::Error,
    },
    #[error("stream: {}", chain(.0))]
    Stream(#[from] tonic::Status),
    #[error("the server closed the stream")]
    Closed,
}

/// `e` and its sources, `: `-separated, each once (layers often repeat their cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Runs the client for ever (the task is dropped with the runtime); `tls` is the
/// bootstrap's mutual TLS, if any.
pub async fn run(
    address: String,
    tls: Option<XdsTls>,
    mut state: XdsState,
    shared: Arc<Shared>,
    delta: bool,
) {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let mut backoff = builder.build();
    loop {
        let mut progressed = false;
        let result = if delta {
            delta_stream(&address, tls.as_ref(), &mut state, &shared, &mut progressed).await
        } else {
            sotw_stream(&address, tls.as_ref(), &mut state, &shared, &mut progressed).await
        };
        shared.metrics.xds_connected.set(0);
        if progressed {
            backoff = builder.build();
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(10));
        if matches!(result, Err(Error::Connect { .. } | Error::Tls { .. })) {
            shared.metrics.xds_connect_failures.inc();
        }
        match result {
            Ok(()) => tracing::info!(?wait, "xDS stream ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, ?wait, "xDS stream failed; reconnecting"),
        }
        tokio::time::sleep(wait).await;
    }
}

async fn connect(
    address: &str,
    tls: Option<&XdsTls>,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, Error> {
    let connect_error = |source| Error::Connect {
        address: address.into(),
        source,
    };
    // With TLS, our connector does the handshake under tonic's plaintext scheme.
    let dial = match tls {
        Some(_) => address.replacen("https://", "http://", 1),
        None => address.to_string(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(dial)
        .map_err(connect_error)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    let channel = match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            // Read now: a certificate renewed on disk is used from this connection on.
            let config = tls.client_config().map_err(|source| Error::Tls {
                address: address.into(),
                source,
            })?;
            endpoint
                .connect_with_connector(Connector {
                    config: Arc::new(config),
                    ca: tls.ca().to_path_buf(),
                })
                .await
        }
    }
    .map_err(connect_error)?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

async fn delta_stream(
    address: &str,
    tls: Option<&XdsTls>,
    state: &mut XdsState,
    shared: &Shared,
    progressed: &mut bool,
) -> Result<(), Error> {
    let mut client = connect(address, tls).await?;
    let (tx, rx) = mpsc::channel(OUTBOX);
    for r in state.delta_start() {
        let _ = tx.try_send(r);
    }
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    shared.metrics.xds_connected.set(1);
    while let Some(resp) = stream.message().await? {
        *progressed = true;
        for r in state.on_delta(&resp, shared) {
            if tx.send(r).await.is_err() {
                return Err(Error::Closed);
            }
        }
    }
    Ok(())
}

async fn sotw_stream(
    address: &str,
    tls: Option<&XdsTls>,
    state: &mut XdsState,
    shared: &Shared,
    progressed: &mut bool,
) -> Result<(), Error> {
    let mut client = connect(address, tls).await?;
    let (tx, rx) = mpsc::channel(OUTBOX);
    for r in state.sotw_start() {
        let _ = tx.try_send(r);
    }
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    shared.metrics.xds_connected.set(1);
    while let Some(resp) = stream.message().await? {
        *progressed = true;
        for r in state.on_sotw(&resp, shared) {
            if tx.send(r).await.is_err() {
                return Err(Error::Closed);
            }
        }
    }
    Ok(())
}

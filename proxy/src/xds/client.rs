//! Runs [`XdsState`] over an ADS stream to the router or a hub, and reconnects with
//! exponential backoff and jitter (reset once a stream has received a response).

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

use super::XdsState;
use crate::Shared;

/// Requests waiting to be sent on one stream (a response yields at most five).
const OUTBOX: usize = 64;

/// Why a stream ended (all are retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("the server closed the stream")]
    Closed,
}

/// Runs the client until `shutdown` resolves.
pub async fn run(address: String, mut state: XdsState, shared: Arc<Shared>, delta: bool) {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let mut backoff = builder.build();
    loop {
        let mut progressed = false;
        let result = if delta {
            delta_stream(&address, &mut state, &shared, &mut progressed).await
        } else {
            sotw_stream(&address, &mut state, &shared, &mut progressed).await
        };
        shared.metrics.xds_connected.set(0);
        if progressed {
            backoff = builder.build();
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(10));
        if matches!(result, Err(Error::Connect { .. })) {
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
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, Error> {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .map_err(|source| Error::Connect {
            address: address.into(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|source| Error::Connect {
            address: address.into(),
            source,
        })?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

async fn delta_stream(
    address: &str,
    state: &mut XdsState,
    shared: &Shared,
    progressed: &mut bool,
) -> Result<(), Error> {
    let mut client = connect(address).await?;
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
    state: &mut XdsState,
    shared: &Shared,
    progressed: &mut bool,
) -> Result<(), Error> {
    let mut client = connect(address).await?;
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

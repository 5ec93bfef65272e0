//! The TCP proxy filter: each downstream connection is piped to one endpoint of the
//! listener's cluster, picked by the cluster's load balancer; a failed connect counts
//! for outlier detection and the next endpoint is tried (up to three attempts, as
//! Envoy's `max_connect_attempts` default of 1 would drop the connection at once).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::Shared;
use crate::config::Outcome;

const CONNECT_ATTEMPTS: usize = 3;

/// Proxies `downstream` to cluster `cluster` until either side closes.
/// `original_dst` is where the connection was going before it was redirected to the
/// proxy (transparent mode): an `ORIGINAL_DST` cluster connects there.
pub async fn proxy<S>(
    shared: Arc<Shared>,
    cluster: Arc<str>,
    mut downstream: S,
    original_dst: Option<SocketAddr>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let snapshot = shared.snapshot.load_full();
    let Some(cluster) = snapshot.clusters.get(&cluster).cloned() else {
        tracing::debug!(%cluster, "tcp_proxy: cluster not found; closing");
        return;
    };
    drop(snapshot);
    let Ok(_admission) = cluster.admit() else {
        return;
    };
    if cluster.def.original_dst {
        let Some(dst) = original_dst else {
            // Not redirected: the original destination is the proxy itself.
            tracing::debug!(cluster = %cluster.def.name, "ORIGINAL_DST cluster without an original destination; closing");
            return;
        };
        cluster.stats.requests.inc();
        let connect = tokio::time::timeout(cluster.def.connect_timeout, TcpStream::connect(dst));
        match connect.await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            }
            _ => {
                cluster.stats.failures.inc();
            }
        }
        return;
    }
    let mut avoid = None;
    for _ in 0..CONNECT_ATTEMPTS {
        let Ok(endpoint) = cluster.pick(avoid) else {
            return;
        };
        cluster.stats.requests.inc();
        let connect = tokio::time::timeout(
            cluster.def.connect_timeout,
            TcpStream::connect(endpoint.endpoint.address),
        );
        match connect.await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                let upstream = crate::tls::upgrade(
                    upstream,
                    cluster.tls.as_deref(),
                    cluster.def.connect_timeout,
                )
                .await;
                let Ok(mut upstream) = upstream else {
                    cluster.stats.failures.inc();
                    cluster.record(&endpoint.endpoint, Outcome::ConnectFailure);
                    avoid = Some(endpoint.endpoint.address);
                    continue;
                };
                cluster.record(&endpoint.endpoint, Outcome::Status(200));
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                return;
            }
            _ => {
                cluster.stats.failures.inc();
                cluster.record(&endpoint.endpoint, Outcome::ConnectFailure);
                avoid = Some(endpoint.endpoint.address);
            }
        }
    }
}

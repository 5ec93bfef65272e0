//! The Tributary proxy: a lightweight data plane driven by the hub's xDS.
//!
//! Modules follow the words of DESIGN.md §10:
//! - [`bootstrap`]: the bootstrap file (node, xDS server and its mTLS, admin, workers).
//! - [`xds`]: the Delta/SotW ADS client; [`xds::translate`] turns xDS resources into
//!   the typed config, or into the reasons a NACK names.
//! - [`config`]: the typed, validated snapshot the data path reads without locks.
//! - [`listener`]: binds listeners from LDS and drains removed ones.
//! - [`http`]: the HTTP connection manager's data path (routing, retries, timeouts).
//! - [`http1`]: its hand-written HTTP/1.1 fast path for plaintext connections.
//! - [`tcp`]: the TCP proxy filter.
//! - [`tls`]: downstream and upstream TLS with certificates from SDS.
//! - [`cluster`]: Envoy clusters at run time: load balancing, outlier detection,
//!   circuit breakers, upstream connection pools.
//! - [`admin`]: `/ready`, `/stats`, `/config_dump`.
//!
//! `docs/proxy.md` documents the bootstrap, what is supported and what is NACKed.

pub mod admin;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod deadline;
pub mod http;
pub mod http1;
pub mod listener;
pub mod metrics;
pub mod tcp;
pub mod tls;
pub mod xds;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::bootstrap::{Bootstrap, Protocol};
use crate::config::{ListenerConfig, Snapshot};

/// State shared by the xDS client (the one writer), the listeners and the admin
/// endpoint (readers).
#[derive(Debug)]
pub struct Shared {
    /// What requests read: swapped whole by the xDS client, loaded without locks.
    pub snapshot: ArcSwap<Snapshot>,
    /// The listener set the manager binds.
    pub listeners: watch::Sender<BTreeMap<Arc<str>, ListenerConfig>>,
    /// Bound listener addresses, by name.
    pub bound: watch::Sender<BTreeMap<Arc<str>, SocketAddr>>,
    /// True once the first complete config is applied and while every certificate
    /// and trust bundle that held listeners and clusters name is loaded.
    pub ready: watch::Sender<bool>,
    /// The SDS secrets held, for TLS handshakes (swapped whole by the xDS client).
    pub secrets: Arc<ArcSwap<tls::SecretSet>>,
    pub metrics: metrics::Metrics,
    /// The xDS client's view for `/config_dump` (written per response, read by admin only).
    pub dump: std::sync::Mutex<serde_json::Value>,
}

/// How long a removed listener's connections may take to finish.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// A started proxy.
#[derive(Debug)]
pub struct Proxy {
    pub shared: Arc<Shared>,
    pub admin_addr: SocketAddr,
}

impl Proxy {
    /// Starts the admin endpoint, the listener manager and the xDS client on the
    /// current runtime.
    pub async fn start(b: Bootstrap) -> std::io::Result<Proxy> {
        let proxy = Self::serve(&b).await?;
        let delta = b.xds.protocol == Protocol::Delta;
        let state = xds::XdsState::new(xds::node(&b.node), delta);
        tokio::spawn(xds::client::run(
            b.xds.address.clone(),
            b.tls.clone().map(xds::tls::XdsTls::new),
            state,
            proxy.shared.clone(),
            delta,
        ));
        Ok(proxy)
    }

    /// Starts the admin endpoint and the listener manager, without an xDS client:
    /// config then comes from an [`xds::XdsState`] the caller drives (tests).
    pub async fn serve(b: &Bootstrap) -> std::io::Result<Proxy> {
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            listeners: watch::Sender::new(BTreeMap::new()),
            bound: watch::Sender::new(BTreeMap::new()),
            ready: watch::Sender::new(false),
            secrets: Default::default(),
            metrics: metrics::Metrics::default(),
            dump: std::sync::Mutex::new(serde_json::Value::Null),
        });
        let admin_addr = admin::serve(shared.clone(), b.admin.address).await?;
        let drain = b
            .listeners
            .drain_timeout
            .map_or(DEFAULT_DRAIN, Duration::from_secs_f64);
        tokio::spawn(listener::manage(shared.clone(), b.listeners.clone(), drain));
        Ok(Proxy { shared, admin_addr })
    }

    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Waits until the proxy is ready (its first complete config is applied and its
    /// certificates are loaded).
    pub async fn ready(&self) {
        let mut rx = self.shared.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Waits until listener `name` is bound; returns its address.
    pub async fn listener_addr(&self, name: &str) -> SocketAddr {
        let mut rx = self.shared.bound.subscribe();
        let b = rx
            .wait_for(|b| b.contains_key(name))
            .await
            .expect("the proxy's listener map outlives it");
        b[name]
    }
}

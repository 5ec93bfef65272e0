//! The etcd backend: the [`Store`] operations on etcd's v3 API through `etcd-client`.
//!
//! etcd already has the model ([`crate`]'s docs): revisions, prefix watches from a
//! revision, leases, transactions. What this adds is the mapping of errors — an
//! unreachable cluster is [`StoreError::Unavailable`] (retryable), a compacted start
//! revision is [`StoreError::Compacted`], an expired lease `LeaseNotFound` — and
//! watches as [`EventStream`]s that end with an error when the connection breaks, so
//! [`crate::watcher::Watcher`] resumes them from the last revision seen. The client
//! reconnects by itself on the next request.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, WatchOptions};
use futures_util::StreamExt;

use crate::{
    Compare, CompareOp, CompareTarget, Event, EventKind, EventStream, KeyValue, LeaseId, Range,
    Result, Revision, Store, StoreError, Txn, TxnOp, TxnResult, ttl_seconds,
};

/// Options of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` of each member.
    pub endpoints: Vec<String>,
    /// How long one request may take before it counts as unavailable.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A connection to an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    name: String,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("name", &self.name).finish()
    }
}

impl Etcd {
    /// Connects (lazily: an unreachable cluster fails the first request, not this).
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self> {
        let name = format!("etcd {}", cfg.endpoints.join(","));
        let opts = ConnectOptions::new()
            .with_connect_timeout(cfg.connect_timeout)
            .with_timeout(cfg.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|e| StoreError::Failed {
                store: name.clone(),
                message: format!("connecting: {e}"),
            })?;
        Ok(Etcd { client, name })
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        map_err(&self.name, e)
    }
}

fn map_err(name: &str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let store = name.to_string();
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message().to_string();
            if msg.contains("requested lease not found") {
                return StoreError::LeaseNotFound { store, lease: 0 };
            }
            if msg.contains("required revision has been compacted") {
                return StoreError::Compacted {
                    store,
                    requested: 0,
                    compacted: 0,
                };
            }
            match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
                | tonic::Code::ResourceExhausted => StoreError::Unavailable {
                    store,
                    message: format!("{}: {msg}", s.code()),
                },
                code => StoreError::Failed {
                    store,
                    message: format!("{code}: {msg}"),
                },
            }
        }
        E::TransportError(t) => StoreError::Unavailable {
            store,
            message: t.to_string(),
        },
        E::IoError(io) => StoreError::Unavailable {
            store,
            message: io.to_string(),
        },
        E::LeaseKeepAliveError(m) if m.contains("not found") => {
            StoreError::LeaseNotFound { store, lease: 0 }
        }
        E::WatchError(m) | E::LeaseKeepAliveError(m) => {
            StoreError::Unavailable { store, message: m }
        }
        other => StoreError::Failed {
            store,
            message: other.to_string(),
        },
    }
}

fn convert_kv(name: &str, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = kv.key_str().map_err(|e| StoreError::Failed {
        store: name.to_string(),
        message: format!("a key is not UTF-8: {e}"),
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision())
}

fn compare(c: &Compare) -> etcd_client::Compare {
    let op = match c.op {
        CompareOp::Equal => etcd_client::CompareOp::Equal,
        CompareOp::NotEqual => etcd_client::CompareOp::NotEqual,
        CompareOp::Greater => etcd_client::CompareOp::Greater,
        CompareOp::Less => etcd_client::CompareOp::Less,
    };
    let key = c.key.as_bytes().to_vec();
    match &c.target {
        CompareTarget::Value(v) => etcd_client::Compare::value(key, op, v.clone()),
        CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(key, op, *r),
        CompareTarget::CreateRevision(r) => etcd_client::Compare::create_revision(key, op, *r),
        CompareTarget::Version(v) => etcd_client::Compare::version(key, op, *v),
    }
}

fn op(o: &TxnOp) -> etcd_client::TxnOp {
    match o {
        TxnOp::Put { key, value, lease } => {
            let opts = (*lease != 0).then(|| etcd_client::PutOptions::new().with_lease(*lease));
            etcd_client::TxnOp::put(key.as_str(), value.clone(), opts)
        }
        TxnOp::Delete { key } => etcd_client::TxnOp::delete(key.as_str(), None),
        TxnOp::Get { key } => etcd_client::TxnOp::get(key.as_str(), None),
    }
}

#[async_trait::async_trait]
impl Store for Etcd {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision)> {
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(|e| self.err(e))?;
        let kv = resp
            .kvs()
            .first()
            .map(|kv| convert_kv(&self.name, kv))
            .transpose()?;
        Ok((kv, header_revision(resp.header())))
    }

    async fn range(&self, prefix: &str) -> Result<Range> {
        let opts = etcd_client::GetOptions::new().with_prefix();
        let resp = self
            .client
            .clone()
            .get(prefix, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| convert_kv(&self.name, kv))
            .collect::<Result<Vec<_>>>()?;
        Ok(Range {
            kvs,
            revision: header_revision(resp.header()),
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        let opts = (lease != 0).then(|| etcd_client::PutOptions::new().with_lease(lease));
        let resp = self
            .client
            .clone()
            .put(key, value, opts)
            .await
            .map_err(|e| match self.err(e) {
                StoreError::LeaseNotFound { store, .. } => {
                    StoreError::LeaseNotFound { store, lease }
                }
                other => other,
            })?;
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<(bool, Revision)> {
        let resp = self
            .client
            .clone()
            .delete(key, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok((resp.deleted() > 0, header_revision(resp.header())))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let t = etcd_client::Txn::new()
            .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
        let resp = self.client.clone().txn(t).await.map_err(|e| self.err(e))?;
        let mut gets = Vec::new();
        for r in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = r {
                gets.push(
                    g.kvs()
                        .first()
                        .map(|kv| convert_kv(&self.name, kv))
                        .transpose()?,
                );
            }
        }
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
            gets,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<EventStream> {
        let mut opts = WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let stream = self
            .client
            .clone()
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let name = self.name.clone();
        let s = futures_util::stream::unfold(Some(stream), move |state| {
            let name = name.clone();
            async move {
                let mut stream = state?;
                loop {
                    let msg = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            let e = StoreError::Unavailable {
                                store: name,
                                message: "the watch stream ended".into(),
                            };
                            return Some((Err(e), None));
                        }
                        Err(e) => return Some((Err(map_err(&name, e)), None)),
                    };
                    if msg.canceled() {
                        let e = if msg.compact_revision() > 0 {
                            StoreError::Compacted {
                                store: name,
                                requested: from,
                                compacted: msg.compact_revision(),
                            }
                        } else {
                            StoreError::Unavailable {
                                store: name,
                                message: format!("the watch was canceled: {}", msg.cancel_reason()),
                            }
                        };
                        return Some((Err(e), None));
                    }
                    if msg.events().is_empty() {
                        continue;
                    }
                    let mut events = Vec::with_capacity(msg.events().len());
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let kv = match convert_kv(&name, kv) {
                            Ok(kv) => kv,
                            Err(e) => return Some((Err(e), None)),
                        };
                        let kind = match ev.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => EventKind::Delete,
                        };
                        events.push(Event { kind, kv });
                    }
                    return Some((Ok(events), Some(stream)));
                }
            }
        });
        Ok(s.boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.client
            .clone()
            .compact(revision, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let resp = self
            .client
            .clone()
            .lease_grant(ttl_seconds(ttl), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let not_found = || StoreError::LeaseNotFound {
            store: self.name.clone(),
            lease,
        };
        let err = |e| match self.err(e) {
            StoreError::LeaseNotFound { store, .. } => StoreError::LeaseNotFound { store, lease },
            other => other,
        };
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(err)?;
        keeper.keep_alive().await.map_err(err)?;
        match stream.message().await.map_err(err)? {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            Some(_) => Err(not_found()),
            None => Err(StoreError::Unavailable {
                store: self.name.clone(),
                message: "the keep-alive stream ended".into(),
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.client
            .clone()
            .lease_revoke(lease)
            .await
            .map_err(|e| match self.err(e) {
                StoreError::LeaseNotFound { store, .. } => {
                    StoreError::LeaseNotFound { store, lease }
                }
                other => other,
            })?;
        Ok(())
    }
}

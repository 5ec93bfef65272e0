//! The store conformance suite: one set of async test functions, run against the
//! embedded store (`embedded::*`) and against a real etcd (`etcd::*`, Debian's etcd
//! 3.4 started on free loopback ports with a temporary data dir, stopped by pid).
//!
//! - get / put / delete with revisions; a txn with several writes is one revision;
//! - a prefix watch from a revision, then live events;
//! - watch resumption across a disconnect (etcd: `kill -9` and restart of the etcd
//!   process; embedded: every watch dropped), no event lost or repeated, in order;
//! - a watch from a compacted revision re-lists (never a silent skip);
//! - lease expiry after the holder dies (etcd: `kill -9` of a child process that holds
//!   the lease; embedded: its keeper dropped) and not before;
//! - a transaction that loses a compare applies nothing;
//! - election with two candidates, one of which dies.
//!
//! The embedded store adds: watch resumption and lease expiry across a restart of the
//! store from its file.

use std::collections::BTreeMap;
#[cfg(feature = "etcd")]
use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tributary_store::embedded::{Embedded, EmbeddedConfig};
#[cfg(feature = "etcd")]
use tributary_store::etcd::Etcd;
use tributary_store::lease::LeaseKeeper;
#[cfg(feature = "etcd")]
use tributary_store::testing::EtcdServer;
use tributary_store::watcher::{Update, Watcher};
use tributary_store::{
    Compare, CompareOp, CompareTarget, EventKind, SharedStore, StoreError, Txn, TxnOp, election,
};

const TTL: u64 = 2;
const WAIT: Duration = Duration::from_secs(20);

/// A backend under test.
#[async_trait::async_trait]
trait Harness: Send {
    fn store(&self) -> SharedStore;
    /// Breaks every watch's connection to the store (and, for etcd, the server
    /// itself: it is killed and started again).
    async fn disconnect(&mut self);
    /// Starts a lease holder that writes `key` (or, with `campaign`, campaigns under
    /// that prefix with `key` as its value) under a lease of [`TTL`] and keeps it
    /// alive; returns once it holds the key (or leads, for a campaign: pass
    /// `wait_ready = false` to return once it is a candidate).
    async fn holder(&mut self, key: &str, campaign: Option<&str>, wait_ready: bool) -> Holder;
}

enum Holder {
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Process {
        child: std::process::Child,
        // Keeps the reader thread's channel open while the holder runs.
        _lines: mpsc::UnboundedReceiver<String>,
    },
    Task {
        keeper: LeaseKeeper,
        task: Option<tokio::task::JoinHandle<()>>,
    },
}

impl Holder {
    /// The holder dies without a word: `kill -9`, or its keeper dropped.
    fn kill(self) {
        match self {
            Holder::Process { mut child, .. } => {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            Holder::Task { keeper, task } => {
                if let Some(t) = task {
                    t.abort();
                }
                drop(keeper);
            }
        }
    }
}

struct EmbeddedHarness {
    store: Embedded,
    _dir: tempfile::TempDir,
}

impl EmbeddedHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Embedded::open(&dir.path().join("store.redb"), EmbeddedConfig::default()).unwrap();
        EmbeddedHarness { store, _dir: dir }
    }
}

async fn task_holder(store: SharedStore, key: &str, campaign: Option<&str>) -> Holder {
    let keeper = LeaseKeeper::grant(store.clone(), Duration::from_secs(TTL))
        .await
        .unwrap();
    let lease = keeper.id();
    match campaign {
        None => {
            store.put(key, b"held".to_vec(), lease).await.unwrap();
            Holder::Task { keeper, task: None }
        }
        Some(prefix) => {
            let (prefix, value) = (prefix.to_string(), key.as_bytes().to_vec());
            let task = tokio::spawn(async move {
                election::campaign(&store, &prefix, lease, value)
                    .await
                    .unwrap();
            });
            Holder::Task {
                keeper,
                task: Some(task),
            }
        }
    }
}

#[async_trait::async_trait]
impl Harness for EmbeddedHarness {
    fn store(&self) -> SharedStore {
        Arc::new(self.store.clone())
    }
    async fn disconnect(&mut self) {
        self.store.disconnect_watchers();
    }
    async fn holder(&mut self, key: &str, campaign: Option<&str>, wait_ready: bool) -> Holder {
        let h = task_holder(self.store(), key, campaign).await;
        if let (Some(prefix), true) = (campaign, wait_ready) {
            wait_leader(&self.store(), prefix, key).await;
        }
        h
    }
}

#[cfg(feature = "etcd")]
struct EtcdHarness {
    server: EtcdServer,
    store: SharedStore,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "etcd")]
impl EtcdHarness {
    async fn new() -> Self {
        Self::on("127.0.0.1").await
    }
    async fn on(ip: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = EtcdServer::start(dir.path(), ip).await;
        let store = Arc::new(Etcd::connect(&server.config()).await.unwrap());
        EtcdHarness {
            server,
            store,
            _dir: dir,
        }
    }
}

#[cfg(feature = "etcd")]
#[async_trait::async_trait]
impl Harness for EtcdHarness {
    fn store(&self) -> SharedStore {
        self.store.clone()
    }
    async fn disconnect(&mut self) {
        self.server.restart().await;
    }
    async fn holder(&mut self, key: &str, campaign: Option<&str>, wait_ready: bool) -> Holder {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tributary-store-holder"));
        cmd.args([self.server.client_url.as_str(), &TTL.to_string(), key, key]);
        if let Some(p) = campaign {
            cmd.arg(p);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting tributary-store-holder");
        let stdout = child.stdout.take().unwrap();
        let (tx, mut lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let want = if campaign.is_some() && !wait_ready {
            "lease"
        } else {
            "ready"
        };
        loop {
            let line = timeout(WAIT, lines.recv())
                .await
                .expect("the holder started")
                .expect("the holder is running");
            if line.starts_with(want) {
                break;
            }
        }
        if let (Some(prefix), false) = (campaign, wait_ready) {
            // A candidate: its key exists once it printed its lease.
            wait_candidates(&self.store, prefix, key).await;
        }
        Holder::Process {
            child,
            _lines: lines,
        }
    }
}

async fn wait_leader(store: &SharedStore, prefix: &str, value: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(kv)) = election::leader(store, prefix).await
            && kv.value == value.as_bytes()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{value} never led");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_candidates(store: &SharedStore, prefix: &str, value: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = store.range(prefix).await.unwrap();
        if r.kvs.iter().any(|k| k.value == value.as_bytes()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{value} never became a candidate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next events from `w`, skipping interruptions (counted).
async fn next_events(w: &mut Watcher, interruptions: &mut usize) -> Vec<tributary_store::Event> {
    loop {
        match timeout(WAIT, w.next()).await.expect("a watch update") {
            Update::Events(e) => return e,
            Update::Interrupted(_) => *interruptions += 1,
            Update::Resync(r) => panic!("unexpected resync at {}", r.revision),
        }
    }
}

// ---- the suite ------------------------------------------------------------------

async fn get_put_delete(h: &mut dyn Harness) {
    let s = h.store();
    let r1 = s.put("/t/a", b"1".to_vec(), 0).await.unwrap();
    let (kv, rev) = s.get("/t/a").await.unwrap();
    let kv = kv.unwrap();
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease
        ),
        (&b"1"[..], r1, r1, 1, 0)
    );
    assert!(rev >= r1);
    let r2 = s.put("/t/a", b"2".to_vec(), 0).await.unwrap();
    assert!(r2 > r1);
    let kv = s.get("/t/a").await.unwrap().0.unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2)
    );
    s.put("/t/c", b"3".to_vec(), 0).await.unwrap();
    s.put("/t/b", b"4".to_vec(), 0).await.unwrap();
    s.put("/u/x", b"5".to_vec(), 0).await.unwrap();
    let range = s.range("/t/").await.unwrap();
    let keys: Vec<&str> = range.kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b", "/t/c"], "prefix range, in key order");
    let (existed, r3) = s.delete("/t/a").await.unwrap();
    assert!(existed && r3 > r2);
    assert_eq!(s.get("/t/a").await.unwrap().0, None);
    let (existed, r4) = s.delete("/t/a").await.unwrap();
    assert!(!existed);
    assert_eq!(r4, r3, "deleting nothing writes nothing");
    // Recreated: a new create revision, version 1.
    let r5 = s.put("/t/a", b"6".to_vec(), 0).await.unwrap();
    let kv = s.get("/t/a").await.unwrap().0.unwrap();
    assert_eq!((kv.create_revision, kv.version), (r5, 1));
    // Several writes in one transaction share one revision.
    let t = s
        .txn(Txn {
            compares: vec![],
            success: vec![
                TxnOp::put("/t/x", "x"),
                TxnOp::put("/t/y", "y"),
                TxnOp::delete("/t/b"),
            ],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(t.succeeded && t.revision == r5 + 1);
    for k in ["/t/x", "/t/y"] {
        assert_eq!(s.get(k).await.unwrap().0.unwrap().mod_revision, t.revision);
    }
}

async fn watch_from_revision(h: &mut dyn Harness) {
    let s = h.store();
    let r1 = s.put("/w/a", b"1".to_vec(), 0).await.unwrap();
    s.put("/other/z", b"z".to_vec(), 0).await.unwrap();
    let r2 = s.put("/w/b", b"2".to_vec(), 0).await.unwrap();
    let (_, r3) = s.delete("/w/a").await.unwrap();
    let mut w = Watcher::resume(s.clone(), "/w/", r1 - 1);
    let mut seen = Vec::new();
    let mut interruptions = 0;
    while seen.len() < 3 {
        seen.extend(next_events(&mut w, &mut interruptions).await);
    }
    let got: Vec<(EventKind, &str, i64)> = seen
        .iter()
        .map(|e| (e.kind, e.kv.key.as_str(), e.revision()))
        .collect();
    assert_eq!(
        got,
        [
            (EventKind::Put, "/w/a", r1),
            (EventKind::Put, "/w/b", r2),
            (EventKind::Delete, "/w/a", r3),
        ]
    );
    // Live events after the replay, a transaction's events together.
    let t = s
        .txn(Txn {
            success: vec![TxnOp::put("/w/c", "c"), TxnOp::put("/w/d", "d")],
            ..Default::default()
        })
        .await
        .unwrap();
    let batch = next_events(&mut w, &mut interruptions).await;
    let got: Vec<(&str, i64)> = batch
        .iter()
        .map(|e| (e.kv.key.as_str(), e.revision()))
        .collect();
    assert_eq!(got, [("/w/c", t.revision), ("/w/d", t.revision)]);
    assert_eq!(w.last_revision(), t.revision);
}

async fn watch_resumes_across_disconnect(h: &mut dyn Harness) {
    let s = h.store();
    let (mut w, range) = Watcher::list(s.clone(), "/r/").await.unwrap();
    assert!(range.kvs.is_empty());
    let mut interruptions = 0;
    let mut seen: Vec<(String, i64)> = Vec::new();
    // Before the disconnect: 20 writes, all seen.
    for i in 0..20 {
        s.put(&format!("/r/{i:03}"), i.to_string().into_bytes(), 0)
            .await
            .unwrap();
    }
    while seen.len() < 20 {
        for e in next_events(&mut w, &mut interruptions).await {
            seen.push((e.kv.key.clone(), e.revision()));
        }
    }
    // Writes the watch has not delivered yet, then the disconnect, then more writes.
    for i in 20..30 {
        s.put(&format!("/r/{i:03}"), i.to_string().into_bytes(), 0)
            .await
            .unwrap();
    }
    h.disconnect().await;
    let s = h.store();
    for i in 30..50 {
        let key = format!("/r/{i:03}");
        // etcd may take a moment to accept writes after its restart.
        let deadline = Instant::now() + WAIT;
        loop {
            match s.put(&key, i.to_string().into_bytes(), 0).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    while seen.len() < 50 {
        for e in next_events(&mut w, &mut interruptions).await {
            seen.push((e.kv.key.clone(), e.revision()));
        }
    }
    let keys: Vec<String> = seen.iter().map(|(k, _)| k.clone()).collect();
    let want: Vec<String> = (0..50).map(|i| format!("/r/{i:03}")).collect();
    assert_eq!(keys, want, "every event once, in order");
    assert!(
        seen.windows(2).all(|p| p[0].1 < p[1].1),
        "revisions increase"
    );
    assert!(interruptions >= 1, "the watch saw the disconnect");
    // Nothing more: a new write is the very next event.
    let r = s.put("/r/last", b"x".to_vec(), 0).await.unwrap();
    let e = next_events(&mut w, &mut interruptions).await;
    assert_eq!((e[0].kv.key.as_str(), e[0].revision()), ("/r/last", r));
}

async fn compacted_watch_resyncs(h: &mut dyn Harness) {
    let s = h.store();
    let r1 = s.put("/c/a", b"1".to_vec(), 0).await.unwrap();
    s.put("/c/b", b"2".to_vec(), 0).await.unwrap();
    s.delete("/c/a").await.unwrap();
    let r4 = s.put("/c/c", b"3".to_vec(), 0).await.unwrap();
    s.compact(r4).await.unwrap();
    assert!(
        matches!(
            s.watch("/c/", r1).await.map(|_| ()),
            Err(StoreError::Compacted { .. })
        ) || {
            // etcd reports compaction in the watch stream rather than at creation.
            use futures_util::StreamExt;
            let mut st = s.watch("/c/", r1).await.unwrap();
            matches!(
                timeout(WAIT, st.next()).await.unwrap(),
                Some(Err(StoreError::Compacted { .. }))
            )
        }
    );
    let mut w = Watcher::resume(s.clone(), "/c/", r1);
    match timeout(WAIT, w.next()).await.unwrap() {
        Update::Resync(range) => {
            let keys: Vec<&str> = range.kvs.iter().map(|k| k.key.as_str()).collect();
            assert_eq!(keys, ["/c/b", "/c/c"]);
            assert!(range.revision >= r4);
            assert_eq!(w.last_revision(), range.revision);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    let r5 = s.put("/c/d", b"4".to_vec(), 0).await.unwrap();
    match timeout(WAIT, w.next()).await.unwrap() {
        Update::Events(e) => assert_eq!((e[0].kv.key.as_str(), e[0].revision()), ("/c/d", r5)),
        other => panic!("expected events, got {other:?}"),
    }
}

async fn lease_expires_after_holder_dies(h: &mut dyn Harness) {
    let s = h.store();
    let holder = h.holder("/l/held", None, true).await;
    let (kv, _) = s.get("/l/held").await.unwrap();
    let kv = kv.expect("the holder wrote its key");
    assert_ne!(kv.lease, 0);
    let mut w = Watcher::resume(s.clone(), "/l/", kv.mod_revision);
    // Kept alive: still there after twice its TTL.
    tokio::time::sleep(Duration::from_secs(2 * TTL)).await;
    assert!(
        s.get("/l/held").await.unwrap().0.is_some(),
        "a kept lease expired"
    );
    let killed = Instant::now();
    holder.kill();
    let mut interruptions = 0;
    let events = next_events(&mut w, &mut interruptions).await;
    let took = killed.elapsed();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str()))
            .collect::<Vec<_>>(),
        [(EventKind::Delete, "/l/held")]
    );
    assert!(
        took <= Duration::from_secs(TTL + 2),
        "the key went {took:?} after the holder died (TTL {TTL}s)"
    );
    assert!(s.get("/l/held").await.unwrap().0.is_none());
    let err = s.keep_alive(kv.lease).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err}");
    let err = s.put("/l/late", b"x".to_vec(), kv.lease).await.unwrap_err();
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err}");
}

async fn revoke_deletes_now(h: &mut dyn Harness) {
    let s = h.store();
    let keeper = LeaseKeeper::grant(s.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    s.put("/v/a", b"1".to_vec(), keeper.id()).await.unwrap();
    let r = s.put("/v/b", b"2".to_vec(), keeper.id()).await.unwrap();
    let mut w = Watcher::resume(s.clone(), "/v/", r);
    keeper.revoke().await.unwrap();
    let mut deleted = Vec::new();
    let mut interruptions = 0;
    while deleted.len() < 2 {
        for e in next_events(&mut w, &mut interruptions).await {
            assert_eq!(e.kind, EventKind::Delete);
            deleted.push(e.kv.key);
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["/v/a", "/v/b"]);
}

async fn txn_loses_a_compare(h: &mut dyn Harness) {
    let s = h.store();
    let r1 = s.put("/x/k", b"v1".to_vec(), 0).await.unwrap();
    let cas = |value: &'static str| Txn {
        compares: vec![Compare::mod_revision("/x/k", r1)],
        success: vec![TxnOp::put("/x/k", value), TxnOp::put("/x/by", value)],
        failure: vec![TxnOp::get("/x/k")],
    };
    let first = s.txn(cas("a")).await.unwrap();
    assert!(first.succeeded);
    let second = s.txn(cas("b")).await.unwrap();
    assert!(!second.succeeded, "the second writer lost the compare");
    let current = second.gets[0].as_ref().unwrap();
    assert_eq!(
        (current.value.as_slice(), current.mod_revision),
        (&b"a"[..], first.revision)
    );
    assert_eq!(second.revision, first.revision, "a lost txn writes nothing");
    assert_eq!(s.get("/x/by").await.unwrap().0.unwrap().value, b"a");
    // Creation only if absent; value compares.
    let create = |k: &str| Txn {
        compares: vec![Compare::absent(k)],
        success: vec![TxnOp::put(k, "new")],
        failure: vec![],
    };
    assert!(!s.txn(create("/x/k")).await.unwrap().succeeded);
    assert!(s.txn(create("/x/fresh")).await.unwrap().succeeded);
    let by_value = |v: &str| Txn {
        compares: vec![Compare::new(
            "/x/k",
            CompareOp::Equal,
            CompareTarget::Value(v.into()),
        )],
        success: vec![TxnOp::delete("/x/k")],
        failure: vec![],
    };
    assert!(!s.txn(by_value("v1")).await.unwrap().succeeded);
    assert!(s.get("/x/k").await.unwrap().0.is_some());
    assert!(s.txn(by_value("a")).await.unwrap().succeeded);
    assert!(s.get("/x/k").await.unwrap().0.is_none());
    let newer = Txn {
        compares: vec![Compare::new(
            "/x/by",
            CompareOp::Greater,
            CompareTarget::Version(1),
        )],
        ..Default::default()
    };
    assert!(!s.txn(newer).await.unwrap().succeeded);
}

async fn election_with_two_candidates_one_dies(h: &mut dyn Harness) {
    let s = h.store();
    let prefix = "/e/hub/";
    let first = h.holder("first", Some(prefix), true).await;
    let mut observed = election::observe(s.clone(), prefix).await.unwrap();
    assert_eq!(
        observed.borrow().as_ref().map(|k| k.value.clone()),
        Some(b"first".to_vec())
    );
    let keeper = LeaseKeeper::grant(s.clone(), Duration::from_secs(TTL))
        .await
        .unwrap();
    let (store, lease) = (s.clone(), keeper.id());
    let mut second =
        tokio::spawn(
            async move { election::campaign(&store, prefix, lease, b"second".to_vec()).await },
        );
    // While the first lives (its lease renewed past two TTLs), the second waits.
    assert!(
        timeout(Duration::from_secs(2 * TTL), &mut second)
            .await
            .is_err(),
        "the second candidate led while the first was alive"
    );
    let killed = Instant::now();
    first.kill();
    let won = timeout(WAIT, &mut second)
        .await
        .expect("the second leads")
        .unwrap()
        .unwrap();
    assert!(
        killed.elapsed() <= Duration::from_secs(TTL + 2),
        "took {:?}",
        killed.elapsed()
    );
    assert_eq!(won.key, election::candidate_key(prefix, lease));
    timeout(
        WAIT,
        observed.wait_for(|l| l.as_ref().is_some_and(|k| k.value == b"second")),
    )
    .await
    .expect("observers see the second lead")
    .unwrap();
    // Resigning leaves nobody.
    election::resign(&s, prefix, lease).await.unwrap();
    timeout(WAIT, observed.wait_for(Option::is_none))
        .await
        .expect("observers see nobody lead")
        .unwrap();
}

/// A third candidate waits for the one just before it, not for the leader.
async fn election_order_is_creation_order(h: &mut dyn Harness) {
    let s = h.store();
    let prefix = "/e/order/";
    let mut keepers = Vec::new();
    let mut order = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let k = LeaseKeeper::grant(s.clone(), Duration::from_secs(30))
            .await
            .unwrap();
        let (store, lease) = (s.clone(), k.id());
        let task =
            tokio::spawn(
                async move { election::campaign(&store, prefix, lease, name.into()).await },
            );
        wait_candidates(&s, prefix, name).await;
        order.insert(name, task);
        keepers.push(k);
    }
    let a = order.remove("a").unwrap();
    timeout(WAIT, a).await.unwrap().unwrap().unwrap();
    // b's candidate resigns before leading: c follows a directly.
    election::resign(&s, prefix, keepers[1].id()).await.unwrap();
    let b = order.remove("b").unwrap();
    election::resign(&s, prefix, keepers[0].id()).await.unwrap();
    let c = order.remove("c").unwrap();
    timeout(WAIT, c).await.unwrap().unwrap().unwrap();
    // b's campaign ends with an error: its key is gone.
    assert!(timeout(WAIT, b).await.unwrap().unwrap().is_err());
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut h = super::EmbeddedHarness::new();
                    super::$name(&mut h).await;
                }
            )*
        }
        #[cfg(feature = "etcd")]
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut h = super::EtcdHarness::new().await;
                    super::$name(&mut h).await;
                }
            )*
        }
    };
}

suite!(
    get_put_delete,
    watch_from_revision,
    watch_resumes_across_disconnect,
    compacted_watch_resyncs,
    lease_expires_after_holder_dies,
    revoke_deletes_now,
    txn_loses_a_compare,
    election_with_two_candidates_one_dies,
    election_order_is_creation_order,
);

// ---- embedded only: restarts from the file ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_watch_resumes_across_a_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Embedded::open(&path, EmbeddedConfig::default()).unwrap();
    let s: SharedStore = Arc::new(store.clone());
    let (mut w, _) = Watcher::list(s.clone(), "/d/").await.unwrap();
    for i in 0..10 {
        s.put(&format!("/d/{i}"), vec![], 0).await.unwrap();
    }
    let mut interruptions = 0;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.extend(next_events(&mut w, &mut interruptions).await);
    }
    let last = w.last_revision();
    // The process ends: every handle dropped, the file closed.
    drop((w, s, store));
    let store = loop {
        match Embedded::open(&path, EmbeddedConfig::default()) {
            Ok(s) => break s,
            // The watch task lets go of the file once it notices.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let s: SharedStore = Arc::new(store);
    for i in 10..15 {
        s.put(&format!("/d/{i}"), vec![], 0).await.unwrap();
    }
    let mut w = Watcher::resume(s.clone(), "/d/", last);
    while seen.len() < 15 {
        seen.extend(next_events(&mut w, &mut interruptions).await);
    }
    let keys: Vec<String> = seen.iter().map(|e| e.kv.key.clone()).collect();
    let want: Vec<String> = (0..15).map(|i| format!("/d/{i}")).collect();
    assert_eq!(keys, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lease_expires_across_a_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Embedded::open(&path, EmbeddedConfig::default()).unwrap();
    let s: SharedStore = Arc::new(store.clone());
    let lease = s.grant(Duration::from_secs(TTL)).await.unwrap();
    let r = s.put("/l/a", b"1".to_vec(), lease).await.unwrap();
    drop((s, store));
    let store = Embedded::open(&path, EmbeddedConfig::default()).unwrap();
    let s: SharedStore = Arc::new(store);
    let kv = s
        .get("/l/a")
        .await
        .unwrap()
        .0
        .expect("kept across the restart");
    assert_eq!(kv.lease, lease);
    let opened = Instant::now();
    let mut w = Watcher::resume(s.clone(), "/l/", r);
    let mut interruptions = 0;
    let e = next_events(&mut w, &mut interruptions).await;
    assert_eq!(
        (e[0].kind, e[0].kv.key.as_str()),
        (EventKind::Delete, "/l/a")
    );
    assert!(opened.elapsed() <= Duration::from_secs(TTL + 2));
    // A new lease after the restart gets a new id.
    assert_ne!(s.grant(Duration::from_secs(TTL)).await.unwrap(), lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_lagging_watch_resumes_from_the_log() {
    let store = Embedded::in_memory(EmbeddedConfig::default()).unwrap();
    let s: SharedStore = Arc::new(store);
    let (mut w, _) = Watcher::list(s.clone(), "/g/").await.unwrap();
    // Start the live watch, then write more batches than its buffer holds.
    s.put("/g/first", vec![], 0).await.unwrap();
    let mut interruptions = 0;
    let mut keys = next_events(&mut w, &mut interruptions)
        .await
        .into_iter()
        .map(|e| e.kv.key)
        .collect::<Vec<_>>();
    let n = tributary_store::embedded::WATCH_BUFFER + 100;
    for i in 0..n {
        s.put(&format!("/g/{i:05}"), vec![], 0).await.unwrap();
    }
    while keys.len() < n + 1 {
        keys.extend(
            next_events(&mut w, &mut interruptions)
                .await
                .into_iter()
                .map(|e| e.kv.key),
        );
    }
    assert!(interruptions >= 1, "the watch lagged and was dropped");
    let want: Vec<String> = std::iter::once("/g/first".to_string())
        .chain((0..n).map(|i| format!("/g/{i:05}")))
        .collect();
    assert_eq!(keys, want);
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_on_ipv6_loopback() {
    let mut h = EtcdHarness::on("::1").await;
    get_put_delete(&mut h).await;
}

/// A store reopened in the same process while a last handle of the previous opening
/// (a background task's, say) is still being let go waits for it instead of failing
/// with "in use" (the race that made restart tests flaky under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reopen_waits_for_the_previous_opening_to_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Embedded::open(&path, EmbeddedConfig::default()).unwrap();
    let s: SharedStore = Arc::new(store.clone());
    s.put("/r/a", b"1".to_vec(), 0).await.unwrap();
    drop(s);
    let late = store.clone();
    let (dropped_tx, dropped_rx) = std::sync::mpsc::channel();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(late);
        dropped_tx.send(Instant::now()).unwrap();
    });
    drop(store);
    let reopened = Embedded::open(&path, EmbeddedConfig::default()).expect("reopened");
    let opened_at = Instant::now();
    let dropped_at = dropped_rx.recv().unwrap();
    assert!(
        dropped_at <= opened_at,
        "opened before the last handle went"
    );
    releaser.join().unwrap();
    let s: SharedStore = Arc::new(reopened);
    let (kv, _) = s.get("/r/a").await.unwrap();
    assert_eq!(kv.expect("kept").value, b"1");
}

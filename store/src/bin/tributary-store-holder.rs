//! `tributary-store-holder`: a process that holds an etcd lease, for the store's
//! conformance tests (a lease holder, or an election candidate, that a test can
//! `kill -9`). Not for production use.
//!
//! `tributary-store-holder ENDPOINT TTL_SECONDS KEY VALUE [ELECTION_PREFIX]`: grants a
//! lease, writes KEY=VALUE under it (or, with ELECTION_PREFIX, campaigns with VALUE),
//! prints `lease <hex id>` and then `ready` (holding the key, or leading), and keeps the
//! lease alive until killed.

use std::sync::Arc;
use std::time::Duration;

use tributary_store::etcd::{Etcd, EtcdConfig};
use tributary_store::lease::LeaseKeeper;
use tributary_store::{SharedStore, election};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, ttl, key, value, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: tributary-store-holder ENDPOINT TTL_SECONDS KEY VALUE [ELECTION_PREFIX]".into(),
        );
    };
    let ttl = Duration::from_secs(ttl.parse()?);
    let store: SharedStore =
        Arc::new(Etcd::connect(&EtcdConfig::new(vec![endpoint.clone()])).await?);
    let keeper = LeaseKeeper::grant(store.clone(), ttl).await?;
    println!("lease {:x}", keeper.id());
    match rest.first() {
        Some(prefix) => {
            election::campaign(&store, prefix, keeper.id(), value.clone().into_bytes()).await?;
        }
        None => {
            store
                .put(key, value.clone().into_bytes(), keeper.id())
                .await?;
        }
    }
    println!("ready");
    let mut lost = keeper.lost();
    let _ = lost.wait_for(|l| *l).await;
    Err("the lease was lost".into())
}

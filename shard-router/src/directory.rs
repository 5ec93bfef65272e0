//! The directory API (`tributary.directory.v1.Directory`), served on the router's xDS
//! port: which hub replicas serve which shards, from the same routing table the relay
//! uses. `Lookup` answers once; `Watch` sends the answer, then a new one whenever the
//! membership of the matching shards changes (a level-triggered stream: a slow reader
//! skips to the newest view). Agents and tools use it to find the replicas of a zone.
//!
//! A replica's federation address is its xDS address (a hub serves both on one gRPC
//! port). `leader` is not set: shards have no leader of their own yet.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use tributary_proto::directory::v1::directory_server::Directory;
use tributary_proto::directory::v1::{LookupRequest, LookupResponse, Replica, Shard};

use crate::table::Table;

#[derive(Debug, Clone)]
pub struct DirectoryService {
    table: Arc<Table>,
}

impl DirectoryService {
    pub fn new(table: Arc<Table>) -> Self {
        Self { table }
    }
}

/// The shards matching `req` (an empty environment or zone matches every one), with
/// their live replicas.
pub fn answer(table: &Table, req: &LookupRequest) -> LookupResponse {
    let shards = table
        .routes()
        .into_iter()
        .filter_map(|s| {
            let (env, zone) = s.shard.split_once('/')?;
            let wanted = (req.environment.is_empty() || req.environment == env)
                && (req.zone.is_empty() || req.zone == zone);
            wanted.then(|| Shard {
                environment: env.to_string(),
                zone: zone.to_string(),
                replicas: s
                    .replicas
                    .into_iter()
                    .map(|r| Replica {
                        id: r.replica,
                        federation_address: r.xds_addr.clone(),
                        xds_address: r.xds_addr,
                        leader: false,
                    })
                    .collect(),
            })
        })
        .collect();
    LookupResponse {
        shards,
        revision: table.revision(),
    }
}

fn not_ready(table: &Table) -> Result<(), Status> {
    if *table.applied().borrow() == 0 {
        return Err(Status::unavailable(
            "the shard router has not listed membership from the store yet; retry",
        ));
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<LookupResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Directory for DirectoryService {
    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        not_ready(&self.table)?;
        Ok(Response::new(answer(&self.table, request.get_ref())))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        not_ready(&self.table)?;
        let req = request.into_inner();
        let table = self.table.clone();
        let applied = table.applied();
        let stream = futures_util::stream::unfold(
            (table, applied, req, None::<Vec<Shard>>),
            |(table, mut applied, req, last)| async move {
                loop {
                    applied.borrow_and_update();
                    let now = answer(&table, &req);
                    if last.as_ref() != Some(&now.shards) {
                        let shards = now.shards.clone();
                        return Some((Ok(now), (table, applied, req, Some(shards))));
                    }
                    // The router is shutting down when the table is gone.
                    applied.changed().await.ok()?;
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

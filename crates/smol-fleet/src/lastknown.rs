//! What a replica last read from the store, for while the store is down (issue 15:
//! "PostgreSQL stopped: mutations 503 retryable, running machines keep running and answer exec
//! through their node").
//!
//! Every request reads its key and, for a machine on a remote node, the machine's record and
//! placement from the store. Each successful read is kept here; a read that fails with
//! [`FleetError::StoreUnavailable`] is answered from what was kept, if it is younger than
//! [`KEPT_FOR`], so execs, files and streams of machines this replica has served go on while
//! the database is away. Nothing is served from here while the store answers: a revoked key or
//! a deleted machine is refused as soon as the store says so (a read that finds nothing also
//! forgets what was kept). Mutations (create, delete, lifecycle records) still need the store
//! and are 503 `retryable` without it.
//!
//! A route is answered first from `cache.rs` (what the store's notifications say still
//! holds), which is empty whenever the store is not heard.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::{AuthKey, MachineRow};
use crate::error::FleetError;
use crate::remote::NodeAt;
use crate::server::Fleet;

/// How long a read is served from here while the store is down.
pub const KEPT_FOR: Duration = Duration::from_secs(600);
/// The most entries of each kind kept (the oldest go first).
const MOST: usize = 50_000;

type Route = (MachineRow, Option<NodeAt>);

/// The last reads of keys (by their hash) and of machines' routes (by tenant and id).
#[derive(Debug, Default)]
pub struct LastKnown {
    keys: Mutex<HashMap<String, (AuthKey, Instant)>>,
    routes: Mutex<HashMap<(String, String), (Route, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // a panic while it was held leaves a map, stale at worst: take it as it is
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `v` under `k` in `map`, making room by dropping the oldest entries.
fn keep<K: std::hash::Hash + Eq + Clone, V>(map: &mut HashMap<K, (V, Instant)>, k: K, v: V) {
    if map.len() >= MOST && !map.contains_key(&k) {
        map.retain(|_, (_, at)| at.elapsed() < KEPT_FOR);
        if map.len() >= MOST {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
    }
    map.insert(k, (v, Instant::now()));
}

impl LastKnown {
    /// The key of `hash` as the store answered it, or as last read when the store is down.
    pub(crate) async fn key(
        &self,
        fleet: &Fleet,
        hash: &str,
    ) -> Result<Option<AuthKey>, FleetError> {
        match fleet.db().key_of_hash(hash).await {
            Ok(Some(k)) => {
                keep(&mut lock(&self.keys), hash.to_owned(), k.clone());
                Ok(Some(k))
            }
            Ok(None) => {
                lock(&self.keys).remove(hash);
                Ok(None)
            }
            Err(e @ FleetError::StoreUnavailable { .. }) => {
                let kept = lock(&self.keys)
                    .get(hash)
                    .filter(|(_, at)| at.elapsed() < KEPT_FOR)
                    .map(|(k, _)| k.clone());
                match kept {
                    Some(k) => {
                        tracing::warn!(key = %k.id, error = %e, "store unavailable: the key as last read");
                        Ok(Some(k))
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Machine `id` of `tenant` and its node (none: not on a remote node), as the store
    /// answers, or as last read when the store is down. `None`: no such machine.
    pub(crate) async fn route(
        &self,
        fleet: &Fleet,
        tenant: &str,
        id: &str,
    ) -> Result<Option<Route>, FleetError> {
        if let Some((row, node)) = fleet.cache().route(tenant, id) {
            return Ok(Some((row, Some(node))));
        }
        let epoch = fleet.cache().epoch();
        let read = async {
            let Some(row) = fleet.db().machine(tenant, id).await? else {
                return Ok(None);
            };
            let node = fleet
                .db()
                .machine_node(&row.id)
                .await?
                .filter(|n| n.api_url.is_some());
            Ok::<_, FleetError>(Some((row, node)))
        };
        let k = (tenant.to_owned(), id.to_owned());
        match read.await {
            Ok(Some(route)) => {
                if let (row, Some(node)) = &route {
                    fleet.cache().keep_route(epoch, tenant, id, row, node);
                }
                keep(&mut lock(&self.routes), k, route.clone());
                Ok(Some(route))
            }
            Ok(None) => {
                lock(&self.routes).remove(&k);
                Ok(None)
            }
            Err(e @ FleetError::StoreUnavailable { .. }) => {
                let kept = lock(&self.routes)
                    .get(&k)
                    .filter(|(_, at)| at.elapsed() < KEPT_FOR)
                    .map(|(r, _)| r.clone());
                match kept {
                    Some(r) => {
                        tracing::warn!(machine = %id, error = %e, "store unavailable: the machine's node as last read");
                        Ok(Some(r))
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entries_go_first_when_full() {
        let mut m: HashMap<u32, (u32, Instant)> = HashMap::new();
        keep(&mut m, 0, 0);
        std::thread::sleep(Duration::from_millis(2));
        for i in 1..MOST as u32 {
            keep(&mut m, i, i);
        }
        assert_eq!(m.len(), MOST);
        keep(&mut m, u32::MAX, 7);
        assert_eq!(m.len(), MOST);
        assert!(m.contains_key(&u32::MAX));
        assert!(!m.contains_key(&0), "the oldest went");
        // one already kept is replaced, nothing dropped
        keep(&mut m, 5, 50);
        assert_eq!((m.len(), m[&5].0), (MOST, 50));
    }
}

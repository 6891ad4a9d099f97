//! What a control replica answers without reading the store (issue 15: "route caches are
//! invalidated on state changes (`LISTEN/NOTIFY`)"): machines' routes, the record and the
//! remote node a machine runs on.
//!
//! A request for a machine on a remote node read the machine's record and its placement
//! before the node was asked: two round trips to PostgreSQL on every exec. This cache keeps
//! those answers while the store says nothing changed:
//!
//! * The PostgreSQL store's triggers (`store/pg/notify.rs`) `NOTIFY smol_routes` in the
//!   transaction of every change that makes an entry wrong: a machine removed, renamed,
//!   relabelled or given other lifetimes, its placement moved or removed, its delete
//!   tombstoned (`m:ID`), a node's API address changed or the node removed (`n:ID`). The
//!   notification arrives after the commit; the entries it names go. Until it arrives (well
//!   under a millisecond), a request goes to the node the machine was on, whose own record
//!   answers: a machine deleted there is 404 from the node.
//! * Keys are not kept: a node cannot tell a revoked key (the replica's word is final), so a
//!   revocation counts from its commit, on every replica.
//! * Entries are kept only while this replica's `LISTEN` connection is up ([`Cache::set_live`]):
//!   a lost connection drops them all and nothing is kept until it is back (a change made in
//!   between is not missed).
//! * A read that began before a notification arrived is not kept ([`Cache::epoch`]).
//! * A route is kept only for a node that is `live`, and only until that node's lease ends
//!   (the database's clock, told as time left): a node that stops its heartbeats is
//!   `suspect` and then `lost` by the store's clock, and its machines are read again by then.
//!   Machines of this replica's own engine (no node) are not kept.
//! * Nothing is kept longer than [`ROUTE_TTL`] (a bound on a notification the network lost
//!   while the connection looked up).
//!
//! SQLite (one process, its reads in-process) has no listener: there nothing is kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::MachineRow;
use crate::remote::NodeAt;

/// The channel the store notifies on.
pub const CHANNEL: &str = "smol_routes";
/// The `application_name` of the store's listening connection (an operator, and a test,
/// tell it from the pool's connections).
pub const LISTENER_NAME: &str = "smolfleet-listen";
/// The longest a route is kept.
pub const ROUTE_TTL: Duration = Duration::from_secs(60);
/// The most entries kept (beyond: the expired go, then everything).
const MOST: usize = 20_000;

/// A machine's record and the remote node it runs on.
pub type Route = (MachineRow, NodeAt);

#[derive(Debug, Default)]
struct Entries {
    /// Bumped by every notification and every change of [`Cache::set_live`].
    epoch: u64,
    routes: HashMap<(String, String), (Route, Instant)>,
}

/// Routes as last read, while the store's notifications say they still hold.
#[derive(Debug, Default)]
pub struct Cache {
    live: AtomicBool,
    entries: Mutex<Entries>,
    hits: AtomicU64,
    misses: AtomicU64,
    notifications: AtomicU64,
}

/// What the cache has done, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub live: bool,
    pub hits: u64,
    pub misses: u64,
    pub notifications: u64,
}

fn bounded<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, (V, Instant)>) {
    if map.len() >= MOST {
        let now = Instant::now();
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MOST {
            map.clear();
        }
    }
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // a panic while it was held leaves entries at most as stale as notifications allow
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch to give [`Cache::keep_route`] for a read that starts now.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Whether entries are kept (the store's notifications are heard).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// The listener is up (`true`: from now on every change is notified) or down: either
    /// way, what was kept goes.
    pub fn set_live(&self, live: bool) {
        let mut e = self.lock();
        e.epoch += 1;
        e.routes.clear();
        if self.live.swap(live, Ordering::AcqRel) != live {
            if live {
                tracing::info!("fleet cache: the store's changes are heard; routes are kept");
            } else {
                tracing::info!("fleet cache: the store's changes are not heard; nothing is kept");
            }
        }
    }

    /// A notification of the store (`m:MACHINE`, `n:NODE`; anything else drops every entry).
    pub fn changed(&self, payload: &str) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        let mut e = self.lock();
        e.epoch += 1;
        match payload.split_once(':') {
            Some(("m", id)) => e.routes.retain(|_, ((row, _), _)| row.id != id),
            Some(("n", id)) => e.routes.retain(|_, ((_, node), _)| node.id != id),
            _ => {
                tracing::warn!(
                    payload,
                    "fleet cache: a notification of no known kind; everything kept goes"
                );
                e.routes.clear();
            }
        }
    }

    /// Machine `id` (or name) of `tenant` and its node, if kept and not expired.
    pub fn route(&self, tenant: &str, id: &str) -> Option<Route> {
        if !self.is_live() {
            return None;
        }
        let found = self
            .lock()
            .routes
            .get(&(tenant.to_owned(), id.to_owned()))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(r, _)| r.clone());
        self.count(found.is_some());
        found
    }

    /// Keeps machine `id` of `tenant` on `node` (read by a read that began at `epoch`): only
    /// for a `live` node, until its lease ends.
    pub fn keep_route(&self, epoch: u64, tenant: &str, id: &str, row: &MachineRow, node: &NodeAt) {
        if !self.is_live() || node.liveness != "live" {
            return;
        }
        let left = match node.lease_left_ms {
            // a node without a lease (`--role all`'s own) is live until it is removed
            None => ROUTE_TTL,
            Some(ms) if ms > 0 => ROUTE_TTL.min(Duration::from_millis(ms as u64)),
            Some(_) => return,
        };
        let mut e = self.lock();
        if e.epoch != epoch {
            return;
        }
        bounded(&mut e.routes);
        e.routes.insert(
            (tenant.to_owned(), id.to_owned()),
            ((row.clone(), node.clone()), Instant::now() + left),
        );
    }

    fn count(&self, hit: bool) {
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Its counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            live: self.is_live(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            notifications: self.notifications.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> MachineRow {
        crate::db::test_row(id, "t", &format!("{id}-name"))
    }

    fn node(id: &str, liveness: &str, left: Option<i64>) -> NodeAt {
        NodeAt {
            id: id.into(),
            api_url: Some("https://127.0.0.1:1".into()),
            liveness: liveness.into(),
            lease_until: left,
            lease_left_ms: left,
            deleting: false,
            placement: None,
        }
    }

    fn keep(c: &Cache, e: u64, id: &str, node_id: &str) {
        c.keep_route(e, "t", id, &row(id), &node(node_id, "live", None));
    }

    #[test]
    fn nothing_is_kept_until_the_store_is_heard_and_all_goes_when_it_is_not() {
        let c = Cache::default();
        keep(&c, c.epoch(), "m1", "n1");
        assert_eq!(c.route("t", "m1"), None);
        c.set_live(true);
        keep(&c, c.epoch(), "m1", "n1");
        assert_eq!(c.route("t", "m1").map(|r| r.0.id), Some("m1".into()));
        assert_eq!(c.route("other", "m1"), None, "by tenant");
        c.set_live(false);
        assert_eq!(c.route("t", "m1"), None);
        c.set_live(true);
        assert_eq!(
            c.route("t", "m1"),
            None,
            "a listener heard again starts empty"
        );
    }

    #[test]
    fn notifications_drop_what_they_name_and_a_read_they_overtook() {
        let c = Cache::default();
        c.set_live(true);
        let e = c.epoch();
        keep(&c, e, "m1", "n1");
        c.keep_route(e, "t", "m1-name", &row("m1"), &node("n1", "live", None));
        keep(&c, e, "m2", "n2");
        keep(&c, e, "m3", "n2");
        c.changed("m:m1");
        assert_eq!(c.route("t", "m1"), None);
        assert_eq!(c.route("t", "m1-name"), None, "kept by name, dropped by id");
        assert!(c.route("t", "m2").is_some());
        c.changed("n:n2");
        assert_eq!(c.route("t", "m2"), None);
        assert_eq!(c.route("t", "m3"), None);
        // a read that began before a notification arrived is not kept
        let before = c.epoch();
        c.changed("m:other");
        keep(&c, before, "m4", "n1");
        assert_eq!(c.route("t", "m4"), None);
        keep(&c, c.epoch(), "m4", "n1");
        c.changed("what");
        assert_eq!(
            c.route("t", "m4"),
            None,
            "an unknown notification drops everything"
        );
        let s = c.stats();
        assert!(
            s.live && s.hits == 1 && s.misses >= 5 && s.notifications == 4,
            "{s:?}"
        );
    }

    #[test]
    fn routes_are_kept_for_live_nodes_until_their_lease_ends() {
        let c = Cache::default();
        c.set_live(true);
        let e = c.epoch();
        c.keep_route(e, "t", "s", &row("s"), &node("n", "suspect", Some(-5)));
        c.keep_route(e, "t", "l", &row("l"), &node("n", "lost", Some(-5000)));
        c.keep_route(e, "t", "x", &row("x"), &node("n", "live", Some(0)));
        c.keep_route(e, "t", "y", &row("y"), &node("n", "live", Some(30)));
        assert_eq!(c.route("t", "s"), None);
        assert_eq!(c.route("t", "l"), None);
        assert_eq!(c.route("t", "x"), None);
        assert!(c.route("t", "y").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.route("t", "y"), None, "kept past the node's lease");
    }
}

//! A node and the control plane agree on which machines the node runs (issue 15: "a node that
//! returns reconciles: orphans are killed after a grace period").
//!
//! Every heartbeat of a node with an API lists the machines its fleet holds (by the control
//! plane's ids, under which the node records them). The control replica answers with those of
//! them that have no placement on that node: machines the control plane does not know there,
//! e.g. one a create made on the node after the replica had given it up (its answer came too
//! late) and released its name and reservation, or one whose record an operator removed. The
//! node deletes such an orphan once it has been unplaced for the whole grace period
//! (`--orphan-grace`, default 60 s), so a machine between its node's create and the replica's
//! record of it (a branch's clones) is never taken for one. A replica that does not know the
//! field answers none, and nothing is deleted.
//!
//! A machine whose VM vanished (the host rebooted) needs nothing here: its node's engine reads
//! it `stopped` from its record, which is what the control plane shows.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::error::FleetError;
use crate::server::Fleet;

/// How long a machine must stay unplaced before its node deletes it, unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

pub(crate) const PLACED_MACHINES: &str = "SELECT machine_id FROM placements WHERE node_id = ?1";

/// The machines placed on node `node_id`.
pub fn placed_machines(c: &Connection, node_id: &str) -> Result<Vec<String>, FleetError> {
    let mut st = c
        .prepare(PLACED_MACHINES)
        .map_err(|e| FleetError::db("list a node's placements", e))?;
    let rows = st
        .query_map([node_id], |r| r.get(0))
        .map_err(|e| FleetError::db("list a node's placements", e))?;
    rows.collect::<Result<Vec<String>, _>>()
        .map_err(|e| FleetError::db("list a node's placements", e))
}

/// Of `held` (a node's machines), those not in `placed` (its placements), in `held`'s order.
pub(crate) fn unplaced(held: &[String], placed: &[String]) -> Vec<String> {
    let placed: HashSet<&str> = placed.iter().map(String::as_str).collect();
    held.iter()
        .filter(|m| !placed.contains(m.as_str()))
        .cloned()
        .collect()
}

/// The control plane's part of a heartbeat: of the machines node `node_id` holds, those it
/// has no placement for (none when the store cannot say: a heartbeat never fails for it).
pub(crate) async fn answer(
    fleet_db: &crate::store::Db,
    node_id: &str,
    held: &[String],
) -> Vec<String> {
    match fleet_db.placed_machines(node_id).await {
        Ok(placed) => unplaced(held, &placed),
        Err(e) => {
            tracing::warn!(node = %node_id, error = %e, "cannot list the node's placements; no reconciliation this beat");
            Vec::new()
        }
    }
}

/// A node's view of its unplaced machines across heartbeats.
#[derive(Debug)]
pub struct Orphans {
    grace: Duration,
    since: HashMap<String, Instant>,
}

impl Orphans {
    /// Orphans deleted once unplaced for `grace`.
    pub fn new(grace: Duration) -> Orphans {
        Orphans {
            grace,
            since: HashMap::new(),
        }
    }

    /// Notes a heartbeat's answer at `now`: the machines unplaced for the whole grace period
    /// (to delete now; they are forgotten here). One no longer unplaced starts over.
    pub fn note(&mut self, unplaced: &[String], now: Instant) -> Vec<String> {
        self.since.retain(|m, _| unplaced.contains(m));
        let mut due = Vec::new();
        for m in unplaced {
            let first = *self.since.entry(m.clone()).or_insert(now);
            if now.duration_since(first) >= self.grace {
                due.push(m.clone());
            }
        }
        for m in &due {
            self.since.remove(m);
        }
        due
    }
}

/// The machines node fleet `fleet` holds, by the control plane's ids (their names here).
pub(crate) async fn held(fleet: &Fleet) -> Result<Vec<String>, FleetError> {
    Ok(fleet
        .db()
        .all_machines()
        .await?
        .into_iter()
        .map(|r| r.name)
        .collect())
}

/// Deletes the orphans `names` of node fleet `fleet` (each failure logged; tried again once
/// the grace period has passed again).
pub(crate) async fn remove(fleet: &Fleet, names: &[String]) {
    let rows = match fleet.db().all_machines().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the node's machines; orphans kept for now");
            return;
        }
    };
    for row in rows.iter().filter(|r| names.contains(&r.name)) {
        tracing::warn!(machine = %row.name, "orphan: the control plane places no such machine on this node; deleting it");
        match fleet.destroy(row).await {
            Ok(()) => tracing::info!(machine = %row.name, "orphan deleted"),
            Err(e) => tracing::warn!(machine = %row.name, error = %e, "cannot delete an orphan"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn unplaced_is_what_the_node_holds_and_the_control_plane_does_not_place_there() {
        assert_eq!(
            unplaced(&s(&["a", "b", "c"]), &s(&["b", "z"])),
            s(&["a", "c"])
        );
        assert!(unplaced(&s(&["a"]), &s(&["a"])).is_empty());
        assert!(unplaced(&[], &s(&["a"])).is_empty());
    }

    #[test]
    fn an_orphan_is_due_only_after_a_whole_grace_period_unplaced() {
        let t0 = Instant::now();
        let g = Duration::from_secs(10);
        let mut o = Orphans::new(g);
        assert!(o.note(&s(&["a", "b"]), t0).is_empty());
        assert!(o
            .note(&s(&["a", "b"]), t0 + Duration::from_secs(5))
            .is_empty());
        // b is placed again (its record came): it starts over
        assert!(o.note(&s(&["a"]), t0 + Duration::from_secs(6)).is_empty());
        assert_eq!(o.note(&s(&["a", "b"]), t0 + g), s(&["a"]));
        // a was handed out once; b's clock started at 10 s
        assert!(o.note(&s(&["b"]), t0 + Duration::from_secs(19)).is_empty());
        assert_eq!(o.note(&s(&["b"]), t0 + Duration::from_secs(20)), s(&["b"]));
        // an answer without orphans forgets them all
        assert!(o.note(&s(&["c"]), t0 + Duration::from_secs(21)).is_empty());
        assert!(o.note(&[], t0 + Duration::from_secs(40)).is_empty());
        assert!(o.note(&s(&["c"]), t0 + Duration::from_secs(41)).is_empty());
    }
}

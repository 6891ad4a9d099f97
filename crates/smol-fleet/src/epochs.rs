//! Placement epochs (schema 10, issue 15: "commands carry a placement epoch; a node refuses a
//! stale one").
//!
//! Every placement (a machine on a node, `placements`) has an epoch, 1 when it is made. It
//! grows when the control plane takes a placement's command out of the hands of whichever
//! replica held it: a replica's sweep that claims an overdue operation (`operations.rs`, its
//! replica presumed dead) raises the epoch of the operation's machine in the same transaction
//! as the claim. Every request a replica sends a node about a placed machine carries the
//! machine's id and epoch as the control plane read it (`x-smol-placement: ID EPOCH`, set by
//! `remote::send` only: a client's header of that name is dropped). A node keeps, for each
//! machine, the highest epoch it has been sent (`placement_epochs` in its own store, and in
//! memory) and refuses a request carrying a lower one: `503 retryable` naming both epochs, its
//! body unread, nothing done. So the create of a replica that stalled past its operation's
//! deadline cannot make a machine after the sweep that claimed its operation has asked the
//! node (with the higher epoch) and found none: exactly one outcome, never an orphan for
//! `reconcile.rs` to clear. A raised epoch changes the placement row, which notifies every
//! replica's route cache (`store/pg/notify.rs`). A request without the header (a replica of
//! an older version, the checkpoint routes, which name no placement) is not checked.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::HeaderValue;

use crate::error::FleetError;

/// Schema version 10: each placement's epoch; a node's highest epoch seen per machine.
pub(crate) const SCHEMA_V10: &str = "
ALTER TABLE placements ADD COLUMN epoch INTEGER NOT NULL DEFAULT 1;
CREATE TABLE placement_epochs (
    machine_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
";

/// The header a replica names the placement a request is about with: `ID EPOCH`.
pub const HEADER: &str = "x-smol-placement";

/// Raises the epoch of machine `?1`'s placement (a claimed operation's).
pub(crate) const BUMP: &str = "UPDATE placements SET epoch = epoch + 1 WHERE machine_id = ?1";

/// Records that this node was sent epoch `?2` of machine `?1`; the highest it was ever sent.
pub(crate) const RAISE_SQLITE: &str = "
INSERT INTO placement_epochs (machine_id, epoch) VALUES (?1, ?2)
ON CONFLICT (machine_id) DO UPDATE SET epoch = MAX(placement_epochs.epoch, excluded.epoch)
RETURNING epoch";

/// [`RAISE_SQLITE`] in PostgreSQL (`GREATEST`).
pub(crate) const RAISE_PG: &str = "
INSERT INTO placement_epochs (machine_id, epoch) VALUES ($1, $2)
ON CONFLICT (machine_id) DO UPDATE SET epoch = GREATEST(placement_epochs.epoch, excluded.epoch)
RETURNING epoch";

/// Forgets machine `?1`'s epoch on its node (its record removed there).
pub(crate) const FORGET: &str = "DELETE FROM placement_epochs WHERE machine_id = ?1";

/// Records that this node was sent epoch `epoch` of machine `id`; the highest it was sent.
pub fn raise(c: &rusqlite::Connection, id: &str, epoch: i64) -> Result<i64, FleetError> {
    c.query_row(RAISE_SQLITE, rusqlite::params![id, epoch], |r| r.get(0))
        .map_err(|e| FleetError::db("record a placement epoch", e))
}

/// A machine's placement as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementEpoch {
    /// The machine (the control plane's id, under which its node records it).
    pub machine_id: String,
    /// Its placement's epoch.
    pub epoch: i64,
}

impl PlacementEpoch {
    /// The [`HEADER`] value.
    pub fn header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&format!("{} {}", self.machine_id, self.epoch)).ok()
    }

    /// A [`HEADER`] value read back (`None`: not `ID EPOCH` with a machine id and an epoch of
    /// at least 1).
    pub fn parse(v: &HeaderValue) -> Option<PlacementEpoch> {
        let (id, epoch) = v.to_str().ok()?.split_once(' ')?;
        let epoch: i64 = epoch.parse().ok()?;
        let id_ok = !id.is_empty()
            && id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        (id_ok && epoch >= 1).then(|| PlacementEpoch {
            machine_id: id.to_owned(),
            epoch,
        })
    }
}

/// What a node decides about a request's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// As high as any this node was sent for the machine: go on.
    Current,
    /// Lower than `held`, which this node was sent before: refuse.
    Stale {
        /// The highest epoch the node holds for the machine.
        held: i64,
    },
}

/// A node's epochs: the highest it was sent per machine, in memory in front of its store
/// (only a raise writes).
#[derive(Debug, Default)]
pub struct Epochs {
    known: Mutex<HashMap<String, i64>>,
}

impl Epochs {
    /// Checks `p` against what this node holds, recording it when it is higher.
    pub async fn check(
        &self,
        db: &crate::store::Db,
        p: &PlacementEpoch,
    ) -> Result<Verdict, FleetError> {
        let held = self
            .known
            .lock()
            .expect("epochs lock")
            .get(&p.machine_id)
            .copied();
        match held {
            Some(h) if p.epoch < h => return Ok(Verdict::Stale { held: h }),
            Some(h) if p.epoch == h => return Ok(Verdict::Current),
            _ => {}
        }
        let held = db.raise_epoch(&p.machine_id, p.epoch).await?;
        let mut known = self.known.lock().expect("epochs lock");
        let h = known.entry(p.machine_id.clone()).or_insert(held);
        *h = (*h).max(held);
        Ok(if p.epoch < *h {
            Verdict::Stale { held: *h }
        } else {
            Verdict::Current
        })
    }

    /// Forgets machine `id` (deleted on this node; its row goes with its record).
    pub fn forget(&self, id: &str) {
        self.known.lock().expect("epochs lock").remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_reads_back_and_refuses_what_is_not_an_id_and_an_epoch() {
        let p = PlacementEpoch {
            machine_id: "m-abc_1".into(),
            epoch: 3,
        };
        assert_eq!(PlacementEpoch::parse(&p.header().unwrap()), Some(p));
        for bad in [
            "", "m-1", "m-1 ", "m-1 0", "m-1 -2", "m-1 x", " 3", "m/1 3", "m-1 3 4",
        ] {
            let v = HeaderValue::from_str(bad).unwrap();
            assert_eq!(PlacementEpoch::parse(&v), None, "{bad:?}");
        }
    }
}

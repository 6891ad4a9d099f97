//! The lifetime of machines (SPEC §10.6): `autoStopSeconds` stops a machine idle that long,
//! `ttlSeconds` deletes it that long after create, `ephemeral` deletes it when it stops.
//!
//! * Activity: every exec, streamed exec and file transfer holds a [`Busy`] guard for its
//!   duration ([`Fleet::busy`]), which counts as activity at its start and at its end; the
//!   ingress proxy calls [`Fleet::touch`] per connection (or holds a [`Busy`] while relaying).
//!   A stopped machine has no idle clock; starting it restarts the clock.
//! * The sweeper ([`start`], run by [`Fleet::serve`]) sweeps at once and then every
//!   [`Fleet::sweep_interval`] (15 s by default, `smolfleet serve --sweep-interval`). Deadlines
//!   are in the database (`expires_at`, `last_activity_at`, flushed each sweep), so a machine
//!   whose TTL passed while the server was down goes at the next start.
//! * An operation in flight postpones every automatic action on its machine to a later sweep
//!   (a machine is never stopped or deleted mid-exec); while the sweeper stops or deletes a
//!   machine, a new operation on it waits for that to finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smolmachines::wire::MachineInfo;
use smolmachines::{Error, Machine, MachineState};
use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::db::{self, MachineRow};
use crate::error::{ApiError, FleetError};
use crate::server::Fleet;

/// How often the sweeper runs unless told otherwise (SPEC §10.6: every 15 s).
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(15);

/// The largest `autoStopSeconds` / `ttlSeconds` accepted: one year.
pub const MAX_LIFETIME_SECONDS: u64 = 366 * 24 * 3600;

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The last activity of `row` as the database knows it (unix ms): the last flushed, else
/// its creation.
fn persisted_last(row: &MachineRow) -> i64 {
    row.last_activity_at
        .unwrap_or(row.created_at)
        .saturating_mul(1000)
}

/// One machine's activity: the gate operations hold shared (the sweeper exclusive, only when
/// free) and the time of its last activity.
#[derive(Debug)]
struct Entry {
    gate: Arc<RwLock<()>>,
    /// Unix ms of the last activity, and whether the database has seen it.
    last: Mutex<(i64, bool)>,
}

impl Entry {
    fn touch(&self) {
        match self.last.lock() {
            Ok(mut l) => *l = (now_ms(), true),
            Err(_) => tracing::error!("machine activity lock poisoned; activity not recorded"),
        }
    }

    fn last_ms(&self) -> Option<i64> {
        self.last.lock().ok().map(|l| l.0)
    }
}

/// What the fleet knows about its machines' lifetimes while it runs.
#[derive(Debug)]
pub(crate) struct Lifetimes {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    interval: Mutex<Duration>,
    interval_changed: Notify,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            entries: Mutex::new(HashMap::new()),
            interval: Mutex::new(DEFAULT_SWEEP_INTERVAL),
            interval_changed: Notify::new(),
        }
    }
}

impl Lifetimes {
    /// The entry of engine machine `name`, made on first use (its clock starting now).
    fn entry(&self, name: &str) -> Arc<Entry> {
        self.entry_since(name, None)
    }

    /// The entry of `name`, made on first use with its last activity at `since` (unix ms;
    /// `None`: now, not yet in the database).
    fn entry_since(&self, name: &str, since: Option<i64>) -> Arc<Entry> {
        let mut map = match self.entries.lock() {
            Ok(m) => m,
            Err(p) => {
                tracing::error!("machine activity map poisoned; continuing with it");
                p.into_inner()
            }
        };
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Entry {
                    gate: Arc::new(RwLock::new(())),
                    last: Mutex::new(match since {
                        Some(at) => (at, false),
                        None => (now_ms(), true),
                    }),
                })
            })
            .clone()
    }

    /// The entry of `name` if this server has seen activity on it.
    fn existing(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries.lock().ok()?.get(name).cloned()
    }

    fn remove(&self, name: &str) {
        if let Ok(mut m) = self.entries.lock() {
            m.remove(name);
        }
    }

    /// The activity the database has not seen yet: `(machine id, unix seconds)`, marked seen.
    /// A machine with an operation in flight here (its gate held) is active now, and stays
    /// unflushed: other replicas' sweepers read the database, so a long exec through this one
    /// keeps its machine's activity fresh there, one sweep at a time.
    fn unflushed(&self, rows: &[MachineRow]) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for r in rows {
            if let Some(e) = self.existing(&r.engine_name) {
                if e.gate.try_write().is_err() {
                    out.push((r.id.clone(), now_ms() / 1000));
                    continue;
                }
                if let Ok(mut l) = e.last.lock() {
                    if l.1 {
                        l.1 = false;
                        out.push((r.id.clone(), l.0 / 1000));
                    }
                }
            }
        }
        out
    }
}

/// An operation in flight on a machine: while one is held the sweeper neither stops nor
/// deletes the machine. Taking it and dropping it both count as activity.
#[derive(Debug)]
pub struct Busy {
    entry: Arc<Entry>,
    _shared: OwnedRwLockReadGuard<()>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.entry.touch();
    }
}

/// Aborts the sweeper when dropped (with the serving future that started it).
#[derive(Debug)]
pub(crate) struct SweeperTask(tokio::task::JoinHandle<()>);

impl Drop for SweeperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the sweeper of `fleet`: one sweep now, then one every [`Fleet::sweep_interval`].
pub(crate) fn start(fleet: Fleet) -> SweeperTask {
    SweeperTask(tokio::spawn(async move {
        loop {
            if let Err(e) = fleet.sweep().await {
                tracing::error!(error = %e, "sweep failed; retrying at the next one");
            }
            let interval = fleet.sweep_interval();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = fleet.lifetimes().interval_changed.notified() => {}
            }
        }
    }))
}

/// What one sweep did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Machines stopped for being idle.
    pub stopped: Vec<String>,
    /// Machines deleted (TTL passed, or ephemeral and stopped).
    pub deleted: Vec<String>,
    /// Machines due for an action but busy with an operation (left for a later sweep).
    pub postponed: Vec<String>,
}

/// Why the sweeper acts on a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Expired,
    EphemeralStopped,
    Idle,
}

impl Fleet {
    /// Records activity on engine machine `name` now (the ingress proxy calls it for each
    /// connection it relays; exec and files hold a [`Busy`] instead, which touches too).
    pub fn touch(&self, name: &str) {
        self.lifetimes().entry(name).touch();
    }

    /// Marks an operation on engine machine `name` in flight until the guard is dropped;
    /// waits while the sweeper is stopping or deleting it.
    pub async fn busy(&self, name: &str) -> Busy {
        let entry = self.lifetimes().entry(name);
        let shared = entry.gate.clone().read_owned().await;
        entry.touch();
        Busy {
            entry,
            _shared: shared,
        }
    }

    /// Sets `lastActivityAt` of `row`'s record to this server's latest knowledge (the
    /// database has it as of the last sweep).
    pub(crate) fn finish_lifetime(&self, row: &MachineRow, info: &mut MachineInfo) {
        if let Some(ms) = self
            .lifetimes()
            .existing(&row.engine_name)
            .and_then(|e| e.last_ms())
        {
            info.last_activity_at = Some(db::rfc3339(ms / 1000));
        }
    }

    /// How often the sweeper runs.
    pub fn sweep_interval(&self) -> Duration {
        self.lifetimes()
            .interval
            .lock()
            .map(|d| *d)
            .unwrap_or(DEFAULT_SWEEP_INTERVAL)
    }

    /// Sets how often the sweeper runs (`smolfleet serve --sweep-interval`; tests shorten
    /// it). A running sweeper sweeps once now and then at the new interval.
    pub fn set_sweep_interval(&self, every: Duration) {
        let every = every.max(Duration::from_millis(50));
        match self.lifetimes().interval.lock() {
            Ok(mut d) => *d = every,
            Err(_) => tracing::error!("sweep interval lock poisoned; interval unchanged"),
        }
        self.lifetimes().interval_changed.notify_waiters();
    }

    /// Deletes machine `row` on the node and its record (the node having lost it already
    /// is logged, not an error).
    pub(crate) async fn destroy(&self, row: &MachineRow) -> Result<(), Error> {
        let path = format!("/v1/machines/{}", row.id);
        match crate::remote::call(self, row, axum::http::Method::DELETE, &path).await {
            // on a remote node: deleted there (or gone already), then the record
            Ok(Some(s)) if s.is_success() || s == axum::http::StatusCode::NOT_FOUND => {
                self.db().delete_machine(&row.id).await?;
                self.lifetimes().remove(&row.engine_name);
                return Ok(());
            }
            Ok(Some(s)) => {
                return Err(Error::coded(
                    smolmachines::ErrorCode::SmolvmError,
                    format!("the node of machine {} answered {s} to its delete", row.id),
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(e.0),
        }
        match self.handle(&row.engine_name).await {
            Ok(m) => m.delete().await?,
            Err(Error::NotFound { .. }) => {
                tracing::warn!(machine = %row.id, "the node has no such machine; removing its record")
            }
            Err(e) => return Err(e),
        }
        self.forget(&row.engine_name).await;
        let i = row.id.clone();
        self.db().delete_machine(&i).await?;
        self.lifetimes().remove(&row.engine_name);
        Ok(())
    }

    /// Deletes `row` if it is ephemeral (after a stop): whether it did.
    pub(crate) async fn delete_if_ephemeral(&self, row: &MachineRow) -> Result<bool, Error> {
        if !row.ephemeral {
            return Ok(false);
        }
        tracing::info!(machine = %row.id, "ephemeral machine stopped; deleting it");
        self.destroy(row).await?;
        Ok(true)
    }

    /// One sweep: runs the deletes that waited for their node and finishes the operations
    /// other replicas left (`operations.rs`), flushes activity to the database, then stops
    /// idle machines and deletes expired ones and stopped ephemeral ones, skipping any with an
    /// operation in flight.
    pub async fn sweep(&self) -> Result<SweepReport, FleetError> {
        crate::remote::run_tombstones(self).await?;
        crate::operations::finish_overdue(self).await?;
        let rows = self.db().swept_machines().await?;
        let seen = self.lifetimes().unflushed(&rows);
        if !seen.is_empty() {
            self.db().set_last_activity(&seen).await?;
        }
        let mut report = SweepReport::default();
        if rows.is_empty() {
            return Ok(report);
        }
        let states: HashMap<String, MachineState> =
            match Machine::list_on(&**self.engine(), &Default::default()).await {
                Ok(all) => all.into_iter().map(|s| (s.name, s.state)).collect(),
                Err(e) => {
                    tracing::error!(error = %e, "sweep: cannot list the node's machines");
                    return Ok(report);
                }
            };
        let now = now_ms();
        for row in rows {
            let state = match crate::remote::info_of(self, &row).await {
                // on a remote node: its state there; a node that cannot say is left for later
                Ok(Some(info)) if info.error_reason.is_some() => continue,
                Ok(Some(info)) => info.state.parse::<MachineState>().ok(),
                Ok(None) => states.get(&row.engine_name).copied(),
                Err(e) => {
                    tracing::warn!(machine = %row.id, error = %e.0, "sweep: cannot find its node");
                    continue;
                }
            };
            let Some(due) = self.due(&row, state, now) else {
                continue;
            };
            // an operation in flight postpones the action; holding the gate makes new ones wait
            let entry = self
                .lifetimes()
                .entry_since(&row.engine_name, Some(persisted_last(&row)));
            let Ok(gate) = entry.gate.clone().try_write_owned() else {
                tracing::debug!(machine = %row.id, ?due, "sweep: busy, postponed");
                report.postponed.push(row.id.clone());
                continue;
            };
            // an operation may have ended between the check and the gate
            if self.due(&row, state, now_ms()) != Some(due) {
                continue;
            }
            match self.act(&row, due, gate).await {
                Ok(deleted) => {
                    if due == Due::Idle {
                        report.stopped.push(row.id.clone());
                    }
                    if deleted {
                        report.deleted.push(row.id.clone());
                    }
                }
                Err(e) => {
                    tracing::error!(machine = %row.id, ?due, error = %e, "sweep: action failed")
                }
            }
        }
        Ok(report)
    }

    /// What is due on `row` in `state` (`None`: the node has no such machine) at `now` (ms).
    fn due(&self, row: &MachineRow, state: Option<MachineState>, now: i64) -> Option<Due> {
        if row
            .expires_at
            .is_some_and(|e| e.saturating_mul(1000) <= now)
        {
            return Some(Due::Expired);
        }
        let running = state == Some(MachineState::Running);
        if row.ephemeral && !running {
            return Some(Due::EphemeralStopped);
        }
        let idle_ms = i64::try_from(row.auto_stop_seconds?)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        if !running {
            return None;
        }
        // the later of this replica's own and what the store has (other replicas' activity
        // reaches this one there, at their sweeps)
        let last = self
            .lifetimes()
            .existing(&row.engine_name)
            .and_then(|e| e.last_ms())
            .map_or_else(|| persisted_last(row), |own| own.max(persisted_last(row)));
        (now.saturating_sub(last) >= idle_ms).then_some(Due::Idle)
    }

    /// Does what is due, holding the machine's gate; whether the machine was deleted.
    async fn act(
        &self,
        row: &MachineRow,
        due: Due,
        _gate: OwnedRwLockWriteGuard<()>,
    ) -> Result<bool, Error> {
        match due {
            Due::Expired => {
                tracing::info!(machine = %row.id, ttl_seconds = ?row.ttl_seconds, "TTL passed; deleting the machine");
                self.destroy(row).await?;
                Ok(true)
            }
            Due::EphemeralStopped => self.delete_if_ephemeral(row).await,
            Due::Idle => {
                tracing::info!(machine = %row.id, auto_stop_seconds = ?row.auto_stop_seconds, "idle; stopping the machine");
                let path = format!("/v1/machines/{}/stop", row.id);
                match crate::remote::call(self, row, axum::http::Method::POST, &path).await {
                    Ok(Some(s)) if s.is_success() => return self.delete_if_ephemeral(row).await,
                    Ok(Some(s)) => {
                        return Err(Error::coded(
                            smolmachines::ErrorCode::SmolvmError,
                            format!("the node of machine {} answered {s} to its stop", row.id),
                        ))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e.0),
                }
                let m = self.handle(&row.engine_name).await?;
                if m.state().await? == MachineState::Running {
                    m.stop().await?;
                }
                self.delete_if_ephemeral(row).await
            }
        }
    }
}

/// Refuses a create body whose `autoStopSeconds` / `ttlSeconds` is not `null` or a whole
/// number of seconds in `1..=MAX_LIFETIME_SECONDS`, or whose `ephemeral` is not a boolean
/// (422 naming the field). A body that is not a JSON object is left to the schema check.
pub(crate) fn validate_lifetimes(body: &[u8]) -> Result<(), ApiError> {
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(());
    };
    for field in ["autoStopSeconds", "ttlSeconds"] {
        match v.get(field) {
            None | Some(serde_json::Value::Null) => {}
            Some(n) => match n.as_u64() {
                Some(s) if (1..=MAX_LIFETIME_SECONDS).contains(&s) => {}
                Some(0) => {
                    return Err(ApiError::unprocessable(format!(
                        "{field} must be at least 1 second (null: none), got 0"
                    )))
                }
                _ => {
                    return Err(ApiError::unprocessable(format!(
                        "{field} must be null or a whole number of seconds from 1 to \
                         {MAX_LIFETIME_SECONDS} (one year), got {n}"
                    )))
                }
            },
        }
    }
    match v.get("ephemeral") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(_)) => Ok(()),
        Some(e) => Err(ApiError::unprocessable(format!(
            "ephemeral must be true, false or null, got {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> MachineRow {
        MachineRow {
            id: id.into(),
            tenant_id: "ten-1".into(),
            name: id.into(),
            engine_name: id.into(),
            spec: "{}".into(),
            created_at: 0,
            auto_stop_seconds: Some(2),
            ttl_seconds: None,
            expires_at: None,
            ephemeral: false,
            last_activity_at: None,
        }
    }

    #[tokio::test]
    async fn a_machine_busy_here_is_flushed_as_active_at_every_sweep() {
        let l = Lifetimes::default();
        let rows = [row("mach-a"), row("mach-b")];
        let a = l.entry("mach-a");
        l.entry("mach-b");
        // both touched since the last flush: flushed once, then not again
        assert_eq!(l.unflushed(&rows).len(), 2);
        assert!(l.unflushed(&rows).is_empty());
        // an operation in flight on mach-a: flushed as active now at each sweep, until it ends
        let held = a.gate.clone().read_owned().await;
        for _ in 0..2 {
            let seen = l.unflushed(&rows);
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].0, "mach-a");
            assert!(seen[0].1 >= now_ms() / 1000 - 1, "{seen:?}");
        }
        drop(held);
        assert!(l.unflushed(&rows).is_empty());
    }

    fn detail(body: serde_json::Value) -> Option<String> {
        validate_lifetimes(body.to_string().as_bytes())
            .err()
            .map(|e| e.0.to_string())
    }

    #[test]
    fn lifetimes_are_validated_naming_the_field() {
        use serde_json::json;
        assert_eq!(
            detail(json!({"autoStopSeconds": null, "ttlSeconds": 60})),
            None
        );
        assert_eq!(detail(json!({"ttlSeconds": MAX_LIFETIME_SECONDS})), None);
        for (body, field) in [
            (json!({"autoStopSeconds": 0}), "autoStopSeconds"),
            (json!({"autoStopSeconds": -5}), "autoStopSeconds"),
            (json!({"ttlSeconds": 1.5}), "ttlSeconds"),
            (json!({"ttlSeconds": "60"}), "ttlSeconds"),
            (
                json!({"ttlSeconds": MAX_LIFETIME_SECONDS + 1}),
                "ttlSeconds",
            ),
            (json!({"ttlSeconds": u64::MAX}), "ttlSeconds"),
            (json!({"ephemeral": "yes"}), "ephemeral"),
        ] {
            let d = detail(body.clone()).unwrap_or_else(|| panic!("{body} was accepted"));
            assert!(d.contains(field), "{body}: {d}");
        }
        // not an object: the schema check answers
        assert_eq!(
            validate_lifetimes(b"[1]").err().map(|e| e.0.to_string()),
            None
        );
    }
}

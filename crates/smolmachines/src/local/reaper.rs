//! The reaper: cleans up after processes that died. A machine that was not to outlive its
//! process loses its VM (if it still runs) and, unless persistent, its record, disk and
//! sockets, so `ls` never shows a ghost.
//!
//! It does not scan every record and `/proc` on every call: a full scan runs when an engine is
//! first used and then at most every [`REAP_INTERVAL`]; in between, the records an operation
//! reads anyway are checked one by one ([`reap_one`]: a create whose name is taken, an open, a
//! list).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::record::Record;
use super::state::StateDb;
use crate::error::Result;

/// Time between two full scans of an engine's records.
pub const REAP_INTERVAL: Duration = Duration::from_secs(30);

/// Where an engine keeps a machine's files.
pub(crate) struct Dirs<'a> {
    /// `<run dir>/machines`.
    pub run: &'a Path,
    /// `<home>/machines`.
    pub home: &'a Path,
}

fn remove_dir(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "reaper: cannot remove"),
    }
}

/// How long a persistent machine's VMM may outlive its owner before the reaper ends it: the
/// guest's linger, the watchdog's grace, and a margin.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(15);

/// Whether the VMM `pid` of `name`, first seen orphaned by this process's reaper, has had
/// [`ORPHAN_GRACE`] to end by itself.
fn orphan_grace_over(name: &str, pid: u32) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;
    static SEEN: OnceLock<Mutex<HashMap<(String, u32), Instant>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .expect("orphan map lock");
    let first = *seen
        .entry((name.to_string(), pid))
        .or_insert_with(Instant::now);
    let over = first.elapsed() >= ORPHAN_GRACE;
    if over {
        seen.remove(&(name.to_string(), pid));
    }
    over
}

/// Reaps `rec` if its owner died. True when the record is gone (a non-persistent machine);
/// blocking (SQLite, `/proc`, the file system).
pub(crate) fn reap_one(db: &StateDb, dirs: &Dirs<'_>, mut rec: Record) -> Result<bool> {
    if rec.detach {
        if rec.vmm.is_some() && !rec.vmm_alive() {
            tracing::debug!(machine = %rec.name, "reaper: detached VMM gone");
            rec.vmm = None;
            db.update(&rec)?;
        }
        return Ok(false);
    }
    if rec.owner_alive() {
        return Ok(false);
    }
    if let Some(v) = rec.vmm.filter(|v| v.alive()) {
        // The agent syncs when its host goes away, and powers off by itself after the linger
        // time (and the owner's watchdog ends the VMM soon after, whatever the guest does). A
        // persistent machine's guest gets that time: ended at once, it would lose what it had
        // not synced yet, and a `connect` meanwhile attaches to it. A VMM still there after
        // ORPHAN_GRACE is ended (SIGTERM: QEMU flushes its disks).
        if rec.persistent && !orphan_grace_over(&rec.name, v.pid) {
            tracing::debug!(machine = %rec.name, pid = v.pid, "reaper: owner gone, the guest is powering off");
            return Ok(false);
        }
        tracing::info!(machine = %rec.name, pid = v.pid, "reaper: ending the VMM of a dead owner");
        // SAFETY: signals the recorded VMM process (pid and start time checked); no memory.
        if unsafe { libc::kill(v.pid as i32, libc::SIGTERM) } != 0 {
            tracing::debug!(
                machine = %rec.name,
                error = %std::io::Error::last_os_error(),
                "reaper: SIGTERM failed (the VMM ended meanwhile)"
            );
        }
    }
    if rec.persistent {
        if rec.vmm.is_some() || rec.owner.is_some() {
            rec.vmm = None;
            rec.owner = None;
            db.update(&rec)?;
        }
        return Ok(false);
    }
    tracing::info!(machine = %rec.name, "reaper: removing a machine whose owner died");
    remove_dir(&dirs.run.join(&rec.name));
    remove_dir(&dirs.home.join(&rec.name));
    super::ram::remove_dir(&super::ram::dir(dirs.run, &rec.name));
    db.delete(&rec.name)?;
    Ok(true)
}

/// Reaps every record of `db`; returns how many machines were removed. Blocking. Then the
/// cgroups of machines that have no record any more or whose VMM is gone (an engine that
/// crashed before it removed them, `local::cgroup::sweep`).
pub(crate) fn reap_all(db: &StateDb, dirs: &Dirs<'_>) -> Result<usize> {
    let mut reaped = 0;
    let cap = super::console::cap();
    for rec in db.list(&BTreeMap::new())? {
        // a detached machine's console log has no supervisor trimming it: each reaper run does
        super::console::trim_logged(&dirs.run.join(&rec.name).join("console.log"), cap);
        if reap_one(db, dirs, rec)? {
            reaped += 1;
        }
    }
    super::cgroup::sweep(dirs.run, |name| match db.get(name) {
        Ok(Some(rec)) => rec.booted && !rec.vmm_alive(),
        Ok(None) => true,
        Err(_) => false,
    });
    Ok(reaped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::record::ProcId;

    fn rec(name: &str, persistent: bool, owner: Option<ProcId>) -> Record {
        Record {
            persistent,
            owner,
            booted: true,
            ..Record::for_test(name)
        }
    }

    #[test]
    fn dead_owners_lose_their_machines_live_ones_keep_them() {
        let home = tempfile::tempdir().unwrap();
        let db = StateDb::open(home.path()).unwrap();
        let (run, mhome) = (home.path().join("run"), home.path().join("machines"));
        let dirs = Dirs {
            run: &run,
            home: &mhome,
        };
        let me = ProcId::current();
        let dead = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        db.insert(&rec("mine", false, Some(me))).unwrap();
        db.insert(&rec("ghost", false, Some(dead))).unwrap();
        db.insert(&rec("kept", true, Some(dead))).unwrap();
        std::fs::create_dir_all(mhome.join("ghost")).unwrap();
        std::fs::create_dir_all(run.join("ghost")).unwrap();
        assert_eq!(reap_all(&db, &dirs).unwrap(), 1);
        assert!(db.get("ghost").unwrap().is_none());
        assert!(!mhome.join("ghost").exists() && !run.join("ghost").exists());
        assert!(db.get("mine").unwrap().is_some());
        let kept = db.get("kept").unwrap().unwrap();
        assert!(
            kept.owner.is_none(),
            "a persistent record forgets its dead owner"
        );
        // nothing left to do
        assert_eq!(reap_all(&db, &dirs).unwrap(), 0);
    }

    #[test]
    fn a_machines_console_log_past_its_cap_is_trimmed_by_a_reaper_run() {
        let home = tempfile::tempdir().unwrap();
        let db = StateDb::open(home.path()).unwrap();
        let (run, mhome) = (home.path().join("run"), home.path().join("machines"));
        let dirs = Dirs {
            run: &run,
            home: &mhome,
        };
        // a detached machine: no owner, so nothing else trims its log
        db.insert(&rec("loud", true, None)).unwrap();
        std::fs::create_dir_all(run.join("loud")).unwrap();
        let log = run.join("loud").join("console.log");
        let cap = crate::local::console::cap();
        std::fs::write(&log, vec![b'x'; cap as usize + 1]).unwrap();
        reap_all(&db, &dirs).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert!(crate::local::console::older(&log).exists());
        assert!(db.get("loud").unwrap().is_some());
    }

    #[test]
    fn a_persistent_guest_gets_time_to_power_off_before_its_vmm_is_ended() {
        let home = tempfile::tempdir().unwrap();
        let db = StateDb::open(home.path()).unwrap();
        let (run, mhome) = (home.path().join("run"), home.path().join("machines"));
        let dirs = Dirs {
            run: &run,
            home: &mhome,
        };
        let me = ProcId::current();
        let dead = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        // stand-ins for two VMMs: real processes the reaper may signal
        let mut kept_vmm = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut ended_vmm = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut kept = rec("kept", true, Some(dead));
        kept.vmm = ProcId::of(kept_vmm.id());
        let mut gone = rec("gone", false, Some(dead));
        gone.vmm = ProcId::of(ended_vmm.id());
        db.insert(&kept).unwrap();
        db.insert(&gone).unwrap();
        assert_eq!(reap_all(&db, &dirs).unwrap(), 1);
        // the ephemeral machine's VMM is ended at once
        let status = ended_vmm.wait().unwrap();
        assert!(!status.success(), "{status:?}");
        // the persistent one keeps its VMM (and its record says so) within the grace
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            kept_vmm.try_wait().unwrap().is_none(),
            "ended before its grace"
        );
        let rec = db.get("kept").unwrap().unwrap();
        assert_eq!(rec.vmm, kept.vmm, "a live VMM must stay in the record");
        kept_vmm.kill().unwrap();
        kept_vmm.wait().unwrap();
    }
}

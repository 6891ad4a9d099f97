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
        // time; a VMM still here is ended (SIGTERM: QEMU flushes its disks).
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
    db.delete(&rec.name)?;
    Ok(true)
}

/// Reaps every record of `db`; returns how many machines were removed. Blocking.
pub(crate) fn reap_all(db: &StateDb, dirs: &Dirs<'_>) -> Result<usize> {
    let mut reaped = 0;
    for rec in db.list(&BTreeMap::new())? {
        if reap_one(db, dirs, rec)? {
            reaped += 1;
        }
    }
    Ok(reaped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::record::ProcId;

    fn rec(name: &str, persistent: bool, owner: Option<ProcId>) -> Record {
        Record {
            name: name.into(),
            cpus: 1,
            memory_mb: 256,
            storage_gb: 1,
            accel: "tcg".into(),
            accel_reason: "test".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            flavor: "smol".into(),
            persistent,
            detach: false,
            labels: BTreeMap::new(),
            ports: vec![],
            mounts: vec![],
            network: false,
            created_unix: 1,
            vmm: None,
            owner,
            booted: true,
            image: None,
            workload: None,
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
}

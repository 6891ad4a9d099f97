//! The hand-over of a warm pool clone's running VM to a new machine (booted templates,
//! `local::template`).
//!
//! A pool clone is a running clone of a template, made ahead of time under a name of its own
//! and warmed (one `exec` ran in it, so the guest paths a create and a first command take are
//! already translated under TCG). A create takes it over: the VM, its watchdog tie and its
//! files and its agent connection move to the new machine, which gives the guest its identity
//! (hostname, RNG reseed: one round trip); the pool's handle, record and directories go. The
//! VMM process and the agent session are the same throughout.

use std::path::Path;

use super::*;

/// Moves every entry of `from` into `to` (both directories of one file system), except the
/// names in `keep`.
fn move_entries(from: &Path, to: &Path, keep: &[&str]) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        if keep.iter().any(|k| name == std::ffi::OsStr::new(k)) {
            continue;
        }
        std::fs::rename(e.path(), to.join(&name))?;
    }
    Ok(())
}

impl LocalMachine {
    /// Gives this pool clone's running VM to `to` (just created by `create`: phase `Creating`,
    /// its record stored, its directories made, no VM). On success `to` runs with its own
    /// name and identity and this handle has nothing left (phase `Deleted`, its record and
    /// directories removed). On failure the VM is `to`'s to clean up when the move got that
    /// far, else this handle's.
    pub(crate) async fn hand_over(&self, to: &LocalMachine) -> Result<()> {
        let failed = |reason: String| Error::BootFailed {
            name: to.inner.name.clone(),
            reason: format!("taking over the pool clone {:?}: {reason}", self.inner.name),
            log_tail: String::new(),
        };
        if self.phase() != Phase::Running {
            return Err(failed(format!("it is {}", self.phase())));
        }
        let vm = self
            .inner
            .vm
            .lock()
            .expect("vm lock")
            .take()
            .ok_or_else(|| failed("it has no VM".into()))?;
        if let Some(d) = vm.exit.borrow().clone() {
            return Err(failed(d));
        }
        let conn = self
            .inner
            .conn
            .lock()
            .expect("conn lock")
            .take()
            .ok_or_else(|| failed("it has no agent connection".into()))?;
        // From here the VM is `to`'s: this handle's drop, phase `Deleted`, removes nothing.
        Self::note(&self.inner, Event::Delete);
        Self::note(&self.inner, Event::Removed);
        // `to` waits on an exit of its own, told only once its `on_exit` has run: a stop that
        // returned on the pool clone's (which comes first) let a start right after it bind a
        // new agent socket that this `on_exit` then removed.
        let mut watch = vm.exit.clone();
        let (exit_tx, exit_rx) = watch::channel(None);
        let vm = Vm {
            exit: exit_rx,
            ..vm
        };
        let pid = vm.pid;
        *to.inner.vm.lock().expect("vm lock") = Some(vm);
        to.apply(Event::Boot, "create")?;
        to.inner.boots.fetch_add(1, Ordering::SeqCst);
        let weak = Arc::downgrade(&to.inner);
        tokio::spawn(async move {
            // the VMM's own supervisor (the pool clone's) reaps it and says how it ended
            let detail = match watch.wait_for(|d| d.is_some()).await {
                Ok(d) => d.clone().unwrap_or_default(),
                Err(_) => return,
            };
            Self::on_exit(&weak, &detail).await;
            if exit_tx.send(Some(detail)).is_err() {
                tracing::trace!("VMM exit seen after the last handle");
            }
        });
        // Sockets, logs and disk layers move with their inodes: QEMU keeps its open files and
        // listening QMP socket, reached by the new paths. The agent connection is the same one
        // (its QEMU chardev still names the old path, which only QEMU's own retry would use;
        // every reconnect of the engine sets the path first, `nudge_reconnect`).
        let moved = move_entries(&self.inner.spec.dir, &to.inner.spec.dir, &["attach.lock"])
            .and_then(|()| move_entries(&self.inner.home_dir, &to.inner.home_dir, &[]));
        if let Err(e) = moved {
            return Err(failed(format!("moving its files: {e}")));
        }
        to.watch_agent(conn.clone());
        *to.inner.conn.lock().expect("conn lock") = Some(conn);
        to.apply(Event::Booted, "create")?;
        to.give_identity().await?;
        let me = ProcId::current();
        to.save_record(|r| {
            r.vmm = ProcId::of(pid);
            r.owner = Some(me);
            r.booted = true;
            r.paused = false;
        })
        .await;
        // what is left of the pool clone goes in the background
        let (name, db) = (self.inner.name.clone(), self.inner.db.clone());
        let dirs = [
            self.inner.spec.dir.clone(),
            self.inner.home_dir.clone(),
            self.inner.ram_dir(),
        ];
        tokio::spawn(async move {
            let n = name.clone();
            if let Err(e) = db.call(move |db| db.delete(&n)).await {
                tracing::warn!(pool = %name, error = %e, "cannot remove the pool clone's record");
            }
            for d in dirs {
                if let Err(e) = std::fs::remove_dir_all(&d) {
                    tracing::debug!(path = %d.display(), error = %e, "pool clone directory");
                }
            }
        });
        Ok(())
    }
}

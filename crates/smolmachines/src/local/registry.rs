//! One engine per home per process, and the live machines it holds.
//!
//! [`engines`] maps a canonical (home, run directory) to the process's one [`LocalBackend`] for
//! it, so every `LocalBackend::shared()` / `backend_for` / `open_home` of a home returns the
//! same `Arc` and one state database. Each engine's [`Shared`] keeps a [`Slot`] per machine name
//! this process drives: a weak reference to the live handle (a handle dropped by its caller still
//! ends its machine) and an async gate that serialises attaching, creating and cleaning up that
//! name, so a second `open` / `connect` of a held machine returns the same handle at once and
//! fifty concurrent `open`s attach once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use super::machine::{Inner, LocalMachine};
use super::state::StateDb;
use super::LocalBackend;
use crate::config::MachineState;
use crate::error::Result;

/// The key of an engine: canonical home and run directory.
pub(crate) type EngineKey = (PathBuf, PathBuf);

/// A path made absolute and canonical: its longest existing ancestor resolved (symlinks), the
/// rest normalised (`.` and `..`), so a home not created yet has the key it will have.
pub(crate) fn canonical(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    let mut rest = Vec::new();
    let mut base = out.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(base) {
            let mut real = real;
            real.extend(rest.iter().rev());
            return real;
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                base = parent;
            }
            _ => return out,
        }
    }
}

/// The process-wide engines, by canonical (home, run directory).
pub(crate) fn engines() -> &'static Mutex<HashMap<EngineKey, Arc<LocalBackend>>> {
    static ENGINES: OnceLock<Mutex<HashMap<EngineKey, Arc<LocalBackend>>>> = OnceLock::new();
    ENGINES.get_or_init(Default::default)
}

/// The engine of `key`, made with `make` on first use.
pub(crate) fn engine(key: EngineKey, make: impl FnOnce() -> LocalBackend) -> Arc<LocalBackend> {
    engines()
        .lock()
        .expect("engine registry lock")
        .entry(key)
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

/// What every handle of one engine shares: the state database, the live machines, the reaper's
/// clock.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    db: tokio::sync::OnceCell<Arc<StateDb>>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// When the reaper last scanned every record (`None`: not yet).
    pub(crate) last_reap: Mutex<Option<Instant>>,
    /// This process's booted templates, by name (`local::template`).
    pub(crate) templates: Templates,
}

/// The names of the templates this engine used (they are kept in the engine home,
/// `local::template_store`), and the warm pool clones made of them (by template name).
#[derive(Default)]
pub(crate) struct Templates(
    pub(crate) Mutex<std::collections::BTreeSet<String>>,
    pub(crate) Mutex<HashMap<String, Vec<LocalMachine>>>,
);

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .0
            .lock()
            .expect("templates lock")
            .iter()
            .cloned()
            .collect();
        f.debug_tuple("Templates").field(&names).finish()
    }
}

/// One machine name of an engine in this process.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Held while this process attaches, creates or cleans up the machine.
    pub(crate) gate: Arc<tokio::sync::Mutex<()>>,
    handle: Mutex<Weak<Inner>>,
    /// The last handle was dropped and its files and record are being removed.
    draining: std::sync::atomic::AtomicBool,
}

impl Slot {
    /// The live handle, unless there is none or it was deleted.
    pub(crate) fn live(&self) -> Option<LocalMachine> {
        let inner = self.handle.lock().expect("slot lock").upgrade()?;
        let m = LocalMachine { inner };
        (m.public_state() != MachineState::Deleted).then_some(m)
    }

    /// Remembers `m` as the live handle of this name.
    pub(crate) fn set(&self, m: &LocalMachine) {
        *self.handle.lock().expect("slot lock") = Arc::downgrade(&m.inner);
    }

    fn holds(&self, inner: *const Inner) -> bool {
        std::ptr::eq(self.handle.lock().expect("slot lock").as_ptr(), inner)
    }
}

impl Shared {
    /// The state database of `home`, opened (on a blocking thread) on first use.
    pub(crate) async fn db(&self, home: &Path) -> Result<Arc<StateDb>> {
        self.db
            .get_or_try_init(|| async {
                let home = home.to_path_buf();
                super::state::blocking(&home.join("state.db"), move || {
                    StateDb::open(&home).map(Arc::new)
                })
                .await
            })
            .await
            .cloned()
    }

    /// The slot of `name` (made on first use).
    pub(crate) fn slot(&self, name: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .expect("slots lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The live handle of `name` in this process, if any (cheap: one map lookup).
    pub(crate) fn live(&self, name: &str) -> Option<LocalMachine> {
        let slot = self.slots.lock().expect("slots lock").get(name).cloned()?;
        slot.live()
    }

    /// Forgets `name` if its slot holds `inner` and nobody else uses the slot (a deleted or
    /// dropped machine leaves the map; a task waiting on the gate keeps it).
    pub(crate) fn forget(&self, name: &str, inner: *const Inner) {
        let mut slots = self.slots.lock().expect("slots lock");
        // only the map holds the slot: nobody can start using it without the map lock
        if slots
            .get(name)
            .is_some_and(|s| s.holds(inner) && Arc::strong_count(s) == 1)
        {
            slots.remove(name);
        }
    }

    /// For the `Drop` of `inner`'s last handle: the gate of its name, locked, and the slot
    /// marked draining until [`Shared::drained`], so a create / open of the name waits for the
    /// cleanup and `list` does not show it. `None` when another task holds the gate (it is
    /// attaching the name right now) or the slot belongs to another handle.
    pub(crate) fn release(
        &self,
        name: &str,
        inner: *const Inner,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let slots = self.slots.lock().expect("slots lock");
        let slot = slots.get(name)?;
        if !slot.holds(inner) {
            return None;
        }
        let guard = slot.gate.clone().try_lock_owned().ok()?;
        slot.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Some(guard)
    }

    /// The cleanup after [`Shared::release`] is done.
    pub(crate) fn drained(&self, name: &str, inner: *const Inner) {
        if let Some(s) = self.slots.lock().expect("slots lock").get(name) {
            s.draining.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        self.forget(name, inner);
    }

    /// Whether the machine `name` is being removed after its last handle went away.
    pub(crate) fn draining(&self, name: &str) -> bool {
        self.slots
            .lock()
            .expect("slots lock")
            .get(name)
            .is_some_and(|s| s.draining.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// How many names have a slot (tests: deleted machines leave the map).
    #[cfg(test)]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.lock().expect("slots lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_name_one_engine() {
        let d = tempfile::tempdir().unwrap();
        let a = canonical(d.path());
        let b = canonical(&d.path().join("x/.."));
        assert_eq!(a, b);
        // not made yet: the key it will have once it exists
        let later = canonical(&d.path().join("./home"));
        std::fs::create_dir(d.path().join("home")).unwrap();
        assert_eq!(later, canonical(&d.path().join("home")));
        // a home that does not exist yet still gets an absolute key
        let missing = canonical(Path::new("relative/home"));
        assert!(missing.is_absolute(), "{missing:?}");
    }

    #[test]
    fn slots_are_made_once_and_forgotten_only_for_their_handle() {
        let s = Shared::default();
        let a = s.slot("m");
        let b = s.slot("m");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(s.live("m").is_none(), "no handle yet");
        // a slot holding no handle is not forgotten for another handle's pointer
        let other = std::ptr::dangling::<Inner>();
        s.forget("m", other);
        assert_eq!(s.slot_count(), 1);
        drop((a, b));
        assert!(s.release("m", other).is_none());
    }
}

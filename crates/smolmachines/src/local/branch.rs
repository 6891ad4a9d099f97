//! `branch()`: a running copy-on-write clone of a running, branchable local machine.
//!
//! A branch source (`MachineConfig.branchable`) has its guest RAM in a file on tmpfs, mapped
//! `share=on` (`local::ram`). A branch (TCG-NOTES §5 C and D):
//!
//! 1. *Before the pause:* the clone's record (the name reserved), directories, attach lock and
//!    port listeners are made; nothing of the source changes.
//! 2. *Pause window* (the source's vCPUs stopped, QMP `stop`, which drains and flushes its
//!    disk): at once and in parallel, the device state is migrated with `x-ignore-shared` (RAM
//!    is not in the stream: ~30 KB) to `<clone run dir>/branch.state`, the RAM file is copied
//!    to the clone's RAM directory and the source's qcow2 to `<clone home>/base-<id>.qcow2`,
//!    both sparse (data extents only). Then QMP `cont`: the source goes on with its own files.
//!    The window is what the copies cost (the RAM the guest has touched, its disk layer).
//! 3. *The clone* gets a qcow2 overlay `disk.qcow2` over the frozen layer, and its QEMU starts
//!    with the frozen RAM file and `-incoming defer`; the device state is loaded over QMP, the
//!    clone continues (`cont`), its agent (in a session with the source's host, as far as it
//!    knows) takes the clone's hello as a new session, and gets its own hostname and a
//!    reseeded kernel RNG (`Op::Identity`, protocol generation 4).
//!
//! *Memory:* a clone that is not branchable maps the frozen copy `share=off` (`MAP_PRIVATE`,
//! copy on write) and the file is unlinked once its QEMU has it mapped: the kernel keeps the
//! pages while the mapping lives, so nothing has to be reference-counted. A branchable clone
//! (`BranchOptions.branchable`) maps the copy `share=on` as its own RAM file instead.
//! *Disk:* the frozen layer and every layer below it (the source's own `base-*.qcow2`) are
//! hard links in the clone's home directory, named relative to it in the qcow2 headers: each
//! machine's chain is self-contained and the file system counts the references, so deleting
//! the source or a sibling leaves a clone working, and clones of clones work. The bottom of
//! every chain is the shared ext4 template, which is never removed.
//!
//! *Frozen base* (`BranchOptions.freeze_source`, and the booted templates of `create`): the
//! source's vCPUs are not resumed; its device state is kept as `frozen.state`, its RAM file
//! copied (sparse) to `frozen.ram` in its home directory, on the disk file system, and removed
//! from tmpfs, its VMM ended, its record marked `frozen` (phase `Frozen`). On disk, because a
//! clone maps it `MAP_PRIVATE`: a page a clone touches that the base never did (a hole) would,
//! in a tmpfs file, become a tmpfs page of the base's file charged to the clone's cgroup *and*
//! the clone's own copy, twice the guest's RAM at worst, past its `memory.max` (its VMM was
//! OOM-killed filling its disk, the guest page cache touching all its RAM); in a disk file it is
//! clean page cache, which the kernel reclaims. A branch
//! of a base copies the state file, maps `frozen.ram` itself copy-on-write (a branchable clone
//! gets a copy), hard-links the base's disk (no VMM writes it any more) as the clone's frozen
//! layer `base-frozen-<base>.qcow2` and copies a prepared overlay over it: no pause window, no
//! RAM copy, no qemu-img, and every clone starts from the same instant.
//!
//! Not branchable: a stopped or paused source (`InvalidState` naming its state), one created
//! without `branchable` (`InvalidState` "not branchable"), one with mounts (`InvalidConfig`:
//! virtio-fs shares block migration). Commands running in the source at the branch instant
//! keep running there; in the clone, the agent session they belonged to ends, so their copies
//! are killed (the agent kills a session's process groups). Background processes (`Spawn`,
//! the workload) run on in both. A clone is a new machine of this process: not persistent,
//! not detached, the source's labels, resources, image and workload.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::super::qmp::Qmp;
use super::super::ram;
use super::super::record::now_unix;
use super::super::vmm::Restore;
use super::*;
use crate::config::BranchOptions;

/// How long a device-state migration (save or load) may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Migration bandwidth: QEMU's default (32 MiB/s) would make even a small stream slow.
const MAX_BANDWIDTH: u64 = 10 << 30;
/// Name of the saved device state in the clone's run directory.
const STATE_FILE: &str = "branch.state";
/// A frozen base's device state, in its run directory.
pub(crate) const BASE_STATE: &str = "frozen.state";
/// A frozen base's RAM, in its home directory (see the module documentation).
pub(crate) const BASE_RAM: &str = "frozen.ram";

/// The RAM file of the frozen base whose home directory is `home` and RAM directory `ram_dir`:
/// `<home>/frozen.ram`, or `<ram_dir>/frozen.ram` for a base frozen before the RAM of bases
/// moved to disk (when only that one exists).
pub(crate) fn base_ram_at(home: &Path, ram_dir: &Path) -> PathBuf {
    let on_disk = home.join(BASE_RAM);
    let old = ram_dir.join(BASE_RAM);
    if !on_disk.exists() && old.exists() {
        return old;
    }
    on_disk
}
/// A frozen base's prepared clone overlay (over `base-frozen-<name>.qcow2`), in its home.
const CLONE_OVERLAY: &str = "clone-overlay.qcow2";
/// Bytes of host randomness a clone's RNG is reseeded with.
pub(super) const SEED_BYTES: usize = 32;

/// What one branch took and copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchReport {
    /// How long the source's vCPUs were stopped.
    pub pause: Duration,
    /// Bytes of RAM copied (the data extents of the source's RAM file).
    pub ram_bytes: u64,
    /// Bytes of the source's disk layer copied.
    pub disk_bytes: u64,
    /// From the call until the clone's agent answered with its new identity.
    pub total: Duration,
}

/// What the pause window produced.
pub(crate) struct Frozen {
    pub(crate) pause: Duration,
    pub(crate) ram_bytes: u64,
    pub(crate) disk_bytes: u64,
}

/// Polls `query-migrate` until the migration completed; its error otherwise.
async fn wait_migration(qmp: &mut Qmp, side: &str) -> std::result::Result<(), String> {
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let r = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| format!("{side}: query-migrate: {e}"))?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            s @ ("failed" | "cancelled") => {
                return Err(format!(
                    "{side}: migration {s}: {}",
                    r["error-desc"].as_str().unwrap_or("no detail")
                ))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{side}: the migration did not end in {MIGRATE_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn migration_setup(qmp: &mut Qmp, side: &str) -> std::result::Result<(), String> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true}
        ]})),
    )
    .await
    .map_err(|e| format!("{side}: enabling x-ignore-shared: {e}"))?;
    qmp.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({"max-bandwidth": MAX_BANDWIDTH})),
    )
    .await
    .map_err(|e| format!("{side}: setting the migration bandwidth: {e}"))?;
    Ok(())
}

/// QMP of `socket`, ready for a device-state migration (`side` names it in errors).
pub(super) async fn migration_qmp(socket: &Path, side: &str) -> std::result::Result<Qmp, String> {
    let mut qmp = Qmp::connect(socket)
        .await
        .map_err(|e| format!("{side}: QMP: {e}"))?;
    migration_setup(&mut qmp, side).await?;
    Ok(qmp)
}

/// Saves the (stopped) VM's device state to `state`: written to a temporary name and renamed
/// into place once complete, then waited for. QEMU writes to a descriptor handed to it
/// (`fd:` migration): its seccomp sandbox denies the fork an `exec:` migration needs.
pub(super) async fn save_state(qmp: &mut Qmp, state: &Path) -> std::result::Result<(), String> {
    let tmp = state.with_extension("tmp");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| format!("source: creating {}: {e}", tmp.display()))?;
    qmp.send_fd("smol-state-out", std::os::fd::AsFd::as_fd(&file))
        .await
        .map_err(|e| format!("source: getfd: {e}"))?;
    drop(file);
    qmp.execute(
        "migrate",
        Some(serde_json::json!({ "uri": "fd:smol-state-out" })),
    )
    .await
    .map_err(|e| format!("source: migrate: {e}"))?;
    wait_migration(qmp, "source").await?;
    std::fs::rename(&tmp, state).map_err(|e| {
        format!(
            "source: renaming {} to {}: {e}",
            tmp.display(),
            state.display()
        )
    })
}

/// Why a pause window (branch, checkpoint) failed: a typed error the caller passes on as it
/// is (no room for the copies), or a reason the caller words as its own error.
#[derive(Debug)]
pub(super) enum Failure {
    /// Passed on as it is.
    Typed(Error),
    /// Worded by the caller.
    Reason(String),
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Failure::Reason(reason)
    }
}

impl Failure {
    /// The error to return: a typed one as it is, a reason through `word`.
    pub(super) fn into_error(self, word: impl FnOnce(String) -> Error) -> Error {
        match self {
            Failure::Typed(e) => e,
            Failure::Reason(r) => word(r),
        }
    }
}

/// Copies on the blocking pool. A full file system is `Error::NoSpace` (typed); the partial
/// copy is removed at once, so the tmpfs that also holds the source's own RAM file has its
/// room back before the source runs again.
pub(super) async fn copy_blocking(src: PathBuf, dst: PathBuf) -> std::result::Result<u64, Failure> {
    let what = format!("copying {} to {}", src.display(), dst.display());
    let to = dst.clone();
    let r = tokio::task::spawn_blocking(move || ram::copy_sparse(&src, &dst)).await;
    if !matches!(r, Ok(Ok(_))) {
        if let Err(e) = std::fs::remove_file(&to) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %to.display(), error = %e, "cannot remove a partial copy");
            }
        }
    }
    match r {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e @ Error::NoSpace { .. })) => Err(Failure::Typed(e)),
        Ok(Err(e)) => Err(Failure::Reason(format!("{what}: {e}"))),
        Err(e) => Err(Failure::Reason(format!("{what}: the copy panicked: {e}"))),
    }
}

/// The directory a machine's disk layers live in, and its `base-*.qcow2` layers.
fn layers(home: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(home)? {
        let e = e?;
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("base-") && n.ends_with(".qcow2") {
            out.push(e.path());
        }
    }
    Ok(out)
}

impl LocalMachine {
    /// [`MachineBackend::branch`](crate::MachineBackend::branch) with what the branch took: a
    /// running clone named `name` (see the module documentation).
    #[tracing::instrument(skip(self, opts), fields(machine = %self.inner.name, clone = name))]
    pub async fn branch_machine(
        &self,
        name: &str,
        opts: &BranchOptions,
    ) -> Result<(LocalMachine, BranchReport)> {
        let started = Instant::now();
        crate::config::validate_name(name)?;
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        let frozen = match self.phase() {
            Phase::Running => false,
            Phase::Frozen => true,
            _ => return Err(self.invalid_state("branch")),
        };
        let source = self.record();
        let src_ram = if frozen {
            Some(self.base_ram())
        } else {
            self.inner.spec.ram_file.clone()
        };
        let Some(src_ram) = src_ram.filter(|_| source.branchable) else {
            return Err(Error::InvalidState {
                name: self.inner.name.clone(),
                state: "running but not branchable (create it with branchable: true)".into(),
                op: "branch".into(),
            });
        };
        if !source.mounts.is_empty() {
            return Err(Error::invalid(format!(
                "machine {:?} has mounts: a machine with virtio-fs shares cannot be branched \
                 (the shares block the device-state migration); create the source without mounts",
                self.inner.name
            )));
        }
        let machines = self.inner.spec.dir.parent().unwrap_or(Path::new("/"));
        let homes = self.inner.home_dir.parent().unwrap_or(Path::new("/"));
        let (dir, home) = (machines.join(name), homes.join(name));
        let sock_len = dir.join("agent.sock").as_os_str().len();
        if sock_len > super::super::MAX_SOCKET_PATH {
            return Err(Error::invalid(format!(
                "the clone's socket path would be {sock_len} bytes; set SMOL_RUN_DIR to a shorter directory"
            )));
        }
        let ports: Vec<(u16, u16)> = if opts.ports.is_empty() {
            source.ports.iter().map(|&(_, g)| (0, g)).collect()
        } else {
            opts.ports.iter().map(|p| (p.host, p.guest)).collect()
        };
        let slot = self.inner.engine.slot(name);
        let _gate = slot.gate.clone().lock_owned().await;
        let mut record = Record {
            name: name.to_string(),
            persistent: false,
            detach: false,
            ports: Vec::new(),
            created_unix: now_unix(),
            vmm: None,
            owner: Some(ProcId::current()),
            booted: false,
            branchable: opts.branchable,
            frozen: false,
            ..source.clone()
        };
        let rec = record.clone();
        self.inner.db.call(move |db| db.insert(&rec)).await?;
        let ram_dir = ram::dir(machines, name);
        let prepared = async {
            for d in [&dir, &home, &ram_dir] {
                tokio::fs::create_dir_all(d)
                    .await
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
            }
            let lock = lock_attach(&dir, name, Duration::ZERO).await?;
            let listeners = super::super::ports::bind(&ports).await?;
            Ok::<_, Error>((lock, listeners))
        }
        .await;
        let (lock, listeners) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let dirs = [dir.clone(), home.clone(), ram_dir.clone()];
                super::super::teardown::undo_reservation(&self.inner.db, dirs, name, "branch")
                    .await;
                return Err(e);
            }
        };
        record.ports = listeners
            .iter()
            .map(|(l, g)| (l.local_addr().map(|a| a.port()).unwrap_or(0), *g))
            .collect();
        let mut spec = self.inner.spec.clone();
        spec.name = name.to_string();
        spec.dir = dir.clone();
        spec.disk = Some(home.join("disk.qcow2"));
        spec.linger_ms = Some(super::super::LINGER.as_millis() as u64);
        spec.ram_file = opts.branchable.then(|| ram_dir.join(ram::FILE));
        spec.restore = None;
        let clone = LocalMachine::new(Parts {
            spec,
            vmm: self.inner.vmm.clone(),
            db: self.inner.db.clone(),
            passt: self.inner.passt.clone(),
            home_dir: home.clone(),
            record,
            ready_timeout: self.inner.ready_timeout,
            owned: true,
            lock,
            engine: self.inner.engine.clone(),
            phase: Phase::Creating,
        });
        match self.make_clone(&clone, &src_ram, opts).await {
            Ok(frozen) => {
                clone.serve_ports(listeners);
                slot.set(&clone);
                let report = BranchReport {
                    pause: frozen.pause,
                    ram_bytes: frozen.ram_bytes,
                    disk_bytes: frozen.disk_bytes,
                    total: started.elapsed(),
                };
                tracing::info!(
                    pause_ms = report.pause.as_secs_f64() * 1e3,
                    ram_mib = report.ram_bytes >> 20,
                    disk_mib = report.disk_bytes >> 20,
                    total_ms = report.total.as_secs_f64() * 1e3,
                    "branched"
                );
                Ok((clone, report))
            }
            Err(e) => {
                drop(listeners);
                if let Err(d) = clone.destroy().await {
                    tracing::warn!(error = %d, "cleanup after a failed branch");
                }
                Err(e)
            }
        }
    }

    /// Freezes the source into the clone's files (or copies a frozen base's), then starts
    /// the clone (phase `Creating`, its directories made, no disk yet).
    pub(crate) async fn make_clone(
        &self,
        clone: &LocalMachine,
        src_ram: &Path,
        opts: &BranchOptions,
    ) -> Result<Frozen> {
        let branchable = opts.branchable;
        let cname = clone.inner.name.clone();
        let failed = |reason: String| Error::BootFailed {
            name: cname.clone(),
            reason: format!("branch of {:?}: {reason}", self.inner.name),
            log_tail: String::new(),
        };
        let cram = clone.inner.ram_dir();
        let from_base = self.phase() == Phase::Frozen;
        // A frozen base's RAM never changes: a clone that maps it copy-on-write maps the
        // base's own file (no copy; unlinking it later leaves the mapping). A branchable clone
        // writes its RAM file, so it gets a copy.
        let frozen_ram = if branchable {
            cram.join(ram::FILE)
        } else if from_base {
            src_ram.to_path_buf()
        } else {
            cram.join("base.ram")
        };
        // a base's layer has one name in every clone, so one prepared overlay fits them all
        let layer = if from_base {
            format!("base-frozen-{}.qcow2", self.inner.name)
        } else {
            format!("base-{:016x}.qcow2", rand::random::<u64>())
        };
        let chome = clone.inner.home_dir.clone();
        let state = clone.inner.spec.dir.join(STATE_FILE);
        let src_disk = self
            .inner
            .spec
            .disk
            .clone()
            .ok_or_else(|| failed("the source has no disk".into()))?;
        let frozen = if from_base {
            self.copy_base(src_ram, &frozen_ram, &src_disk, &chome.join(&layer), &state)
                .await
        } else {
            let keep = opts.freeze_source;
            self.freeze(
                src_ram,
                &frozen_ram,
                &src_disk,
                &chome.join(&layer),
                &state,
                keep,
            )
            .await
        }
        .map_err(|f| f.into_error(failed))?;
        if opts.freeze_source && self.phase() == Phase::Running {
            self.become_base(src_ram, &state).await?;
        }
        // the clone's disk: its own overlay over the frozen layer, every layer below linked in
        let below = layers(&self.inner.home_dir)
            .map_err(|e| failed(format!("listing the source's disk layers: {e}")))?;
        for l in below {
            let to = chome.join(l.file_name().unwrap_or_default());
            std::fs::hard_link(&l, &to)
                .map_err(|e| failed(format!("linking {} to {}: {e}", l.display(), to.display())))?;
        }
        let overlay = chome.join("disk.qcow2");
        let prepared = self.inner.home_dir.join(CLONE_OVERLAY);
        if !(from_base && tokio::fs::copy(&prepared, &overlay).await.is_ok()) {
            super::super::disk::create_overlay(&overlay, &layer).await?;
            if from_base {
                // kept for the next clone of this base (copying it beats running qemu-img)
                let tmp = prepared.with_extension(format!("{:x}.tmp", rand::random::<u32>()));
                let kept = match tokio::fs::copy(&overlay, &tmp).await {
                    Ok(_) => tokio::fs::rename(&tmp, &prepared).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = kept {
                    remove_file_logged(&tmp);
                    tracing::debug!(error = %e, "no prepared overlay kept for the base");
                }
            }
        }
        let restore = Restore {
            ram: frozen_ram.clone(),
            shared: branchable,
        };
        tracing::debug!(
            pause_ms = frozen.pause.as_secs_f64() * 1e3,
            "source frozen; starting the clone"
        );
        clone.apply(Event::Boot, "branch")?;
        clone.inner.boots.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = clone.start_vm(Some((&restore, &state))).await {
            Self::note(&clone.inner, Event::BootFailed);
            return Err(e);
        }
        clone.apply(Event::Booted, "branch")?;
        // QEMU has the frozen RAM mapped (or it is the clone's own RAM file): the state file and
        // a private base are no longer needed by name
        remove_file_logged(&state);
        if !branchable && !from_base {
            remove_file_logged(&frozen_ram);
        }
        tracing::debug!("the clone's agent answered; giving it its identity");
        clone.give_identity().await?;
        Ok(frozen)
    }

    /// Gives this running clone its own hostname (its name) and reseeds its kernel RNG with
    /// host randomness (`Op::Identity`), bounded by the ready timeout.
    pub(super) async fn give_identity(&self) -> Result<()> {
        let conn = self.conn("branch")?;
        let seed: Vec<u8> = (0..SEED_BYTES).map(|_| rand::random::<u8>()).collect();
        // Bounded: the clone is up and its agent answered, so this takes milliseconds; a
        // channel that loses the answer must fail the branch, not hang it.
        let wait = self.inner.ready_timeout;
        match tokio::time::timeout(wait, conn.identity(&self.inner.name, seed)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.map_err(e).await),
            Err(_) => Err(Error::BootFailed {
                name: self.inner.name.clone(),
                reason: format!(
                    "the clone's agent did not confirm its new identity within {wait:?}"
                ),
                log_tail: String::new(),
            }),
        }
    }

    /// The pause window: stop the source's vCPUs, save its device state and copy its RAM and
    /// disk layer in parallel, let it go on. The source runs again whatever happened, unless
    /// `keep` (it is to become a frozen base) and everything was saved.
    async fn freeze(
        &self,
        src_ram: &Path,
        ram_to: &Path,
        src_disk: &Path,
        disk_to: &Path,
        state: &Path,
        keep: bool,
    ) -> std::result::Result<Frozen, Failure> {
        let mut qmp = migration_qmp(&self.inner.spec.qmp_socket(), "source").await?;
        let t0 = Instant::now();
        qmp.execute("stop", None)
            .await
            .map_err(|e| format!("source: stop: {e}"))?;
        let (saved, ram, disk) = tokio::join!(
            save_state(&mut qmp, state),
            copy_blocking(src_ram.to_path_buf(), ram_to.to_path_buf()),
            copy_blocking(src_disk.to_path_buf(), disk_to.to_path_buf()),
        );
        if keep && saved.is_ok() && ram.is_ok() && disk.is_ok() {
            return Ok(Frozen {
                pause: t0.elapsed(),
                ram_bytes: ram?,
                disk_bytes: disk?,
            });
        }
        let cont = qmp.execute("cont", None).await;
        let pause = t0.elapsed();
        if let Err(e) = cont {
            tracing::error!(machine = %self.inner.name, error = %e, "the source could not be resumed after a branch; trying again");
            self.qmp_command("cont", "resume after a branch")
                .await
                .map_err(|e| format!("source: cont: {e}"))?;
        }
        saved?;
        Ok(Frozen {
            pause,
            ram_bytes: ram?,
            disk_bytes: disk?,
        })
    }

    /// A branch of a frozen base: its saved device state and RAM are copied, its disk (which
    /// no VMM writes any more) is linked as the clone's frozen layer. The base does not change.
    async fn copy_base(
        &self,
        base_ram: &Path,
        ram_to: &Path,
        base_disk: &Path,
        disk_to: &Path,
        state: &Path,
    ) -> std::result::Result<Frozen, Failure> {
        let base_state = self.inner.spec.dir.join(BASE_STATE);
        tokio::fs::copy(&base_state, state)
            .await
            .map_err(|e| format!("copying {}: {e}", base_state.display()))?;
        std::fs::hard_link(base_disk, disk_to).map_err(|e| {
            format!(
                "linking {} to {}: {e}",
                base_disk.display(),
                disk_to.display()
            )
        })?;
        let ram_bytes = if ram_to == base_ram {
            0 // mapped as it is
        } else {
            copy_blocking(base_ram.to_path_buf(), ram_to.to_path_buf()).await?
        };
        Ok(Frozen {
            pause: Duration::ZERO,
            ram_bytes,
            disk_bytes: 0,
        })
    }

    /// A frozen base's RAM file.
    pub(crate) fn base_ram(&self) -> PathBuf {
        base_ram_at(&self.inner.home_dir, &self.inner.ram_dir())
    }

    /// Makes this frozen base a booted template kept in the engine home across processes
    /// (`local::template_store`): its record persistent and ownerless (the reaper leaves it,
    /// dropping this handle removes nothing). The sizes of its RAM and device-state files.
    pub(crate) async fn keep_as_template(&self) -> Result<(u64, u64)> {
        if self.phase() != Phase::Frozen {
            return Err(self.invalid_state("keep as a template"));
        }
        self.save_record(|r| {
            r.persistent = true;
            r.owner = None;
            r.vmm = None;
        })
        .await;
        let size = |p: PathBuf| {
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        Ok((
            size(self.base_ram())?,
            size(self.inner.spec.dir.join(BASE_STATE))?,
        ))
    }

    /// Makes this running, branchable machine a frozen base without branching it (a booted
    /// template): its vCPUs stop, its device state is saved, then as [`Self::become_base`].
    /// A failure leaves it running.
    pub(crate) async fn freeze_in_place(&self) -> Result<()> {
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        if self.phase() != Phase::Running {
            return Err(self.invalid_state("freeze"));
        }
        let Some(ram) = self.inner.spec.ram_file.clone() else {
            return Err(self.invalid_state("freeze"));
        };
        let state = self.inner.spec.dir.join(STATE_FILE);
        let saved = async {
            let mut qmp = migration_qmp(&self.inner.spec.qmp_socket(), "source").await?;
            qmp.execute("stop", None)
                .await
                .map_err(|e| format!("source: stop: {e}"))?;
            save_state(&mut qmp, &state).await
        }
        .await;
        if let Err(reason) = saved {
            if let Err(c) = self
                .qmp_command("cont", "resume after a failed freeze")
                .await
            {
                tracing::error!(error = %c, "the machine stays paused after a failed freeze");
            }
            remove_file_logged(&state);
            return Err(Error::Protocol {
                message: format!("cannot freeze machine {:?}: {reason}", self.inner.name),
            });
        }
        let based = self.become_base(&ram, &state).await;
        remove_file_logged(&state);
        based
    }

    /// After a branch with `freeze_source` (the source's vCPUs still stopped): the source
    /// becomes a frozen base. Its device state (the clone's copy of it) and a sparse copy of
    /// its RAM file on the disk file system (see the module documentation) are kept under the
    /// base's names, its VMM is ended and its RAM file on tmpfs removed, and its record says
    /// `frozen`, so it stays one across processes.
    async fn become_base(&self, ram: &Path, state: &Path) -> Result<()> {
        let base_state = self.inner.spec.dir.join(BASE_STATE);
        let base_ram = self.inner.home_dir.join(BASE_RAM);
        let kept = async {
            tokio::fs::copy(state, &base_state)
                .await
                .map_err(|e| Error::io(format!("keeping {}", base_state.display()), e))?;
            // the vCPUs are stopped: the file does not change while it is copied
            copy_blocking(ram.to_path_buf(), base_ram.clone())
                .await
                .map(drop)
                .map_err(|f| {
                    f.into_error(|reason| Error::Storage {
                        path: base_ram.clone(),
                        message: reason,
                    })
                })
        }
        .await;
        if let Err(e) = kept {
            // not a base after all: the source goes on as it was
            remove_file_logged(&base_state);
            if let Err(c) = self
                .qmp_command("cont", "resume after a failed freeze")
                .await
            {
                tracing::error!(error = %c, "the source stays paused after a failed freeze");
            }
            return Err(e);
        }
        self.apply(Event::Freeze, "branch")?;
        self.save_record(|r| r.frozen = true).await;
        self.kill_and_wait().await;
        // its VMM is gone: the RAM on tmpfs is no longer anyone's
        remove_file_logged(ram);
        tracing::info!("frozen: a branch base from now on");
        Ok(())
    }

    /// A clone's VMM is up with `-incoming defer`: load the saved device state and let it run.
    /// The error is the reason its boot failed.
    pub(super) async fn load_state(
        &self,
        state: &Path,
        exit: watch::Receiver<Option<String>>,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        let mut qmp = loop {
            match Qmp::connect(&self.inner.spec.qmp_socket()).await {
                Ok(q) => break q,
                Err(e) => {
                    if let Some(d) = exit.borrow().clone() {
                        return Err(format!("{d} before its device state was loaded"));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("clone: QMP: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        let t0 = Instant::now();
        migration_setup(&mut qmp, "clone").await?;
        tracing::trace!(ms = t0.elapsed().as_secs_f64() * 1e3, "clone: QMP up");
        let file = std::fs::File::open(state)
            .map_err(|e| format!("clone: opening {}: {e}", state.display()))?;
        qmp.send_fd("smol-state-in", std::os::fd::AsFd::as_fd(&file))
            .await
            .map_err(|e| format!("clone: getfd: {e}"))?;
        drop(file);
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": "fd:smol-state-in" })),
        )
        .await
        .map_err(|e| format!("clone: migrate-incoming: {e}"))?;
        wait_migration(&mut qmp, "clone").await?;
        tracing::trace!(ms = t0.elapsed().as_secs_f64() * 1e3, "clone: migrated in");
        qmp.execute("cont", None)
            .await
            .map_err(|e| format!("clone: cont: {e}"))?;
        Ok(())
    }
}

impl Inner {
    /// The directory of this machine's RAM files (a branch source's RAM, a clone's frozen
    /// base): `local::ram::dir`, the run directory itself when that is on tmpfs.
    pub(super) fn ram_dir(&self) -> PathBuf {
        let machines = self.spec.dir.parent().unwrap_or(Path::new("/"));
        ram::dir(machines, &self.name)
    }
}

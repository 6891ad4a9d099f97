//! Portable checkpoints of local machines (SPEC §4.8, docs/CHECKPOINTS.md).
//!
//! `checkpoint(output)` of a running or paused branchable machine (a frozen base too):
//!
//! 1. *Pause window* (as a branch's, `local::branch`): the vCPUs stop (a paused machine stays
//!    as it is), and in parallel the device state is saved with `x-ignore-shared`, the RAM
//!    file and the top disk layer are copied sparse into scratch files; the vCPUs go on.
//! 2. *After it*, with the machine running: the disk copy is flattened with its layers into
//!    one standalone qcow2 (`qemu-img convert`), and the state, the RAM's data extents and the
//!    disk are streamed into `output` (a temporary name, renamed into place), with a manifest
//!    of versions, the machine and every section's sha256 (`local::checkpoint_file`).
//!
//! `restore_checkpoint(path, name)` verifies the whole file (manifest, every checksum, arch,
//! QEMU, accelerator) before it reserves anything, then unpacks it into the new machine's
//! directories (the RAM into its tmpfs RAM file, mapped `share=on`: a restored machine is
//! branchable), starts QEMU with `-incoming defer`, loads the state, lets it run, and waits for
//! the agent (any generation this host speaks: the agent in the checkpoint is the one that ran).
//! It gets its own hostname and a reseeded RNG (`Op::Identity`, generation 4; an older agent
//! keeps the old ones, logged) unless `keep_identity`, and its own ports. A failure leaves no
//! machine, record or directory.
//!
//! Not checkpointable: a machine created without `branchable` (its RAM is anonymous memory;
//! `InvalidState` naming it), one with mounts, a stopped one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::branch::{copy_blocking, migration_qmp, save_state, BASE_STATE, SEED_BYTES};
use super::*;
use crate::config::{CheckpointOptions, RestoreOptions};
use crate::local::checkpoint_file::{self as file, AssetId, Manifest, Parts as FileParts};
use crate::local::checkpoint_store::Store;
use crate::local::record::now_unix;
use crate::local::vmm::Restore;
use crate::local::{ram, LocalBackend};
use crate::wire::CheckpointInfo;

/// The protocol generation that has `Op::Identity`.
const IDENTITY_GENERATION: u16 = 4;
/// The device state unpacked for a restore, in the machine's run directory.
const STATE_FILE: &str = "checkpoint.state";

/// Removes the scratch files of a checkpoint whatever happened.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            remove_file_logged(p);
        }
    }
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Guest {
            message: format!("{what} panicked: {e}"),
        })?
}

impl LocalMachine {
    /// The protocol generation negotiated with the machine's agent, while it is connected (a
    /// machine restored from an older agent's checkpoint speaks that agent's generation).
    pub fn protocol_generation(&self) -> Option<u16> {
        self.inner
            .conn
            .lock()
            .expect("conn lock")
            .as_ref()
            .map(|c| c.generation())
    }

    /// [`MachineBackend::checkpoint`](crate::MachineBackend::checkpoint): see the module
    /// documentation.
    #[tracing::instrument(skip(self, opts), fields(machine = %self.inner.name))]
    pub async fn checkpoint_to(&self, opts: &CheckpointOptions) -> Result<CheckpointInfo> {
        let started = Instant::now();
        let Some(output) = opts.output.as_deref() else {
            return Err(Error::invalid(
                "a local checkpoint needs an output path (a .smolcheckpoint file)",
            ));
        };
        let (output, dir, fname) = file::output_path(output, "checkpoint output")?;
        let (dir, fname) = (dir.as_path(), fname.as_os_str());
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        let phase = self.phase();
        if !matches!(phase, Phase::Running | Phase::Paused | Phase::Frozen) {
            return Err(self.invalid_state("checkpoint"));
        }
        let record = self.record();
        if !record.branchable {
            return Err(Error::InvalidState {
                name: self.inner.name.clone(),
                state: format!(
                    "{} but not checkpointable (create it with branchable: true: its RAM must \
                     be a file)",
                    self.current_state()
                ),
                op: "checkpoint".into(),
            });
        }
        if !record.mounts.is_empty() {
            return Err(Error::invalid(format!(
                "machine {:?} has mounts: a machine with virtio-fs shares cannot be checkpointed",
                self.inner.name
            )));
        }
        let qemu = self
            .inner
            .vmm
            .version()
            .map_err(|e| Error::HypervisorUnavailable {
                message: e.to_string(),
            })?;
        let generation = self
            .inner
            .conn
            .lock()
            .expect("conn lock")
            .as_ref()
            .map(|c| c.generation())
            .unwrap_or(0);
        let tag = format!("{:08x}", rand::random::<u32>());
        let src_disk = self
            .inner
            .spec
            .disk
            .clone()
            .ok_or_else(|| Error::invalid("the machine has no disk"))?;
        let flat = self.inner.home_dir.join(format!(".ckpt-{tag}.flat.qcow2"));
        let mut scratch = Scratch(vec![flat.clone()]);
        let (state, ram_copy, pause) = if phase == Phase::Frozen {
            // a frozen base's files never change: no pause, no copies
            let state = self.inner.spec.dir.join(BASE_STATE);
            crate::local::disk::flatten(&src_disk, &flat).await?;
            (state, self.base_ram(), Duration::ZERO)
        } else {
            let src_ram = self
                .inner
                .spec
                .ram_file
                .clone()
                .ok_or_else(|| self.invalid_state("checkpoint"))?;
            let state = self.inner.spec.dir.join(format!("ckpt-{tag}.state"));
            let ram_copy = self.inner.ram_dir().join(format!("ckpt-{tag}.ram"));
            let disk_copy = self.inner.home_dir.join(format!(".ckpt-{tag}.qcow2"));
            scratch
                .0
                .extend([state.clone(), ram_copy.clone(), disk_copy.clone()]);
            let pause = self
                .checkpoint_window(phase, &src_ram, &ram_copy, &src_disk, &disk_copy, &state)
                .await?;
            // the machine runs again: flatten the copy of its top layer over its layers
            crate::local::disk::flatten(&disk_copy, &flat).await?;
            remove_file_logged(&disk_copy);
            (state, ram_copy, pause)
        };
        let (kernel, initrd) = (
            self.inner.spec.assets.kernel.clone(),
            self.inner.spec.assets.initrd.clone(),
        );
        let tmp = dir.join(format!(".{}.{tag}.tmp", fname.to_string_lossy()));
        scratch.0.push(tmp.clone());
        let created = now_unix();
        let (out, tmp2, store_dir) = (output.clone(), tmp.clone(), opts.store.clone());
        let written = blocking("writing the checkpoint", move || {
            let asset = |p: &Path| {
                AssetId::of(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
            };
            let mut manifest = Manifest {
                format: file::FORMAT,
                smol_version: env!("CARGO_PKG_VERSION").to_string(),
                protocol_generation: generation,
                qemu_version: qemu,
                arch: std::env::consts::ARCH.to_string(),
                created_unix: created,
                kernel: asset(&kernel)?,
                initrd: asset(&initrd)?,
                machine: record,
                ram_bytes: 0,
                sections: Vec::new(),
                chunks: None,
            };
            let parts = FileParts {
                state: &state,
                ram: &ram_copy,
                disk: &flat,
            };
            // with a store: its shared lock (a prune waits) and the ref, before any chunk
            let store = match store_dir {
                Some(d) => {
                    let d = std::path::absolute(&d).map_err(|e| {
                        Error::invalid(format!("checkpoint store {}: {e}", d.display()))
                    })?;
                    let s = Store::open(&d, true, false)?;
                    s.add_ref(&out)?;
                    Some(s)
                }
                None => None,
            };
            let n = file::write(&tmp2, &parts, &mut manifest, store.as_ref())?;
            std::fs::rename(&tmp2, &out)
                .map_err(|e| Error::io(format!("renaming into {}", out.display()), e))?;
            Ok((n, store.is_some()))
        })
        .await?;
        let (written, stored) = written;
        let size = written.bytes;
        drop(scratch);
        let id = output.display().to_string();
        let info = CheckpointInfo {
            id: id.clone(),
            machine_id: self.inner.name.clone(),
            status: "available".into(),
            size_bytes: size,
            arch: std::env::consts::ARCH.into(),
            created_at: crate::wire::rfc3339(created),
            download_url: None,
            reused_bytes: stored.then_some(written.reused),
            path: Some(id),
            source_pause_ms: Some(pause.as_millis() as u64),
            elapsed_ms: Some(started.elapsed().as_millis() as u64),
        };
        tracing::info!(
            size_mib = size >> 20,
            reused_mib = written.reused >> 20,
            pause_ms = pause.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "checkpoint written"
        );
        Ok(info)
    }

    /// The pause window: stop the vCPUs (unless paused already), save the device state and
    /// copy RAM and the top disk layer in parallel, let the vCPUs go on. Returns how long they
    /// were stopped.
    async fn checkpoint_window(
        &self,
        phase: Phase,
        src_ram: &Path,
        ram_to: &Path,
        src_disk: &Path,
        disk_to: &Path,
        state: &Path,
    ) -> Result<Duration> {
        let failed = |reason: String| Error::Protocol {
            message: format!("checkpoint of {:?}: {reason}", self.inner.name),
        };
        let mut qmp = migration_qmp(&self.inner.spec.qmp_socket(), "source")
            .await
            .map_err(failed)?;
        let running = phase == Phase::Running;
        let t0 = Instant::now();
        if running {
            qmp.execute("stop", None)
                .await
                .map_err(|e| failed(format!("stop: {e}")))?;
        }
        let (saved, ram, disk) = tokio::join!(
            save_state(&mut qmp, state),
            copy_blocking(src_ram.to_path_buf(), ram_to.to_path_buf()),
            copy_blocking(src_disk.to_path_buf(), disk_to.to_path_buf()),
        );
        let pause = if running {
            let cont = qmp.execute("cont", None).await;
            let pause = t0.elapsed();
            if let Err(e) = cont {
                tracing::error!(error = %e, "the machine could not be resumed after a checkpoint; trying again");
                self.qmp_command("cont", "resume after a checkpoint")
                    .await?;
            }
            pause
        } else {
            Duration::ZERO
        };
        saved.map_err(failed)?;
        ram.map_err(|f| f.into_error(failed))?;
        disk.map_err(|f| f.into_error(failed))?;
        Ok(pause)
    }

    /// A restored machine (phase `Creating`, its files unpacked): QEMU with `-incoming defer`
    /// over its RAM file, the device state loaded, the agent connected; then its identity.
    async fn start_restored(&self, state: &Path, keep_identity: bool) -> Result<()> {
        let ram_file = self
            .inner
            .spec
            .ram_file
            .clone()
            .ok_or_else(|| self.invalid_state("restore"))?;
        let restore = Restore {
            ram: ram_file,
            shared: true,
        };
        self.apply(Event::Boot, "restore")?;
        self.inner.boots.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.start_vm(Some((&restore, state))).await {
            Self::note(&self.inner, Event::BootFailed);
            return Err(e);
        }
        self.apply(Event::Booted, "restore")?;
        remove_file_logged(state);
        let conn = self.conn("restore")?;
        let generation = conn.generation();
        if keep_identity {
            return Ok(());
        }
        if generation < IDENTITY_GENERATION {
            tracing::warn!(
                generation,
                "the restored machine's agent is older than protocol generation {}: it keeps \
                 the checkpointed hostname and RNG state",
                IDENTITY_GENERATION
            );
            return Ok(());
        }
        let seed: Vec<u8> = (0..SEED_BYTES).map(|_| rand::random::<u8>()).collect();
        let wait = self.inner.ready_timeout;
        match tokio::time::timeout(wait, conn.identity(&self.inner.name, seed)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.map_err(e).await),
            Err(_) => Err(Error::BootFailed {
                name: self.inner.name.clone(),
                reason: format!(
                    "the restored machine's agent did not confirm its new identity within {wait:?}"
                ),
                log_tail: String::new(),
            }),
        }
    }
}

impl LocalBackend {
    /// [`Backend::restore_checkpoint`](crate::Backend::restore_checkpoint): see the module
    /// documentation.
    #[tracing::instrument(skip(self, opts), fields(machine = name))]
    pub async fn restore_machine(
        &self,
        path: &str,
        name: &str,
        opts: &RestoreOptions,
    ) -> Result<LocalMachine> {
        crate::config::validate_name(name)?;
        let path = std::path::absolute(path)
            .map_err(|e| Error::invalid(format!("checkpoint {path}: {e}")))?;
        let p = path.clone();
        let v = blocking("verifying the checkpoint", move || file::verify(&p)).await?;
        let m = &v.manifest;
        let bad = |reason: String| Error::InvalidCheckpoint {
            path: path.clone(),
            reason,
        };
        if m.arch != std::env::consts::ARCH {
            return Err(bad(format!(
                "taken on {}; this host is {}",
                m.arch,
                std::env::consts::ARCH
            )));
        }
        let qemu = self
            .vmm
            .version()
            .map_err(|e| Error::HypervisorUnavailable {
                message: e.to_string(),
            })?;
        if m.qemu_version != qemu {
            return Err(bad(format!(
                "taken with {:?}; this host runs {qemu:?} (device state only loads into the \
                 same QEMU)",
                m.qemu_version
            )));
        }
        let accel = crate::local::accel::detect().map_err(crate::local::map_accel)?;
        if m.machine.accel != accel.accel.as_str() {
            return Err(bad(format!(
                "taken under {}; this host runs {}",
                m.machine.accel,
                accel.accel.as_str()
            )));
        }
        if let Some(i) = m.machine.image.as_ref().filter(|i| !i.rootfs.exists()) {
            return Err(bad(format!(
                "the machine ran image {:?}, which this engine's image cache lacks (pull it \
                 first)",
                i.reference
            )));
        }
        // images its run(image) slots held (local::slots): its guest has them mounted
        if let Some(s) = m
            .machine
            .image_slots
            .iter()
            .flatten()
            .find(|s| !s.file.exists())
        {
            return Err(bad(format!(
                "the machine ran image {:?} with run(image), which this engine's image cache \
                 lacks (pull it first)",
                s.reference
            )));
        }
        let assets = match &self.assets {
            Some(a) => a.clone(),
            None => crate::local::assets::resolve()?,
        };
        if AssetId::of(&assets.kernel).is_ok_and(|k| k.sha256 != m.kernel.sha256) {
            tracing::warn!("restoring with another kernel file than the checkpointed machine booted; its RAM holds the kernel that runs");
        }
        let dir = self.machine_run_dir(name);
        let sock_len = dir.join("agent.sock").as_os_str().len();
        if sock_len > crate::local::MAX_SOCKET_PATH {
            return Err(Error::invalid(format!(
                "the machine's socket path would be {sock_len} bytes; set SMOL_RUN_DIR to a shorter directory"
            )));
        }
        let ports: Vec<(u16, u16)> = if opts.ports.is_empty() {
            m.machine.ports.iter().map(|&(_, g)| (0, g)).collect()
        } else {
            opts.ports.iter().map(|p| (p.host, p.guest)).collect()
        };
        let db = self.db().await?;
        self.reap_if_due().await?;
        let slot = self.shared.slot(name);
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
            branchable: true,
            frozen: false,
            paused: false,
            kernel: assets.kernel.clone(),
            initrd: assets.initrd.clone(),
            accel_reason: accel.reason.clone(),
            ..m.machine.clone()
        };
        let rec = record.clone();
        db.call(move |db| db.insert(&rec)).await?;
        let home = self.machine_home_dir(name);
        let ram_dir = ram::dir(&self.machines_dir(), name);
        let state = dir.join(STATE_FILE);
        let prepared = async {
            for d in [&dir, &home, &ram_dir] {
                tokio::fs::create_dir_all(d)
                    .await
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
            }
            let lock = lock_attach(&dir, name, Duration::ZERO).await?;
            let listeners = crate::local::ports::bind(&ports).await?;
            let (st, ram_file, disk) = (
                state.clone(),
                ram_dir.join(ram::FILE),
                home.join("disk.qcow2"),
            );
            blocking("unpacking the checkpoint", move || {
                v.extract("state", &st)?;
                v.extract_ram(&ram_file)?;
                v.extract("disk", &disk)
            })
            .await?;
            Ok::<_, Error>((lock, listeners))
        }
        .await;
        let (lock, listeners) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let dirs = [dir.clone(), home.clone(), ram_dir.clone()];
                crate::local::teardown::undo_reservation(&db, dirs, name, "restore").await;
                return Err(e);
            }
        };
        record.ports = listeners
            .iter()
            .map(|(l, g)| (l.local_addr().map(|a| a.port()).unwrap_or(0), *g))
            .collect();
        let machine = LocalMachine::new(Parts {
            spec: self.spec_for(&record),
            vmm: self.vmm.clone(),
            db: db.clone(),
            passt: self.passt.clone().unwrap_or_else(crate::local::net::passt),
            home_dir: home,
            record,
            ready_timeout: crate::local::DEFAULT_READY_TIMEOUT,
            owned: true,
            lock,
            engine: self.shared.clone(),
            phase: Phase::Creating,
        });
        if let Err(e) = machine.start_restored(&state, opts.keep_identity).await {
            drop(listeners);
            if let Err(d) = machine.destroy().await {
                tracing::warn!(error = %d, "cleanup after a failed restore");
            }
            return Err(e);
        }
        machine.serve_ports(listeners);
        slot.set(&machine);
        tracing::info!(checkpoint = %path.display(), "restored");
        Ok(machine)
    }

    /// [`Backend::delete_checkpoint`](crate::Backend::delete_checkpoint): removes the file;
    /// a missing one is `NotFound`, one that is not a checkpoint is not removed.
    pub async fn delete_checkpoint_file(&self, path: &str) -> Result<()> {
        let p = std::path::absolute(path)
            .map_err(|e| Error::invalid(format!("checkpoint {path}: {e}")))?;
        blocking("deleting the checkpoint", move || {
            let mut magic = [0u8; 8];
            let read = std::fs::File::open(&p).and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut magic, 0)
            });
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::NotFound {
                        what: format!("checkpoint file {}", p.display()),
                    })
                }
                Ok(()) if &magic == file::MAGIC => {}
                _ => {
                    return Err(Error::InvalidCheckpoint {
                        path: p,
                        reason: "not a .smolcheckpoint file: not deleted".into(),
                    })
                }
            }
            let store = file::store_of(&p);
            std::fs::remove_file(&p)
                .map_err(|e| Error::io(format!("removing {}", p.display()), e))?;
            // its chunks stay until the store is pruned; the ref goes now
            if let Some(d) = store {
                match Store::open(&d, false, false) {
                    Ok(s) => s.remove_ref(&p),
                    Err(e) => tracing::warn!(store = %d.display(), error = %e,
                        "the deleted checkpoint's store could not be opened; prune it later"),
                }
            }
            Ok(())
        })
        .await
    }
}

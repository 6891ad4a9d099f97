//! `Machine::run(image, argv, opts)` on the local engine: a command in a container of an image
//! inside a running machine.
//!
//! The image comes from the engine's image cache (pulled once per host, as for
//! `MachineConfig.image`). Its read-only block image (erofs) reaches the guest through an
//! image slot (`local::slots`: a virtio-blk device pointed at the cached file, nothing copied)
//! and is mounted once per boot (`Op::MountImage`). Without a free slot, or with an agent
//! that mounts none, it is copied once per machine onto the machine's disk
//! (`/var/lib/smol/images`, so it survives restarts) and mounted through a loop device.
//! Each run is an `Op::ExecIn`: the agent gives the command its own mount namespace whose
//! root is an overlay of a fresh tmpfs over the image, with `/proc`, `/dev` and a private
//! `/tmp`; its writes vanish when it ends.

use std::collections::BTreeMap;

use smol_protocol::{ErrorKind, ExecRequest, Op};

use super::agent::AgentError;
use super::on_own_thread;
use super::record::{Record, SlotRecord};
use super::slots;
use super::LocalMachine;
use crate::config::{ExecOptions, ExecResult};
use crate::error::{Error, Result};

/// Guest directory of image files copied into a machine.
const GUEST_IMAGES: &str = "/var/lib/smol/images";
/// Guest directory where they are mounted.
const GUEST_MOUNTS: &str = "/run/smol/images";

/// An image mounted in the guest, with its run defaults.
struct Mounted {
    rootfs: String,
    env: BTreeMap<String, String>,
    workdir: Option<String>,
}

/// The request of a run: the image's `Env` under `opts.env`, its `WorkingDir` unless
/// `opts.workdir`.
fn request(m: &Mounted, argv: &[String], opts: &ExecOptions) -> ExecRequest {
    let mut env = m.env.clone();
    env.extend(opts.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    ExecRequest {
        argv: argv.to_vec(),
        env: env.into_iter().collect(),
        workdir: opts.workdir.clone().or_else(|| m.workdir.clone()),
        timeout_ms: opts.timeout_ms(),
        stdin: opts.stdin.is_some(),
        user: None,
    }
}

impl LocalMachine {
    /// [`crate::Machine::run`] locally.
    pub(crate) async fn run_in_image(
        &self,
        image: &str,
        argv: &[String],
        opts: &ExecOptions,
    ) -> Result<ExecResult> {
        self.conn("run")?; // a stopped machine fails before any pull
        let mounted = self.mount_image(image).await?;
        let op = Op::ExecIn {
            exec: request(&mounted, argv, opts),
            rootfs: mounted.rootfs,
        };
        self.exec_op(op, argv, opts).await
    }

    /// Pulls `image` if the cache lacks it, copies it into the guest unless it is there, and
    /// mounts it unless it is mounted.
    async fn mount_image(&self, image: &str) -> Result<Mounted> {
        let store = self.image_store()?;
        let reference = image.to_string();
        let p = on_own_thread(move || async move { store.ensure(&reference, None).await }).await?;
        let key = p
            .rootfs
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| Error::invalid("image file without a name"))?
            .to_string();
        let fstype = p.format.fstype();
        let file = format!("{GUEST_IMAGES}/{key}.{fstype}");
        let target = format!("{GUEST_MOUNTS}/{key}");
        let size = std::fs::metadata(&p.rootfs)
            .map_err(|e| Error::io(format!("reading {}", p.rootfs.display()), e))?
            .len();
        let _one_copy_at_a_time = self.inner.images.lock().await;
        let conn = self.conn("run")?;
        let mounted = Mounted {
            rootfs: target.clone(),
            env: p.config.env_map(),
            workdir: p.config.working_dir.clone().filter(|w| !w.is_empty()),
        };
        if let Some(i) = self.slot_with(&p.info.reference, &p.rootfs).await {
            match conn
                .mount_image(&slots::guest_path(i), fstype, size, &target)
                .await
            {
                Ok(()) => return Ok(mounted),
                // an agent that mounts no slot: the copy below
                Err(AgentError::Remote(e)) if e.kind == ErrorKind::NotFound => {
                    tracing::debug!(slot = i, error = %e.message, "image slot not mounted: copying");
                }
                Err(e) => return Err(self.map_err(e).await),
            }
        }
        match conn.mount_image(&file, fstype, size, &target).await {
            Ok(()) => {}
            Err(AgentError::Remote(e)) if e.kind == ErrorKind::NotFound => {
                // Not in this machine yet (or an interrupted copy): copy it, then mount.
                let bytes = tokio::fs::read(&p.rootfs)
                    .await
                    .map_err(|e| Error::io(format!("reading {}", p.rootfs.display()), e))?;
                if let Err(e) = conn.write_file(&file, &bytes, Some(0o444)).await {
                    return Err(self.map_err(e).await);
                }
                if let Err(e) = conn.mount_image(&file, fstype, size, &target).await {
                    return Err(self.map_err(e).await);
                }
            }
            Err(e) => return Err(self.map_err(e).await),
        }
        Ok(mounted)
    }

    /// The image slot that holds `file` (image `reference`): one that holds it already, or a
    /// free one pointed at it now (`local::slots`). `None`: no slot is free, or the VMM
    /// refused (logged); the image is copied then.
    async fn slot_with(&self, reference: &str, file: &std::path::Path) -> Option<usize> {
        let held = |r: &Record| {
            r.image_slots
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| s.file == file))
        };
        if let Some(i) = held(&self.record()) {
            return Some(i);
        }
        // no branch or checkpoint while a slot changes: they copy the record's slots
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        let free = self.record().image_slots.iter().position(|s| s.is_none())?;
        if let Err(e) = slots::attach(&self.inner.spec.qmp_socket(), free, file).await {
            tracing::warn!(slot = free, error = %e, "cannot point an image slot at the image: copying it");
            return None;
        }
        let slot = SlotRecord {
            reference: reference.to_string(),
            file: file.to_path_buf(),
        };
        self.save_record(|r| {
            if let Some(s) = r.image_slots.get_mut(free) {
                *s = Some(slot);
            }
        })
        .await;
        Some(free)
    }
}

//! `Machine::run(image, argv, opts)` on the local engine: a command in a container of an image
//! inside a running machine.
//!
//! The image comes from the engine's image cache (pulled once per host, as for
//! `MachineConfig.image`). Its read-only block image (erofs) is copied once per machine onto the
//! machine's disk (`/var/lib/smol/images`, so it survives restarts) and mounted once per boot
//! through a loop device (`Op::MountImage`). Each run is an `Op::ExecIn`: the agent gives the
//! command its own mount namespace whose root is an overlay of a fresh tmpfs over the image,
//! with `/proc`, `/dev` and a private `/tmp`; its writes vanish when it ends.

use std::collections::BTreeMap;

use smol_protocol::{ErrorKind, ExecRequest, Op};

use super::agent::AgentError;
use super::on_own_thread;
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
        Ok(Mounted {
            rootfs: target,
            env: p.config.env_map(),
            workdir: p.config.working_dir.clone().filter(|w| !w.is_empty()),
        })
    }
}

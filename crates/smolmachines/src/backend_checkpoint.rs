//! Portable checkpoints on [`Machine`] (SPEC §4.8 `checkpoint`, `restore_checkpoint`,
//! `delete_checkpoint`, §2.2 target inference). Arguments are checked here, before the backend
//! sees any call; what a checkpoint is on each target is the backend's.

use std::path::Path;
use std::sync::Arc;

use super::{backend_for, Backend, Machine};
use crate::config::{CheckpointOptions, ConnectOptions, RestoreOptions, Target};
use crate::error::{Error, Result};
use crate::wire::CheckpointInfo;

/// The target of a checkpoint id (SPEC §4.8 `restore_checkpoint`): with `conn`, SPEC §2.2;
/// without, local when the id is an existing file, ends in `.smolcheckpoint`, is absolute or
/// has a directory part, else the cloud.
pub fn checkpoint_target(id: &str, conn: Option<&ConnectOptions>) -> Target {
    if let Some(c) = conn {
        return c.resolve_target();
    }
    let local = Path::new(id).is_file()
        || id.ends_with(".smolcheckpoint")
        || id.starts_with('/')
        || id.contains('/');
    if local {
        Target::Local
    } else {
        Target::Cloud
    }
}

/// The backend for a checkpoint id and optional connection options.
fn backend_for_id(id: &str, conn: Option<&ConnectOptions>) -> Result<Arc<dyn Backend>> {
    match conn {
        Some(c) => backend_for(c),
        None => backend_for(&ConnectOptions {
            target: Some(checkpoint_target(id, None)),
            ..Default::default()
        }),
    }
}

fn check_id(id: &str) -> Result<()> {
    if id.trim().is_empty() {
        return Err(Error::invalid(
            "a checkpoint id (or file) must not be empty",
        ));
    }
    Ok(())
}

impl Machine {
    /// A portable checkpoint of this running (or paused) machine, which keeps running (SPEC
    /// §4.8). Locally `opts.output` (the `.smolcheckpoint` file to write) is required and the
    /// returned id is its absolute path, status `"available"`; with a `store` directory (made
    /// if missing) the sections go into its content-addressed chunks, shared with every other
    /// checkpoint of that store, and `output` holds the manifest only (`reusedBytes`: what the
    /// store had already). On the cloud the server keeps the checkpoint: `output` or `store` is
    /// an `InvalidConfig` error.
    pub async fn checkpoint(&self, opts: CheckpointOptions) -> Result<CheckpointInfo> {
        match self.target() {
            Target::Local => {
                let Some(out) = &opts.output else {
                    return Err(Error::invalid(
                        "a local checkpoint needs an output path (a .smolcheckpoint file)",
                    ));
                };
                if out.as_os_str().is_empty() {
                    return Err(Error::invalid("the checkpoint output path is empty"));
                }
                if let Some(store) = &opts.store {
                    if store.as_os_str().is_empty() {
                        return Err(Error::invalid("the checkpoint store path is empty"));
                    }
                    if store.exists() && !store.is_dir() {
                        return Err(Error::invalid(format!(
                            "the checkpoint store {} is not a directory",
                            store.display()
                        )));
                    }
                }
            }
            Target::Cloud => {
                if opts.output.is_some() || opts.store.is_some() {
                    return Err(Error::invalid(
                        "a cloud checkpoint is kept by the server: output and store are local \
                         only",
                    ));
                }
            }
        }
        self.inner.checkpoint(&opts).await
    }

    /// The checkpoints of this machine (cloud; locally `NotSupported`).
    pub async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        self.inner.checkpoints().await
    }

    /// A new running machine `name` from checkpoint `id` on the target of
    /// [`checkpoint_target`]: locally a `.smolcheckpoint` file, verified whole (every checksum)
    /// before anything starts; the machine has the checkpointed memory, processes, files and
    /// disk, its own name, hostname, reseeded RNG (unless `keep_identity`) and ports.
    pub async fn restore_checkpoint(
        id: &str,
        name: &str,
        conn: Option<ConnectOptions>,
        opts: RestoreOptions,
    ) -> Result<Machine> {
        check_id(id)?;
        crate::config::validate_name(name)?;
        let backend = backend_for_id(id, conn.as_ref())?;
        Self::restore_checkpoint_on(&*backend, id, name, opts).await
    }

    /// [`Machine::restore_checkpoint`] on `backend`.
    pub async fn restore_checkpoint_on(
        backend: &dyn Backend,
        id: &str,
        name: &str,
        opts: RestoreOptions,
    ) -> Result<Machine> {
        check_id(id)?;
        crate::config::validate_name(name)?;
        if opts.ports.iter().any(|p| p.guest == 0) {
            return Err(Error::invalid("ports must be 1..=65535"));
        }
        match backend.target() {
            Target::Cloud if opts.keep_identity => {
                return Err(Error::NotSupported {
                    message: "keep_identity is local only".into(),
                })
            }
            Target::Local if opts.network.is_some() => {
                return Err(Error::NotSupported {
                    message: "restore's network option is cloud only; a local restore keeps \
                              the checkpointed machine's network setting"
                        .into(),
                })
            }
            _ => {}
        }
        Ok(Machine {
            inner: backend.restore_checkpoint(id, name, &opts).await?,
        })
    }

    /// [`Machine::restore_checkpoint`] with default options (SPEC's alias `restore`).
    pub async fn restore(id: &str, name: &str, conn: Option<ConnectOptions>) -> Result<Machine> {
        Self::restore_checkpoint(id, name, conn, RestoreOptions::default()).await
    }

    /// Removes checkpoint `id` on the target of [`checkpoint_target`]: locally the file
    /// (`NotFound` if it is missing).
    pub async fn delete_checkpoint(id: &str, conn: Option<ConnectOptions>) -> Result<()> {
        check_id(id)?;
        let backend = backend_for_id(id, conn.as_ref())?;
        Self::delete_checkpoint_on(&*backend, id).await
    }

    /// Writes the local checkpoint `source` (one written with a chunk store, or a standalone
    /// file) as one standalone, portable `.smolcheckpoint` file `output` (SPEC §4.8
    /// `export_checkpoint`), after verifying it whole. Returns the bytes written.
    pub async fn export_checkpoint(source: &Path, output: &Path) -> Result<u64> {
        let (source, output) = (source.to_path_buf(), output.to_path_buf());
        tokio::task::spawn_blocking(move || {
            crate::local::checkpoint_store::export_checkpoint(&source, &output)
        })
        .await
        .map_err(|e| Error::io("export_checkpoint", std::io::Error::other(e)))?
    }

    /// Removes the chunks of the local checkpoint store `store` that no checkpoint still names
    /// (SPEC §4.8 `prune_checkpoint_store`); waits for checkpoints being written to it. Returns
    /// the bytes freed.
    pub async fn prune_checkpoint_store(store: &Path) -> Result<u64> {
        let store = store.to_path_buf();
        tokio::task::spawn_blocking(move || {
            crate::local::checkpoint_store::Store::open(&store, false, true)?.prune()
        })
        .await
        .map_err(|e| Error::io("prune_checkpoint_store", std::io::Error::other(e)))?
    }

    /// [`Machine::delete_checkpoint`] on `backend`.
    pub async fn delete_checkpoint_on(backend: &dyn Backend, id: &str) -> Result<()> {
        check_id(id)?;
        backend.delete_checkpoint(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_pick_their_target_without_options() {
        for local in ["/tmp/x.smolcheckpoint", "a/b", "x.smolcheckpoint", "/abs"] {
            assert_eq!(checkpoint_target(local, None), Target::Local, "{local}");
        }
        assert_eq!(checkpoint_target("ckpt-123", None), Target::Cloud);
        let conn = ConnectOptions {
            target: Some(Target::Local),
            ..Default::default()
        };
        assert_eq!(checkpoint_target("ckpt-123", Some(&conn)), Target::Local);
    }

    fn opts(output: &str) -> CheckpointOptions {
        CheckpointOptions {
            output: Some(output.into()),
            store: None,
        }
    }

    #[tokio::test]
    async fn arguments_are_checked_before_the_backend() {
        let b = crate::fake::FakeBackend::new();
        let m = Machine::create_on(
            &b,
            crate::MachineConfig {
                name: Some("src".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let before = b.calls().len();
        let e = m
            .checkpoint(CheckpointOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG", "{e}");
        let e = m
            .checkpoint(CheckpointOptions {
                output: Some("/tmp/x.smolcheckpoint".into()),
                store: Some("".into()),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG", "{e}");
        let e = m
            .checkpoint(CheckpointOptions {
                output: Some("/tmp/x.smolcheckpoint".into()),
                store: Some("/etc/hostname".into()),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG", "{e}");
        for (id, name) in [("", "ok"), ("/tmp/x.smolcheckpoint", "Bad Name")] {
            let e = Machine::restore_checkpoint_on(&b, id, name, RestoreOptions::default())
                .await
                .unwrap_err();
            assert_eq!(e.code(), "INVALID_CONFIG", "{id:?} {name:?}: {e}");
        }
        let e = Machine::restore_checkpoint_on(
            &b,
            "/tmp/x.smolcheckpoint",
            "ok",
            RestoreOptions {
                network: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "NOT_SUPPORTED", "{e}");
        let e = Machine::delete_checkpoint_on(&b, " ").await.unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG", "{e}");
        assert_eq!(b.calls().len(), before, "{:?}", b.calls());
    }

    #[tokio::test]
    async fn a_checkpoint_restores_deletes_once_and_names_stay_unique() {
        let b = crate::fake::FakeBackend::new();
        let m = Machine::create_on(
            &b,
            crate::MachineConfig {
                name: Some("src".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        m.write_file("/a", "one", None).await.unwrap();
        let c = m.checkpoint(opts("/tmp/f.smolcheckpoint")).await.unwrap();
        assert_eq!(
            (c.id.as_str(), c.status.as_str(), c.machine_id.as_str()),
            ("/tmp/f.smolcheckpoint", "available", "src")
        );
        assert_eq!(m.checkpoints().await.unwrap(), vec![c.clone()]);
        m.write_file("/a", "two", None).await.unwrap();
        let r = Machine::restore_checkpoint_on(&b, &c.id, "dst", RestoreOptions::default())
            .await
            .unwrap();
        assert_eq!(r.read_file("/a").await.unwrap(), b"one");
        let e = Machine::restore_checkpoint_on(&b, &c.id, "src", RestoreOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "CONFLICT", "{e}");
        Machine::delete_checkpoint_on(&b, &c.id).await.unwrap();
        let e = Machine::delete_checkpoint_on(&b, &c.id).await.unwrap_err();
        assert_eq!(e.code(), "NOT_FOUND", "{e}");
        let e = Machine::restore_checkpoint_on(&b, &c.id, "dst2", RestoreOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "NOT_FOUND", "{e}");
    }
}

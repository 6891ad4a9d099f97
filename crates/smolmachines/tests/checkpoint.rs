//! VM tests of portable checkpoints (issue 12, local engine): real QEMU microVMs, a
//! `.smolcheckpoint` file written from a running branchable machine, restored into new ones.
//! Run with the agent of this tree (the restored identity needs protocol generation 4):
//! `SMOL_INITRD=$(scripts/dev-initramfs.sh) cargo test --release -p smolmachines --test
//! checkpoint`.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{config, engine, run};
use smolmachines::local::{checkpoint_file, LocalBackend, LocalMachine};
use smolmachines::{
    CheckpointOptions, Error, ExecOptions, Machine, MachineBackend, MachineState, RestoreOptions,
};

/// A running branchable machine named `name` (256 MiB).
async fn source(engine: &LocalBackend, name: &str) -> LocalMachine {
    let mut c = config(Some(name));
    c.branchable = Some(true);
    c.resources.memory_mb = Some(256);
    engine
        .create_machine(c)
        .await
        .expect("create a branchable machine")
}

/// stdout of `script`, which must succeed.
async fn out(m: &LocalMachine, script: &str) -> String {
    let r = run(m, script).await;
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout.trim().to_string()
}

fn to(path: &Path) -> CheckpointOptions {
    CheckpointOptions {
        output: Some(path.to_path_buf()),
        store: None,
    }
}

async fn restore(engine: &LocalBackend, path: &Path, name: &str) -> smolmachines::Result<Machine> {
    Machine::restore_checkpoint_on(
        engine,
        path.to_str().unwrap(),
        name,
        RestoreOptions::default(),
    )
    .await
}

/// What identifies the machine's state: a RAM file's and a disk file's sha256, the background
/// process.
const STATE: &str = "sha256sum /dev/shm/r /root/d | cut -d' ' -f1 | tr '\\n' ' '; \
                     for p in /proc/[0-9]*; do \
                     grep -q 3133[7] $p/cmdline 2>/dev/null && echo proc && break; done";

async fn exec_out(m: &Machine, script: &str) -> String {
    let r = m
        .exec(
            &common::sh(script),
            ExecOptions {
                timeout: Some(std::time::Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout.trim().to_string()
}

#[tokio::test]
async fn a_restored_machine_has_the_memory_disk_and_processes_and_its_own_identity() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "ck-src").await;
    out(
        &src,
        "head -c 3000000 /dev/urandom > /dev/shm/r && head -c 2000000 /dev/urandom > /root/d",
    )
    .await;
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    src.exec(&common::sh("exec sleep 31337"), &bg)
        .await
        .expect("a background process");
    let before = out(&src, STATE).await;
    assert!(before.ends_with("proc"), "{before}");
    let file = dir.path().join("a.smolcheckpoint");
    let handle = Machine::from_backend(Arc::new(src.clone()));
    let info = handle.checkpoint(to(&file)).await.expect("checkpoint");
    assert_eq!(info.id, file.display().to_string());
    assert_eq!(info.path.as_deref(), Some(info.id.as_str()));
    assert_eq!(info.status, "available");
    assert_eq!(info.machine_id, "ck-src");
    assert_eq!(info.size_bytes, std::fs::metadata(&file).unwrap().len());
    assert!(info.source_pause_ms.is_some() && info.elapsed_ms.is_some());
    // no scratch file is left next to it
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("smolcheckpoint"))
        .collect();
    assert_eq!(names, ["a.smolcheckpoint"]);
    // the source goes on
    assert_eq!(handle.state().await.unwrap(), MachineState::Running);
    assert_eq!(out(&src, STATE).await, before);
    out(&src, "echo later > /root/later").await;

    let r1 = restore(&engine, &file, "ck-r1").await.expect("restore");
    assert_eq!(exec_out(&r1, STATE).await, before);
    assert_eq!(exec_out(&r1, "hostname").await, "ck-r1");
    assert_eq!(
        exec_out(&r1, "test -e /root/later || echo absent").await,
        "absent"
    );
    let rnd = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert_ne!(exec_out(&r1, rnd).await, out(&src, rnd).await);
    // a restored machine is a machine like any other: files, a checkpoint of its own
    r1.write_file("/root/w", "w", None).await.unwrap();
    assert_eq!(r1.read_file("/root/w").await.unwrap(), b"w");
    assert!(r1.ports().is_empty());

    // the checkpoint does not need its source
    src.delete().await.unwrap();
    let r2 = restore(&engine, &file, "ck-r2")
        .await
        .expect("restore again");
    assert_eq!(exec_out(&r2, STATE).await, before);
    assert_eq!(exec_out(&r2, "hostname").await, "ck-r2");
    let e = restore(&engine, &file, "ck-r2").await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    // the refused restore left ck-r2 running
    assert_eq!(exec_out(&r2, "echo ok").await, "ok");
    r1.delete().await.unwrap();
    r2.delete().await.unwrap();
    Machine::delete_checkpoint_on(&engine, file.to_str().unwrap())
        .await
        .unwrap();
    assert!(!file.exists());
    let e = Machine::delete_checkpoint_on(&engine, file.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
}

/// Nothing of machine `name` is left: no record, no run or home directory.
async fn nothing_of(engine: &LocalBackend, name: &str) {
    let listed = engine.list_machines(&Default::default()).await.unwrap();
    assert!(listed.iter().all(|m| m.name != name), "{listed:?}");
    for d in [
        engine.run_dir().join("machines").join(name),
        engine.home().join("machines").join(name),
    ] {
        assert!(!d.exists(), "{} is left", d.display());
    }
    assert!(engine.live_machine(name).is_none());
}

#[tokio::test]
async fn damaged_checkpoints_are_refused_before_anything_starts() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "ck-dmg").await;
    out(&src, "head -c 100000 /dev/urandom > /root/d").await;
    let file = dir.path().join("d.smolcheckpoint");
    src.checkpoint(&to(&file)).await.expect("checkpoint");
    let bytes = std::fs::read(&file).unwrap();
    let v = checkpoint_file::verify(&file).unwrap();
    let last = v.manifest.sections.last().unwrap();
    let manifest_at = last.offset + last.length;
    let mut damaged: Vec<(String, Vec<u8>)> = v
        .manifest
        .sections
        .iter()
        .map(|s| {
            let mut b = bytes.clone();
            b[(s.offset + s.length / 2) as usize] ^= 1;
            (s.name.clone(), b)
        })
        .collect();
    let mut b = bytes.clone();
    b[manifest_at as usize + 5] ^= 1;
    damaged.push(("manifest".into(), b));
    damaged.push(("truncated".into(), bytes[..bytes.len() - 4096].to_vec()));
    for (i, (what, b)) in damaged.into_iter().enumerate() {
        let p = dir.path().join(format!("bad-{what}.smolcheckpoint"));
        std::fs::write(&p, b).unwrap();
        let name = format!("ck-bad{i}");
        let e = restore(&engine, &p, &name).await.unwrap_err();
        let Error::InvalidCheckpoint { path, reason } = &e else {
            panic!("{what}: {e:?}");
        };
        assert_eq!(path, &p, "{what}");
        if !matches!(what.as_str(), "manifest" | "truncated") {
            assert!(reason.contains(&what), "{what}: {reason}");
        }
        assert_eq!(e.code(), "INVALID_CONFIG");
        nothing_of(&engine, &name).await;
    }
    // the undamaged file still restores
    let ok = restore(&engine, &file, "ck-good").await.expect("restore");
    assert_eq!(exec_out(&ok, "hostname").await, "ck-good");
    ok.delete().await.unwrap();
    src.delete().await.unwrap();
}

#[tokio::test]
async fn what_cannot_be_checkpointed_or_restored_is_a_typed_error() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let plain = engine
        .create_machine(config(Some("ck-plain")))
        .await
        .unwrap();
    let handle = Machine::from_backend(Arc::new(plain.clone()));
    let e = handle
        .checkpoint(CheckpointOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let file = dir.path().join("p.smolcheckpoint");
    let e = handle.checkpoint(to(&file)).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidState { state, .. } if state.contains("not checkpointable")),
        "{e:?}"
    );
    assert!(!file.exists());
    let e = handle
        .checkpoint(to(&dir.path().join("no/such/dir/x.smolcheckpoint")))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let missing = dir.path().join("missing.smolcheckpoint");
    let e = restore(&engine, &missing, "ck-none").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let e = Machine::delete_checkpoint_on(&engine, missing.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    // a file that is not a checkpoint is neither restored nor deleted
    let other = dir.path().join("other.smolcheckpoint");
    std::fs::write(&other, b"not a checkpoint").unwrap();
    let e = Machine::delete_checkpoint_on(&engine, other.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidCheckpoint { .. }), "{e:?}");
    assert!(other.exists());
    nothing_of(&engine, "ck-none").await;
    plain.delete().await.unwrap();
}

#[tokio::test]
async fn a_paused_machine_stays_paused_and_a_frozen_base_is_checkpointed_from_its_files() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "ck-pz").await;
    out(&src, "echo paused > /root/p").await;
    let handle = Machine::from_backend(Arc::new(src.clone()));
    handle.pause().await.unwrap();
    let file = dir.path().join("p.smolcheckpoint");
    let info = handle.checkpoint(to(&file)).await.expect("checkpoint");
    assert_eq!(
        info.source_pause_ms,
        Some(0),
        "a paused machine is not paused again"
    );
    assert_eq!(handle.state().await.unwrap(), MachineState::Paused);
    let r = restore(&engine, &file, "ck-pz-r").await.expect("restore");
    assert_eq!(exec_out(&r, "cat /root/p").await, "paused");
    handle.resume().await.unwrap();
    assert_eq!(out(&src, "cat /root/p").await, "paused");
    // the source becomes a frozen base: its checkpoint needs no pause window
    let (clone, _) = src
        .branch_machine(
            "ck-pz-c",
            &smolmachines::BranchOptions {
                freeze_source: true,
                ..Default::default()
            },
        )
        .await
        .expect("freeze");
    assert_eq!(handle.state().await.unwrap(), MachineState::Frozen);
    let file2 = dir.path().join("f.smolcheckpoint");
    let info = handle
        .checkpoint(to(&file2))
        .await
        .expect("checkpoint of a base");
    assert_eq!(info.source_pause_ms, Some(0));
    let r2 = restore(&engine, &file2, "ck-pz-f").await.expect("restore");
    assert_eq!(
        exec_out(&r2, "cat /root/p; hostname").await,
        "paused\nck-pz-f"
    );
    for m in [r, r2] {
        m.delete().await.unwrap();
    }
    clone.delete().await.unwrap();
    src.delete().await.unwrap();
}

/// The RAM file's and the disk file's sha256.
const SUMS: &str = "sha256sum /dev/shm/r /root/d";

#[tokio::test]
async fn checkpoints_into_a_chunk_store_share_chunks_restore_export_and_prune() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "ck-store").await;
    out(&src, "head -c 20000000 /dev/urandom > /dev/shm/r && head -c 2000000 /dev/urandom > /root/d && sync").await;
    let store = dir.path().join("store");
    let opts = |name: &str| CheckpointOptions {
        output: Some(dir.path().join(name)),
        store: Some(store.clone()),
    };
    let handle = Machine::from_backend(Arc::new(src.clone()));
    let before = out(&src, SUMS).await;
    let a = handle
        .checkpoint(opts("a.smolcheckpoint"))
        .await
        .expect("checkpoint a");
    let a_path = dir.path().join("a.smolcheckpoint");
    // the file is the manifest only; the bytes are in the store
    assert!(a.size_bytes < 1 << 20, "{a:?}");
    assert_eq!(a.reused_bytes, Some(0), "{a:?}");
    // a second checkpoint of the same machine, a little later: most chunks are there already
    out(&src, "echo more > /root/more").await;
    let b = handle
        .checkpoint(opts("b.smolcheckpoint"))
        .await
        .expect("checkpoint b");
    let reused = b.reused_bytes.expect("reused bytes");
    assert!(reused >= 20_000_000, "{b:?}");

    let r = restore(&engine, &a_path, "ck-store-r")
        .await
        .expect("restore from the store");
    assert_eq!(exec_out(&r, SUMS).await, before);
    assert_eq!(
        exec_out(&r, "test -e /root/more || echo absent").await,
        "absent"
    );
    r.delete().await.unwrap();

    // export: one standalone file, restorable with the store gone
    let exported = dir.path().join("a-export.smolcheckpoint");
    let n = Machine::export_checkpoint(&a_path, &exported)
        .await
        .expect("export");
    assert_eq!(n, std::fs::metadata(&exported).unwrap().len());
    assert!(n > 20_000_000, "{n}");
    let moved = dir.path().join("store-away");
    std::fs::rename(&store, &moved).unwrap();
    let e = restore(&engine, &a_path, "ck-store-gone")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidCheckpoint { .. }), "{e:?}");
    nothing_of(&engine, "ck-store-gone").await;
    let r = restore(&engine, &exported, "ck-store-x")
        .await
        .expect("restore the export");
    assert_eq!(exec_out(&r, SUMS).await, before);
    r.delete().await.unwrap();
    std::fs::rename(&moved, &store).unwrap();

    // prune: nothing while both checkpoints are there; a's own chunks after it is deleted
    assert_eq!(Machine::prune_checkpoint_store(&store).await.unwrap(), 0);
    Machine::delete_checkpoint_on(&engine, a_path.to_str().unwrap())
        .await
        .unwrap();
    let freed = Machine::prune_checkpoint_store(&store).await.unwrap();
    assert!(freed > 0, "a's own chunks");
    let b_path = dir.path().join("b.smolcheckpoint");
    checkpoint_file::verify(&b_path).expect("b is whole after the prune");
    let r = restore(&engine, &b_path, "ck-store-b")
        .await
        .expect("restore b");
    assert_eq!(exec_out(&r, "cat /root/more").await, "more");
    r.delete().await.unwrap();
    src.delete().await.unwrap();
}

//! Input hygiene against real VMs (issue 10): what a caller sends that the guest cannot take is
//! a typed `InvalidConfig` (or `NotFound`) on the host before anything runs, and the space a
//! guest frees on its disk goes back to the host.

mod common;

use std::time::{Duration, Instant};

use common::{argv, config, engine, sh};
use smolmachines::{Error, ExecOptions, Machine, MountSpec, MAX_WAIT};

fn invalid(e: Error) -> String {
    match e {
        Error::InvalidConfig { message } => message,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

fn env_opts(k: &str, v: &str) -> ExecOptions {
    ExecOptions {
        env: [(k.to_string(), v.to_string())].into(),
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    }
}

/// NUL bytes in argv or env, env names with `=` or empty, are refused naming the argument or
/// the name (before: exit 126/127 from the guest, or `{"A=B": "c"}` read as `A="B=c"`); a huge
/// timeout is the longest wait, not an error; the machine is untouched by what was refused.
#[tokio::test]
async fn argv_and_env_the_guest_cannot_take_are_refused_on_the_host() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = Machine::create_on(&engine, config(None)).await.unwrap();
    let t0 = Instant::now();
    let e = m
        .exec(&argv(&["echo", "a", "b\0c"]), ExecOptions::default())
        .await
        .unwrap_err();
    let msg = invalid(e);
    assert!(msg.contains("argument 2") && msg.contains("NUL"), "{msg}");
    let e = m
        .exec(&argv(&["ec\0ho"]), ExecOptions::default())
        .await
        .unwrap_err();
    assert!(invalid(e).contains("argument 0"));
    let e = m
        .exec(&argv(&["env"]), env_opts("A=B", "c"))
        .await
        .unwrap_err();
    let msg = invalid(e);
    assert!(msg.contains("\"A=B\"") && msg.contains("'='"), "{msg}");
    let e = m
        .exec(&argv(&["env"]), env_opts("", "c"))
        .await
        .unwrap_err();
    assert!(invalid(e).contains("\"\" is empty"));
    let e = m
        .exec(&argv(&["env"]), env_opts("V", "x\0y"))
        .await
        .unwrap_err();
    let msg = invalid(e);
    assert!(msg.contains("\"V\"") && msg.contains("NUL"), "{msg}");
    let Err(e) = m
        .exec_stream(&argv(&["echo", "\0"]), ExecOptions::default())
        .await
    else {
        panic!("exec_stream of a NUL argument is refused");
    };
    assert!(invalid(e).contains("argument 1"));
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refused on the host, at once: {:?}",
        t0.elapsed()
    );
    // a huge timeout (what `timeout=1e300` becomes) runs the command
    let huge = ExecOptions {
        timeout: Some(MAX_WAIT),
        env: [("A".to_string(), "B=c".to_string())].into(),
        ..Default::default()
    };
    let r = m.exec(&sh("echo \"$A\""), huge).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "B=c\n"), "{r:?}");
    m.delete().await.unwrap();
}

fn mount(source: &str, target: &str) -> MountSpec {
    MountSpec {
        source: source.into(),
        target: target.into(),
        read_only: false,
        staged: false,
    }
}

/// Mount targets the guest kernel owns (`/proc`, `/sys`, `/dev`, below them, `/`) are
/// `InvalidConfig`; a missing host directory is `NotFound` naming it, a relative one or a file
/// `InvalidConfig` (before: accepted and a broken guest, or the base `MOUNT_ERROR`). Nothing
/// is left behind, and a good mount still works.
#[tokio::test]
async fn mount_errors_are_typed_and_kernel_paths_are_refused() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("f"), "from the host\n").unwrap();
    let src = share.display().to_string();
    let create = |mounts: Vec<MountSpec>| {
        let mut cfg = config(Some("mnt"));
        cfg.mounts = mounts;
        Machine::create_on(&engine, cfg)
    };
    for target in ["/proc", "/sys/kernel", "/dev", "/dev/shm/", "/"] {
        let e = create(vec![mount(&src, target)]).await.err().unwrap();
        let msg = invalid(e);
        assert!(msg.contains("mount target"), "{target}: {msg}");
    }
    let e = create(vec![mount("/no/such/dir", "/w")])
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), "NOT_FOUND", "{e:?}");
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
    let e = create(vec![mount("rel/dir", "/w")]).await.err().unwrap();
    assert!(invalid(e).contains("absolute"));
    let file = share.join("f").display().to_string();
    let e = create(vec![mount(&file, "/w")]).await.err().unwrap();
    assert!(invalid(e).contains("not a directory"));
    assert!(
        !dir.path().join("machines/mnt").exists(),
        "a refused create leaves nothing"
    );
    let m = create(vec![mount(&src, "/mnt/share")]).await.unwrap();
    let r = m
        .exec(&argv(&["cat", "/mnt/share/f"]), ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "from the host\n", "{r:?}");
    m.delete().await.unwrap();
}

/// Bytes of the file that the host has allocated (`du`), not its apparent size.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A file the guest writes and removes gives its space back to the host: discard goes from
/// the ext4 under the overlay through virtio-blk to the qcow2 (before: the qcow2 kept every
/// byte ever written).
#[tokio::test]
async fn space_freed_in_the_guest_is_given_back_to_the_host() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let m = Machine::create_on(&engine, config(Some("trim")))
        .await
        .unwrap();
    let qcow = dir.path().join("machines/trim/disk.qcow2");
    let opts = || ExecOptions {
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let base = allocated(&qcow);
    let r = m
        .exec(
            &sh("dd if=/dev/urandom of=/root/big bs=1M count=200 2>&1 && sync"),
            opts(),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let full = allocated(&qcow);
    assert!(
        full >= base + (190 << 20),
        "200 MB written reach the qcow2: {base} -> {full}"
    );
    let r = m.exec(&sh("rm /root/big && sync"), opts()).await.unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    // online discard is asynchronous in ext4 (at the journal commit): give it a few seconds
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = allocated(&qcow);
    while after > base + (50 << 20) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = allocated(&qcow);
    }
    eprintln!(
        "qcow2 allocated: {} MiB before, {} MiB with the file, {} MiB after rm",
        base >> 20,
        full >> 20,
        after >> 20
    );
    assert!(
        after <= base + (50 << 20),
        "the freed 200 MB went back to the host: {base} -> {full} -> {after} bytes"
    );
    m.delete().await.unwrap();
}

/// A machine that cannot boot is `BootFailed` whose hint says where its log is (the error's
/// `log_tail`, which the bindings expose as `e.log_tail` / `err.logTail`), not "check the log
/// above", which only the CLI prints.
#[tokio::test]
async fn boot_failed_says_where_its_log_is() {
    let Some(mut assets) = common::vm_assets() else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("smt")
        .tempdir_in("/tmp")
        .unwrap();
    let bogus = dir.path().join("not-an-initramfs.cpio");
    std::fs::write(&bogus, b"not a cpio archive").unwrap();
    assets.initrd = bogus;
    let engine = smolmachines::local::LocalBackend::at(dir.path()).with_assets(assets);
    let mut cfg = config(None);
    cfg.ready_timeout = Some(Duration::from_secs(20));
    let e = Machine::create_on(&engine, cfg).await.err().unwrap();
    let Error::BootFailed { log_tail, .. } = &e else {
        panic!("expected BootFailed, got {e:?}");
    };
    assert!(!log_tail.trim().is_empty(), "the console's last lines");
    let hint = e.hint().unwrap_or_default();
    assert!(
        hint.contains("log_tail") && hint.contains("e.log_tail") && !hint.contains("log above"),
        "{hint}"
    );
}

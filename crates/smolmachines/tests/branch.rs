//! VM tests of pause / resume and branch (issue 12, local engine): real QEMU microVMs, a
//! branchable source's RAM in a file on tmpfs, clones started from its frozen copy.
//! Run with the agent of this tree: `SMOL_INITRD=$(scripts/dev-initramfs.sh) cargo test
//! --release -p smolmachines --test branch` (the clone's identity needs protocol generation 4).

mod common;

use std::sync::Arc;

use common::{config, engine, qemu_processes_in, run};
use smolmachines::local::{LocalBackend, LocalMachine};
use smolmachines::{BranchOptions, Error, ExecOptions, Machine, MachineBackend, MachineState};

/// A branchable machine named `name`.
async fn source(engine: &LocalBackend, name: &str) -> LocalMachine {
    let mut c = config(Some(name));
    c.branchable = Some(true);
    c.resources.memory_mb = Some(256);
    engine
        .create_machine(c)
        .await
        .expect("create a branchable machine")
}

async fn branch(src: &LocalMachine, name: &str) -> LocalMachine {
    src.branch_machine(name, &BranchOptions::default())
        .await
        .unwrap_or_else(|e| panic!("branch {name}: {e}"))
        .0
}

/// stdout of `script`, which must succeed.
async fn out(m: &LocalMachine, script: &str) -> String {
    let r = run(m, script).await;
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout.trim().to_string()
}

fn invalid_state(e: &Error) -> Option<&str> {
    match e {
        Error::InvalidState { state, .. } => Some(state),
        _ => None,
    }
}

#[tokio::test]
async fn pause_resume_and_what_a_paused_machine_refuses() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(Some("pz"))).await.unwrap();
    let handle = Machine::from_backend(Arc::new(m.clone()));
    out(&m, "echo 1 > /tmp/before").await;
    handle.pause().await.unwrap();
    assert_eq!(handle.state().await.unwrap(), MachineState::Paused);
    assert_eq!(handle.state().await.unwrap().as_str(), "paused");
    assert!(!handle.ready().await.unwrap());
    handle
        .pause()
        .await
        .expect("pausing a paused machine is a no-op");
    let e = handle
        .exec(&common::sh("true"), ExecOptions::default())
        .await
        .unwrap_err();
    assert_eq!(invalid_state(&e), Some("paused"), "{e:?}");
    assert!(e.to_string().contains("paused"), "{e}");
    let e = handle.read_file("/tmp/before").await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("paused"), "{e:?}");
    let e = handle.write_file("/tmp/x", b"x", None).await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("paused"), "{e:?}");
    // the VMM is still there, with its memory
    assert!(m.pid().is_some_and(smolmachines::local::record::pid_alive));
    handle.resume().await.unwrap();
    assert_eq!(handle.state().await.unwrap(), MachineState::Running);
    assert_eq!(out(&m, "cat /tmp/before").await, "1");
    handle
        .resume()
        .await
        .expect("resuming a running machine is a no-op");
    // a paused machine stops (cleanly: resumed first) and boots again
    handle.pause().await.unwrap();
    handle.stop().await.unwrap();
    assert_eq!(handle.state().await.unwrap(), MachineState::Stopped);
    let e = handle.pause().await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("stopped"), "{e:?}");
    let e = handle.resume().await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("stopped"), "{e:?}");
    handle.start().await.unwrap();
    assert_eq!(out(&m, "echo up").await, "up");
    // and a paused machine is deleted
    handle.pause().await.unwrap();
    handle.delete().await.unwrap();
    assert_eq!(handle.state().await.unwrap(), MachineState::Deleted);
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

#[tokio::test]
async fn a_clone_has_the_sources_memory_and_disk_then_they_diverge() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "bsrc").await;
    // random data in the guest's tmpfs (RAM) and on its disk, and a process that runs on
    let mem = out(
        &src,
        "head -c 24000000 /dev/urandom > /tmp/mem && sha256sum /tmp/mem | cut -d' ' -f1",
    )
    .await;
    let disk = out(
        &src,
        "mkdir -p /data && head -c 8000000 /dev/urandom > /data/disk && \
         sha256sum /data/disk | cut -d' ' -f1",
    )
    .await;
    let r = src
        .exec(
            &common::sh("while true; do sleep 1; done"),
            &ExecOptions {
                background: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let pid = r.pid.expect("a background pid");
    // through the seam, as every front end calls it
    let clone = Machine::from_backend(Arc::new(src.clone()))
        .branch("bclone", Vec::new())
        .await
        .unwrap();
    assert_eq!(clone.name(), "bclone");
    assert_eq!(clone.state().await.unwrap(), MachineState::Running);
    let clone = engine
        .live_machine("bclone")
        .expect("the clone is a live machine");
    // the source kept running
    assert_eq!(src.state().await.unwrap(), MachineState::Running);
    for m in [&src, &clone] {
        assert_eq!(
            out(m, "sha256sum /tmp/mem | cut -d' ' -f1").await,
            mem,
            "{}",
            m.dir().display()
        );
        assert_eq!(out(m, "sha256sum /data/disk | cut -d' ' -f1").await, disk);
        // the background process was copied with the memory
        assert_eq!(
            out(m, &format!("kill -0 {pid} && echo alive")).await,
            "alive"
        );
    }
    assert_eq!(
        out(&clone, "hostname; cat /etc/hostname").await,
        "bclone\nbclone"
    );
    assert_eq!(out(&src, "hostname").await, "bsrc");
    // diverge: each one's writes are its own, in memory and on disk
    out(
        &src,
        "echo src > /tmp/who; echo src > /data/who; echo only-src > /tmp/s; sync",
    )
    .await;
    out(
        &clone,
        "echo clone > /tmp/who; echo clone > /data/who; sync",
    )
    .await;
    for (m, who) in [(&src, "src"), (&clone, "clone")] {
        // dropping the page cache makes the disk answer
        assert_eq!(
            out(
                m,
                "echo 3 > /proc/sys/vm/drop_caches; cat /tmp/who /data/who"
            )
            .await,
            format!("{who}\n{who}")
        );
    }
    let r = run(&clone, "cat /tmp/s").await;
    assert_ne!(
        r.exit_code, 0,
        "a file written in the source after the branch: {r:?}"
    );
    assert_eq!(
        out(
            &clone,
            "echo 3 > /proc/sys/vm/drop_caches; sha256sum /data/disk | cut -d' ' -f1"
        )
        .await,
        disk
    );
    // files through the agent
    clone
        .write_file("/tmp/f", b"clone file", None)
        .await
        .unwrap();
    assert_eq!(clone.read_file("/tmp/f").await.unwrap(), b"clone file");
    assert!(src.read_file("/tmp/f").await.is_err());
    // the source deleted: the clone keeps working, its disk layers are its own
    src.delete().await.unwrap();
    assert_eq!(
        out(
            &clone,
            "echo 3 > /proc/sys/vm/drop_caches; sha256sum /data/disk /tmp/mem | cut -d' ' -f1"
        )
        .await,
        format!("{disk}\n{mem}")
    );
    out(&clone, "head -c 4000000 /dev/urandom > /data/more && sync").await;
    // stop and boot again: a cold boot of the clone's own disk chain
    clone.stop().await.unwrap();
    clone.start().await.unwrap();
    assert_eq!(
        out(&clone, "cat /data/who; hostname").await,
        "clone\nbclone"
    );
    assert_eq!(
        out(&clone, "sha256sum /data/disk | cut -d' ' -f1").await,
        disk
    );
    clone.delete().await.unwrap();
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

#[tokio::test]
async fn two_clones_read_different_random_bytes() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "rsrc").await;
    let a = branch(&src, "ra").await;
    let b = branch(&src, "rb").await;
    let read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb, rs) = (
        out(&a, read).await,
        out(&b, read).await,
        out(&src, read).await,
    );
    assert_eq!(ra.len(), 64, "{ra}");
    assert_ne!(ra, rb, "two clones produced the same random bytes");
    assert_ne!(ra, rs);
    assert_ne!(rb, rs);
    assert_eq!(out(&a, "hostname").await, "ra");
    assert_eq!(out(&b, "hostname").await, "rb");
    for m in [a, b, src] {
        m.delete().await.unwrap();
    }
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

/// The kernel reseeds its CRNG from the input pool at most every 60 s once it has been up for
/// 120 s (before that, every half uptime): only then would two clones of one source, without
/// the reseed of `Op::Identity`, read the same bytes. So this one waits for that uptime (a
/// wait, not a timing assertion; ~2 minutes).
#[tokio::test]
async fn clones_of_a_long_running_source_read_different_random_bytes() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "lsrc").await;
    let wait = "while [ $(cut -d. -f1 /proc/uptime) -lt 125 ]; do sleep 1; done; echo up";
    let r = src
        .exec(
            &common::sh(wait),
            &ExecOptions {
                timeout: Some(std::time::Duration::from_secs(300)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "up\n", "{r:?}");
    let a = branch(&src, "la").await;
    let b = branch(&src, "lb").await;
    let read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ra, rb) = (out(&a, read).await, out(&b, read).await);
    assert_eq!(ra.len(), 64, "{ra}");
    assert_ne!(ra, rb, "two clones produced the same random bytes");
    for m in [a, b, src] {
        m.delete().await.unwrap();
    }
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

/// A command running in the source at the branch instant runs to its end there; in the clone,
/// the agent session it belonged to ends, so its copy is killed (docs/BRANCH.md); both channels
/// carry on.
#[tokio::test]
async fn a_command_running_at_the_branch_goes_on_in_the_source_only() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "esrc").await;
    let mut stream = src
        .exec_stream(
            &common::sh("echo start; sleep 3; echo end; touch /tmp/ended"),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    match stream.next_event().await {
        Some(smolmachines::ExecEvent::Stdout(b)) => assert_eq!(b, b"start\n"),
        other => panic!("{other:?}"),
    }
    let clone = branch(&src, "eclone").await;
    let mut rest = Vec::new();
    let code = loop {
        match stream.next_event().await {
            Some(smolmachines::ExecEvent::Stdout(b)) => rest.extend(b),
            Some(smolmachines::ExecEvent::Exit(c)) => break c,
            other => panic!("the source's command: {other:?}"),
        }
    };
    assert_eq!((code, rest.as_slice()), (0, b"end\n".as_slice()));
    // in the clone, no copy of the command is left, and it never finished
    let r = run(
        &clone,
        "sleep 4; ps -o args | grep -c '^sleep 3' ; ls /tmp/ended",
    )
    .await;
    assert_eq!(r.stdout, "0\n", "{r:?}");
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert_eq!(out(&src, "ls /tmp/ended").await, "/tmp/ended");
    for m in [clone, src] {
        m.delete().await.unwrap();
    }
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

#[tokio::test]
async fn what_cannot_be_branched_is_a_typed_error() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let opts = BranchOptions::default();
    // not branchable
    let plain = engine.create_machine(config(Some("nb"))).await.unwrap();
    let e = plain.branch_machine("nb-c", &opts).await.unwrap_err();
    assert!(
        invalid_state(&e).is_some_and(|s| s.contains("not branchable")),
        "{e:?}"
    );
    assert_eq!(e.code(), "INVALID_STATE");
    assert!(engine.live_machine("nb-c").is_none());
    plain.delete().await.unwrap();
    // branchable, but paused, then stopped
    let src = source(&engine, "bs").await;
    MachineBackend::pause(&src).await.unwrap();
    let e = src.branch_machine("bs-c", &opts).await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("paused"), "{e:?}");
    MachineBackend::resume(&src).await.unwrap();
    MachineBackend::stop(&src).await.unwrap();
    let e = src.branch_machine("bs-c", &opts).await.unwrap_err();
    assert_eq!(invalid_state(&e), Some("stopped"), "{e:?}");
    // a stopped branch source boots again (a fresh RAM file) and branches
    MachineBackend::start(&src).await.unwrap();
    out(&src, "echo again > /tmp/a").await;
    // the name of an existing machine
    let e = src.branch_machine("bs", &opts).await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    let c = branch(&src, "bs-c").await;
    assert_eq!(out(&c, "cat /tmp/a").await, "again");
    // the refused branches left nothing behind
    c.delete().await.unwrap();
    src.delete().await.unwrap();
    assert_eq!(qemu_processes_in(dir.path()), 0);
    assert!(engine
        .list_machines(&Default::default())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_source_with_mounts_is_refused_at_branch_time() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    if !std::path::Path::new(&smolmachines::local::mounts::virtiofsd()).exists() {
        eprintln!("skipping: no virtiofsd");
        return;
    }
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("f"), "host").unwrap();
    let mut c = config(Some("bm"));
    c.branchable = Some(true);
    c.mounts = vec![smolmachines::MountSpec {
        source: share.path().display().to_string(),
        target: "/mnt/share".into(),
        read_only: true,
        staged: false,
    }];
    let m = engine.create_machine(c).await.unwrap();
    assert_eq!(out(&m, "cat /mnt/share/f").await, "host");
    let e = m
        .branch_machine("bm-c", &BranchOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    assert!(e.to_string().contains("mounts"), "{e}");
    m.delete().await.unwrap();
    // virtiofsd (its path has "qemu" in it) is reaped in the background: give it a moment
    for _ in 0..100 {
        if qemu_processes_in(dir.path()) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

#[tokio::test]
async fn clones_of_clones_and_sixteen_at_once() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "gen0").await;
    out(
        &src,
        "mkdir -p /data && echo 0 > /data/gen && echo 0 > /tmp/gen && sync",
    )
    .await;
    let (g1, _) = src
        .branch_machine(
            "gen1",
            &BranchOptions {
                branchable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    out(&g1, "echo 1 >> /data/gen && echo 1 >> /tmp/gen && sync").await;
    let g2 = branch(&g1, "gen2").await;
    // the middle generation and the source go: the grandchild's chain is its own
    g1.delete().await.unwrap();
    src.delete().await.unwrap();
    assert_eq!(
        out(
            &g2,
            "echo 3 > /proc/sys/vm/drop_caches; cat /data/gen /tmp/gen; hostname"
        )
        .await,
        "0\n1\n0\n1\ngen2"
    );
    // a branch of a clone that is not branchable is refused
    let e = g2
        .branch_machine("gen3", &BranchOptions::default())
        .await
        .unwrap_err();
    assert!(
        invalid_state(&e).is_some_and(|s| s.contains("not branchable")),
        "{e:?}"
    );
    g2.delete().await.unwrap();

    // sixteen clones asked for at once, all running together
    let src = source(&engine, "many").await;
    out(&src, "echo shared > /tmp/s").await;
    let names: Vec<String> = (1..=16).map(|i| format!("m{i}")).collect();
    let opts = BranchOptions::default();
    let made = futures::future::join_all(names.iter().map(|n| src.branch_machine(n, &opts))).await;
    let clones: Vec<LocalMachine> = made.into_iter().map(|r| r.unwrap().0).collect();
    let mut seen = std::collections::BTreeSet::new();
    for (m, n) in clones.iter().zip(&names) {
        assert_eq!(out(m, "cat /tmp/s; hostname").await, format!("shared\n{n}"));
        seen.insert(out(m, "head -c 16 /dev/urandom | od -An -tx1").await);
    }
    assert_eq!(seen.len(), 16, "clones shared random bytes: {seen:?}");
    assert_eq!(qemu_processes_in(dir.path()), 17);
    for m in clones {
        m.delete().await.unwrap();
    }
    src.delete().await.unwrap();
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

/// `freeze_source`: the source becomes a frozen base (no VMM, state `frozen`, no commands, no
/// resume or start), and every later branch of it starts from the same instant.
#[tokio::test]
async fn a_frozen_source_is_a_base_for_clones_of_one_instant() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "fsrc").await;
    out(
        &src,
        "echo base > /tmp/mark && mkdir -p /data && echo disk > /data/mark && sync",
    )
    .await;
    let freeze = BranchOptions {
        freeze_source: true,
        ..Default::default()
    };
    let (a, _) = src.branch_machine("fa", &freeze).await.unwrap();
    let handle = Machine::from_backend(Arc::new(src.clone()));
    assert_eq!(handle.state().await.unwrap(), MachineState::Frozen);
    assert!(
        !src.pid()
            .is_some_and(smolmachines::local::record::pid_alive),
        "a frozen base has no VMM"
    );
    let e = src
        .exec(&common::sh("true"), &ExecOptions::default())
        .await
        .unwrap_err();
    assert_eq!(invalid_state(&e), Some("frozen"), "{e:?}");
    for e in [
        handle.resume().await.unwrap_err(),
        handle.start().await.unwrap_err(),
        handle.pause().await.unwrap_err(),
    ] {
        assert_eq!(invalid_state(&e), Some("frozen"), "{e:?}");
    }
    handle
        .stop()
        .await
        .expect("stopping a frozen base is a no-op");
    // the first clone goes on from the freeze and changes its copy
    assert_eq!(out(&a, "cat /tmp/mark /data/mark").await, "base\ndisk");
    out(&a, "echo a > /tmp/mark && echo a > /data/mark && sync").await;
    // a later clone starts from the frozen instant, not from the first clone
    let (b, report) = src
        .branch_machine("fb", &BranchOptions::default())
        .await
        .unwrap();
    assert_eq!(
        report.pause,
        std::time::Duration::ZERO,
        "a base has no vCPUs to stop"
    );
    assert_eq!(
        out(
            &b,
            "echo 3 > /proc/sys/vm/drop_caches; cat /tmp/mark /data/mark; hostname"
        )
        .await,
        "base\ndisk\nfb"
    );
    let read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert_ne!(out(&a, read).await, out(&b, read).await);
    // the base is frozen for other handles too, and connect leaves it so
    let listed = engine.list_machines(&Default::default()).await.unwrap();
    let fsrc = listed.iter().find(|m| m.name == "fsrc").expect("listed");
    assert_eq!(fsrc.state, MachineState::Frozen);
    assert_eq!(qemu_processes_in(dir.path()), 2);
    // the base goes; its clones keep working
    handle.delete().await.unwrap();
    assert_eq!(out(&b, "cat /tmp/mark").await, "base");
    assert_eq!(out(&a, "cat /tmp/mark").await, "a");
    for m in [a, b] {
        m.delete().await.unwrap();
    }
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

/// A clone whose VMM is killed is a machine that died: its operations fail with a typed
/// error, its siblings and its source go on.
#[tokio::test]
async fn a_killed_clone_leaves_its_siblings_and_source_running() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let src = source(&engine, "ksrc").await;
    out(&src, "echo k > /tmp/k").await;
    let a = branch(&src, "ka").await;
    let b = branch(&src, "kb").await;
    let pid = a.pid().expect("the clone has a VMM");
    // SAFETY: signals a process this test's engine started; no memory involved.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let mut gone = false;
    for _ in 0..200 {
        if a.state().await.unwrap() == MachineState::Stopped {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "the killed clone is not seen as stopped");
    assert_eq!(out(&b, "cat /tmp/k; hostname").await, "k\nkb");
    assert_eq!(out(&src, "cat /tmp/k; hostname").await, "k\nksrc");
    assert_eq!(qemu_processes_in(dir.path()), 2);
    for m in [a, b, src] {
        m.delete().await.unwrap();
    }
    assert_eq!(qemu_processes_in(dir.path()), 0);
}

/// Bytes used on the file system of `dir` (`df`).
fn used_bytes(dir: &std::path::Path) -> u64 {
    let o = std::process::Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(dir)
        .output()
        .expect("df");
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

fn tmpfs(dir: &std::path::Path, opts: &str) {
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (the VM tests run as root in CI)"
    );
}

/// The tmpfs that holds the RAM files full at a branch: a typed `NoSpace`, nothing of the clone
/// left, and the source (whose own RAM file is on that tmpfs) goes on, writing new memory. With
/// room again, the branch works.
#[tokio::test]
async fn a_full_ram_tmpfs_at_branch_is_no_space_and_the_source_goes_on() {
    let Some((_, dir)) = engine() else {
        return;
    };
    let run_dir = dir.path().join("ram-tmpfs");
    std::fs::create_dir_all(&run_dir).unwrap();
    tmpfs(&run_dir, "size=1g");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(run_dir.clone());
    let engine = LocalBackend::at(dir.path().join("home"))
        .with_run_dir(&run_dir)
        .with_assets(common::vm_assets().unwrap());
    let src = source(&engine, "fsrc").await;
    out(
        &src,
        "head -c 40000000 /dev/urandom > /tmp/fill && echo 1 > /tmp/one",
    )
    .await;
    // leave free about a third of what the source's RAM holds: its copy cannot fit, while
    // the source has room for the pages it touches next
    let used = used_bytes(&run_dir);
    let size = used + used / 3;
    let st = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={size}"), "tmpfs"])
        .arg(&run_dir)
        .status()
        .unwrap();
    assert!(st.success(), "remount the RAM tmpfs at {size} bytes");
    let e = src
        .branch_machine("fclone", &BranchOptions::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e:?}");
    assert!(engine.live_machine("fclone").is_none());
    assert!(!run_dir.join("machines").join("fclone").exists());
    assert!(
        used_bytes(&run_dir) <= used + (8 << 20),
        "the partial copy was removed: {} bytes used, {used} before",
        used_bytes(&run_dir)
    );
    // the source runs and writes memory it had not touched
    assert_eq!(src.state().await.unwrap(), MachineState::Running);
    assert_eq!(
        out(
            &src,
            "head -c 8000000 /dev/zero > /tmp/more && cat /tmp/one"
        )
        .await,
        "1"
    );
    // room again: the branch works
    let st = std::process::Command::new("mount")
        .args(["-o", "remount,size=1g", "tmpfs"])
        .arg(&run_dir)
        .status()
        .unwrap();
    assert!(st.success());
    let c = branch(&src, "fclone").await;
    assert_eq!(out(&c, "cat /tmp/one; hostname").await, "1\nfclone");
    c.delete().await.unwrap();
    src.delete().await.unwrap();
}

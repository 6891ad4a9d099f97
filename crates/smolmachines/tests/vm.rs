//! VM tests: real QEMU microVMs (TCG here, KVM where the host has it) with the real agent.
//! They need the assets of `make setup`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{argv, config, engine, qemu_processes_in, run, sh};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use smolmachines::local::record::pid_alive;
use smolmachines::{
    Error, ExecEvent, ExecOptions, Machine, MachineBackend, MachineState, ResourceSpec,
};

#[tokio::test]
async fn exec_semantics() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine
        .create_machine(config(Some("exec-sem")))
        .await
        .unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Running);

    let r = run(&m, "uname -s; whoami; hostname; ls /bin/ls").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(r.stdout, "Linux\nroot\nexec-sem\n/bin/ls\n");

    // a non-zero exit is a result, not an error; stdout and stderr stay apart
    let r = run(&m, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (3, "out\n", "err\n")
    );

    // a missing command: 127 and a message, as a shell would say
    let r = m
        .exec(&argv(&["no-such-command"]), &ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 127);
    assert!(
        r.stderr.contains("no-such-command: command not found"),
        "{r:?}"
    );

    // env, workdir, stdin
    let opts = ExecOptions {
        env: BTreeMap::from([("GREETING".to_string(), "hi there".to_string())]),
        workdir: Some("/tmp".into()),
        stdin: Some(b"line1\nline2\n".to_vec()),
        ..Default::default()
    };
    let r = m
        .exec(&sh("echo \"$GREETING\"; pwd; wc -l"), &opts)
        .await
        .unwrap();
    assert_eq!(r.stdout, "hi there\n/tmp\n2\n", "{r:?}");

    // a missing workdir is a typed error
    let opts = ExecOptions {
        workdir: Some("/no/such/dir".into()),
        ..Default::default()
    };
    let e = m.exec(&argv(&["true"]), &opts).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    // timeout: the whole process group dies, exit 124, output so far is kept
    let opts = ExecOptions {
        timeout: Some(Duration::from_millis(1500)),
        ..Default::default()
    };
    let r = m
        .exec(&sh("echo started; sleep 30 & sleep 30; echo never"), &opts)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 124);
    assert!(r.timed_out);
    assert_eq!(r.stdout, "started\n");
    let r = run(&m, "ps -o comm | grep -c '^sleep' || true").await;
    assert_eq!(
        r.stdout.trim(),
        "0",
        "timed-out process group left sleepers"
    );

    // a command's cgroup is its own: one that left a process behind keeps its cgroup, and the
    // next commands (the agent reuses emptied cgroups) never share it
    let left = run(&m, "sleep 30 >/dev/null 2>&1 & cat /proc/self/cgroup").await;
    assert_eq!(left.exit_code, 0, "{left:?}");
    assert!(left.stdout.contains("/smol-user/"), "{left:?}");
    for _ in 0..3 {
        let r = run(&m, "cat /proc/self/cgroup").await;
        assert!(r.stdout.contains("/smol-user/"), "{r:?}");
        assert_ne!(r.stdout, left.stdout, "a command joined a busy cgroup");
    }

    // binary output is byte-exact
    let r = run(&m, "printf '\\000\\377\\001'").await;
    assert_eq!(r.stdout_bytes, vec![0u8, 255, 1]);

    m.delete().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Deleted);
    let e = m
        .exec(&argv(&["true"]), &ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
}

#[tokio::test]
async fn exec_stream_delivers_output_while_the_command_runs() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(None)).await.unwrap();
    // The command cannot finish until the test, having seen its first line, writes /tmp/go.
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 7";
    let mut s = m
        .exec_stream(&sh(script), &ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(s.next().await, Some(ExecEvent::Stdout(b"first\n".to_vec())));
    m.write_file("/tmp/go", b"", None).await.unwrap();
    let mut rest = Vec::new();
    while let Some(ev) = s.next().await {
        rest.push(ev);
    }
    assert_eq!(
        rest,
        vec![ExecEvent::Stderr(b"second\n".to_vec()), ExecEvent::Exit(7)]
    );

    // dropping a stream kills its command
    let mut s = m
        .exec_stream(
            &sh("echo $$ > /tmp/pid; echo started; exec sleep 60"),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        s.next().await,
        Some(ExecEvent::Stdout(b"started\n".to_vec()))
    );
    drop(s);
    let r = run(&m, "for i in $(seq 50); do kill -0 $(cat /tmp/pid) 2>/dev/null || { echo gone; exit 0; }; sleep 0.1; done; echo alive").await;
    assert_eq!(r.stdout.trim(), "gone");
    m.delete().await.unwrap();
}

#[tokio::test]
async fn files_are_byte_exact_and_errors_are_typed() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(None)).await.unwrap();

    // 64 MiB of pseudo-random bytes, checked on both sides
    let mut data = vec![0u8; 64 * 1024 * 1024];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = hex(&Sha256::digest(&data));
    m.write_file("/tmp/big.bin", &data, None).await.unwrap();
    let r = run(&m, "sha256sum /tmp/big.bin").await;
    assert_eq!(r.stdout.split_whitespace().next(), Some(want.as_str()));
    let back = m.read_file("/tmp/big.bin").await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(hex(&Sha256::digest(&back)), want);
    drop((data, back));

    // str content, mode, parents created, executable afterwards
    m.write_file("/work/dir/run.sh", b"#!/bin/sh\necho ran $1\n", Some(0o755))
        .await
        .unwrap();
    let r = m
        .exec(&argv(&["/work/dir/run.sh", "ok"]), &ExecOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "ran ok\n");
    let r = run(&m, "stat -c %a /work/dir/run.sh").await;
    assert_eq!(r.stdout.trim(), "755");
    // empty files round-trip
    m.write_file("/tmp/empty", b"", None).await.unwrap();
    assert!(m.read_file("/tmp/empty").await.unwrap().is_empty());

    let e = m.read_file("/no/such/file").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let e = m.read_file("/tmp").await.unwrap_err();
    assert!(matches!(e, Error::IsADirectory { .. }), "{e:?}");
    let e = m.write_file("/tmp", b"x", None).await.unwrap_err();
    assert!(matches!(e, Error::IsADirectory { .. }), "{e:?}");

    // through the public API: relative paths are refused before reaching the guest
    let pm = Machine::from_backend(std::sync::Arc::new(m.clone()));
    let e = pm.read_file("relative/path").await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = pm.write_file("tmp/x", "x", None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    // a failed write leaves the old content intact
    m.write_file("/tmp/keep", b"old", None).await.unwrap();
    let e = m
        .write_file("/tmp/keep/child", b"x", None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::NotADirectory { .. } | Error::Guest { .. }),
        "{e:?}"
    );
    assert_eq!(m.read_file("/tmp/keep").await.unwrap(), b"old");
    m.delete().await.unwrap();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn resources_and_names() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut cfg = config(Some("sized"));
    cfg.resources = ResourceSpec {
        cpus: Some(2),
        memory_mb: Some(256),
        ..Default::default()
    };
    let m = engine.create_machine(cfg).await.unwrap();
    let r = run(&m, "nproc; awk '/MemTotal/{print $2}' /proc/meminfo").await;
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("2"));
    let mem_kb: u64 = lines.next().unwrap().parse().unwrap();
    assert!(
        (180_000..=262_144).contains(&mem_kb),
        "MemTotal {mem_kb} kB"
    );

    // the same name again: typed error, the existing machine untouched
    let e = engine
        .create_machine(config(Some("sized")))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Conflict { name } if name == "sized"),
        "{e:?}"
    );
    assert_eq!(run(&m, "echo still").await.stdout, "still\n");

    let e = engine
        .create_machine(config(Some("bad/name")))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let mut cfg = config(None);
    cfg.resources.cpus = Some(0);
    assert!(matches!(
        engine.create_machine(cfg).await.unwrap_err(),
        Error::InvalidConfig { .. }
    ));
    m.delete().await.unwrap();
}

#[tokio::test]
async fn vmm_killed_during_exec_gives_a_typed_error_and_leaves_nothing() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(None)).await.unwrap();
    let pid = m.pid().unwrap();
    let sock = m.dir().join("agent.sock");
    assert!(sock.exists());
    let m2 = m.clone();
    let exec = tokio::spawn(async move {
        m2.exec(&argv(&["sleep", "60"]), &ExecOptions::default())
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: signals the QEMU process of this test's machine.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let res = tokio::time::timeout(Duration::from_secs(5), exec)
        .await
        .expect("exec did not return within 5 s")
        .unwrap();
    let e = res.unwrap_err();
    assert!(
        matches!(&e, Error::Interrupted { detail, .. } if detail.contains("SIGKILL")),
        "{e:?}"
    );
    assert_eq!(m.state().await.unwrap(), MachineState::Stopped);
    assert!(!pid_alive(pid));
    assert!(!sock.exists(), "agent socket left behind");
    assert!(!m.dir().join("qmp.sock").exists(), "qmp socket left behind");
    let e = m
        .exec(&argv(&["true"]), &ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    m.delete().await.unwrap();
    assert!(!m.dir().exists());
}

#[tokio::test]
async fn agent_that_never_answers_fails_within_the_ready_timeout() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut assets = smolmachines::local::assets::resolve().unwrap();
    // An initramfs whose /init is a shell that never starts the agent.
    let stage = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(stage.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", stage.path().join("bin/busybox")).unwrap();
    std::fs::write(
        stage.path().join("init"),
        "#!/bin/busybox sh\n/bin/busybox sleep 600\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        stage.path().join("init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let cpio = stage.path().join("../noagent.cpio");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio --quiet -o -H newc > {}",
            stage.path().display(),
            cpio.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    assets.initrd = cpio.clone();
    let engine2 = engine.clone().with_assets(assets.clone());
    let mut cfg = config(Some("never-ready"));
    cfg.ready_timeout = Some(Duration::from_secs(4));
    let t0 = std::time::Instant::now();
    let e = engine2.create_machine(cfg).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(15));
    match &e {
        Error::BootFailed {
            reason, log_tail, ..
        } => {
            assert!(reason.contains("did not answer"), "{reason}\n{log_tail}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        !engine.run_dir().join("machines/never-ready").exists(),
        "machine dir left"
    );
    assert_eq!(qemu_processes_in(engine.run_dir()), 0);
    let _ = std::fs::remove_file(cpio);

    // A file that is not a kernel: QEMU itself refuses, and the error carries its words.
    let bogus = stage.path().join("bogus-kernel");
    std::fs::write(&bogus, b"not a kernel").unwrap();
    assets.kernel = bogus;
    let e = engine
        .clone()
        .with_assets(assets)
        .create_machine(config(Some("bogus")))
        .await
        .unwrap_err();
    match &e {
        Error::BootFailed {
            reason, log_tail, ..
        } => {
            assert!(reason.contains("VMM exited"), "{reason}");
            // the reason itself says why, in QEMU's last words
            assert!(reason.to_lowercase().contains("kernel"), "{reason}");
            assert!(log_tail.to_lowercase().contains("kernel"), "{log_tail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(qemu_processes_in(engine.run_dir()), 0);
}

#[tokio::test]
async fn two_machines_and_ten_concurrent_execs() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let (a, b) = tokio::join!(
        engine.create_machine(config(Some("twin-a"))),
        engine.create_machine(config(Some("twin-b")))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ra, rb) = tokio::join!(run(&a, "hostname"), run(&b, "hostname"));
    assert_eq!(
        (ra.stdout.as_str(), rb.stdout.as_str()),
        ("twin-a\n", "twin-b\n")
    );

    let mut tasks = Vec::new();
    for i in 0..10 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let script =
                format!("sleep 0.$((RANDOM % 5)); echo task-{i}; echo err-{i} >&2; exit {i}");
            a.exec(&sh(&script), &ExecOptions::default()).await.unwrap()
        }));
    }
    // file transfers at the same time
    let a2 = a.clone();
    let files = tokio::spawn(async move {
        for i in 0..5 {
            let body = vec![i as u8; 3 * 1024 * 1024 + i];
            a2.write_file(&format!("/tmp/f{i}"), &body, None)
                .await
                .unwrap();
            assert_eq!(a2.read_file(&format!("/tmp/f{i}")).await.unwrap(), body);
        }
    });
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.exit_code, i as i32);
        assert_eq!(r.stdout, format!("task-{i}\n"));
        assert_eq!(r.stderr, format!("err-{i}\n"));
    }
    files.await.unwrap();
    a.delete().await.unwrap();
    b.delete().await.unwrap();
}

#[tokio::test]
async fn stop_start_and_reconnect() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(None)).await.unwrap();
    // the agent survives the host going away and coming back
    m.write_file("/tmp/marker", b"kept", None).await.unwrap();
    m.reconnect().await.unwrap();
    assert_eq!(m.read_file("/tmp/marker").await.unwrap(), b"kept");
    m.reconnect().await.unwrap();
    assert_eq!(run(&m, "echo again").await.stdout, "again\n");
    // many in a row: each new session gets every frame of its host (the agent's earlier
    // sessions leave the port alone)
    for i in 0..10 {
        m.reconnect().await.unwrap();
        assert_eq!(run(&m, &format!("echo {i}")).await.stdout, format!("{i}\n"));
    }

    let pid = m.pid().unwrap();
    m.stop().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Stopped);
    assert!(!pid_alive(pid));
    let e = m
        .exec(&argv(&["true"]), &ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }));
    m.start().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Running);
    assert_eq!(run(&m, "echo back").await.stdout, "back\n");
    m.delete().await.unwrap();
    assert!(!m.dir().exists());
}

#[tokio::test]
async fn detached_machine_is_reachable_from_a_new_handle() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut cfg = config(Some("detached"));
    cfg.detach = true;
    let m = engine.create_machine(cfg).await.unwrap();
    m.write_file("/tmp/state", b"from the first handle", None)
        .await
        .unwrap();
    let pid = m.pid().unwrap();
    drop(m);
    assert!(pid_alive(pid), "a detached VM outlives its handle");
    let listed = engine.list_machines(&BTreeMap::new()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].state),
        ("detached", MachineState::Running)
    );
    let l = &listed[0];
    assert!(l.detached && l.persistent && l.image.is_none(), "{l:?}");
    assert!(l.created_unix > 1_700_000_000 && l.storage_gb > 0, "{l:?}");
    let c = engine.connect_machine("detached").await.unwrap();
    assert_eq!(
        c.read_file("/tmp/state").await.unwrap(),
        b"from the first handle"
    );
    c.delete().await.unwrap();
    assert!(!pid_alive(pid));
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
    let e = engine.connect_machine("detached").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
}

#[tokio::test]
async fn debian_cloud_kernel_fallback_boots() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let dir = smolmachines::local::assets::smol_home().join("assets");
    let assets = smolmachines::local::assets::resolve_from(&dir, Some("cloud"), None)
        .expect("cloud kernel assets missing: run `make setup`");
    let m = engine
        .with_assets(assets)
        .create_machine(config(None))
        .await
        .unwrap();
    let r = run(&m, "uname -r; ls /sys/bus/virtio/drivers").await;
    assert!(
        r.stdout.starts_with("6.1.0-") && r.stdout.contains("cloud"),
        "{r:?}"
    );
    assert!(r.stdout.contains("virtio_console"), "{r:?}");
    m.write_file("/tmp/x", b"cloud", None).await.unwrap();
    assert_eq!(m.read_file("/tmp/x").await.unwrap(), b"cloud");
    m.stop().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Stopped);
    m.delete().await.unwrap();
}

#[tokio::test]
async fn public_api_end_to_end() {
    if common::vm_assets().is_none() {
        return;
    }
    use smolmachines::{ConnectOptions, MachineConfig, Target};
    // The default backend (local, environment-configured) behind the Machine seam.
    let m = Machine::create(MachineConfig::default(), ConnectOptions::default())
        .await
        .unwrap();
    assert!(m.name().starts_with("smol-"));
    assert_eq!(m.url(), None);
    let r = m
        .exec(&argv(&["uname", "-a"]), ExecOptions::default())
        .await
        .unwrap();
    assert!(r.stdout.starts_with("Linux "));
    r.assert_success(&argv(&["uname"])).unwrap();
    let r = m
        .exec(&argv(&["false"]), ExecOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        r.assert_success(&argv(&["false"])),
        Err(Error::CommandFailed { exit_code: 1, .. })
    ));
    let e = m.exec(&[], ExecOptions::default()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }));
    let e = m
        .exec(
            &argv(&["true"]),
            ExecOptions {
                timeout: Some(Duration::ZERO),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }));
    m.stop().await.unwrap();
    assert_eq!(m.state().await.unwrap(), MachineState::Stopped);
    m.delete().await.unwrap();
    let e = m
        .exec(&argv(&["true"]), ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }));

    // cloud must never fall back to local silently
    let cloud = ConnectOptions {
        target: Some(Target::Cloud),
        ..Default::default()
    };
    let e = Machine::create(MachineConfig::default(), cloud)
        .await
        .unwrap_err();
    // (the cloud target's InvalidConfig: no key, or no image)
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
}

/// `ExecOptions.background` (SPEC §3.6): the call returns at once with the pid; the command
/// runs on; it takes no stdin, no timeout and cannot be streamed.
#[tokio::test]
async fn background_commands_return_at_once_with_their_pid() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let lm = engine.create_machine(config(None)).await.unwrap();
    let m = smolmachines::Machine::from_backend(std::sync::Arc::new(lm.clone()));
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let r = m
        .exec(&sh("sleep 2; echo done > /tmp/bg"), bg.clone())
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "returned at once");
    let pid = r.pid.expect("a pid");
    assert_eq!((r.exit_code, r.stdout.clone()), (0, format!("pid={pid}\n")));
    let alive = run(&lm, &format!("kill -0 {pid} && echo alive")).await;
    assert_eq!(alive.stdout, "alive\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while m.read_file("/tmp/bg").await.ok().as_deref() != Some(b"done\n".as_slice()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the background command never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a missing program is reported as exec reports it
    let r = m
        .exec(&argv(&["no-such-program"]), bg.clone())
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.pid), (127, None));
    // no stdin, no timeout, no streaming
    for opts in [
        ExecOptions {
            stdin: Some(b"x".to_vec()),
            ..bg.clone()
        },
        ExecOptions {
            timeout: Some(Duration::from_secs(1)),
            ..bg.clone()
        },
    ] {
        let e = m.exec(&sh("true"), opts).await.unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    }
    let e = m.exec_stream(&sh("true"), bg).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    m.delete().await.unwrap();
}

/// `ready()` / `wait_until_ready()` (SPEC §4.2): running, and every published port has a guest
/// listener behind it (the host side alone, which accepts at once, does not count).
#[tokio::test]
async fn ready_waits_for_the_guest_listeners_of_published_ports() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let host = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(None);
    cfg.ports = vec![smolmachines::PortSpec { host, guest: 8080 }];
    let lm = engine.create_machine(cfg).await.unwrap();
    let m = smolmachines::Machine::from_backend(std::sync::Arc::new(lm.clone()));
    assert!(
        !m.ready().await.unwrap(),
        "nothing listens on guest port 8080 yet"
    );
    let e = m
        .wait_until_ready(Duration::from_millis(400), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    m.exec(&sh("exec nc -ll -p 8080 -e cat"), bg).await.unwrap();
    m.wait_until_ready(Duration::from_secs(20), Duration::from_millis(100))
        .await
        .unwrap();
    assert!(m.ready().await.unwrap());
    m.stop().await.unwrap();
    assert!(!m.ready().await.unwrap(), "a stopped machine is not ready");
    m.delete().await.unwrap();
}

/// A full guest disk is a typed error that loses nothing: after freeing space, writes work.
#[tokio::test]
async fn a_full_guest_disk_is_a_typed_error_and_recoverable() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut cfg = config(None);
    cfg.resources.storage_gb = Some(1);
    let m = engine.create_machine(cfg).await.unwrap();
    m.write_file("/root/kept", b"before", None).await.unwrap();
    let r = run(&m, "dd if=/dev/zero of=/root/fill bs=1M 2>&1; echo rc=$?").await;
    assert!(r.stdout.contains("No space left"), "{r:?}");
    let e = m
        .write_file("/root/more", &vec![7u8; 4 << 20], None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e:?}");
    assert_eq!(e.code(), "STORAGE_ERROR");
    assert_eq!(m.read_file("/root/kept").await.unwrap(), b"before");
    run(&m, "rm /root/fill").await;
    m.write_file("/root/more", &vec![7u8; 4 << 20], None)
        .await
        .unwrap();
    assert_eq!(m.read_file("/root/more").await.unwrap().len(), 4 << 20);
    m.delete().await.unwrap();
}

/// `publish` / `unpublish` on a running machine (SPEC §4.7).
#[tokio::test]
async fn ports_are_published_and_unpublished_at_runtime() {
    use std::io::Read;
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let lm = engine.create_machine(config(None)).await.unwrap();
    let m = smolmachines::Machine::from_backend(std::sync::Arc::new(lm.clone()));
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    m.exec(&sh("exec nc -ll -p 8080 -e echo hi"), bg)
        .await
        .unwrap();
    let p = m.publish(8080, None, "tcp").await.unwrap();
    assert!(p.host > 0 && p.guest == 8080, "{p:?}");
    assert_eq!(m.ports(), vec![p]);
    let fetch = move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p.host))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = tokio::task::spawn_blocking(fetch).await.unwrap();
        if got.as_ref().is_ok_and(|s| s == "hi\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // bad input
    let e = m.publish(8081, None, "sctp").await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = m.publish(8081, None, "udp").await.unwrap_err();
    assert!(matches!(e, Error::NotSupported { .. }), "{e:?}");
    let e = m.publish(8081, Some(p.host), "tcp").await.unwrap_err();
    assert_eq!(e.code(), "CONFLICT", "{e:?}");
    let e = m.unpublish(None, None, "tcp").await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = m.unpublish(Some(9999), None, "tcp").await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    // unpublished: the host port is closed
    m.unpublish(Some(8080), None, "tcp").await.unwrap();
    assert!(m.ports().is_empty());
    let mut refused = false;
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", p.host)).is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "host port {} still accepts", p.host);
    m.stop().await.unwrap();
    let e = m.publish(8080, None, "tcp").await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    m.delete().await.unwrap();
}

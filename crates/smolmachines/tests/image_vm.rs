//! Machines that boot into an OCI image pulled from the test registry (real registry, real VMs).

mod common;
mod common_registry;

use std::collections::BTreeMap;

use common::{argv, config, engine, sh};
use smolmachines::{Error, ExecOptions, MachineBackend};

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_runs_in_its_image() {
    let reg = common_registry::shared();
    let Some((engine, _dir)) = engine() else {
        return;
    };

    // a real-world image: Debian minbase with python3
    let mut cfg = config(Some("py"));
    cfg.image = Some(reg.reference("library/python:3.12"));
    let m = engine.create_machine(cfg).await.unwrap();
    let r = m
        .exec(
            &argv(&["python3", "-c", "print(2**10)"]),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "1024\n"), "{r:?}");
    let r = m
        .exec(&argv(&["cat", "/etc/os-release"]), &ExecOptions::default())
        .await
        .unwrap();
    assert!(r.stdout.contains("bookworm"), "{r:?}");
    // writes land on the machine's disk, over the read-only image
    m.write_file("/root/note", b"kept", None).await.unwrap();
    m.stop().await.unwrap();
    m.start().await.unwrap();
    assert_eq!(m.read_file("/root/note").await.unwrap(), b"kept");
    m.delete().await.unwrap();

    // the image config: Env under the caller's, WorkingDir unless the caller names one
    let mut cfg = config(Some("bb"));
    cfg.image = Some(reg.reference("test/busybox:latest"));
    let m = engine.create_machine(cfg).await.unwrap();
    let r = m
        .exec(
            &sh("echo $SMOL_FIXTURE; pwd; cat /etc/motd"),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("busybox"), "{r:?}");
    assert_eq!(lines.next(), Some("/data"), "{r:?}");
    let opts = ExecOptions {
        env: BTreeMap::from([("SMOL_FIXTURE".to_string(), "mine".to_string())]),
        workdir: Some("/tmp".into()),
        ..Default::default()
    };
    let r = m.exec(&sh("echo $SMOL_FIXTURE; pwd"), &opts).await.unwrap();
    assert_eq!(r.stdout, "mine\n/tmp\n");
    m.delete().await.unwrap();

    // the Machine API's image calls use the same cache: the images above are listed, and a
    // pull of a cached image needs nothing new
    let pm = smolmachines::Machine::from_backend(std::sync::Arc::new(
        engine.create_machine(config(Some("lister"))).await.unwrap(),
    ));
    let listed: Vec<String> = pm
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert!(
        listed.iter().any(|r| r.ends_with("library/python:3.12")),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|r| r.ends_with("test/busybox:latest")),
        "{listed:?}"
    );
    let info = pm
        .pull_image(&reg.reference("test/busybox:latest"))
        .await
        .unwrap();
    assert!(
        info.digest.starts_with("sha256:") && info.architecture == "amd64" && info.os == "linux"
    );
    let e = pm
        .pull_image(&reg.reference("library/nope:2"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    pm.delete().await.unwrap();

    // an unknown image is a typed error naming it, and leaves no machine behind
    let mut cfg = config(Some("ghost"));
    let missing = reg.reference("library/nope:1");
    cfg.image = Some(missing.clone());
    let e = engine.create_machine(cfg).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { what } if what.contains("nope")),
        "{e:?}"
    );
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
}

/// The guest's mounts of run(image) images: (source device, mount point) under
/// /run/smol/images.
async fn image_mounts(m: &smolmachines::local::LocalMachine) -> Vec<(String, String)> {
    let r = m
        .exec(&argv(&["cat", "/proc/mounts"]), &ExecOptions::default())
        .await
        .unwrap();
    r.stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && f[1].starts_with("/run/smol/images/"))
                .then(|| (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

/// run(image) reaches the guest through image slots (local::slots): the image is mounted from
/// a virtio-blk device pointed at the host's cached file, nothing is copied onto the machine's
/// disk. Two slots: a third image is copied as before (a loop device). The slots keep their
/// images across a restart, and a branch's guest finds them where its source mounted them.
#[tokio::test(flavor = "multi_thread")]
async fn run_mounts_images_from_slots_and_copies_only_past_them() {
    let reg = common_registry::shared();
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut cfg = config(Some("slots"));
    cfg.branchable = Some(true);
    let m = engine.create_machine(cfg).await.unwrap();
    let python = reg.reference("library/python:3.12");
    let busybox = reg.reference("test/busybox:latest");
    let multi = reg.reference("test/busybox:multi");
    let o = ExecOptions::default;
    let py = argv(&["python3", "-c", "print(6*7)"]);
    let r = m.run(&python, &py, &o()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "42\n"), "{r:?}");
    let r = m
        .run(&busybox, &sh("echo $SMOL_FIXTURE"), &o())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let mounts = image_mounts(&m).await;
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert!(
        mounts.iter().all(|(dev, _)| dev.starts_with("/dev/vd")),
        "slot devices, not loop devices: {mounts:?}"
    );
    let r = m
        .exec(&sh("ls /var/lib/smol/images 2>/dev/null | wc -l"), &o())
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "0", "nothing copied: {r:?}");
    let slots = m.record().image_slots;
    assert_eq!(slots.len(), 2);
    assert!(slots.iter().all(|s| s.is_some()), "{slots:?}");

    // no slot left: the third image is copied onto the disk and mounted through a loop device
    let r = m.run(&multi, &sh("echo multi"), &o()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "multi\n"), "{r:?}");
    let mounts = image_mounts(&m).await;
    assert_eq!(mounts.len(), 3, "{mounts:?}");
    assert_eq!(
        mounts
            .iter()
            .filter(|(d, _)| d.starts_with("/dev/loop"))
            .count(),
        1,
        "{mounts:?}"
    );

    // a branch: its guest has the images mounted, its VMM the slots' files under them
    let (clone, _) = m
        .branch_machine("slots-b", &smolmachines::BranchOptions::default())
        .await
        .unwrap();
    let r = clone.run(&python, &py, &o()).await.unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, "42\n"),
        "clone: {r:?}"
    );
    // files neither had read before: the clone's come through its own slot device
    let sum = sh("cat /usr/lib/x86_64-linux-gnu/*.so* /usr/bin/* 2>/dev/null | md5sum");
    let in_clone = clone.run(&python, &sum, &o()).await.unwrap();
    let in_source = m.run(&python, &sum, &o()).await.unwrap();
    assert_eq!(in_clone.exit_code, 0, "{in_clone:?}");
    assert_eq!(in_clone.stdout, in_source.stdout);
    clone.delete().await.unwrap();

    // a restart boots with the slots holding their images; each is mounted again on its run
    m.stop().await.unwrap();
    m.start().await.unwrap();
    assert!(image_mounts(&m).await.is_empty());
    let r = m.run(&python, &py, &o()).await.unwrap();
    assert_eq!(r.stdout, "42\n", "{r:?}");
    let r = m.run(&busybox, &sh("true"), &o()).await.unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let mounts = image_mounts(&m).await;
    assert!(
        mounts.len() == 2 && mounts.iter().all(|(d, _)| d.starts_with("/dev/vd")),
        "{mounts:?}"
    );

    // a slot whose file is gone at a boot (a pruned cache) is free again, and the next run
    // of that image takes a slot anew
    m.stop().await.unwrap();
    let file = m.record().image_slots[0].clone().unwrap().file;
    let aside = file.with_extension("aside");
    std::fs::rename(&file, &aside).unwrap();
    let started = m.start().await;
    std::fs::rename(&aside, &file).unwrap();
    started.unwrap();
    assert!(m.record().image_slots[0].is_none(), "{:?}", m.record());
    let r = m.run(&python, &py, &o()).await.unwrap();
    assert_eq!(r.stdout, "42\n", "{r:?}");
    assert!(
        m.record()
            .image_slots
            .iter()
            .flatten()
            .any(|s| s.file == file),
        "{:?}",
        m.record().image_slots
    );
    m.delete().await.unwrap();
}

/// `Machine::run(image, argv)`: a container of an image inside a running machine.
#[tokio::test(flavor = "multi_thread")]
async fn run_executes_in_a_container_of_an_image() {
    let reg = common_registry::shared();
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let lm = engine.create_machine(config(Some("host"))).await.unwrap();
    let m = smolmachines::Machine::from_backend(std::sync::Arc::new(lm.clone()));
    let python = reg.reference("library/python:3.12");
    let busybox = reg.reference("test/busybox:latest");
    let o = ExecOptions::default;

    // a real-world image's program, from the image's root, not the machine's
    let r = m
        .run(&python, &argv(&["python3", "-c", "print(2**10)"]), o())
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "1024\n"), "{r:?}");
    let r = m
        .run(&python, &argv(&["cat", "/etc/os-release"]), o())
        .await;
    assert!(r.unwrap().stdout.contains("bookworm"));
    let r = m.exec(&argv(&["which", "python3"]), o()).await.unwrap();
    assert_ne!(r.exit_code, 0, "the machine itself has no python: {r:?}");

    // the image's Env under the caller's, its WorkingDir unless the caller names one
    let r = m.run(&busybox, &sh("echo $SMOL_FIXTURE; pwd"), o()).await;
    assert_eq!(r.unwrap().stdout, "busybox\n/data\n");
    let opts = ExecOptions {
        env: BTreeMap::from([("SMOL_FIXTURE".to_string(), "mine".to_string())]),
        workdir: Some("/tmp".into()),
        ..Default::default()
    };
    let r = m.run(&busybox, &sh("echo $SMOL_FIXTURE; pwd"), opts).await;
    assert_eq!(r.unwrap().stdout, "mine\n/tmp\n");

    // /proc, /dev and a /tmp of its own; writes vanish with the container, the image and the
    // machine are untouched
    let r = m
        .run(
            &busybox,
            &sh("test -e /proc/self/status && echo x > /dev/null && touch /tmp/t /etc/scratch && echo ok"),
            o(),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "ok\n", "{r:?}");
    let r = m.run(&busybox, &sh("ls /etc/scratch /tmp/t"), o()).await;
    assert_ne!(
        r.unwrap().exit_code,
        0,
        "a container's writes do not outlive it"
    );
    let r = m.exec(&sh("ls /etc/scratch"), o()).await.unwrap();
    assert_ne!(r.exit_code, 0, "nor reach the machine's root");

    // its own PID namespace: the command is PID 1 and sees only its own processes, and what it
    // leaves running in the background ends with it
    let r = m
        .run(&busybox, &sh("echo $$; ls /proc | grep -c '^[0-9]'"), o())
        .await
        .unwrap();
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("1"), "{r:?}");
    let n: u32 = lines.next().unwrap_or_default().parse().unwrap_or(99);
    assert!(n <= 4, "the container sees {n} processes: {r:?}");
    m.run(&busybox, &sh("sleep 600 & echo started"), o())
        .await
        .unwrap();
    let r = m
        .exec(
            &sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -c 'sleep 60[0]'"),
            o(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.stdout.trim(),
        "0",
        "a container's background process outlived it: {r:?}"
    );

    // exit codes, stdin, a missing command and the timeout behave as exec's
    assert_eq!(
        m.run(&busybox, &sh("exit 7"), o()).await.unwrap().exit_code,
        7
    );
    let opts = ExecOptions {
        stdin: Some(b"in".to_vec()),
        ..Default::default()
    };
    assert_eq!(
        m.run(&busybox, &argv(&["cat"]), opts).await.unwrap().stdout,
        "in"
    );
    let r = m
        .run(&busybox, &argv(&["no-such-program"]), o())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 127, "{r:?}");
    let opts = ExecOptions {
        timeout: Some(std::time::Duration::from_millis(500)),
        ..Default::default()
    };
    let r = m
        .run(&busybox, &sh("echo started; sleep 30"), opts)
        .await
        .unwrap();
    assert_eq!(
        (r.exit_code, r.timed_out, r.stdout.as_str()),
        (124, true, "started\n")
    );

    // both images came through image slots (local::slots): nothing was copied into the
    // machine, and the slots keep them across a restart
    let r = m
        .exec(&sh("ls /var/lib/smol/images 2>/dev/null | wc -l"), o())
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "0", "{r:?}");
    m.stop().await.unwrap();
    let e = m.run(&busybox, &sh("true"), o()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidState { .. }), "{e:?}");
    m.start().await.unwrap();
    let r = m
        .run(&busybox, &sh("echo $SMOL_FIXTURE"), o())
        .await
        .unwrap();
    assert_eq!(r.stdout, "busybox\n");

    // bad input: typed errors, the machine keeps working
    let e = m
        .run(&reg.reference("test/busybox:no-such-tag"), &sh("true"), o())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-tag"), "{e}");
    let opts = ExecOptions {
        user: Some("nobody".into()),
        ..Default::default()
    };
    let e = m.run(&busybox, &sh("true"), opts).await.unwrap_err();
    assert!(matches!(e, Error::NotSupported { .. }), "{e:?}");
    let e = m.run(&busybox, &[], o()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let opts = ExecOptions {
        workdir: Some("/no/such/dir".into()),
        ..Default::default()
    };
    let e = m.run(&busybox, &sh("true"), opts).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(
        m.exec(&sh("echo fine"), o()).await.unwrap().stdout,
        "fine\n"
    );
    m.delete().await.unwrap();
}

/// Reads a guest file until it holds `want` (the workload runs in the background).
async fn wait_for(m: &smolmachines::local::LocalMachine, path: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = m
            .read_file(path)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if got.contains(want) || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// SPEC §3.4: a machine of an image launches the image's workload (`Entrypoint` + `Cmd`, or
/// `command`) at create and at every later boot, with `env` over the image's `Env` and
/// `workdir` over its `WorkingDir`; its output goes to the workload log.
#[tokio::test(flavor = "multi_thread")]
async fn the_image_workload_starts_at_create_and_at_every_boot() {
    let reg = common_registry::shared();
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let busybox = reg.reference("test/busybox:latest");
    let log = "/var/log/smol/workload.log";

    // the image's own Cmd (`sh -c 'cat /etc/motd'`)
    let mut cfg = config(Some("default-cmd"));
    cfg.image = Some(busybox.clone());
    let m = engine.create_machine(cfg).await.unwrap();
    assert_eq!(
        wait_for(&m, log, "motd from layer 3").await,
        "motd from layer 3\n"
    );
    m.delete().await.unwrap();

    // a command of the caller's, with env and workdir; relaunched after stop / start
    let mut cfg = config(Some("own-cmd"));
    cfg.image = Some(busybox.clone());
    cfg.command = Some(argv(&[
        "sh",
        "-c",
        "echo $$ > /root/pid; echo \"$GREETING $SMOL_FIXTURE $(pwd)\" >> /root/started; echo to-the-log; exec sleep 600",
    ]));
    cfg.env = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
    cfg.workdir = Some("/tmp".into());
    let m = engine.create_machine(cfg).await.unwrap();
    let line = "hello busybox /tmp\n";
    assert_eq!(wait_for(&m, "/root/started", line).await, line);
    assert_eq!(wait_for(&m, log, "to-the-log").await, "to-the-log\n");
    let r = m
        .exec(
            &sh("kill -0 $(cat /root/pid) && echo running"),
            &ExecOptions::default(),
        )
        .await;
    assert_eq!(r.unwrap().stdout, "running\n", "the workload keeps running");
    m.stop().await.unwrap();
    m.start().await.unwrap();
    let twice = format!("{line}{line}");
    assert_eq!(wait_for(&m, "/root/started", &twice).await, twice);
    m.delete().await.unwrap();

    // an empty command launches nothing (what `smol run IMAGE -- argv` asks for)
    let mut cfg = config(Some("no-cmd"));
    cfg.image = Some(busybox.clone());
    cfg.command = Some(vec![]);
    let m = engine.create_machine(cfg).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let e = m.read_file(log).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    m.delete().await.unwrap();

    // a workload that cannot start fails the create and leaves no machine
    let mut cfg = config(Some("bad-cmd"));
    cfg.image = Some(busybox.clone());
    cfg.command = Some(argv(&["no-such-program"]));
    let e = engine.create_machine(cfg).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-program"), "{e}");
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
    let mut cfg = config(Some("bad-workdir"));
    cfg.image = Some(busybox.clone());
    cfg.workdir = Some("/no/such/dir".into());
    let e = engine.create_machine(cfg).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());

    // invalid workload settings are refused before anything boots
    for bad in [
        smolmachines::MachineConfig {
            command: Some(argv(&["ok", ""])),
            ..config(None)
        },
        smolmachines::MachineConfig {
            workdir: Some("relative".into()),
            command: Some(argv(&["true"])),
            ..config(None)
        },
        // env without a workload to apply to
        smolmachines::MachineConfig {
            env: BTreeMap::from([("A".to_string(), "b".to_string())]),
            ..config(None)
        },
    ] {
        let e = engine.create_machine(bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    }
}

/// Per-command and workload users (SPEC §3.4, §3.6), resolved in the image's /etc/passwd.
#[tokio::test(flavor = "multi_thread")]
async fn commands_run_as_users_of_the_image() {
    let reg = common_registry::shared();
    let Some((engine, _dir)) = engine() else {
        return;
    };
    // (the image's WorkingDir, /root, is not theirs to enter: a workdir they can)
    let as_user = |u: &str| ExecOptions {
        user: Some(u.to_string()),
        workdir: Some("/tmp".into()),
        ..Default::default()
    };
    let mut cfg = config(Some("users"));
    cfg.image = Some(reg.reference("library/python:3.12"));
    cfg.command = Some(sh("id -un > /tmp/workload-user; exec sleep 600"));
    cfg.user = Some("daemon".into());
    cfg.workdir = Some("/tmp".into());
    let m = engine.create_machine(cfg).await.unwrap();
    let who = "sh -c 'echo $(id -u):$(id -g) $USER $HOME'";
    let r = m.exec(&sh(who), &as_user("nobody")).await.unwrap();
    assert_eq!(r.stdout, "65534:65534 nobody /nonexistent\n", "{r:?}");
    let r = m.exec(&sh(who), &as_user("www-data")).await.unwrap();
    assert_eq!(r.stdout, "33:33 www-data /var/www\n", "{r:?}");
    let r = m.exec(&sh(who), &as_user("1234:55")).await.unwrap();
    assert_eq!(r.stdout, "1234:55 1234 /\n", "{r:?}");
    let r = m.exec(&sh(who), &ExecOptions::default()).await.unwrap();
    assert_eq!(r.stdout, "0:0 root /root\n", "root by default: {r:?}");
    // the user's rights are the kernel's to enforce
    let r = m
        .exec(&sh("touch /root/x"), &as_user("nobody"))
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0, "{r:?}");
    // the workload ran as its user
    assert_eq!(
        wait_for(&m, "/tmp/workload-user", "daemon").await,
        "daemon\n"
    );
    // unknown users and groups are typed errors
    for bad in ["nosuch", "nobody:nosuchgroup"] {
        let e = m.exec(&sh("true"), &as_user(bad)).await.unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
        assert!(e.to_string().contains("unknown"), "{e}");
    }
    m.delete().await.unwrap();

    // a bare machine has no users to pick from; a workload user needs an image
    let bare = engine.create_machine(config(Some("bare"))).await.unwrap();
    let e = bare
        .exec(&sh("true"), &as_user("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    bare.delete().await.unwrap();
    let mut cfg = config(Some("bare-user"));
    cfg.command = Some(sh("true"));
    cfg.user = Some("nobody".into());
    let e = engine.create_machine(cfg).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
}

//! The `smol` binary, driven as a user would. These boot real VMs (assets of `make setup`).

use std::process::{Command, Output};

/// The assets `make setup` installed in the default home (the tests use their own homes).
fn assets_dir() -> std::path::PathBuf {
    std::env::var_os("SMOL_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".local/share/smol/assets")
        })
}

/// Whether `make setup` installed the guest assets; otherwise the VM tests skip with one message
/// (and fail under `SMOL_VM_TESTS=required`, as in `make test`).
fn vm_ready() -> bool {
    static SAID: std::sync::Once = std::sync::Once::new();
    let kernel = assets_dir().join("vmlinux");
    if kernel.is_file() {
        return true;
    }
    if std::env::var("SMOL_VM_TESTS").as_deref() == Ok("required") {
        panic!(
            "the VM tests are required but {} is missing: run `make setup`",
            kernel.display()
        );
    }
    // written to the real stderr, past the test harness's capture
    SAID.call_once(|| {
        use std::io::Write;
        writeln!(
            std::io::stderr(),
            "skipping the CLI's VM tests: {} is missing; run `make setup` first",
            kernel.display()
        )
        .expect("stderr")
    });
    false
}

fn cmd(home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smol"));
    c.env("SMOL_HOME", home)
        .env("SMOL_RUN_DIR", home.join("run"))
        .env("SMOL_ASSETS", assets_dir());
    c
}

fn smol(home: &std::path::Path, args: &[&str]) -> Output {
    cmd(home).args(args).output().expect("run smol")
}

fn run_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("smc")
        .tempdir_in("/tmp")
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_passes_output_and_exit_code_through() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let o = smol(d.path(), &["run", "--", "uname", "-a"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).starts_with("Linux smol-"),
        "{}",
        text(&o.stdout)
    );

    let o = smol(
        d.path(),
        &[
            "run",
            "--cpus",
            "2",
            "--",
            "sh",
            "-c",
            "nproc; echo oops >&2; exit 42",
        ],
    );
    assert_eq!(o.status.code(), Some(42));
    assert_eq!(text(&o.stdout), "2\n");
    assert_eq!(text(&o.stderr), "oops\n");

    let o = smol(d.path(), &["run", "--", "no-such-tool"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(text(&o.stderr).contains("command not found"));

    let o = smol(d.path(), &["run", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(o.status.code(), Some(124));
    // ephemeral machines leave nothing behind (but the booted template their creates were
    // cloned from, `tpl-<key>`, kept in the home for the next process: docs/BRANCH.md)
    let left: Vec<_> = std::fs::read_dir(d.path().join("machines"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("tpl-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn machine_lifecycle_across_processes() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let o = smol(
        d.path(),
        &["machine", "create", "--name", "cli-box", "--memory", "256"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "cli-box");

    let o = smol(
        d.path(),
        &[
            "machine",
            "exec",
            "cli-box",
            "--",
            "sh",
            "-c",
            "echo hi > /root/f; hostname",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "cli-box\n");
    // a second process sees what the first wrote: same VM
    let o = smol(
        d.path(),
        &[
            "machine",
            "exec",
            "cli-box",
            "-e",
            "X=1",
            "-w",
            "/root",
            "--",
            "sh",
            "-c",
            "cat f; echo $X; pwd",
        ],
    );
    assert_eq!(text(&o.stdout), "hi\n1\n/root\n");

    let o = smol(d.path(), &["machine", "ls"]);
    let ls = text(&o.stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("cli-box") && l.contains("running")),
        "{ls}"
    );

    let o = smol(d.path(), &["machine", "create", "--name", "cli-box"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("already exists"),
        "{}",
        text(&o.stderr)
    );

    assert!(smol(d.path(), &["machine", "stop", "cli-box"])
        .status
        .success());
    let ls = text(&smol(d.path(), &["machine", "ls"]).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("cli-box") && l.contains("stopped")),
        "{ls}"
    );
    // exec boots a stopped machine again; what it wrote is on its disk
    let o = smol(
        d.path(),
        &["machine", "exec", "cli-box", "--", "cat", "/root/f"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hi\n");

    assert!(smol(d.path(), &["machine", "rm", "cli-box"])
        .status
        .success());
    let ls = text(&smol(d.path(), &["machine", "ls"]).stdout);
    assert!(!ls.contains("cli-box"), "{ls}");
    let o = smol(d.path(), &["machine", "exec", "cli-box", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o.stderr).contains("not found"), "{}", text(&o.stderr));
}

#[test]
fn errors_are_one_line_with_a_hint() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let o = cmd(d.path())
        .args(["run", "--", "true"])
        .env("SMOL_KERNEL", "/nonexistent/vmlinux")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("error: guest kernel not found at /nonexistent/vmlinux\n"),
        "{err}"
    );
    assert!(err.contains("hint: run `make setup`"), "{err}");

    let o = smol(d.path(), &["run", "--timeout", "0", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o.stderr).contains("--timeout must be a finite number of seconds > 0"));

    let o = cmd(d.path())
        .args(["run", "--", "true"])
        .env("SMOL_ACCEL", "kvm")
        .output()
        .unwrap();
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(o.status.code(), Some(125));
        assert!(
            text(&o.stderr).contains("KVM unavailable"),
            "{}",
            text(&o.stderr)
        );
    }
}

#[test]
fn doctor_says_which_accelerator_and_why() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let o = smol(d.path(), &["doctor"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("accelerator: "), "{out}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            out.contains("accelerator: tcg") && out.contains("kvm-pvm"),
            "{out}"
        );
    }
    assert!(out.contains("QEMU emulator version"), "{out}");
    let o = cmd(d.path())
        .arg("doctor")
        .env("SMOL_ACCEL", "tcg")
        .output()
        .unwrap();
    assert!(text(&o.stdout).contains("accelerator: tcg (SMOL_ACCEL=tcg)"));
}

#[test]
fn run_in_an_image_from_the_test_registry() {
    if !vm_ready() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/test-registry.sh"))
        .args(["start", "--watch", &std::process::id().to_string()])
        .output()
        .expect("scripts/test-registry.sh");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let port = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("PORT=").map(str::to_string))
        .expect("PORT=");
    let image = format!("127.0.0.1:{port}/library/python:3.12");
    let d = run_dir();
    let o = smol(d.path(), &["image", "pull", &image]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let ls = text(&smol(d.path(), &["image", "ls"]).stdout);
    assert!(
        ls.contains("library/python:3.12") && ls.contains("linux/amd64"),
        "{ls}"
    );
    let o = smol(
        d.path(),
        &["run", &image, "--", "python3", "-c", "print(2**10)"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "1024\n");
    // an image not cached yet: `run` shows the pull on stderr, stdout stays the command's
    let busybox = format!("127.0.0.1:{port}/test/busybox:latest");
    let o = smol(d.path(), &["run", &busybox, "--", "cat", "/etc/motd"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "motd from layer 3\n");
    let err = text(&o.stderr);
    assert!(
        err.contains("downloaded") && err.contains("block image"),
        "{err}"
    );
    let o = smol(
        d.path(),
        &[
            "run",
            &format!("127.0.0.1:{port}/library/nope:1"),
            "--",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("library/nope:1"),
        "{}",
        text(&o.stderr)
    );

    // a detached machine of an image, with a workload of the caller's
    let o = smol(
        d.path(),
        &[
            "machine",
            "create",
            "--name",
            "svc",
            "--image",
            &image,
            "-e",
            "WHO=cli",
            "-w",
            "/root",
            "--",
            "sh",
            "-c",
            "echo $WHO $(pwd) > started; exec sleep 600",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = smol(
            d.path(),
            &["machine", "exec", "svc", "--", "cat", "/root/started"],
        );
        if text(&o.stdout) == "cli /root\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", text(&o.stderr));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = smol(
        d.path(),
        &[
            "machine", "exec", "svc", "-u", "nobody", "-w", "/", "--", "id", "-u",
        ],
    );
    assert_eq!(text(&o.stdout), "65534\n", "{}", text(&o.stderr));
    let o = smol(d.path(), &["machine", "rm", "svc"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// A directory of links to every program on PATH except `hidden`: a host where it is missing.
fn path_without(hidden: &str) -> (tempfile::TempDir, String) {
    let bin = tempfile::tempdir().unwrap();
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let link = bin.path().join(&name);
            if name != hidden && !link.exists() {
                std::os::unix::fs::symlink(e.path(), &link).unwrap();
            }
        }
    }
    let path = bin.path().display().to_string();
    (bin, path)
}

/// The fresh-machine failure of issue 9: `qemu-img` gone (apt removed it). Doctor must fail with
/// the apt-get line, and a create must fail with a typed error naming the program and its
/// package, not blame the engine home.
#[test]
fn a_missing_program_is_named_with_its_package() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let (_bin, path) = path_without("qemu-img");
    let o = cmd(d.path())
        .arg("doctor")
        .env("PATH", &path)
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("MISSING  qemu-img"), "{out}");
    assert!(out.contains("apt-get install qemu-utils"), "{out}");
    assert!(!out.contains("ok: this host"), "{out}");

    let o = cmd(d.path())
        .args(["run", "--", "true"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("qemu-img is needed to create a machine but it is not installed (Debian package qemu-utils)"),
        "{err}"
    );
    assert!(
        err.contains("hint: install it: apt-get install qemu-utils"),
        "{err}"
    );
    assert!(!err.contains("must be writable"), "{err}");

    // an optional feature's program: doctor still passes and says what the feature needs
    let (_bin2, path2) = path_without("passt");
    let o = cmd(d.path())
        .arg("doctor")
        .env("PATH", &path2)
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("missing  passt") && out.contains("apt-get install passt"),
        "{out}"
    );
}

#[test]
fn logs_go_to_stderr_with_v_or_smol_log() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let o = smol(d.path(), &["doctor"]);
    assert!(
        !text(&o.stderr).contains("smol starting"),
        "{}",
        text(&o.stderr)
    );
    let o = smol(d.path(), &["-vv", "doctor"]);
    let err = text(&o.stderr);
    assert!(
        err.contains("DEBUG") && err.contains("smol starting"),
        "{err}"
    );
    // stdout stays the command's
    assert!(!text(&o.stdout).contains("smol starting"));
    let o = cmd(d.path())
        .arg("doctor")
        .env("SMOL_LOG", "smol=debug")
        .output()
        .unwrap();
    assert!(
        text(&o.stderr).contains("smol starting"),
        "{}",
        text(&o.stderr)
    );
    let o = cmd(d.path())
        .arg("doctor")
        .env("SMOL_LOG", "smol=[[[")
        .output()
        .unwrap();
    assert!(
        text(&o.stderr).contains("not a log filter"),
        "{}",
        text(&o.stderr)
    );
}

/// `smol run ... | head -1`: when our stdout's reader goes away, the command is killed and smol
/// exits as a pipeline's writer does (128 + SIGPIPE), instead of streaming into the void.
#[test]
fn a_closed_stdout_ends_the_command() {
    if !vm_ready() {
        return;
    }
    use std::io::Read;
    let d = run_dir();
    let mut child = cmd(d.path())
        .args(["run", "--", "sh", "-c", "while :; do echo y; done"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 2];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"y\n");
    drop(out);
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("smol kept running after its stdout closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(141));
}

/// A command that kills the guest's agent ends `smol run` at once (it hung for good): the
/// agent restarted, the command's stream ends with `Interrupted` and exit code 125.
#[test]
fn run_ends_when_its_command_kills_the_agent() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    let mut child = cmd(d.path())
        .args([
            "run",
            "--timeout",
            "5",
            "--",
            "sh",
            "-c",
            "kill -9 -1; sleep 30",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run smol");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for smol") {
            break s;
        }
        if started.elapsed() > std::time::Duration::from_secs(90) {
            child.kill().expect("kill smol");
            panic!("smol run hung after its command killed the agent");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let o = child.wait_with_output().expect("smol output");
    eprintln!("smol run ended after {:?}", started.elapsed());
    assert_eq!(status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("agent restarted"),
        "{}",
        text(&o.stderr)
    );
}

/// `--network` on `smol run` and `smol machine create` gives the machine its network device
/// (eth0, up); without it there is only `lo`.
#[test]
fn network_is_turned_on_by_a_flag() {
    if !vm_ready() {
        return;
    }
    let d = run_dir();
    // whether eth0 is administratively up (IFF_UP, set by the agent), or no-eth0 (lo, and the
    // kernel's sit0, are always there)
    let script = "f=$(cat /sys/class/net/eth0/flags 2>/dev/null) || { echo no-eth0; exit; }; \
                  [ $((f & 1)) = 1 ] && echo up || echo \"down $f\"";
    let o = smol(d.path(), &["run", "--", "sh", "-c", script]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "no-eth0\n");
    let o = smol(d.path(), &["run", "--network", "--", "sh", "-c", script]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "up\n");

    let o = smol(
        d.path(),
        &["machine", "create", "--name", "net1", "--network"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    // the machine's link outlives `create`: a holder of this home serves its egress filter
    // (and a passt of the machine runs), until the VM ends
    let home = d.path().to_string_lossy().to_string();
    let holder_of_home = || -> Vec<u32> {
        procs_with(&["hold-network", "net1"])
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/environ"))
                    .is_ok_and(|e| String::from_utf8_lossy(&e).contains(&home))
            })
            .collect()
    };
    let t0 = std::time::Instant::now();
    while holder_of_home().is_empty() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        holder_of_home().len(),
        1,
        "one holder of the machine's link"
    );
    let t0 = std::time::Instant::now();
    let passt = || procs_with(&[&format!("{home}/run/machines/net1/net/")]);
    // (the creating process's passt ends a moment after it does)
    while passt().len() != 1 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(passt().len(), 1, "the holder's passt");
    let o = smol(
        d.path(),
        &["machine", "exec", "net1", "--", "sh", "-c", script],
    );
    let rm = smol(d.path(), &["machine", "rm", "net1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "up\n");
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    let t0 = std::time::Instant::now();
    while !holder_of_home().is_empty() && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        holder_of_home().is_empty(),
        "the holder outlived its machine"
    );
}

/// Live processes whose command line holds every one of `words` (zombies have none).
fn procs_with(words: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            words.iter().all(|w| cmd.contains(w)).then_some(pid)
        })
        .collect()
}

/// `smol fleet ARGS` is `smolfleet ARGS`: the one beside the `smol` binary, its arguments as
/// given (flags included), its exit status; none there nor on PATH: 127 and what to build.
#[test]
fn fleet_runs_smolfleet_beside_it_with_its_arguments_and_status() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let smol = dir.path().join("smol");
    std::fs::copy(env!("CARGO_BIN_EXE_smol"), &smol).unwrap();
    let run = |args: &[&str]| {
        Command::new(&smol)
            .args(args)
            .env("PATH", dir.path().join("empty"))
            .output()
            .unwrap()
    };
    let out = run(&["fleet", "serve", "--role", "all"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(
        err.contains("smolfleet") && err.contains("cargo build --release -p smol-fleet"),
        "{err}"
    );
    let fake = dir.path().join("smolfleet");
    std::fs::write(&fake, "#!/bin/sh\necho \"args: $*\"\nexit 7\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(&["fleet", "--help", "node", "-v", "drain", "node-1"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "args: --help node -v drain node-1\n"
    );
}

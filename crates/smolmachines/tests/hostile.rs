//! What a hostile guest must not achieve (issue 10, items 6 and 7), with real VMs: outliving
//! the process that owns it by stopping or wedging its agent, and losing the evidence of (or
//! being reported vaguely after) crashing its own kernel. The owners that get SIGKILLed are
//! this test binary run again as a child process (`hostile_child_entry`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{config, run, sh};
use smolmachines::local::LocalBackend;
use smolmachines::{Error, ExecOptions, MachineBackend, MountSpec};

/// How long after its owner's death a VM that will not power off may live: the linger time
/// (3 s), the watchdog's grace (4 s), SIGTERM (QEMU exits at once), and slack for a busy host.
const DEATH_LIMIT: Duration = Duration::from_secs(15);

fn engine_at(home: &std::path::Path) -> LocalBackend {
    LocalBackend::at(home)
        .with_assets(common::vm_assets().expect("the guest assets of `make setup`"))
}

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("smh")
        .tempdir_in("/tmp")
        .unwrap()
}

/// Runs this test binary as a child process in `mode` against `home`.
fn child(mode: &str, home: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "hostile_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SMOL_TEST_CHILD", mode)
        .env("SMOL_TEST_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The words after `READY` on the child's first line that has it.
fn ready_words(c: &mut Child) -> Vec<String> {
    let mut r = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 {
        if let Some(i) = line.find("READY") {
            return line[i + 5..].split_whitespace().map(String::from).collect();
        }
        line.clear();
    }
    panic!("child ended without READY");
}

/// Processes whose command line mentions `needle` (the machine's run directory: QEMU, passt
/// and virtiofsd name their sockets there).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) && smolmachines::local::record::pid_alive(pid) {
            out.push((pid, cmd));
        }
    }
    out
}

fn program(cmd: &str) -> &str {
    let first = cmd.split_whitespace().next().unwrap_or_default();
    first.rsplit('/').next().unwrap_or(first)
}

/// The machine directory `dir`'s QEMU, passt and virtiofsd: asserts each is there.
fn vm_processes(dir: &str, want: &[&str]) -> Vec<(u32, String)> {
    let procs = processes_mentioning(dir);
    for w in want {
        assert!(
            procs.iter().any(|(_, c)| program(c).starts_with(w)),
            "no {w} among {procs:?}"
        );
    }
    procs
}

/// SIGKILLs the owner and returns how long the VM's processes lived on (or panics after
/// `DEATH_LIMIT`, listing the survivors).
fn kill_owner_and_time_the_vm(c: &mut Child, dir: &str) -> Duration {
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    let t0 = Instant::now();
    loop {
        let left = processes_mentioning(dir);
        if left.is_empty() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < DEATH_LIMIT,
            "{:?} after the owner's SIGKILL these still run: {left:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "helper: runs only as a child process of the other tests"]
fn hostile_child_entry() {
    if common::vm_assets().is_none() {
        return;
    }
    let Ok(mode) = std::env::var("SMOL_TEST_CHILD") else {
        return;
    };
    let home = std::path::PathBuf::from(std::env::var("SMOL_TEST_HOME").unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let engine = engine_at(&home);
        match mode.as_str() {
            // guest code stops the agent (SIGSTOP from a background process): the agent never
            // learns that its host went away, so it never powers the VM off
            "agent-stopped" => {
                let shared = home.join("shared");
                std::fs::create_dir_all(&shared).unwrap();
                let mut cfg = config(Some("stopped"));
                cfg.network = Some(true);
                cfg.mounts = vec![MountSpec {
                    source: shared.display().to_string(),
                    target: "/mnt/shared".into(),
                    read_only: false,
                    staged: false,
                }];
                let m = engine.create_machine(cfg).await.unwrap();
                let r = run(
                    &m,
                    "a=$PPID; (sleep 1; kill -STOP $a) </dev/null >/dev/null 2>&1 & \
                     echo $a",
                )
                .await;
                // the agent, not PID 1 (which restarts it): the guest's init ignores SIGSTOP
                assert_ne!(r.stdout.trim(), "1", "{r:?}");
                // the agent is stopped: a command gets no answer
                tokio::time::sleep(Duration::from_secs(2)).await;
                let opts = ExecOptions {
                    timeout: Some(Duration::from_secs(1)),
                    ..Default::default()
                };
                let probe =
                    tokio::time::timeout(Duration::from_secs(5), m.exec(&sh("true"), &opts)).await;
                assert!(
                    !matches!(probe, Ok(Ok(_))),
                    "the agent still answers: {probe:?}"
                );
                println!("READY {}", m.dir().display());
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            // the whole guest wedged: its vCPUs no longer run (paused over QMP), so nothing in
            // it can react to anything
            "wedged" => {
                let m = engine.create_machine(config(Some("wedged"))).await.unwrap();
                let mut qmp = smolmachines::local::qmp::Qmp::connect(&m.dir().join("qmp.sock"))
                    .await
                    .unwrap();
                qmp.execute("stop", None).await.unwrap();
                println!("READY {}", m.dir().display());
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            // a detached machine: it must keep running after its process dies
            "detached" => {
                let mut cfg = config(Some("free"));
                cfg.detach = true;
                let m = engine.create_machine(cfg).await.unwrap();
                println!("READY {} {}", m.dir().display(), m.pid().unwrap());
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

#[test]
fn an_owner_killed_while_its_agent_is_stopped_takes_its_vm_and_helpers_along() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child("agent-stopped", h.path());
    let dir = ready_words(&mut c).remove(0);
    vm_processes(&dir, &["qemu-system", "passt", "virtiofsd"]);
    let lived = kill_owner_and_time_the_vm(&mut c, &dir);
    eprintln!("QEMU, passt and virtiofsd gone {lived:?} after the owner's SIGKILL");
}

#[test]
fn an_owner_killed_while_its_guest_is_wedged_takes_its_vm_along() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child("wedged", h.path());
    let dir = ready_words(&mut c).remove(0);
    vm_processes(&dir, &["qemu-system"]);
    let lived = kill_owner_and_time_the_vm(&mut c, &dir);
    eprintln!("QEMU gone {lived:?} after the owner's SIGKILL");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detached_machine_outlives_its_killed_process() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child("detached", h.path());
    let words = ready_words(&mut c);
    let pid: u32 = words[1].parse().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    // longer than a non-detached machine may live on
    tokio::time::sleep(DEATH_LIMIT).await;
    assert!(
        smolmachines::local::record::pid_alive(pid),
        "the detached VM died with its process"
    );
    let engine = engine_at(h.path());
    let m = engine.connect_machine("free").await.unwrap();
    assert_eq!(run(&m, "echo here").await.stdout, "here\n");
    m.delete().await.unwrap();
    assert!(!smolmachines::local::record::pid_alive(pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_tmp_and_dev_shm_of_a_small_machine_is_enospc_not_a_kernel_panic() {
    let Some((engine, _dir)) = common::engine() else {
        return;
    };
    let mut cfg = config(None);
    cfg.resources.memory_mb = Some(256);
    let m = engine.create_machine(cfg).await.unwrap();
    for target in ["/dev/shm", "/tmp", "/run"] {
        let r = run(
            &m,
            &format!("dd if=/dev/zero of={target}/fill bs=1M 2>&1; echo rc=$?"),
        )
        .await;
        assert!(
            r.stdout.contains("No space left on device") && !r.stdout.contains("rc=0"),
            "{target}: {r:?}"
        );
    }
    // everything full at once, and the guest still works
    let r = run(&m, "df -m /dev/shm /tmp /run; free -m; echo alive").await;
    assert!(r.stdout.ends_with("alive\n"), "{r:?}");
    eprintln!("{}", r.stdout);
    let console = std::fs::read_to_string(m.dir().join("console.log")).unwrap();
    assert!(!console.contains("Kernel panic"), "{console}");
    m.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_kernel_panic_is_reported_as_a_crash_and_its_console_is_kept_across_a_restart() {
    let Some((engine, _dir)) = common::engine() else {
        return;
    };
    let mut cfg = config(None);
    cfg.persistent = true;
    cfg.resources.memory_mb = Some(256);
    let m = engine.create_machine(cfg).await.unwrap();
    // the guest's own root makes an out-of-memory condition a kernel panic, then runs out (2:
    // also an OOM within a cgroup, which the command's is: the agent's smol-user has a
    // memory.max below the guest's RAM)
    let t0 = Instant::now();
    let opts = ExecOptions {
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let e = m
        .exec(
            &sh("echo 2 > /proc/sys/vm/panic_on_oom && \
                 awk 'BEGIN { s = \"xxxxxxxxxxxxxxxx\"; while (1) s = s s }'"),
            &opts,
        )
        .await
        .unwrap_err();
    let took = t0.elapsed();
    let Error::Interrupted { detail, .. } = &e else {
        panic!("expected Interrupted, got {e:?}");
    };
    assert!(
        detail.starts_with("the VM crashed: Kernel panic"),
        "{detail}"
    );
    assert!(detail.contains("Out of memory"), "{detail}");
    assert!(detail.lines().count() > 3, "the console's lines: {detail}");
    eprintln!("the caller saw after {took:?}: {e}");
    // the next boot starts a new console log and keeps the crashed one
    m.start().await.unwrap();
    assert_eq!(run(&m, "echo back").await.stdout, "back\n");
    let previous = std::fs::read_to_string(m.dir().join("console.log.1")).unwrap();
    assert!(previous.contains("Kernel panic"), "{previous}");
    let current = std::fs::read_to_string(m.dir().join("console.log")).unwrap();
    assert!(!current.contains("Kernel panic"), "{current}");
    m.delete().await.unwrap();
}

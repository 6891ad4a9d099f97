//! VM tests of confinement (`local::confine`, `local::cgroup`): what the host sees of a running
//! machine's QEMU, virtiofsd and passt in /proc and in cgroupfs; the cgroup gone after delete
//! and after a crashed engine; a guest memory hog that stays within the machine's cgroup.
//! They need root (the cgroups; these hosts and CI run as root): otherwise they skip.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{config, engine, run};
use smolmachines::local::{cgroup, confine};
use smolmachines::{MachineBackend, MountSpec};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn core_limit(pid: u32) -> (String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let l = s
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let w: Vec<&str> = l.split_whitespace().collect();
    (w[4].to_string(), w[5].to_string())
}

fn oom_score_adj(pid: u32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Where each descriptor of `pid` points.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

fn wait_gone(dirs: &[PathBuf]) -> bool {
    let t0 = Instant::now();
    while dirs.iter().any(|d| d.exists()) {
        if t0.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[tokio::test]
async fn a_running_machines_processes_are_confined_and_its_cgroup_goes_with_it() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    if !root() {
        eprintln!("not root: the confinement test needs the cgroups; skipped");
        return;
    }
    // a descriptor the caller leaks (no close-on-exec), with a name to look for
    // (outside the share: virtiofsd holds descriptors of what the guest looks up there)
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("shared-file"), "x").unwrap();
    let leak_dir = tempfile::tempdir().unwrap();
    let leak_path = leak_dir.path().join("leaked-by-the-caller");
    let leaked = std::fs::File::create(&leak_path).unwrap();
    // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&leaked), libc::F_SETFD, 0) };
    let mut c = config(Some("confined"));
    c.resources.cpus = Some(2);
    c.resources.memory_mb = Some(256);
    c.network = Some(true);
    c.mounts = vec![MountSpec {
        source: share.path().display().to_string(),
        target: "/mnt/share".into(),
        read_only: false,
        staged: false,
    }];
    let m = engine.create_machine(c).await.unwrap();
    let r = run(&m, "ls /mnt/share; echo ok").await;
    assert!(r.stdout.contains("shared-file"), "{r:?}");
    let qemu = m.pid().unwrap();

    // QEMU: its seccomp filter, no_new_privs, no core dumps, a raised OOM score
    assert_eq!(common::status_field(qemu, "NoNewPrivs"), "1");
    assert_eq!(
        common::status_field(qemu, "Seccomp"),
        "2",
        "QEMU's -sandbox filter"
    );
    assert_eq!(core_limit(qemu), ("0".into(), "0".into()));
    assert_eq!(oom_score_adj(qemu), confine::OOM_SCORE_ADJ);
    let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(
        own,
        confine::OOM_SCORE_ADJ,
        "the caller's score is untouched"
    );

    // its cgroup: the machine's, with the limits of its resources
    let h = cgroup::detect().unwrap();
    let dirs = cgroup::machine_dirs(&h, &m.dir());
    assert!(
        !dirs.is_empty() && dirs.iter().all(|d| d.is_dir()),
        "{dirs:?}"
    );
    let limits = cgroup::limits(256, 2);
    let members: Vec<u32> = match &h {
        cgroup::Hierarchy::V1(_) => {
            let [memory, pids, cpu] = [&dirs[0], &dirs[1], &dirs[2]];
            assert_eq!(
                read(memory, "memory.limit_in_bytes"),
                limits.memory_bytes.to_string()
            );
            assert_eq!(read(pids, "pids.max"), limits.pids.to_string());
            assert_eq!(read(cpu, "cpu.cfs_quota_us"), "200000");
            assert_eq!(read(cpu, "cpu.cfs_period_us"), "100000");
            for d in [memory, pids, cpu] {
                assert!(procs(d).contains(&qemu), "QEMU in {}", d.display());
            }
            procs(memory)
        }
        cgroup::Hierarchy::V2(_) => {
            let d = &dirs[0];
            assert_eq!(read(d, "memory.max"), limits.memory_bytes.to_string());
            assert_eq!(read(d, "pids.max"), limits.pids.to_string());
            assert_eq!(read(d, "cpu.max"), "200000 100000");
            procs(d)
        }
    };
    // the helpers are in it too, confined the same way (virtiofsd forks its sandboxed
    // child, passt drops to nobody and sandboxes itself)
    let names: Vec<String> = members.iter().map(|p| comm(*p)).collect();
    assert!(names.iter().any(|n| n.starts_with("qemu")), "{names:?}");
    assert!(names.iter().any(|n| n == "virtiofsd"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("passt")), "{names:?}");
    // as root: QEMU and passt each at a uid of their own (local::runas), not root, not
    // nobody, not the same; virtiofsd stays root in its own namespaces (threat-model.md)
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && std::env::var_os("SMOL_VMM_USER").is_none() {
        let uid = |p: u32| -> u32 {
            let f = common::status_field(p, "Uid");
            f.split_whitespace().next().unwrap().parse().unwrap()
        };
        let passt: Vec<u32> = members
            .iter()
            .copied()
            .filter(|p| comm(*p).starts_with("passt"))
            .map(uid)
            .collect();
        let q = uid(qemu);
        assert!(q != 0 && q != 65534, "QEMU's uid {q}");
        for p in &passt {
            assert!(
                *p != 0 && *p != 65534 && *p != q,
                "passt's uid {p}, QEMU's {q}"
            );
        }
    }
    for &pid in &members {
        let who = format!("{} ({pid})", comm(pid));
        assert_eq!(common::status_field(pid, "NoNewPrivs"), "1", "{who}");
        assert_eq!(core_limit(pid), ("0".into(), "0".into()), "{who}");
        assert_eq!(oom_score_adj(pid), confine::OOM_SCORE_ADJ, "{who}");
        let fds = fd_targets(pid);
        assert!(
            !fds.iter().any(|t| t.contains("leaked-by-the-caller")),
            "{who} inherited the caller's descriptor: {fds:?}"
        );
    }
    // QEMU has no descriptor of the engine's state or the caller beyond its own files
    let fds = fd_targets(qemu);
    assert!(
        !fds.iter().any(|t| t.ends_with("state.db")),
        "QEMU holds the engine's database: {fds:?}"
    );
    drop(leaked);

    m.delete().await.unwrap();
    assert!(
        wait_gone(&dirs),
        "the cgroup outlived its machine: {dirs:?}"
    );
}

#[tokio::test]
async fn a_guest_memory_hog_is_killed_in_the_guest_and_the_host_stays_within_the_cgroup() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    if !root() {
        eprintln!("not root: skipped");
        return;
    }
    let mut c = config(Some("hog"));
    c.resources.memory_mb = Some(256);
    let m = engine.create_machine(c).await.unwrap();
    let qemu = m.pid().unwrap();
    let h = cgroup::detect().unwrap();
    let dirs = cgroup::machine_dirs(&h, &m.dir());
    let mem = dirs[0].clone();
    let rss = |pid: u32| common::status_field(pid, "VmRSS");
    eprintln!("idle: QEMU VmRSS {}", rss(qemu));
    // past the guest's RAM: the guest's OOM killer ends it
    let r = run(
        &m,
        "x=$(head -c 400000000 /dev/zero | tr '\\0' x); echo survived ${#x}",
    )
    .await;
    assert!(!r.stdout.contains("survived"), "{r:?}");
    // the VMM is alive and answers
    let r = run(&m, "echo alive").await;
    assert_eq!(r.stdout, "alive\n", "{r:?}");
    assert_eq!(m.pid(), Some(qemu));
    let limit: u64 = match &h {
        cgroup::Hierarchy::V1(_) => read(&mem, "memory.limit_in_bytes").parse().unwrap(),
        cgroup::Hierarchy::V2(_) => read(&mem, "memory.max").parse().unwrap(),
    };
    let peak: u64 = match &h {
        cgroup::Hierarchy::V1(_) => read(&mem, "memory.max_usage_in_bytes").parse().unwrap(),
        cgroup::Hierarchy::V2(_) => read(&mem, "memory.peak").parse().unwrap_or(0),
    };
    eprintln!(
        "after the hog: QEMU VmRSS {}, cgroup peak {} MiB of a {} MiB limit (guest RAM 256 MiB)",
        rss(qemu),
        peak >> 20,
        limit >> 20
    );
    assert!(peak <= limit, "{peak} > {limit}");
    // the host never had to OOM-kill inside the machine's cgroup: QEMU fits in its budget
    let oom = match &h {
        cgroup::Hierarchy::V1(_) => read(&mem, "memory.oom_control"),
        cgroup::Hierarchy::V2(_) => read(&mem, "memory.events"),
    };
    assert!(
        oom.lines().any(|l| l == "oom_kill 0"),
        "the host's OOM killer fired in the machine's cgroup: {oom}"
    );
    m.delete().await.unwrap();
    assert!(wait_gone(&dirs), "{dirs:?}");
}

#[tokio::test]
async fn the_reaper_removes_the_cgroups_a_crashed_engine_left() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    if !root() {
        eprintln!("not root: skipped");
        return;
    }
    // a live machine of this engine, whose cgroup must stay
    let m = engine.create_machine(config(Some("alive"))).await.unwrap();
    let h = cgroup::detect().unwrap();
    let alive = cgroup::machine_dirs(&h, &m.dir());
    // what a crashed engine leaves: a machine's cgroup, no record, no process
    let ghost = m.dir().parent().unwrap().join("ghost");
    let dirs = cgroup::create(&h, &ghost, cgroup::limits(128, 1)).unwrap();
    assert!(dirs.iter().all(|d| d.is_dir()));
    // left long ago (a cgroup made in the last 30 s may be a machine starting: never swept)
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for d in &dirs {
        std::fs::File::open(d)
            .and_then(|f| f.set_modified(long_ago))
            .unwrap();
    }
    engine.reap().await.unwrap();
    assert!(wait_gone(&dirs), "the leftover cgroup stayed: {dirs:?}");
    assert!(
        alive.iter().all(|d| d.is_dir()),
        "a live machine lost its cgroup"
    );
    m.delete().await.unwrap();
    assert!(wait_gone(&alive));
}

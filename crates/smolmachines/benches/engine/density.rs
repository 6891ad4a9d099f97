//! Density (issue 16, part 7 of the bench, `SMOL_BENCH_ONLY=density`): how many idle 512 MiB
//! machines one engine holds in a memory cgroup of `SMOL_BENCH_DENSITY_MIB` MiB (default 8192),
//! made one after the other until admission (`local::admission`) refuses one, and what each
//! costs the host (PSS of its QEMU, and the cgroup's usage divided by the count). The bench
//! makes the cgroup (root; a v1 memory hierarchy, or v2 with `memory` delegable below its own
//! cgroup) and runs the engine in a child process of itself moved into it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use smolmachines::local::LocalBackend;
use smolmachines::{Error, ExecOptions, MachineBackend, MachineConfig, ResourceSpec};

/// Set (to the cgroup's directory) in the child that makes the machines.
pub const DENSITY_CHILD: &str = "SMOL_BENCH_DENSITY_CHILD";
const GUEST_MIB: u32 = 512;
const MAX: usize = 200;

struct Cg {
    dir: PathBuf,
    v2: bool,
}

impl Drop for Cg {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("density: cgroup {} left behind", self.dir.display());
    }
}

fn make_cgroup(mib: u64) -> Result<Cg, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let root = Path::new("/sys/fs/cgroup");
    let name = format!("smol-density-{}", std::process::id());
    let w =
        |p: PathBuf, v: String| std::fs::write(&p, v).map_err(|e| format!("{}: {e}", p.display()));
    for l in own.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (
            p.next().unwrap(),
            p.next().unwrap_or(""),
            p.next().unwrap_or(""),
        );
        if ctrls.split(',').any(|c| c == "memory") && root.join("memory").is_dir() {
            let dir = root
                .join("memory")
                .join(path.trim_start_matches('/'))
                .join(&name);
            std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let cg = Cg { dir, v2: false };
            w(
                cg.dir.join("memory.limit_in_bytes"),
                (mib << 20).to_string(),
            )?;
            return Ok(cg);
        }
    }
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no memory cgroup")?;
    let parent = root.join(path.trim_start_matches('/'));
    w(parent.join("cgroup.subtree_control"), "+memory".into())?;
    let dir = parent.join(&name);
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cg = Cg { dir, v2: true };
    w(cg.dir.join("memory.max"), (mib << 20).to_string())?;
    Ok(cg)
}

fn read_key(file: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The parent: makes the cgroup, runs the child in it, prints what it said.
pub fn density() {
    let mib: u64 = std::env::var("SMOL_BENCH_DENSITY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    let cg = match make_cgroup(mib) {
        Ok(cg) => cg,
        Err(e) => return println!("density: cannot make a {mib} MiB memory cgroup: {e}"),
    };
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(DENSITY_CHILD, &cg.dir)
        .env("SMOL_BENCH_DENSITY_MIB", mib.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let (file, key) = if cg.v2 {
        ("memory.events", "oom_kill")
    } else {
        ("memory.oom_control", "oom_kill")
    };
    let kills = read_key(&cg.dir.join(file), key).unwrap_or(0);
    println!("density: OOM kills in the cgroup: {kills} (must be 0)");
}

fn usage(cg: &Path) -> u64 {
    ["memory.current", "memory.usage_in_bytes"]
        .iter()
        .find_map(|f| {
            std::fs::read_to_string(cg.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The child, in the cgroup: machines until one is refused, then their cost.
pub async fn density_child(cg: PathBuf) {
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    let mib: u64 = std::env::var("SMOL_BENCH_DENSITY_MIB")
        .unwrap()
        .parse()
        .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("smd")
        .tempdir_in("/tmp")
        .unwrap();
    let engine = LocalBackend::at(tmp.path());
    let t = vec!["true".to_string()];
    let opts = ExecOptions::default();
    let base = usage(&cg);
    let mut machines = Vec::new();
    let mut refusal = None;
    for i in 0..MAX {
        let made = engine
            .create_machine(MachineConfig {
                name: Some(format!("d{i}")),
                resources: ResourceSpec {
                    memory_mb: Some(GUEST_MIB),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await;
        match made {
            Ok(m) => {
                m.exec(&t, &opts).await.unwrap();
                machines.push(m);
            }
            Err(e @ Error::InsufficientMemory { .. }) => {
                refusal = Some(e.to_string());
                break;
            }
            Err(e) => {
                refusal = Some(format!("NOT the admission error: {e}"));
                break;
            }
        }
    }
    // idle a while, then every machine answers, and its cost
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut answering = 0;
    for m in &machines {
        answering += usize::from(m.exec(&t, &opts).await.is_ok());
    }
    let mut pss: Vec<f64> = machines
        .iter()
        .map(|m| super::pss_kib(m.pid().unwrap()) as f64 / 1024.0)
        .collect();
    let n = machines.len();
    let used = usage(&cg).saturating_sub(base) as f64 / 1048576.0;
    let naive = mib as f64 / f64::from(GUEST_MIB);
    println!(
        "density: {n} idle {GUEST_MIB} MiB machines admitted in a {mib} MiB cgroup, {answering} answer exec; refused next: {}",
        refusal.as_deref().unwrap_or("nothing (stopped at the bench's cap)")
    );
    super::row(
        "idle machines held (baseline: limit / guest RAM)",
        n as f64,
        naive,
        "",
        "info",
    );
    if n > 0 {
        pss.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = pss[n / 2];
        super::row(
            "PSS per idle machine (median)",
            med,
            f64::from(GUEST_MIB),
            "MiB",
            "info (baseline: its guest RAM)",
        );
        println!(
            "density: PSS min {:.0} / max {:.0} MiB; cgroup usage {used:.0} MiB = {:.0} MiB per machine",
            pss[0],
            pss[n - 1],
            used / n as f64
        );
    }
    if n > 0 && std::env::var("SMOL_BENCH_KSM").is_ok_and(|v| v == "1") {
        with_ksm(&machines, pss[n / 2]).await;
    }
    for m in machines {
        let _ = m.delete().await;
    }
}

/// The idle machines' PSS again once KSM has merged their identical pages, against `without`
/// (the median without KSM, this run); every machine must still answer.
async fn with_ksm(machines: &[smolmachines::local::LocalMachine], without: f64) {
    let ksm = match super::engine_ksm::Ksm::on() {
        Ok(k) => k,
        Err(e) => return println!("density: KSM not measured: {e}"),
    };
    let (shared, sharing) = tokio::task::block_in_place(|| ksm.settle(Duration::from_secs(90)));
    let mut pss: Vec<f64> = machines
        .iter()
        .map(|m| super::pss_kib(m.pid().unwrap()) as f64 / 1024.0)
        .collect();
    pss.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let t = vec!["true".to_string()];
    let mut answering = 0;
    for m in machines {
        answering += usize::from(m.exec(&t, &ExecOptions::default()).await.is_ok());
    }
    let n = pss.len();
    super::row(
        "PSS per idle machine, KSM on (median)",
        pss[n / 2],
        without,
        "MiB",
        "info (baseline: KSM off, this run; target <= 50 MiB)",
    );
    println!(
        "density: KSM shares {shared} pages for {sharing} mappings ({:.0} MiB saved); PSS min {:.0} / max {:.0} MiB; {answering} of {n} answer exec",
        sharing as f64 * 4.0 / 1024.0,
        pss[0],
        pss[n - 1]
    );
    drop(ksm);
}

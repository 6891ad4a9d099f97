//! Fleet benchmark: the /v1 server's overhead, each figure beside a baseline measured in the same
//! run on the same node (the fleet's own engine, in this process).
//!
//! 1. exec(`true`) round trip over HTTP (the cloud target: `ConnectOptions` cloud + base URL +
//!    key) against a local exec of `true` on the same machine (the engine's live handle).
//! 2. create -> first exec done through the fleet against a local create -> first exec of the
//!    same kind of machine (same image, detached + persistent as the fleet makes them).
//! 3. sustained execs/s of `true` across 8 machines with 64 concurrent clients over HTTP (each
//!    client its own `CloudBackend`, so its own connection pool), against the same 64-way load
//!    on the same machines through the local engine.
//!
//! The image is the busybox fixture of the test registry on 127.0.0.1
//! (`scripts/test-registry.sh`, stopped when this process exits). Every machine made here is
//! deleted; a guard kills any QEMU left in the engine's run directory, on panic too.
//!
//! Run with `make bench` (or `cargo bench -p smol-fleet --bench fleet`). Needs `make setup`.
//! `SMOL_BENCH_RUNS=N` (default 3) scales it: N creates per side, 20·N execs per side, a
//! (4 + 2·N) s load per side (in two alternating halves). Timings never fail the run.

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol_fleet::testing::spawn;
use smolmachines::local::LocalBackend;
use smolmachines::{ConnectOptions, ExecOptions, Machine, MachineConfig, Target};

const MACHINES: usize = 8;
const CLIENTS: usize = 64;
const READY: Duration = Duration::from_secs(180);

fn runs() -> usize {
    match std::env::var("SMOL_BENCH_RUNS") {
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("SMOL_BENCH_RUNS={s:?}: expected a positive integer"),
        },
        Err(_) => 3,
    }
}

/// Kills the QEMU processes whose command line names the fleet's home when dropped (normally none: every
/// machine is deleted through the API first), then removes the fleet's home.
struct Guard {
    dir: PathBuf,
    _home: tempfile::TempDir,
}

fn qemu_pids_in(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        eprintln!("cannot read /proc: leaked QEMU processes cannot be found");
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).to_string())
                .is_ok_and(|c| c.contains("qemu") && c.contains(&needle))
        })
        .collect()
}

impl Drop for Guard {
    fn drop(&mut self) {
        let pids = qemu_pids_in(&self.dir);
        if pids.is_empty() {
            return;
        }
        eprintln!(
            "guard: killing {} QEMU process(es) of {}: {pids:?}",
            pids.len(),
            self.dir.display()
        );
        for pid in pids {
            match std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
            {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("guard: kill -KILL {pid}: {s}"),
                Err(e) => eprintln!("guard: kill -KILL {pid}: {e}"),
            }
        }
    }
}

/// (median, p90) of `v`.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

fn row(what: &str, ours: (f64, f64), base: (f64, f64), unit: &str, target: &str) {
    println!(
        "{what:<44} median {:>9.3} p90 {:>9.3} {unit:<3} | baseline median {:>9.3} p90 {:>9.3} {unit:<3} | ratio {:>5.2}x  (target {target})",
        ours.0,
        ours.1,
        base.0,
        base.1,
        ours.0 / base.0
    );
}

fn cloud(base_url: &str, key: &str) -> ConnectOptions {
    ConnectOptions {
        target: Some(Target::Cloud),
        base_url: Some(base_url.to_string()),
        api_key: Some(key.to_string()),
    }
}

/// `true`: the busybox fixture has no `true` link, so the applet by name (one exec either way)
fn truth() -> Vec<String> {
    vec!["busybox".to_string(), "true".to_string()]
}

async fn exec_true(m: &Machine) -> f64 {
    let t0 = Instant::now();
    let r = m
        .exec(&truth(), ExecOptions::default())
        .await
        .expect("exec true");
    assert_eq!(r.exit_code, 0, "{r:?}");
    t0.elapsed().as_secs_f64() * 1e3
}

/// Machines the run made, deleted at the end (the guard catches what a panic leaves).
#[derive(Default)]
struct Made(Vec<Machine>);

impl Made {
    async fn delete_all(&mut self) {
        for m in self.0.drain(..) {
            if let Err(e) = m.delete().await {
                eprintln!("delete {}: {e}", m.name());
            }
        }
    }
}

/// `CLIENTS` tasks, each on machine `i % MACHINES` of `pick(i)`, exec `true` in a loop for
/// `secs`; the execs/s and each exec's latency (ms).
async fn load<F>(pick: F, secs: f64) -> (f64, Vec<f64>)
where
    F: Fn(usize) -> Machine,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for i in 0..CLIENTS {
        let m = pick(i);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                lat.push(exec_true(&m).await);
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    let wall = t0.elapsed().as_secs_f64();
    (all.len() as f64 / wall, all)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    let filter = smolmachines::log_filter_from_env().unwrap_or_else(|| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|e| panic!("SMOL_LOG/RUST_LOG {filter:?}: {e}")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Some(_assets) = common::vm_assets() else {
        return;
    };
    let home = tempfile::Builder::new()
        .prefix("sfb")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let guard = Guard {
        dir: home.path().to_path_buf(),
        _home: home,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(bench(guard._home.path(), &guard.dir));
    drop(rt);
    let left = qemu_pids_in(&guard.dir);
    if !left.is_empty() {
        eprintln!(
            "{} QEMU process(es) outlived their delete: {left:?}",
            left.len()
        );
    }
    drop(guard);
}

async fn bench(home: &Path, guarded: &Path) {
    let runs = runs();
    let reg = common_registry::shared();
    let image = reg.reference("test/busybox:latest");
    let srv = spawn(home).await.expect("fleet server");
    let key = srv.admin_key.clone().expect("bootstrap key");
    let conn = cloud(&srv.base_url, &key);
    let engine: Arc<LocalBackend> = srv.fleet.engine().clone();
    // before any machine exists: the guard finds QEMU by the fleet's home, which holds the
    // engine's home (disks) and run directory (sockets), both on QEMU's command line
    assert!(
        engine.home().starts_with(guarded) && engine.run_dir().starts_with(guarded),
        "the engine's home {} and run directory {} are not under {}",
        engine.home().display(),
        engine.run_dir().display(),
        guarded.display()
    );
    let accel = smolmachines::local::accel::detect().expect("accelerator");
    println!(
        "fleet bench: {} ({}), image {image}, SMOL_BENCH_RUNS={runs}, {} CPUs",
        accel.accel.as_str(),
        accel.reason,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let config = MachineConfig {
        image: Some(image.clone()),
        ready_timeout: Some(READY),
        ..Default::default()
    };
    // what the fleet makes of a create body: detached, persistent
    let local_config = |name: String| MachineConfig {
        name: Some(name),
        detach: true,
        persistent: true,
        ..config.clone()
    };
    let mut made = Made::default();

    // warm-up (untimed): the image pulled into the node's store; the first machine of step 3
    let first = Machine::create(config.clone(), conn.clone())
        .await
        .expect("create through the fleet");
    made.0.push(first.clone());

    // 1. exec(true): over HTTP vs on the engine's handle of the same machine
    let local_first = Machine::open_on(&*engine, first.id())
        .await
        .expect("open the fleet's machine on its engine");
    let n = 20 * runs;
    let (mut http, mut local) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        exec_true(&first).await;
        exec_true(&local_first).await;
    }
    for _ in 0..n {
        http.push(exec_true(&first).await);
        local.push(exec_true(&local_first).await);
    }

    // 2. create -> first exec, interleaved so both sides see the same host load
    let (mut via_fleet, mut direct) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let t0 = Instant::now();
        let m = Machine::create(config.clone(), conn.clone())
            .await
            .expect("create through the fleet");
        exec_true(&m).await;
        via_fleet.push(t0.elapsed().as_secs_f64());
        m.delete().await.expect("delete through the fleet");

        let t0 = Instant::now();
        let m = Machine::create_on(&*engine, local_config(format!("bench-local-{i}")))
            .await
            .expect("create on the engine");
        exec_true(&m).await;
        direct.push(t0.elapsed().as_secs_f64());
        m.delete().await.expect("delete on the engine");
    }
    println!("create -> first exec via the fleet (s): {via_fleet:.2?}");
    println!("create -> first exec local (s):         {direct:.2?}");

    // 3. 64 clients on 8 machines
    let mut creates = Vec::new();
    for _ in 1..MACHINES {
        let (config, conn) = (config.clone(), conn.clone());
        creates.push(tokio::spawn(
            async move { Machine::create(config, conn).await },
        ));
    }
    for c in creates {
        made.0.push(
            c.await
                .expect("create task")
                .expect("create through the fleet"),
        );
    }
    let names: Vec<String> = made.0.iter().map(|m| m.name().to_string()).collect();
    let mut http_clients = Vec::new();
    for i in 0..CLIENTS {
        // each client its own backend (own connection pool), as 64 separate callers would be
        let m = Machine::connect(&names[i % MACHINES], conn.clone())
            .await
            .expect("connect through the fleet");
        http_clients.push(m);
    }
    let mut local_machines = Vec::new();
    for m in &made.0 {
        local_machines.push(
            Machine::open_on(&*engine, m.id())
                .await
                .expect("open on the engine"),
        );
    }
    // in alternating halves, so that both sides see the same drift in the host's load
    let secs = (4.0 + 2.0 * runs as f64) / 2.0;
    let (mut http_lat, mut local_lat) = (Vec::new(), Vec::new());
    let (mut http_rate, mut local_rate) = (0.0, 0.0);
    for _ in 0..2 {
        let (rate, lat) = load(|i| http_clients[i].clone(), secs).await;
        http_rate += rate / 2.0;
        http_lat.extend(lat);
        let (rate, lat) = load(|i| local_machines[i % MACHINES].clone(), secs).await;
        local_rate += rate / 2.0;
        local_lat.extend(lat);
    }
    drop(http_clients);
    drop(local_machines);
    drop(local_first);
    made.delete_all().await;

    println!();
    row(
        "exec(true) round trip, HTTP / local",
        stats(http),
        stats(local),
        "ms",
        "<= 1.5x",
    );
    row(
        "create -> first exec, fleet / local",
        stats(via_fleet),
        stats(direct),
        "s",
        "<= 1.1x",
    );
    row(
        &format!("exec(true) latency under {CLIENTS} clients x {MACHINES} machines"),
        stats(http_lat),
        stats(local_lat),
        "ms",
        "info",
    );
    println!(
        "{:<44} HTTP {http_rate:>9.1} execs/s | local {local_rate:>9.1} execs/s | ratio {:>5.2}x  (target: info)",
        format!("sustained execs/s, {CLIENTS} clients x {MACHINES} machines"),
        http_rate / local_rate
    );
    srv.stop();
}

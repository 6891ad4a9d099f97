//! The soak test (`make soak`, issue 14 "Soak and the figures"; ignored in the default run):
//! SOAK_MACHINES machines (default 8) under SOAK_CONCURRENCY operations in flight (default 200,
//! spread evenly over the machines) for SOAK_SECONDS (default 180): execs, writes of files into
//! the guest and reads of them back (checked byte for byte). Then every machine is deleted and
//! the engine dropped, and the test asserts 0 failed operations and nothing leaked: no process
//! naming the engine's home and no child of the test process, the test process's descriptors
//! and sockets as after a first machine's create and delete, no cgroup of the engine on the
//! host, no file left of a machine in the engine's home nor in the private TMPDIR the test
//! gives itself. It prints a table of what it held (operations done, latency percentiles per
//! kind). docs/RELIABILITY.md has a run's figures.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{argv, config, engine, vm_assets};
use smolmachines::local::cgroup;
use smolmachines::{ExecOptions, MachineBackend};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The descriptors of the test process: (all, sockets).
fn own_fds() -> (usize, usize) {
    let mut all = 0;
    let mut sockets = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        all += 1;
        if let Ok(t) = std::fs::read_link(e.path()) {
            if t.to_string_lossy().starts_with("socket:") {
                sockets += 1;
            }
        }
    }
    // the read_dir's own descriptor
    (all - 1, sockets)
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // after the command's closing parenthesis: state, then the parent's pid
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Processes that are children of the test process or name `home` on their command line.
fn our_processes(home: &Path) -> Vec<String> {
    let me = std::process::id();
    let needle = home.to_string_lossy().to_string();
    pids()
        .into_iter()
        .filter(|&p| p != me)
        .filter(|&p| ppid(p) == Some(me) || cmdline(p).contains(&needle))
        .map(|p| format!("{p}: {}", cmdline(p)))
        .collect()
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Unix sockets of the host bound under `home` (/proc/net/unix).
fn host_sockets_under(home: &Path) -> usize {
    let needle = home.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

#[derive(Default)]
struct Kind {
    latencies: Mutex<Vec<Duration>>,
    bytes: AtomicU64,
}

impl Kind {
    fn row(&self, name: &str, secs: f64) -> String {
        let mut l = self.latencies.lock().unwrap().clone();
        l.sort();
        let n = l.len();
        let pct = |p: f64| -> f64 {
            if n == 0 {
                return 0.0;
            }
            let i = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
            l[i].as_secs_f64() * 1e3
        };
        format!(
            "| {name:<10} | {n:>8} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} | {:>9.1} |",
            n as f64 / secs,
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(1.0),
            self.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        )
    }
}

/// A small xorshift: file sizes and contents vary without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
#[ignore = "the soak test: `make soak` (minutes, 8 machines)"]
fn soak_machines_under_concurrent_execs_and_file_transfers_leak_nothing() {
    if vm_assets().is_none() {
        return;
    }
    // the test's own TMPDIR, set before any thread exists: whatever the engine puts in the
    // temporary directory is found there afterwards
    let tmp = tempfile::Builder::new()
        .prefix("smol-soak-tmp")
        .tempdir_in("/tmp")
        .unwrap();
    // SAFETY: no other thread runs yet (the runtime is built below), so nothing reads the
    // environment while it changes.
    unsafe { std::env::set_var("TMPDIR", tmp.path()) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(soak(tmp.path()));
}

async fn soak(tmp: &Path) {
    let machines = env_num("SOAK_MACHINES", 8).max(1) as usize;
    let concurrency = env_num("SOAK_CONCURRENCY", 200).max(1) as usize;
    let seconds = env_num("SOAK_SECONDS", 180);
    let Some((engine, dir)) = engine() else {
        return;
    };
    // a first machine made, used and deleted before the census: what the process opens once
    // for its life (the state database, probes of the host) is then in the baseline, and what
    // each machine holds is not
    {
        let w = engine
            .create_machine(config(Some("soak-warmup")))
            .await
            .expect("create");
        w.write_file("/tmp/w", b"w", None)
            .await
            .expect("write_file");
        assert_eq!(w.read_file("/tmp/w").await.expect("read_file"), b"w");
        w.delete().await.expect("delete");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_before = own_fds();
    let home = dir.path().to_path_buf();
    let machines_dir = engine.run_dir().join("machines");
    let homes_dir = home.join("machines");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let hierarchy = if root { cgroup::detect().ok() } else { None };

    let t_boot = Instant::now();
    let mut handles = Vec::new();
    for i in 0..machines {
        let mut c = config(Some(&format!("soak{i}")));
        c.resources.memory_mb = Some(256);
        c.resources.cpus = Some(1);
        handles.push(Arc::new(engine.create_machine(c).await.expect("create")));
    }
    let boot = t_boot.elapsed();
    let cgroups_running: Vec<PathBuf> = match &hierarchy {
        Some(h) => handles
            .iter()
            .flat_map(|m| cgroup::machine_dirs(h, &m.dir()))
            .collect(),
        None => Vec::new(),
    };
    eprintln!(
        "soak: {machines} machines up in {:.1} s; {concurrency} operations in flight for {seconds} s",
        boot.as_secs_f64()
    );

    let kinds: Arc<[Kind; 3]> = Arc::new(Default::default());
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let m = handles[t % machines].clone();
        let (kinds, failures, failed, stop) = (
            kinds.clone(),
            failures.clone(),
            failed.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1).wrapping_mul(0x2545_f491);
            let path = format!("/tmp/soak-{t}");
            let opts = ExecOptions {
                timeout: Some(Duration::from_secs(120)),
                ..Default::default()
            };
            let mut n = 0u64;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                n += 1;
                // one exec, one write, one read of what was written
                let word = format!("t{t}n{n}");
                let t1 = Instant::now();
                let r = m.exec(&argv(&["echo", &word]), &opts).await;
                let ok = matches!(&r, Ok(r) if r.exit_code == 0 && r.stdout == format!("{word}\n"));
                let fail = |what: String| {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let mut f = failures.lock().unwrap();
                    if f.len() < 20 {
                        f.push(what);
                    }
                };
                if ok {
                    kinds[0].latencies.lock().unwrap().push(t1.elapsed());
                    kinds[0]
                        .bytes
                        .fetch_add(word.len() as u64 + 1, Ordering::Relaxed);
                } else {
                    fail(format!("exec on task {t}: {r:?}"));
                }
                let size = 1 + (next(&mut rng) % (128 << 10)) as usize;
                let seed = next(&mut rng);
                let data: Vec<u8> = (0..size)
                    .map(|i| (seed.rotate_left((i % 64) as u32) as u8) ^ (i as u8))
                    .collect();
                let t2 = Instant::now();
                match m.write_file(&path, &data, Some(0o600)).await {
                    Ok(()) => {
                        kinds[1].latencies.lock().unwrap().push(t2.elapsed());
                        kinds[1].bytes.fetch_add(size as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        fail(format!("write_file on task {t}: {e:?}"));
                        continue;
                    }
                }
                let t3 = Instant::now();
                match m.read_file(&path).await {
                    Ok(back) if back == data => {
                        kinds[2].latencies.lock().unwrap().push(t3.elapsed());
                        kinds[2].bytes.fetch_add(size as u64, Ordering::Relaxed);
                    }
                    Ok(back) => fail(format!(
                        "read_file on task {t}: {} bytes back, {} written, or different",
                        back.len(),
                        size
                    )),
                    Err(e) => fail(format!("read_file on task {t}: {e:?}")),
                }
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            stop.store(true, Ordering::Relaxed);
            failures
                .lock()
                .unwrap()
                .push(format!("a task panicked: {e}"));
            failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let held = t0.elapsed().as_secs_f64();

    // the machines are alive and well after it
    for m in &handles {
        let r = m
            .exec(&argv(&["cat", "/proc/loadavg"]), &ExecOptions::default())
            .await
            .expect("exec after the soak");
        assert_eq!(r.exit_code, 0, "{r:?}");
    }
    let t_del = Instant::now();
    for m in &handles {
        m.delete().await.expect("delete");
    }
    let deleted = t_del.elapsed();
    drop(handles);
    // the warm pool of the booted template (templates are on by default) is the process's
    // own, kept while it runs: dropped here as a process would before it ends
    engine.drop_templates().await.expect("drop_templates");
    drop(engine);
    // the machines' ends are asynchronous (the supervisors reap, cgroups go): a bounded wait
    // for them before the census
    let settle = Instant::now();
    let leaked_processes = loop {
        let p = our_processes(&home);
        let cg_left = cgroups_running.iter().any(|d| d.exists());
        if (p.is_empty() && !cg_left) || settle.elapsed() > Duration::from_secs(30) {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // the runtime's own descriptors settle too (the blocking pool's threads hold none)
    let fds_after = loop {
        let f = own_fds();
        if f.0 <= fds_before.0 || settle.elapsed() > Duration::from_secs(30) {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cgroups_left: Vec<PathBuf> = cgroups_running
        .iter()
        .chain(
            hierarchy
                .as_ref()
                .map(|h| cgroup::engine_dirs(h, &machines_dir))
                .unwrap_or_default()
                .iter(),
        )
        .filter(|d| d.exists())
        .cloned()
        .collect();
    let files_left: BTreeSet<PathBuf> = tree(&machines_dir)
        .into_iter()
        .map(|p| Path::new("run/machines").join(p))
        .chain(
            tree(&homes_dir)
                .into_iter()
                .map(|p| Path::new("machines").join(p)),
        )
        .collect();
    let tmp_left = tree(tmp);
    let sockets_left = host_sockets_under(&home);

    let kinds_names = ["exec", "write_file", "read_file"];
    let total: usize = kinds
        .iter()
        .map(|k| k.latencies.lock().unwrap().len())
        .sum();
    let failed = failed.load(Ordering::Relaxed);
    eprintln!();
    eprintln!(
        "soak: {machines} machines (256 MiB, 1 vCPU each) on {} host CPUs, {concurrency} operations \
         in flight, {held:.0} s; boot of all {:.1} s, delete of all {:.1} s",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        boot.as_secs_f64(),
        deleted.as_secs_f64()
    );
    eprintln!(
        "| operation  |     done |    per s |  p50 ms  |  p90 ms  |  p99 ms  |  max ms  |      MiB  |"
    );
    eprintln!(
        "|------------|----------|----------|----------|----------|----------|----------|-----------|"
    );
    for (k, name) in kinds.iter().zip(kinds_names) {
        eprintln!("{}", k.row(name, held));
    }
    eprintln!(
        "soak: {total} operations done, {failed} failed; leaked: {} processes, descriptors {} -> {} \
         (sockets {} -> {}), {} host sockets under the home, {} cgroups, {} files of machines in \
         the home, {} in TMPDIR",
        leaked_processes.len(),
        fds_before.0,
        fds_after.0,
        fds_before.1,
        fds_after.1,
        sockets_left,
        cgroups_left.len(),
        files_left.len(),
        tmp_left.len()
    );

    let failures = failures.lock().unwrap();
    assert_eq!(failed, 0, "failed operations (the first 20): {failures:#?}");
    assert!(total > 0, "no operation ran");
    assert!(
        leaked_processes.is_empty(),
        "processes left: {leaked_processes:#?}"
    );
    assert!(
        fds_after.0 <= fds_before.0 && fds_after.1 <= fds_before.1,
        "the test process's descriptors {fds_before:?} -> {fds_after:?} (all, sockets)"
    );
    assert_eq!(
        sockets_left,
        0,
        "unix sockets bound under {}",
        home.display()
    );
    assert!(cgroups_left.is_empty(), "cgroups left: {cgroups_left:?}");
    assert!(
        files_left.is_empty(),
        "left in {}: {files_left:?}",
        home.display()
    );
    assert!(tmp_left.is_empty(), "left in TMPDIR: {tmp_left:?}");
    drop(dir);
}

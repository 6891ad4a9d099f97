//! Engine benchmark: each figure is printed beside a baseline measured in the same run.
//!
//! 1. create -> first exec done, against a bare QEMU boot of the same kernel + initramfs to init
//!    (the agent binary in `smol.mode=boot-bench` prints one line as PID 1 and powers off).
//! 2. exec round trip (`true`), against a raw 1-byte echo over the same virtio-serial channel
//!    (the agent in `smol.mode=raw`: no framing, no multiplexing).
//! 3. write_file / read_file of 64 MiB, against raw channel throughput in each direction.
//!
//! 4. With `SMOL_BENCH_COMPARE_INITRD=<initramfs>` (e.g. one built by `scripts/dev-initramfs.sh`
//!    from an older commit): write_file / read_file again, this agent against that one, runs
//!    interleaved in the same process, so a change to the file path shows as a ratio.
//!
//! Run with `make bench` (or `cargo bench -p smolmachines --bench engine`). Needs `make setup`.
//! 5. branch (issue 12): `branch` call -> first exec in the clone, a create from a booted
//!    template (`with_templates(true)`) -> first exec, and the same in a new process from the
//!    template kept in the engine home with no warm pool, each against cold create -> first
//!    exec in the same run, and the source's pause window (printed, never asserted).
//!
//! 6. checkpoint (issue 12): checkpoint of a branchable 256 MiB guest with 100 MiB dirty, and
//!    a restore of the file -> first exec: seconds and the file's size (`engine_checkpoint.rs`).
//!
//! 2b. exec floor (issue 16): exec(`true`) against the guest's own spawn + wait of `/bin/true`
//!    (the agent in `smol.mode=raw`, op `x`, timed on the host: the spawn and one raw round
//!    trip; the guest's clock may tick in 4 ms jiffies under TCG): what is left is the
//!    protocol's and the engine's own cost per exec. The raw VM stays up beside the machine and
//!    the samples alternate (one exec, one guest spawn, one echo); the row compares medians.
//!
//! 7. density (issue 16): idle 512 MiB machines in a memory cgroup until admission refuses one,
//!    and their PSS (`engine/density.rs`; `SMOL_BENCH_DENSITY_MIB`, default 8192). With
//!    `SMOL_BENCH_KSM=1` the PSS again with the host's KSM on for the measurement
//!    (`engine/ksm.rs`; it puts the host's settings back).
//!
//! `SMOL_BENCH_ONLY=files` runs only 3. and 4.; `SMOL_BENCH_ONLY=branch` only 5.;
//! `SMOL_BENCH_ONLY=checkpoint` only 6.; `SMOL_BENCH_ONLY=exec` only 2., 2b. and 3.;
//! `SMOL_BENCH_ONLY=density` only 7. (not part of a full run: it needs root and minutes);
//! `SMOL_BENCH_ONLY=create` only 1., with bare boots that have the image slots beside them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smolmachines::local::vmm::{host_tsc_khz, qemu_args, VmSpec};
use smolmachines::local::{accel, assets, LocalBackend};
use smolmachines::{ExecOptions, MachineBackend, MachineConfig};

#[path = "engine_checkpoint.rs"]
mod engine_checkpoint;
#[path = "engine/density.rs"]
mod engine_density;
#[path = "engine/ksm.rs"]
mod engine_ksm;

const BOOTS: usize = 5;
const ROUND_TRIPS: usize = 200;
const BIG: usize = 64 * 1024 * 1024;
const COMPARE_ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn spec(dir: &std::path::Path, name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        cpus: 1,
        memory_mb: 512,
        assets: assets::resolve().expect("assets: run `make setup`"),
        accel: accel::detect().expect("accelerator"),
        dir: dir.to_path_buf(),
        disk: None,
        linger_ms: None,
        mounts: vec![],
        network: false,
        image: None,
        ram_file: None,
        restore: None,
        // the bare boot has none of the engine's extras: what image slots cost at boot
        // shows in the create ratio
        image_slots: vec![],
    }
}

/// QEMU argv for a spec with extra kernel command-line words and the console on stdout.
fn bare_args(spec: &VmSpec, extra: &str) -> Vec<String> {
    let mut args = qemu_args(spec, host_tsc_khz());
    for i in 0..args.len() {
        if args[i] == "-append" {
            args[i + 1] = format!("{} {extra}", args[i + 1]);
        }
        if args[i] == "-serial" {
            args[i + 1] = "stdio".into();
        }
    }
    args
}

/// Spawn -> the marker line on the console, for a bare boot to init.
/// A bare boot to init; with `slots` empty image slots (the devices every machine gets,
/// `local::slots`) to show what they add.
fn bare_boot(dir: &std::path::Path, slots: usize) -> f64 {
    let mut s = spec(dir, "bench-bare");
    s.image_slots = vec![None; slots];
    let sock = s.agent_socket();
    let _ = std::fs::remove_file(&sock);
    let _listener = UnixListener::bind(&sock).unwrap();
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(bare_args(&s, "smol.mode=boot-bench"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut t = f64::NAN;
    for line in lines.by_ref() {
        if line.unwrap().contains("SMOL_INIT_REACHED") {
            t = t0.elapsed().as_secs_f64();
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    t
}

struct RawVm {
    child: std::process::Child,
    sock: std::os::unix::net::UnixStream,
}

impl RawVm {
    fn boot(dir: &std::path::Path) -> RawVm {
        let s = spec(dir, "bench-raw");
        let _ = std::fs::remove_file(s.agent_socket());
        let listener = UnixListener::bind(s.agent_socket()).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(bare_args(&s, "smol.mode=raw"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (sock, _) = listener.accept().unwrap();
        let mut vm = RawVm { child, sock };
        // the agent is ready once it echoes
        vm.echo();
        vm
    }

    fn cmd(&mut self, op: u8, n: u64) {
        let mut hdr = [0u8; 9];
        hdr[0] = op;
        hdr[1..].copy_from_slice(&n.to_le_bytes());
        self.sock.write_all(&hdr).unwrap();
    }

    fn echo(&mut self) {
        self.cmd(b'e', 1);
        self.sock.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        self.sock.read_exact(&mut b).unwrap();
    }

    /// One guest spawn + wait of `/bin/true` (op `x`, n = 1) as the host sees it: the spawn
    /// and one raw round trip of the channel, on the host's clock, in milliseconds; and the
    /// guest's own figure for the spawn alone. The guest's clock under TCG may tick in jiffies
    /// (4 ms steps: a spawn read 0 or 4 ms), so only the host's figure is a baseline. `None`
    /// from an agent without op `x` (an older initramfs ignores it and stays in step).
    fn spawn_floor(&mut self) -> Option<(f64, f64)> {
        let t0 = Instant::now();
        self.cmd(b'x', 1);
        let mut ns = [0u8; 8];
        self.sock
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let got = self.sock.read_exact(&mut ns);
        let host = t0.elapsed().as_secs_f64() * 1e3;
        self.sock.set_read_timeout(None).unwrap();
        got.ok()?;
        Some((host, u64::from_le_bytes(ns) as f64 / 1e6))
    }

    fn sink(&mut self, n: usize) -> f64 {
        let buf = vec![7u8; 1 << 20];
        let t0 = Instant::now();
        self.cmd(b's', n as u64);
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len());
            self.sock.write_all(&buf[..k]).unwrap();
            left -= k;
        }
        let mut ack = [0u8; 1];
        self.sock.read_exact(&mut ack).unwrap();
        t0.elapsed().as_secs_f64()
    }

    fn source(&mut self, n: usize) -> f64 {
        let mut buf = vec![0u8; 1 << 20];
        let t0 = Instant::now();
        self.cmd(b'o', n as u64);
        let mut left = n;
        while left > 0 {
            let k = self.sock.read(&mut buf[..left.min(1 << 20)]).unwrap();
            assert!(k > 0);
            left -= k;
        }
        t0.elapsed().as_secs_f64()
    }
}

impl Drop for RawVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn row(what: &str, ours: f64, base: f64, unit: &str, target: &str) {
    println!(
        "{what:<40} {ours:>10.4} {unit:<5} baseline {base:>10.4} {unit:<5} ratio {:>6.2}x  (target {target})",
        ours / base
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// connect to a stopped persistent machine -> first exec, against a fresh create; and the host
/// memory an idle machine costs beyond what its guest touched.
/// One write_file and one read_file of `data` on `m`: (write MiB/s, read MiB/s).
async fn file_round(m: &dyn MachineBackend, data: &[u8]) -> (f64, f64) {
    let mib = data.len() as f64 / 1048576.0;
    let t0 = Instant::now();
    m.write_file("/tmp/big", data, None).await.unwrap();
    let w = mib / t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let back = m.read_file("/tmp/big").await.unwrap();
    let r = mib / t0.elapsed().as_secs_f64();
    assert_eq!(back.len(), data.len());
    (w, r)
}

/// 4.: this agent's file throughput against the agent of the initramfs at `other`, in
/// alternating rounds on two machines of the same kernel.
async fn compare_agents(dir: &std::path::Path, other: std::path::PathBuf) {
    let ours = assets::resolve().unwrap();
    let theirs = assets::Assets {
        initrd: other.clone(),
        ..ours.clone()
    };
    let a = LocalBackend::at(dir.join("ours"));
    let b = LocalBackend::at(dir.join("theirs")).with_assets(theirs);
    let ma = a.create_machine(MachineConfig::default()).await.unwrap();
    let mb = b.create_machine(MachineConfig::default()).await.unwrap();
    let data = vec![0x5au8; BIG];
    let (mut wa, mut ra, mut wb, mut rb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..COMPARE_ROUNDS {
        let (w, r) = file_round(&mb, &data).await;
        wb.push(w);
        rb.push(r);
        let (w, r) = file_round(&ma, &data).await;
        wa.push(w);
        ra.push(r);
    }
    ma.delete().await.unwrap();
    mb.delete().await.unwrap();
    println!("agent comparison against {}:", other.display());
    println!("  this agent  write {wa:.0?} read {ra:.0?} MiB/s");
    println!("  that agent  write {wb:.0?} read {rb:.0?} MiB/s");
    row(
        "write_file 64 MiB vs that agent (median)",
        median(wa),
        median(wb),
        "MiB/s",
        ">= 1.0x",
    );
    row(
        "read_file 64 MiB vs that agent (median)",
        median(ra),
        median(rb),
        "MiB/s",
        ">= 1.0x",
    );
}

/// Set (to an engine home) in the child process of 5. that makes one machine from the template
/// kept in that home.
const TEMPLATE_CHILD: &str = "SMOL_BENCH_TEMPLATE_CHILD";

/// The child of 5.: create -> first exec from the kept template, no warm pool; prints seconds.
async fn templated_child(home: std::path::PathBuf) {
    let engine = LocalBackend::at(home)
        .with_templates(true)
        .with_template_pool(0);
    let t0 = Instant::now();
    let m = engine
        .create_machine(MachineConfig::default())
        .await
        .unwrap();
    m.exec(&["true".to_string()], &ExecOptions::default())
        .await
        .unwrap();
    let s = t0.elapsed().as_secs_f64();
    m.delete().await.unwrap();
    println!("templated-child-s={s}");
}

/// 5.: branch -> first exec in the clone against cold create -> first exec, and the pause window
/// of the source (a 512 MiB guest that has booted and run a few commands).
async fn branching(engine: &LocalBackend) {
    let t = vec!["true".to_string()];
    let opts = ExecOptions::default();
    let (mut cold, mut clone, mut pause, mut ram) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let src = engine
        .create_machine(MachineConfig {
            name: Some("branch-src".into()),
            branchable: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    src.exec(&t, &opts).await.unwrap();
    // booted templates: the first templated create builds the template (not measured)
    let templated = engine.clone().with_templates(true).with_template_pool(1);
    let mut from_template = Vec::new();
    templated
        .create_machine(MachineConfig {
            name: Some("warm-template".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .delete()
        .await
        .unwrap();
    for i in 0..BOOTS {
        // a warm pool clone is ready (and nothing fills one while the others are measured)
        templated.settle_pool(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        let m = templated
            .create_machine(MachineConfig {
                name: Some(format!("tpl-made-{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
        m.exec(&t, &opts).await.unwrap();
        from_template.push(t0.elapsed().as_secs_f64());
        m.delete().await.unwrap();
        templated.settle_pool(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        let m = engine
            .create_machine(MachineConfig {
                name: Some(format!("cold-{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
        m.exec(&t, &opts).await.unwrap();
        cold.push(t0.elapsed().as_secs_f64());
        m.delete().await.unwrap();
        let t0 = Instant::now();
        let (c, report) = src
            .branch_machine(&format!("clone-{i}"), &Default::default())
            .await
            .unwrap();
        c.exec(&t, &opts).await.unwrap();
        clone.push(t0.elapsed().as_secs_f64());
        pause.push(report.pause.as_secs_f64() * 1e3);
        ram = report.ram_bytes >> 20;
        c.delete().await.unwrap();
    }
    row(
        "branch -> first exec in the clone",
        median(clone),
        median(cold.clone()),
        "s",
        "<= 0.05 (baseline: cold create)",
    );
    row(
        "templated create -> first exec",
        median(from_template),
        median(cold.clone()),
        "s",
        "<= 0.1 (baseline: cold create)",
    );
    // the template kept in the engine home, used by a new process with no warm pool: the
    // create -> first exec of a fresh process (its engine opened, its first reaper scan)
    let mut kept = Vec::new();
    for _ in 0..BOOTS {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(TEMPLATE_CHILD, engine.home())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let s = text
            .lines()
            .find_map(|l| l.strip_prefix("templated-child-s="))
            .unwrap_or_else(|| panic!("the child said nothing: {text}"));
        kept.push(s.parse::<f64>().unwrap());
    }
    row(
        "templated create -> first exec, kept template, new process, no pool",
        median(kept),
        median(cold),
        "s",
        "<= 0.1 (baseline: cold create)",
    );
    println!(
        "source pause window during branch: median {:.1} ms, max {:.1} ms ({ram} MiB of RAM copied; target <= 40 ms)",
        median(pause.clone()),
        pause.iter().cloned().fold(0.0, f64::max)
    );
    // private memory (PSS) of idle machines: clones share their frozen RAM's pages
    templated.settle_pool(Duration::from_secs(60)).await;
    let cold_m = engine
        .create_machine(MachineConfig {
            name: Some("pss-cold".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (clone_m, _) = src
        .branch_machine("pss-clone", &Default::default())
        .await
        .unwrap();
    let tpl_m = templated
        .create_machine(MachineConfig {
            name: Some("pss-tpl".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    for m in [&cold_m, &clone_m, &tpl_m] {
        m.exec(&t, &opts).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pss = |m: &smolmachines::local::LocalMachine| pss_kib(m.pid().unwrap()) as f64 / 1024.0;
    let base = pss(&cold_m);
    row(
        "PSS of an idle clone",
        pss(&clone_m),
        base,
        "MiB",
        "<= 0.25 (baseline: an idle cold machine)",
    );
    row(
        "PSS of an idle templated machine",
        pss(&tpl_m),
        base,
        "MiB",
        "<= 0.25 (baseline: an idle cold machine)",
    );
    for m in [cold_m, clone_m, tpl_m] {
        m.delete().await.unwrap();
    }
    templated.drop_templates().await.unwrap();
    src.delete().await.unwrap();
}

/// Proportional set size of a process (`smaps_rollup`): its private pages plus its share of
/// pages mapped by others too (a clone's frozen RAM, QEMU's code).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn lifecycle(engine: &LocalBackend) {
    let t = vec!["true".to_string()];
    let opts = ExecOptions::default();
    let mut fresh = Vec::new();
    let mut connect = Vec::new();
    for i in 0..BOOTS {
        let t0 = Instant::now();
        let m = engine
            .create_machine(MachineConfig {
                name: Some(format!("life-{i}")),
                persistent: true,
                ..Default::default()
            })
            .await
            .unwrap();
        m.exec(&t, &opts).await.unwrap();
        fresh.push(t0.elapsed().as_secs_f64());
        m.stop().await.unwrap();
        drop(m);
        let t0 = Instant::now();
        let c = engine.connect_machine(&format!("life-{i}")).await.unwrap();
        c.exec(&t, &opts).await.unwrap();
        connect.push(t0.elapsed().as_secs_f64());
        if i == 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pid = c.pid().unwrap();
            let rss = rss_kib(pid);
            let r = c
                .exec(
                    &[
                        "sh".into(),
                        "-c".into(),
                        "free | awk '/Mem:/{print $3}'".into(),
                    ],
                    &opts,
                )
                .await
                .unwrap();
            let used: u64 = r.stdout.trim().parse().unwrap_or(0);
            println!(
                "idle machine: QEMU RSS {} MiB, guest-used {} MiB, host overhead {} MiB",
                rss / 1024,
                used / 1024,
                rss.saturating_sub(used) / 1024
            );
        }
        c.delete().await.unwrap();
    }
    row(
        "connect stopped persistent -> first exec",
        median(connect),
        median(fresh),
        "s",
        "info (baseline: fresh create)",
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    if let Some(home) = std::env::var_os(TEMPLATE_CHILD) {
        return templated_child(home.into()).await;
    }
    if let Some(cg) = std::env::var_os(engine_density::DENSITY_CHILD) {
        return engine_density::density_child(cg.into()).await;
    }
    if std::env::var("SMOL_BENCH_ONLY").is_ok_and(|v| v == "density") {
        return tokio::task::spawn_blocking(engine_density::density)
            .await
            .unwrap();
    }
    let tmp = tempfile::Builder::new()
        .prefix("smb")
        .tempdir_in("/tmp")
        .unwrap();
    // the baselines are cold boots (booted templates are on by default; 5. turns them on)
    let engine = LocalBackend::at(tmp.path()).with_templates(false);
    let choice = accel::detect().unwrap();
    println!("accelerator: {} ({})", choice.accel.as_str(), choice.reason);
    let files_only = std::env::var("SMOL_BENCH_ONLY").is_ok_and(|v| v == "files");
    if std::env::var("SMOL_BENCH_ONLY").is_ok_and(|v| v == "branch") {
        branching(&engine).await;
        return;
    }
    if std::env::var("SMOL_BENCH_ONLY").is_ok_and(|v| v == "checkpoint") {
        engine_checkpoint::checkpointing(&engine, tmp.path()).await;
        return;
    }
    let compare = std::env::var_os("SMOL_BENCH_COMPARE_INITRD").map(std::path::PathBuf::from);
    if files_only {
        if let Some(other) = compare {
            compare_agents(tmp.path(), other).await;
        } else {
            let m = engine
                .create_machine(MachineConfig::default())
                .await
                .unwrap();
            let data = vec![0x5au8; BIG];
            for _ in 0..3 {
                let (w, r) = file_round(&m, &data).await;
                println!("write_file {w:.0} MiB/s  read_file {r:.0} MiB/s");
            }
            m.delete().await.unwrap();
        }
        return;
    }

    // 1. boot
    let mut bare = Vec::new();
    let mut ours = Vec::new();
    let opts = ExecOptions::default();
    let t = vec!["true".to_string()];
    let exec_only = std::env::var("SMOL_BENCH_ONLY").is_ok_and(|v| v == "exec");
    let create_only = std::env::var("SMOL_BENCH_ONLY").is_ok_and(|v| v == "create");
    let mut bare_slots = Vec::new();
    for i in 0..if exec_only { 0 } else { BOOTS } {
        bare.push(bare_boot(tmp.path(), 0));
        if create_only {
            bare_slots.push(bare_boot(tmp.path(), smolmachines::local::slots::SLOTS));
        }
        let t0 = Instant::now();
        let m = engine
            .create_machine(MachineConfig {
                name: Some(format!("bench-{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
        m.exec(&t, &opts).await.unwrap();
        ours.push(t0.elapsed().as_secs_f64());
        m.delete().await.unwrap();
    }
    println!("bare boot to init (s): {bare:.3?}");
    println!("create -> first exec (s): {ours:.3?}");
    if !exec_only {
        row(
            "create -> first exec done (median)",
            median(ours),
            median(bare.clone()),
            "s",
            "<= 1.15x",
        );
    }
    if create_only {
        row(
            "bare boot with the image slots (median)",
            median(bare_slots),
            median(bare.clone()),
            "s",
            "info",
        );
        return;
    }

    // 2. + 3. raw channel baseline
    let mut raw = RawVm::boot(tmp.path());
    let mut echo = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let t0 = Instant::now();
        raw.echo();
        echo.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let raw_in = median(
        (0..3)
            .map(|_| BIG as f64 / raw.sink(BIG) / 1048576.0)
            .collect(),
    );
    let raw_out = median(
        (0..3)
            .map(|_| BIG as f64 / raw.source(BIG) / 1048576.0)
            .collect(),
    );

    let m = engine
        .create_machine(MachineConfig::default())
        .await
        .unwrap();
    // 2. + 2b. interleaved: one exec, one guest spawn of the raw VM, one raw echo, one
    // protocol ping, so the host's noise hits the figure and its floors alike
    let (mut exec_rt, mut floor, mut echo_i) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ping, mut guest_clock) = (Vec::new(), Vec::new());
    for _ in 0..ROUND_TRIPS {
        let t0 = Instant::now();
        m.exec(&t, &opts).await.unwrap();
        exec_rt.push(t0.elapsed().as_secs_f64() * 1e3);
        if floor.len() == exec_rt.len() - 1 {
            if let Some((host, guest)) = raw.spawn_floor() {
                floor.push(host);
                guest_clock.push(guest);
            }
        }
        let t0 = Instant::now();
        raw.echo();
        echo_i.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        m.ping().await.unwrap();
        ping.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let ping_med = median(ping.clone());
    drop(raw);
    let floor = (floor.len() == exec_rt.len()).then(|| median(floor));
    // pings back to back (no exec before each): against the interleaved pings, what an exec
    // leaves the guest doing after its exit (the ping waits behind it)
    let mut ping_alone = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let t0 = Instant::now();
        m.ping().await.unwrap();
        ping_alone.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let data = vec![0x5au8; BIG];
    let mut w = Vec::new();
    let mut r = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        m.write_file("/tmp/big", &data, None).await.unwrap();
        w.push(BIG as f64 / t0.elapsed().as_secs_f64() / 1048576.0);
        let t0 = Instant::now();
        let back = m.read_file("/tmp/big").await.unwrap();
        r.push(BIG as f64 / t0.elapsed().as_secs_f64() / 1048576.0);
        assert_eq!(back.len(), BIG);
    }
    m.delete().await.unwrap();
    let exec_med = median(exec_rt);
    row(
        "exec(true) round trip (median)",
        exec_med,
        median(echo.clone()),
        "ms",
        "<= 1.5x",
    );
    match floor {
        Some(floor) => {
            let echo_i = median(echo_i);
            // the host's clock on the raw VM's op x: the spawn and its round trip in one
            row(
                "exec(true) vs guest spawn + raw echo",
                exec_med,
                floor,
                "ms",
                "<= 1.2x",
            );
            println!(
                "interleaved medians: guest spawn+wait of /bin/true with its round trip {floor:.3} ms \
                 (the guest's own clock: {:.3} ms), raw echo {echo_i:.3} ms, protocol ping \
                 {ping_med:.3} ms; exec - (spawn round trip - echo + ping) = {:.3} ms",
                median(guest_clock),
                exec_med - (floor - echo_i) - ping_med
            );
        }
        None => println!("exec floor: this initramfs's agent has no raw op x (older agent)"),
    }
    row(
        "protocol ping round trip, right after an exec (median)",
        median(ping),
        median(echo.clone()),
        "ms",
        "info",
    );
    row(
        "protocol ping round trip, back to back (median)",
        median(ping_alone),
        median(echo.clone()),
        "ms",
        "info",
    );
    row(
        "write_file 64 MiB (median)",
        median(w),
        raw_in,
        "MiB/s",
        ">= 0.8x",
    );
    row(
        "read_file 64 MiB (median)",
        median(r),
        raw_out,
        "MiB/s",
        ">= 0.8x",
    );
    if exec_only {
        return;
    }
    lifecycle(&engine).await;
    branching(&engine).await;
    engine_checkpoint::checkpointing(&engine, tmp.path()).await;
    if let Some(other) = compare {
        compare_agents(tmp.path(), other).await;
    }
}

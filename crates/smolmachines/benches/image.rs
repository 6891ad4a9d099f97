//! Image pull benchmark with a same-run baseline.
//!
//! Starts a registry on 127.0.0.1 (`scripts/test-registry.sh`, which pushes the Debian python
//! test image), then, for the same image from the same registry in the same run:
//!
//! * smol: a cold `fetch` (download, verify, store) + `unpack_to` a directory, and a cold
//!   `pull` (the same plus the erofs block image);
//! * baseline: `skopeo copy docker://... oci:...` + `umoci unpack` (what a script would do);
//! * block images of the unpacked tree: erofs, erofs+lz4hc, ext4 (time and size).
//!
//! Run: `cargo bench -p smolmachines --bench image` (`SMOL_BENCH_RUNS=5` for more runs).
//! Needs docker-registry, skopeo, umoci, erofs-utils, e2fsprogs, debootstrap, zstd, jq.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smolmachines::image::{build_block_image, ImageStore, PullOptions, RootfsFormat};

fn registry_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-registry.sh")
}

/// Starts the test registry; returns its port and state directory.
fn start_registry() -> (u16, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-registry.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(["start", "--watch", &std::process::id().to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "scripts/test-registry.sh start failed"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("PORT="))
        .expect("PORT=")
        .parse()
        .expect("port");
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("DIR="))
        .expect("DIR=")
        .to_string();
    (port, dir)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn t1_smol(v: &[Duration]) -> Duration {
    *v.last().unwrap()
}

fn tree_bytes(p: &Path) -> u64 {
    let out = Command::new("du").args(["-sb"]).arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let runs: usize = std::env::var("SMOL_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (port, registry_dir) = start_registry();
    let reference = format!("127.0.0.1:{port}/library/python:3.12");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = tempfile::tempdir().unwrap();
    let opts = PullOptions {
        format: RootfsFormat::Erofs,
        ..Default::default()
    };

    let (mut fetch, mut unpack, mut smol_total, mut pull_full) = (vec![], vec![], vec![], vec![]);
    let (mut copy, mut umoci, mut base_total) = (vec![], vec![], vec![]);
    let mut tree: Option<PathBuf> = None;
    for i in 0..runs {
        // smol: cold fetch + unpack.
        let home = base.path().join(format!("smol-{i}"));
        let store = ImageStore::open(&home).unwrap().with_options(opts.clone());
        let t = Instant::now();
        rt.block_on(store.fetch(&reference, None)).unwrap();
        let t1 = t.elapsed();
        let dir = home.join("unpacked");
        rt.block_on(store.unpack_to(&reference, &dir)).unwrap();
        let t2 = t.elapsed();
        fetch.push(t1);
        unpack.push(t2 - t1);
        smol_total.push(t2);

        // smol: cold pull (with the erofs block image).
        let home2 = base.path().join(format!("smol-pull-{i}"));
        let store2 = ImageStore::open(&home2).unwrap().with_options(opts.clone());
        let t = Instant::now();
        rt.block_on(store2.pull(&reference, None)).unwrap();
        pull_full.push(t.elapsed());

        // Baseline: skopeo copy + umoci unpack.
        let b = base.path().join(format!("base-{i}"));
        std::fs::create_dir_all(&b).unwrap();
        let t = Instant::now();
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:3.12", b.join("layout").display())));
        let t1 = t.elapsed();
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:3.12", b.join("layout").display()))
            .arg(b.join("bundle")));
        let t2 = t.elapsed();
        copy.push(t1);
        umoci.push(t2 - t1);
        base_total.push(t2);

        eprintln!(
            "run {i}: smol fetch {} + unpack {} (pull {}) | skopeo {} + umoci {}",
            secs(t1_smol(&fetch)),
            secs(*unpack.last().unwrap()),
            secs(*pull_full.last().unwrap()),
            secs(*copy.last().unwrap()),
            secs(*umoci.last().unwrap())
        );
        if i + 1 == runs {
            tree = Some(dir);
        } else {
            let _ = std::fs::remove_dir_all(&home);
            let _ = std::fs::remove_dir_all(&home2);
            let _ = std::fs::remove_dir_all(&b);
        }
    }
    let tree = tree.expect("at least one run");
    let (sm, bm) = (median(&mut smol_total), median(&mut base_total));
    println!("image: {reference} ({runs} runs, medians)");
    println!(
        "  smol   fetch {:>8}  unpack {:>8}  total {:>8}   (pull with erofs image: {})",
        secs(median(&mut fetch)),
        secs(median(&mut unpack)),
        secs(sm),
        secs(median(&mut pull_full.clone()))
    );
    println!(
        "  skopeo copy  {:>8}  umoci  {:>8}  total {:>8}",
        secs(median(&mut copy)),
        secs(median(&mut umoci)),
        secs(bm)
    );
    let pm = median(&mut pull_full);
    println!(
        "  ratio, like for like (fetch + unpack to a directory) / (skopeo + umoci) = {:.2}",
        sm.as_secs_f64() / bm.as_secs_f64(),
    );
    println!(
        "  ratio, smol pull (to a bootable erofs image) / (skopeo + umoci) = {:.2}",
        pm.as_secs_f64() / bm.as_secs_f64(),
    );

    println!(
        "block images of the unpacked tree ({} MB, {} runs, medians):",
        tree_bytes(&tree) / 1_000_000,
        runs
    );
    for format in [
        RootfsFormat::Erofs,
        RootfsFormat::ErofsLz4,
        RootfsFormat::Ext4,
    ] {
        let mut times = vec![];
        let mut size = (0, 0);
        for i in 0..runs {
            let img = base.path().join(format!("img-{i}.{}", format.extension()));
            let t = Instant::now();
            build_block_image(&tree, &img, format).unwrap();
            times.push(t.elapsed());
            let m = std::fs::metadata(&img).unwrap();
            size = (m.len(), m.blocks() * 512);
            std::fs::remove_file(&img).unwrap();
        }
        println!(
            "  {:<10} {:>8}  size {:>4} MB (on disk {:>4} MB)",
            format.extension(),
            secs(median(&mut times)),
            size.0 / 1_000_000,
            size.1 / 1_000_000
        );
    }

    second_machine(&rt, &reference, &registry_dir, runs);
}

/// Second machine of an image: create -> first exec with the image cached, against the first
/// machine's pull-inclusive create -> first exec. The registry is stopped before the second
/// machines boot, so they provably need no registry traffic. Also `Machine::run(image, ..)` in
/// a running machine: the first run (an image slot attached + mount, `local::slots`) against
/// the next.
fn second_machine(rt: &tokio::runtime::Runtime, reference: &str, registry_dir: &str, runs: usize) {
    use smolmachines::local::{assets, LocalBackend};
    use smolmachines::{ExecOptions, MachineBackend, MachineConfig};
    let assets = assets::resolve().expect("assets: run `make setup`");
    let base = tempfile::Builder::new()
        .prefix("smolb")
        .tempdir_in("/tmp")
        .unwrap();
    let argv: Vec<String> = ["python3", "-c", "print(1)"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cfg = |name: String| MachineConfig {
        name: Some(name),
        image: Some(reference.to_string()),
        ..Default::default()
    };
    let (mut first, mut second) = (vec![], vec![]);
    let (mut run_first, mut run_next) = (vec![], vec![]);
    // cold boots: this measures the image cache alone (booted templates, on by default, are
    // measured beside it)
    let engines: Vec<LocalBackend> = (0..runs)
        .map(|i| {
            LocalBackend::at(base.path().join(format!("h{i}")))
                .with_assets(assets.clone())
                .with_templates(false)
        })
        .collect();
    // the same with booted templates (the engine's default): the first create also builds
    // the image's template, the second is a clone of it
    let templated: Vec<LocalBackend> = (0..runs)
        .map(|i| {
            LocalBackend::at(base.path().join(format!("t{i}")))
                .with_assets(assets.clone())
                .with_templates(true)
        })
        .collect();
    // create -> first exec of python3 in a machine of the image, then its delete
    let first_exec = |engine: &LocalBackend, name: String| {
        let t = Instant::now();
        let m = rt.block_on(engine.create_machine(cfg(name))).unwrap();
        let r = rt.block_on(m.exec(&argv, &ExecOptions::default())).unwrap();
        let took = t.elapsed();
        assert_eq!(r.stdout, "1\n", "{r:?}");
        rt.block_on(m.delete()).unwrap();
        took
    };
    let (mut t_first, mut t_second) = (vec![], vec![]);
    for (i, engine) in templated.iter().enumerate() {
        t_first.push(first_exec(engine, format!("tfirst{i}")));
    }
    for (i, engine) in engines.iter().enumerate() {
        first.push(first_exec(engine, format!("first{i}")));
        // run(image) inside a plain machine of the same engine (image cached on the host)
        let plain = rt
            .block_on(engine.create_machine(MachineConfig {
                name: Some(format!("plain{i}")),
                ..Default::default()
            }))
            .unwrap();
        for j in 0..3 {
            let t = Instant::now();
            let r = rt
                .block_on(plain.run(reference, &argv, &ExecOptions::default()))
                .unwrap();
            assert_eq!(r.stdout, "1\n", "{r:?}");
            if j == 0 {
                run_first.push(t.elapsed());
            } else {
                run_next.push(t.elapsed());
            }
        }
        rt.block_on(plain.delete()).unwrap();
    }
    run(Command::new("bash")
        .arg(registry_script())
        .args(["stop", registry_dir]));
    for (i, engine) in engines.iter().enumerate() {
        second.push(first_exec(engine, format!("second{i}")));
    }
    for (i, engine) in templated.iter().enumerate() {
        t_second.push(first_exec(engine, format!("tsecond{i}")));
    }
    for engine in &templated {
        rt.block_on(engine.drop_templates()).unwrap();
    }
    let (tf, ts) = (median(&mut t_first), median(&mut t_second));
    let (f, s2) = (median(&mut first), median(&mut second));
    println!("machines of the image ({runs} runs, medians; create -> first exec of python3):");
    println!(
        "  first machine (cold cache: pull + erofs + boot)  {}",
        secs(f)
    );
    println!(
        "  second machine (cached; registry stopped)         {}",
        secs(s2)
    );
    println!(
        "  ratio second / first = {:.2} (target <= 0.3)",
        s2.as_secs_f64() / f.as_secs_f64()
    );
    println!(
        "  with booted templates (the default): first {} (pull + erofs + template), second {}; \
         ratio second / first = {:.2} (target <= 0.3)",
        secs(tf),
        secs(ts),
        ts.as_secs_f64() / tf.as_secs_f64()
    );
    let (rf, rn) = (median(&mut run_first), median(&mut run_next));
    println!(
        "  run(image) in a running machine: first {} (an image slot pointed at the cached \
         file + mount), next {}; ratio first / next = {:.2} (target <= 2)",
        secs(rf),
        secs(rn),
        rf.as_secs_f64() / rn.as_secs_f64()
    );
}

//! Faults (issue 14), each with real components: the registry killed (SIGKILL) in the middle of
//! a layer's download; the VMM killed (SIGKILL) during a file write into the guest, a file read
//! out of it and an exec stream; a persistent machine's fsync'd write across a VMM kill; the
//! caller process killed while its machine is being created. Each failure is typed, and nothing
//! half-made stays: no partial file at the destination, no corrupt cache, no orphan VMM, no
//! stale disk. (The other faults of the list are in lifecycle.rs, vm.rs, image.rs,
//! hostile_exec.rs; docs/RELIABILITY.md maps each to its test.)

mod common;
mod common_registry;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, run};
use common_registry::{layer_tar, oci_layout, Entry, Registry};
use smolmachines::image::{ImageError, ImageStore, Progress, PullEvent, PullOptions};
use smolmachines::local::LocalBackend;
use smolmachines::{Error, ErrorCode, ExecEvent, ExecOptions, MachineBackend, MachineState};

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("smf")
        .tempdir_in("/tmp")
        .unwrap()
}

fn engine_at(home: &Path) -> LocalBackend {
    LocalBackend::at(home).with_assets(common::vm_assets().expect("the guest assets"))
}

fn sigkill(pid: u32) {
    // SAFETY: signals a process this test started (a registry, a VMM of its machine).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn alive(pid: u32) -> bool {
    smolmachines::local::record::pid_alive(pid)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Incompressible bytes (a xorshift stream).
fn noise(len: usize, mut s: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Every blob in the cache holds what its name says, and nothing is left in tmp/.
fn assert_cache_consistent(cache: &Path) {
    let files = |d: PathBuf| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for p in files(cache.join("blobs/sha256")) {
        let bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            common_registry::digest(&bytes),
            format!("sha256:{name}"),
            "blob {} does not match its name",
            p.display()
        );
    }
    let tmp = files(cache.join("tmp"));
    assert!(tmp.is_empty(), "leftovers in tmp/: {tmp:?}");
}

/// Serves the state directory of a killed registry again on its port (its config names both).
fn relaunch(reg: &Registry) -> Child {
    let child = Command::new("setsid")
        .arg("docker-registry")
        .arg("serve")
        .arg(reg.dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry");
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", reg.port)).is_ok()
    });
    assert!(up, "the registry did not come back on port {}", reg.port);
    child
}

/// The registry killed with SIGKILL while a 48 MiB layer is half downloaded: the pull fails
/// with a typed error (the registry unreachable once the retries find it gone), the cache has
/// no image and no partial blob; with the registry back, the same pull works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_killed_mid_pull_is_a_typed_error_and_the_retry_works() {
    let reg = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    let big = noise(48 << 20, 0x5eed);
    let layers = vec![
        layer_tar(&[Entry::Dir("etc/"), Entry::File("etc/hello", b"hello\n")]),
        layer_tar(&[Entry::File("big", &big)]),
    ];
    drop(big);
    oci_layout(&work.path().join("layout"), "v1", &layers);
    reg.push_layout(&work.path().join("layout"), "v1", "fault/big:v1");
    let image = reg.reference("fault/big:v1");
    let registry_pid: u32 = std::fs::read_to_string(reg.dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path())
        .unwrap()
        .with_options(PullOptions {
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(5),
            attempts: 3,
            retry_backoff: Duration::from_millis(100),
            ..Default::default()
        });
    // killed once the big layer is under way, not done
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    let progress: Progress = Arc::new(move |ev: &PullEvent| {
        if let PullEvent::Layer { done, total, .. } = ev {
            if *total > (32 << 20) && *done > 0 && *done < *total && !k.swap(true, Ordering::SeqCst)
            {
                sigkill(registry_pid);
            }
        }
    });
    let t0 = Instant::now();
    let e = store.pull(&image, Some(progress)).await.unwrap_err();
    eprintln!(
        "pull with the registry killed: {e:?} after {:?}",
        t0.elapsed()
    );
    assert!(killed.load(Ordering::SeqCst), "the big layer never started");
    assert!(
        matches!(
            e,
            ImageError::RegistryUnreachable { .. } | ImageError::Registry { .. }
        ),
        "{e:?}"
    );
    let code = smolmachines::Error::from(e).code();
    assert_ne!(code, "INTERNAL", "{code}");
    assert!(store.list().unwrap().is_empty());
    assert_cache_consistent(store.dir());
    assert!(wait_until(Duration::from_secs(5), || !alive(registry_pid)));

    // the registry back: the same store pulls it
    let mut back = relaunch(&reg);
    let info = store.pull(&image, None).await;
    let _ = back.kill();
    let _ = back.wait();
    info.expect("the pull after the registry came back");
    assert_eq!(store.list().unwrap().len(), 1);
    assert_cache_consistent(store.dir());
    let _ = std::fs::remove_dir_all(&reg.dir);
}

/// The VMM killed while a 64 MiB write_file into the guest's disk is under way: the write is a
/// typed `Interrupted`; after a start the target holds its old content (the agent writes beside
/// it and renames at the end), never part of the new.
#[tokio::test(flavor = "multi_thread")]
async fn the_vmm_killed_during_write_file_leaves_the_target_as_it_was() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let engine = engine_at(h.path());
    let m = engine.create_machine(config(Some("wf"))).await.unwrap();
    m.write_file("/root/target", b"old content\n", None)
        .await
        .unwrap();
    let pid = m.pid().unwrap();
    let data = noise(64 << 20, 7);
    let m2 = m.clone();
    let write = tokio::spawn(async move { m2.write_file("/root/target", &data, None).await });
    // under way: its temporary file beside the target exists
    let t0 = Instant::now();
    loop {
        let r = run(&m, "ls -a /root | grep -c '^.target.smol-' || true").await;
        if r.stdout.trim() != "0" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60) && !write.is_finished(),
            "the write never showed up: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the temporary file is on the guest's disk when the VMM dies (else the file system's
    // next commit, seconds later, might never have named it)
    assert_eq!(run(&m, "sync && echo synced").await.stdout, "synced\n");
    sigkill(pid);
    let e = tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the write did not end after the VMM's kill")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::Interrupted { .. }), "{e:?}");
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)));
    assert_eq!(m.state().await.unwrap(), MachineState::Stopped);
    m.start().await.unwrap();
    assert_eq!(
        m.read_file("/root/target").await.unwrap(),
        b"old content\n",
        "the target changed under a write that never finished"
    );
    // nor is its hidden temporary file left beside it: the agent's start removed it
    let r = run(&m, "ls -a /root | grep -c '^.target.smol-' || true").await;
    assert_eq!(
        r.stdout.trim(),
        "0",
        "the interrupted write's file is left: {r:?}"
    );
    // the next write of it works
    m.write_file("/root/target", b"new\n", None).await.unwrap();
    assert_eq!(m.read_file("/root/target").await.unwrap(), b"new\n");
    m.delete().await.unwrap();
}

/// The VMM killed while a file is being read out of the guest (read_file_stream, after its
/// first chunk) and while an exec stream runs: both end with a typed `INTERRUPTED`, at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_vmm_killed_during_a_file_read_and_an_exec_stream_is_typed() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let engine = engine_at(h.path());
    let m = engine.create_machine(config(Some("rd"))).await.unwrap();
    let r = run(&m, "head -c 67108864 /dev/urandom > /root/big && echo ok").await;
    assert_eq!(r.stdout, "ok\n", "{r:?}");
    let pid = m.pid().unwrap();
    let mut stream = m
        .exec_stream(
            &common::sh("while :; do echo tick; sleep 0.05; done"),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    assert!(matches!(
        stream.next_event().await,
        Some(ExecEvent::Stdout(_))
    ));
    let mut reader = m.read_file_stream("/root/big").await.unwrap();
    let first = reader.next_chunk().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    sigkill(pid);
    // the read: an error, never an end that looks like the whole file
    let mut got = first.len();
    let read_end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reader.next_chunk().await {
                Some(Ok(c)) => got += c.len(),
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the read did not end after the VMM's kill");
    let e = read_end
        .unwrap_or_else(|| panic!("the read ended cleanly after {got} of {} bytes", 64 << 20));
    assert!(matches!(e, Error::Interrupted { .. }), "{e:?}");
    assert!(got < 64 << 20, "{got}");
    // the stream: its last event is a typed error
    let last = tokio::time::timeout(Duration::from_secs(30), async {
        let mut last = None;
        while let Some(ev) = stream.next_event().await {
            last = Some(ev);
        }
        last
    })
    .await
    .expect("the exec stream did not end after the VMM's kill");
    match last {
        Some(ExecEvent::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Interrupted, "{message}")
        }
        other => panic!("the stream's last event: {other:?}"),
    }
    m.delete().await.unwrap();
    assert!(!m.dir().exists());
}

/// A persistent machine's fsync'd writes (a command's `sync`, and write_file, which syncs
/// before it renames) are there after the VMM is killed and the machine started again.
#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_machines_synced_writes_survive_a_vmm_kill() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let engine = engine_at(h.path());
    let mut c = config(Some("durable"));
    c.persistent = true;
    let m = engine.create_machine(c).await.unwrap();
    let r = run(
        &m,
        "echo by-exec > /root/a && sync /root/a && dd if=/dev/urandom of=/root/b bs=1M count=4 \
         conv=fsync 2>/dev/null && sha256sum /root/b | cut -d' ' -f1",
    )
    .await;
    let sum = r.stdout.trim().to_string();
    assert_eq!(sum.len(), 64, "{r:?}");
    m.write_file("/root/c", b"by-write-file\n", None)
        .await
        .unwrap();
    let pid = m.pid().unwrap();
    sigkill(pid);
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)));
    let t0 = Instant::now();
    while m.state().await.unwrap() != MachineState::Stopped {
        assert!(t0.elapsed() < Duration::from_secs(10), "never stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.start().await.unwrap();
    let r = run(&m, "cat /root/a /root/c; sha256sum /root/b | cut -d' ' -f1").await;
    assert_eq!(
        r.stdout,
        format!("by-exec\nby-write-file\n{sum}\n"),
        "{r:?}"
    );
    m.delete().await.unwrap();
}

/// Runs this test binary as a child process creating machine `name` in `home`.
fn child_creating(home: &Path, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_creates_a_machine",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SMOL_TEST_HOME", home)
        .env("SMOL_TEST_ARG", name)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "helper: runs only as a child process of the caller-killed test"]
fn child_creates_a_machine() {
    let (Ok(home), Ok(name)) = (
        std::env::var("SMOL_TEST_HOME"),
        std::env::var("SMOL_TEST_ARG"),
    ) else {
        return;
    };
    if common::vm_assets().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let engine = engine_at(Path::new(&home));
        println!("CREATING");
        let m = engine.create_machine(config(Some(&name))).await.unwrap();
        println!("CREATED {}", m.pid().unwrap());
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

/// QEMU processes whose command line names `needle`.
fn qemu_pids(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.split('\0').next().is_some_and(|a| a.contains("qemu")) && c.contains(needle)
            })
        })
        .collect()
}

/// The caller SIGKILLed while its machine boots (its VMM started, the agent not yet answered):
/// the VMM goes with it, and the next engine over the home lists nothing, has no disk of the
/// machine and creates it again under the same name.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_killed_mid_create_leaves_no_vmm_and_no_disk() {
    if common::vm_assets().is_none() {
        return;
    }
    let h = home();
    let mut c = child_creating(h.path(), "midcreate");
    let mut lines = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("CREATING") {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "the child ended");
    }
    // its VMM is up (booting): then the caller goes
    let needle = h.path().to_string_lossy().to_string();
    let started = wait_until(Duration::from_secs(60), || !qemu_pids(&needle).is_empty());
    assert!(started, "no VMM appeared");
    let vmms = qemu_pids(&needle);
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    // no orphan VMM (the supervisor's death signal ends it; the reaper at the latest)
    let engine = engine_at(h.path());
    let list = engine.list_machines(&Default::default()).await.unwrap();
    assert!(
        list.is_empty(),
        "a half-created machine is listed: {list:?}"
    );
    assert!(
        wait_until(Duration::from_secs(15), || vmms.iter().all(|p| !alive(*p))),
        "orphan VMM {vmms:?}"
    );
    assert!(
        !h.path().join("machines/midcreate").exists(),
        "stale disk of the half-created machine"
    );
    // the name is free again
    let m = engine
        .create_machine(config(Some("midcreate")))
        .await
        .unwrap();
    assert_eq!(run(&m, "echo ok").await.stdout, "ok\n");
    m.delete().await.unwrap();
}

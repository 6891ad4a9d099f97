//! Guest files the host reads (issue 10, items 1 and 4), against real VMs: a guest cannot make
//! `read_file` grow the host without bound (devices, FIFOs fed for ever, symlinks to them,
//! huge files) nor wedge its agent with a read that blocks (`/proc/kmsg`).

mod common;

use std::time::{Duration, Instant};

use common::{config, engine, run};
use smolmachines::{Error, ExecOptions, MachineBackend};
use tokio::io::AsyncReadExt;

/// The peak resident memory of this process (VmHWM), in KiB.
fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `read_file(path)` within `limit` (the old code never returned).
async fn read_within(
    m: &smolmachines::local::LocalMachine,
    path: &str,
    limit: Duration,
) -> (smolmachines::Result<Vec<u8>>, Duration) {
    let start = Instant::now();
    let r = tokio::time::timeout(limit, m.read_file(path))
        .await
        .unwrap_or_else(|_| panic!("read_file({path}) did not return within {limit:?}"));
    (r, start.elapsed())
}

#[tokio::test]
async fn reads_of_devices_fifos_symlinks_and_huge_files_are_refused_quickly() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(None)).await.unwrap();
    let setup = "mkfifo /tmp/fifo && ln -s /dev/zero /tmp/zero-link && \
                 truncate -s 314572800 /tmp/huge && echo ok";
    assert_eq!(run(&m, setup).await.stdout.trim(), "ok");
    // a writer feeding the FIFO for ever
    let bg = ExecOptions {
        background: true,
        ..Default::default()
    };
    let feeder = common::sh("while :; do cat /dev/zero > /tmp/fifo; done");
    assert_eq!(m.exec(&feeder, &bg).await.unwrap().exit_code, 0);

    let before = peak_kib();
    for (path, kind) in [
        ("/dev/zero", "a character device"),
        ("/tmp/fifo", "a FIFO"),
        ("/tmp/zero-link", "resolves to /dev/zero"),
    ] {
        let (r, took) = read_within(&m, path, Duration::from_secs(30)).await;
        let e = r.unwrap_err();
        assert!(matches!(e, Error::NotSupported { .. }), "{path}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains(path) && msg.contains(kind), "{msg}");
        assert!(took < Duration::from_secs(5), "{path}: {took:?}");
        eprintln!("{path}: {took:?}: {msg}");
    }
    // over the cap: refused before it is read, naming its size and the limit
    let (r, took) = read_within(&m, "/tmp/huge", Duration::from_secs(30)).await;
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    assert!(
        msg.contains("314572800 bytes") && msg.contains("read limit of 268435456 bytes"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let grown = peak_kib().saturating_sub(before);
    eprintln!("/tmp/huge: {took:?}: {msg}; peak RSS grew by {grown} KiB");
    assert!(grown < 64 * 1024, "the host grew by {grown} KiB");

    // the streaming read has no limit and stays small: the first 32 MiB of the huge file
    let mut reader = m.read_file_stream("/tmp/huge").await.unwrap();
    let mut first = vec![0u8; 32 * 1024 * 1024];
    reader.read_exact(&mut first).await.unwrap();
    assert!(first.iter().all(|&b| b == 0));
    drop((reader, first));
    // ... and is byte-exact on a small file
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    m.write_file("/tmp/small", &data, None).await.unwrap();
    let mut back = Vec::new();
    let mut reader = m.read_file_stream("/tmp/small").await.unwrap();
    reader.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, data);
    let e = m.read_file_stream("/dev/zero").await.unwrap();
    let mut e = e;
    let err = e.next_chunk().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::NotSupported { .. }), "{err:?}");
    // the machine still answers
    assert_eq!(run(&m, "echo alive").await.stdout, "alive\n");
    m.delete().await.unwrap();
}

/// A read of `/proc/kmsg` (blocks once the kernel log is drained) never holds the agent: an
/// exec on the same machine answers while it runs, and the read ends on its own.
#[tokio::test]
async fn a_blocking_read_does_not_wedge_the_agent() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine.create_machine(config(None)).await.unwrap();
    let reading = {
        let m = m.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let r = m.read_file("/proc/kmsg").await;
            (r, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let opts = ExecOptions {
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        m.exec(&common::sh("echo alive"), &opts),
    )
    .await
    .expect("the exec did not answer: the agent is wedged")
    .expect("exec");
    assert_eq!(r.stdout, "alive\n");
    eprintln!(
        "exec during the /proc/kmsg read answered in {:?}",
        start.elapsed()
    );
    let (r, took) = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the /proc/kmsg read never ended")
        .unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(e, Error::NotSupported { .. } | Error::Timeout { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("/proc/kmsg"), "{e}");
    eprintln!("/proc/kmsg: {took:?}: {e}");
    assert_eq!(run(&m, "echo still").await.stdout, "still\n");
    m.delete().await.unwrap();
}

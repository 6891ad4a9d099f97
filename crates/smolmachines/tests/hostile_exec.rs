//! VM tests of what a hostile command can do to its caller through `exec` (issue 10, items 2,
//! 3 and 5): flood it with output, kill the guest's agent, or be given a request too big for
//! the agent channel. Real QEMU microVMs with the real agent; they need `make setup`.

mod common;

use std::time::{Duration, Instant};

use common::{config, engine, run, sh};
use smolmachines::{Error, ExecEvent, ExecOptions, MachineBackend, MAX_BUFFERED_OUTPUT};

/// The peak resident memory of this process so far, in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// A command printing 100 MB: the result keeps the cap and says it is truncated, the command
/// ran to its end (its later output drained and dropped), and host memory stays bounded.
#[tokio::test]
async fn buffered_output_is_capped_and_flagged() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine
        .create_machine(config(Some("out-cap")))
        .await
        .unwrap();
    let before = peak_rss();
    let started = Instant::now();
    let r = run(&m, "head -c 100000000 /dev/zero; echo done >&2").await;
    let grew = peak_rss().saturating_sub(before);
    eprintln!(
        "100 MB of stdout: {:?}, peak RSS grew by {} MiB",
        started.elapsed(),
        grew >> 20
    );
    assert_eq!(r.exit_code, 0, "{:?}", r.stderr);
    assert_eq!(r.stdout_bytes.len(), MAX_BUFFERED_OUTPUT);
    assert_eq!(r.stdout.len(), MAX_BUFFERED_OUTPUT);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(r.stderr, "done\n", "the command must run to its end");
    // the cap's two copies (bytes and text) and the stream window, not 100 MB twice
    assert!(grew < 96 << 20, "peak RSS grew by {} MiB", grew >> 20);
    // small output is whole and not flagged
    let r = run(&m, "echo hi").await;
    assert!(!r.stdout_truncated && r.stdout == "hi\n");
    m.delete().await.unwrap();
}

/// A command that kills every process of the guest kills the agent: the operation fails with
/// `Interrupted` at once (the agent restarted: the message says so), and the next exec works
/// once the host is connected to the restarted agent; `exec_stream` too.
#[tokio::test]
async fn an_agent_killed_by_its_command_fails_fast_and_comes_back() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine
        .create_machine(config(Some("agent-kill")))
        .await
        .unwrap();
    for timeout in [Some(Duration::from_secs(5)), None] {
        let opts = ExecOptions {
            timeout,
            ..Default::default()
        };
        let started = Instant::now();
        let e = tokio::time::timeout(
            Duration::from_secs(60),
            m.exec(&sh("kill -9 -1; sleep 30"), &opts),
        )
        .await
        .expect("the exec hung after its agent was killed")
        .expect_err("the agent was killed: the exec cannot succeed");
        let took = started.elapsed();
        eprintln!("timeout {timeout:?}: {e} after {took:?}");
        assert!(matches!(e, Error::Interrupted { .. }), "{e:?}");
        assert!(e.to_string().contains("agent restarted"), "{e}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
        assert!(e.hint().unwrap().contains("run the operation again"));
        wait_for_exec(&m).await;
    }
    // a stream gets an error event, also at once
    let opts = ExecOptions {
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let started = Instant::now();
    let mut s = m
        .exec_stream(&sh("kill -9 -1; sleep 30"), &opts)
        .await
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(60), async {
        let mut last = None;
        while let Some(ev) = s.next_event().await {
            last = Some(ev);
        }
        last
    })
    .await
    .expect("the stream hung after its agent was killed");
    match last {
        Some(ExecEvent::Error { code, message }) => {
            assert_eq!(
                code,
                smolmachines::error::ErrorCode::Interrupted,
                "{message}"
            );
            assert!(message.contains("agent restarted"), "{message}");
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    wait_for_exec(&m).await;
    m.delete().await.unwrap();
}

/// The next exec works within a few seconds (the host reconnects to the new agent).
async fn wait_for_exec(m: &smolmachines::local::LocalMachine) {
    let started = Instant::now();
    loop {
        let opts = ExecOptions {
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        match m.exec(&sh("echo back"), &opts).await {
            Ok(r) if r.stdout == "back\n" => break,
            other if started.elapsed() > Duration::from_secs(15) => {
                panic!("no exec works after the agent restarted: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    eprintln!("exec works again after {:?}", started.elapsed());
}

/// An env value (or argv) too big for one request of the agent channel is `InvalidConfig`
/// naming the size and the limit, before anything is sent; the machine runs on and execs.
#[tokio::test]
async fn an_oversized_request_is_invalid_config_and_the_machine_lives() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let m = engine
        .create_machine(config(Some("big-req")))
        .await
        .unwrap();
    let big = "x".repeat(400 * 1024);
    let env = ExecOptions {
        env: [("BIG".to_string(), big.clone())].into_iter().collect(),
        ..Default::default()
    };
    let started = Instant::now();
    let e = m.exec(&sh("echo $BIG"), &env).await.unwrap_err();
    eprintln!("400 KB env: {e} after {:?}", started.elapsed());
    match &e {
        Error::InvalidConfig { message } => {
            assert!(
                message.contains(&smol_protocol::MAX_FRAME.to_string()),
                "{message}"
            );
            assert!(message.contains("bytes encoded"), "{message}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let e = m
        .exec(&sh(&format!("echo {big}")), &ExecOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    let e = m.exec_stream(&sh("true"), &env).await.unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    // the connection and the VM are untouched
    tokio::time::sleep(Duration::from_secs(4)).await; // past the agent's linger time
    let r = run(&m, "echo alive").await;
    assert_eq!(r.stdout, "alive\n");
    // a value that fits (Linux takes at most 128 KiB per string) still goes through whole
    let fits = ExecOptions {
        env: [("V".to_string(), "y".repeat(100 * 1024))]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let r = m
        .exec(&sh("printf %s \"$V\" | wc -c"), &fits)
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "102400", "{r:?}");
    m.delete().await.unwrap();
}

//! Shared helpers of the VM tests: an engine with a private run directory, argv building.
#![allow(dead_code)]

use std::time::Duration;

use smolmachines::local::{assets, LocalBackend, LocalMachine};
use smolmachines::{ExecOptions, ExecResult, MachineBackend, MachineConfig, ResourceSpec};

/// The guest assets of `make setup`, or `None` (with one message per test binary saying why the
/// VM tests skip) when this checkout was never set up. Under `make test` / CI
/// (`SMOL_VM_TESTS=required`) missing assets fail the test instead: VM tests never skip there.
pub fn vm_assets() -> Option<assets::Assets> {
    static SAID: std::sync::Once = std::sync::Once::new();
    match assets::resolve() {
        Ok(a) => Some(a),
        Err(e) if std::env::var("SMOL_VM_TESTS").as_deref() == Ok("required") => {
            panic!("the VM tests are required (SMOL_VM_TESTS=required) but {e}: run `make setup`")
        }
        Err(e) => {
            // written to the real stderr, past the test harness's capture
            SAID.call_once(|| {
                use std::io::Write;
                writeln!(
                    std::io::stderr(),
                    "skipping the VM tests of this binary: {e}. They boot real microVMs with the \
                     guest kernel and initramfs of `make setup`: run it first \
                     (SMOL_VM_TESTS=required turns this skip into a failure, as CI does)."
                )
                .expect("stderr")
            });
            None
        }
    }
}

/// An engine whose machines live in a fresh temporary run directory (`None`: no assets, see
/// [`vm_assets`]).
pub fn engine() -> Option<(LocalBackend, tempfile::TempDir)> {
    let assets = vm_assets()?;
    log_to_stderr();
    deadline();
    let dir = tempfile::Builder::new()
        .prefix("smt")
        .tempdir_in("/tmp")
        .expect("tempdir");
    Some((LocalBackend::at(dir.path()).with_assets(assets), dir))
}

/// `SMOL_TEST_LOG=<filter>` (e.g. `smolmachines=debug`) logs the engine to stderr: with
/// `--nocapture`, a hung VM test shows where it stopped.
pub fn log_to_stderr() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("SMOL_TEST_LOG") {
            let filter = tracing_subscriber::EnvFilter::new(filter);
            if let Err(e) = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init()
            {
                eprintln!("SMOL_TEST_LOG: no logger: {e}");
            }
        }
    });
}

/// Ends the test binary once it has run for `SMOL_TEST_DEADLINE` seconds (default 1200): a
/// hang (a lost frame, a guest that never answers) then fails CI in minutes with a message
/// instead of using up its whole time. No VM test binary comes near it when all is well.
pub fn deadline() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let secs = std::env::var("SMOL_TEST_DEADLINE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1200);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            eprintln!(
                "the VM tests of this binary ran for {secs} s (SMOL_TEST_DEADLINE): one of them \
                 hangs. The tests still running are listed above as 'running for over 60 \
                 seconds'; rerun one with --nocapture and SMOL_TEST_LOG=smolmachines=debug to \
                 see where it stops. Aborting."
            );
            std::process::abort();
        });
    });
}

pub fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

pub fn sh(script: &str) -> Vec<String> {
    argv(&["sh", "-c", script])
}

pub fn config(name: Option<&str>) -> MachineConfig {
    MachineConfig {
        name: name.map(String::from),
        ready_timeout: Some(Duration::from_secs(60)),
        resources: ResourceSpec::default(),
        ..Default::default()
    }
}

pub async fn run(m: &LocalMachine, script: &str) -> ExecResult {
    // Bounded, so that a stuck guest command fails its test (exit 124) instead of hanging CI.
    let opts = ExecOptions {
        timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    };
    m.exec(&sh(script), &opts).await.expect("exec")
}

/// QEMU processes whose command line names `dir` (an engine's run directory).
pub fn qemu_processes_in(dir: &std::path::Path) -> usize {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).to_string())
        .filter(|c| c.contains("qemu") && c.contains(&needle))
        .count()
}

/// Field `field` of /proc/`pid`/status (e.g. `Uid`, `NoNewPrivs`), trimmed.
pub fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

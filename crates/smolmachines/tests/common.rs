//! Shared helpers of the VM tests: an engine with a private run directory, argv building.
#![allow(dead_code)]

use std::time::Duration;

use smolmachines::local::{assets, LocalBackend, LocalMachine};
use smolmachines::{ExecOptions, ExecResult, MachineBackend, MachineConfig, ResourceSpec};

/// An engine whose machines live in a fresh temporary run directory.
pub fn engine() -> (LocalBackend, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("smt")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let assets = assets::resolve()
        .expect("guest assets missing: run `make setup` before the VM tests (they boot real VMs)");
    (LocalBackend::at(dir.path()).with_assets(assets), dir)
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

//! smol: microVM sandboxes you can embed in a program.
//!
//! ```no_run
//! # async fn demo() -> smolmachines::Result<()> {
//! use smolmachines::{ConnectOptions, ExecOptions, Machine, MachineConfig};
//! let m = Machine::create(MachineConfig::default(), ConnectOptions::default()).await?;
//! let r = m.exec(&["uname".into(), "-a".into()], ExecOptions::default()).await?;
//! println!("{}", r.stdout);
//! m.write_file("/tmp/hello.txt", "hi", None).await?;
//! assert_eq!(m.read_file("/tmp/hello.txt").await?, b"hi");
//! m.delete().await?;
//! # Ok(()) }
//! ```
//!
//! [`Machine`] runs on a [`Backend`]: the embedded local engine ([`local`], QEMU microVMs
//! supervised by this process) or a smolfleet server over REST ([`cloud`]). See
//! `docs/ARCHITECTURE.md`.

pub mod backend;
mod cleanup;
pub mod cloud;
pub mod config;
pub mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod file_reader;
pub mod image;
pub mod local;
pub mod wire;

pub use backend::{
    Backend, BranchBatchOptions, ExecStream, FileChunks, Machine, MachineBackend,
    DEFAULT_BRANCH_PREFIX, MAX_BRANCH_BATCH,
};
pub use cloud::CloudBackend;
pub use config::{
    BranchOptions, CacheDiskRef, Capabilities, CheckpointOptions, ConfigField, ConnectOptions,
    CredentialSpec, DiskDurability, EgressInterceptor, ExecEvent, ExecOptions, ExecOutput,
    ExecResult, LocalAvailability, MachineConfig, MachineState, MachineSummary, MountSpec,
    NetworkBackend, PortEndpoint, PortSpec, ResourceSpec, RestoreOptions, Support, Target,
    MAX_BUFFERED_OUTPUT, MAX_WAIT,
};
pub use error::{Error, ErrorCode, Problem, Result};
pub use file_reader::FileReader;
pub use image::ImageInfo;
pub use wire::CheckpointInfo;

/// Whether this host can run local machines, and with which accelerator (SPEC §3.10). Never
/// fails: problems are reported in the result.
pub fn local_availability() -> LocalAvailability {
    local::availability()
}

/// The log filter the front ends (CLI, Node addon, fleet server) read from the environment:
/// `SMOL_LOG`, else `RUST_LOG`, the first that is set and not blank (an `EnvFilter` directive
/// string such as `smolmachines=debug`).
pub fn log_filter_from_env() -> Option<String> {
    ["SMOL_LOG", "RUST_LOG"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
}

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
//! supervised by this process) or, later, a fleet server. See `docs/ARCHITECTURE.md`.

pub mod backend;
pub mod config;
pub mod error;
pub mod image;
pub mod local;

pub use backend::{Backend, ExecStream, Machine, MachineBackend};
pub use config::{
    ConnectOptions, ExecEvent, ExecOptions, ExecResult, LocalAvailability, MachineConfig,
    MachineState, MachineSummary, MountSpec, PortEndpoint, PortSpec, ResourceSpec, Target,
};
pub use error::{Error, Result};
pub use image::ImageInfo;

/// Whether this host can run local machines, and with which accelerator (SPEC §3.10). Never
/// fails: problems are reported in the result.
pub fn local_availability() -> LocalAvailability {
    local::availability()
}

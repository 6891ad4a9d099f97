//! What the engine remembers about a machine (stored in the state database), and process
//! identity that survives pid reuse.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A process, identified by pid and start time (so a recycled pid is not mistaken for it).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcId {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl ProcId {
    /// This process.
    pub fn current() -> Self {
        Self::of(std::process::id()).expect("/proc/self/stat is readable")
    }

    /// The process `pid`, if it exists and is not a zombie.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // fields after the parenthesised command name: state is field 3, starttime field 22
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
            return None;
        }
        Some(Self {
            pid,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Whether this very process is still alive.
    pub fn alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|p| p.start == self.start)
    }
}

/// A host directory shared with the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// Absolute host path.
    pub source: PathBuf,
    /// Absolute guest path.
    pub target: String,
    /// Read-only (enforced on the host).
    pub read_only: bool,
}

/// The image a machine boots into.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Canonical reference.
    pub reference: String,
    /// Read-only block image of its root file system.
    pub rootfs: PathBuf,
    /// File system of that block image (`erofs`, `ext4`).
    pub fstype: String,
    /// Environment of the image config (commands get it under their own).
    pub env: BTreeMap<String, String>,
    /// Working directory of the image config.
    pub workdir: Option<String>,
}

/// Everything the engine keeps about one machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Name (unique per engine home).
    pub name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Size of the writable disk in GiB (sparse).
    pub storage_gb: u32,
    /// Accelerator in use.
    pub accel: String,
    /// Why that accelerator.
    pub accel_reason: String,
    /// Kernel path.
    pub kernel: PathBuf,
    /// Initramfs path.
    pub initrd: PathBuf,
    /// `smol` or `cloud`.
    pub flavor: String,
    /// Record and disk outlive the creating process.
    pub persistent: bool,
    /// The VM outlives the creating process.
    pub detach: bool,
    /// Caller labels.
    pub labels: BTreeMap<String, String>,
    /// Host -> guest TCP forwards (host, guest).
    #[serde(default)]
    pub ports: Vec<(u16, u16)>,
    /// Host directories shared with the guest.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// Guest egress enabled.
    #[serde(default)]
    pub network: bool,
    /// Egress allowed to these blocks only (with `allow_hosts`; both empty: open egress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    /// Egress allowed to these names' addresses only, as DNS answers them (`local::egress`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The VMM process while the VM runs.
    pub vmm: Option<ProcId>,
    /// The process that drives the machine (created it, or attached to it last).
    pub owner: Option<ProcId>,
    /// The VM has booted at least once.
    #[serde(default)]
    pub booted: bool,
    /// The image whose root file system the machine runs in.
    #[serde(default)]
    pub image: Option<ImageRecord>,
    /// The workload launched in the background at every boot.
    #[serde(default)]
    pub workload: Option<Workload>,
    /// A branch source: its RAM lives in a file (`MachineConfig.branchable`).
    #[serde(default)]
    pub branchable: bool,
    /// A frozen branch base (`BranchOptions.freeze_source`): never booted again.
    #[serde(default)]
    pub frozen: bool,
    /// Paused (`pause()`): the VMM runs with its vCPUs stopped, so its agent cannot answer.
    /// Meaningful only while `vmm` is alive (cleared when the VMM exits or boots again).
    #[serde(default)]
    pub paused: bool,
    /// Image slots reserved at boot for `run(image)` (`local::slots`): each empty or holding
    /// an image. Kept across boots and copied into branches and checkpoints, so the guest
    /// finds its mounted images where it left them. None in records of older engines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_slots: Vec<Option<SlotRecord>>,
}

/// An image attached to an image slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotRecord {
    /// Canonical reference of the image.
    pub reference: String,
    /// Its read-only block image in the engine's image cache.
    pub file: PathBuf,
}

/// The image workload (`Entrypoint` + `Cmd`, or `MachineConfig.command`) of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// argv.
    pub argv: Vec<String>,
    /// Environment (image `Env` under `MachineConfig.env`).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User (`None`: root).
    #[serde(default)]
    pub user: Option<String>,
}

impl Record {
    /// A record for unit tests: a plain TCG machine named `name` that never booted.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str) -> Record {
        Record {
            name: name.into(),
            cpus: 1,
            memory_mb: 256,
            storage_gb: 1,
            accel: "tcg".into(),
            accel_reason: "test".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            flavor: "smol".into(),
            persistent: false,
            detach: false,
            labels: BTreeMap::new(),
            ports: vec![],
            mounts: vec![],
            network: false,
            allow_cidrs: vec![],
            allow_hosts: vec![],
            created_unix: 1,
            vmm: None,
            owner: None,
            booted: false,
            image: None,
            workload: None,
            branchable: false,
            frozen: false,
            paused: false,
            image_slots: Vec::new(),
        }
    }

    /// Whether the VMM recorded for this machine is running.
    pub fn vmm_alive(&self) -> bool {
        self.vmm.is_some_and(|p| p.alive())
    }

    /// Whether the owning process is alive.
    pub fn owner_alive(&self) -> bool {
        self.owner.is_some_and(|p| p.alive())
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    ProcId::of(pid).is_some()
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_identity() {
        let me = ProcId::current();
        assert!(me.alive());
        let recycled = ProcId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!recycled.alive());
        assert!(ProcId::of(u32::MAX - 1).is_none());
        assert!(pid_alive(std::process::id()));
    }
}

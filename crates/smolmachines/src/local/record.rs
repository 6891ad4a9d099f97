//! The on-disk record of a machine (`machine.json` in its directory) and process liveness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a machine's directory says about it; shared by every process that looks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Name.
    pub name: String,
    /// VMM process id while it runs.
    pub pid: Option<u32>,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
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
    /// The VM outlives the process that created it.
    pub detach: bool,
    /// Caller labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

impl Record {
    /// Path of the record inside a machine directory.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("machine.json")
    }

    /// Writes the record atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("machine.json.tmp");
        let body = serde_json::to_vec_pretty(self).expect("record serializes");
        std::fs::write(&tmp, body)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, Self::path(dir))
            .map_err(|e| Error::io(format!("writing {}", Self::path(dir).display()), e))
    }

    /// Reads the record of the machine in `dir`.
    pub fn load(dir: &Path) -> Result<Record> {
        let p = Self::path(dir);
        let body = std::fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                what: format!(
                    "machine {:?}",
                    dir.file_name().unwrap_or_default().to_string_lossy()
                ),
            },
            _ => Error::io(format!("reading {}", p.display()), e),
        })?;
        serde_json::from_slice(&body).map_err(|e| Error::Io {
            context: format!("parsing {}", p.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // state is the first field after the parenthesised command name
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
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
    fn save_load_roundtrip_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let r = Record {
            name: "a".into(),
            pid: Some(1),
            cpus: 1,
            memory_mb: 256,
            accel: "tcg".into(),
            accel_reason: "test".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            flavor: "smol".into(),
            detach: false,
            labels: BTreeMap::new(),
            created_unix: 5,
        };
        r.save(d.path()).unwrap();
        assert_eq!(Record::load(d.path()).unwrap(), r);
        let e = Record::load(&d.path().join("nope")).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }));
    }

    #[test]
    fn liveness() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }
}

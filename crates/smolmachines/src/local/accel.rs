//! Accelerator choice: hardware KVM where `/dev/kvm` is real, TCG where it is missing, not
//! usable, or is kvm-pvm (which only runs PVM-aware guest kernels). `SMOL_ACCEL=kvm|tcg|auto`
//! overrides.

use std::path::Path;

use thiserror::Error;

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// Name as QEMU and the API spell it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The chosen accelerator and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// Human-readable reason.
    pub reason: String,
}

/// Errors of the accelerator choice.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AccelError {
    /// `SMOL_ACCEL=kvm` on a host where KVM cannot be used.
    #[error("SMOL_ACCEL=kvm but {0}")]
    KvmUnavailable(String),
    /// `SMOL_ACCEL` has an unknown value.
    #[error("SMOL_ACCEL={0:?} is not one of kvm, tcg, auto")]
    BadValue(String),
}

/// What the host offers, gathered from the file system (separate for tests).
#[derive(Debug, Clone, Copy)]
pub struct HostFacts {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/dev/kvm` can be opened read-write.
    pub dev_kvm_usable: bool,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm: bool,
}

impl HostFacts {
    /// Reads the facts of this host.
    pub fn probe() -> Self {
        let dev = Path::new("/dev/kvm");
        Self {
            dev_kvm: dev.exists(),
            dev_kvm_usable: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dev)
                .is_ok(),
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

fn kvm_problem(f: &HostFacts) -> Option<String> {
    if !f.dev_kvm {
        Some("/dev/kvm does not exist".into())
    } else if f.kvm_pvm {
        Some(
            "/dev/kvm is kvm-pvm (/sys/module/kvm_pvm), which runs only PVM-aware guest kernels"
                .into(),
        )
    } else if !f.dev_kvm_usable {
        Some("/dev/kvm cannot be opened read-write by this user".into())
    } else {
        None
    }
}

/// Chooses the accelerator from an override value (`SMOL_ACCEL`) and the host facts.
pub fn choose(env: Option<&str>, facts: &HostFacts) -> Result<AccelChoice, AccelError> {
    match env.unwrap_or("auto") {
        "kvm" => match kvm_problem(facts) {
            None => Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: "SMOL_ACCEL=kvm".into(),
            }),
            Some(p) => Err(AccelError::KvmUnavailable(p)),
        },
        "tcg" => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "SMOL_ACCEL=tcg".into(),
        }),
        "auto" | "" => Ok(match kvm_problem(facts) {
            None => AccelChoice {
                accel: Accel::Kvm,
                reason: "/dev/kvm is hardware KVM".into(),
            },
            Some(p) => AccelChoice {
                accel: Accel::Tcg,
                reason: format!("{p}; using TCG emulation"),
            },
        }),
        other => Err(AccelError::BadValue(other.to_string())),
    }
}

/// Chooses for this host, reading `SMOL_ACCEL`.
pub fn detect() -> Result<AccelChoice, AccelError> {
    let env = std::env::var("SMOL_ACCEL").ok();
    choose(env.as_deref(), &HostFacts::probe())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HW: HostFacts = HostFacts {
        dev_kvm: true,
        dev_kvm_usable: true,
        kvm_pvm: false,
    };
    const PVM: HostFacts = HostFacts {
        dev_kvm: true,
        dev_kvm_usable: true,
        kvm_pvm: true,
    };
    const NONE: HostFacts = HostFacts {
        dev_kvm: false,
        dev_kvm_usable: false,
        kvm_pvm: false,
    };

    #[test]
    fn auto_picks_kvm_only_on_hardware_kvm() {
        assert_eq!(choose(None, &HW).unwrap().accel, Accel::Kvm);
        let c = choose(None, &PVM).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm-pvm"));
        assert_eq!(choose(Some("auto"), &NONE).unwrap().accel, Accel::Tcg);
    }

    #[test]
    fn overrides() {
        assert_eq!(choose(Some("tcg"), &HW).unwrap().accel, Accel::Tcg);
        assert!(matches!(
            choose(Some("kvm"), &PVM),
            Err(AccelError::KvmUnavailable(_))
        ));
        assert!(matches!(
            choose(Some("hvf"), &HW),
            Err(AccelError::BadValue(_))
        ));
    }

    #[test]
    fn this_host_gives_an_answer() {
        // On the project's CI hosts (kvm-pvm) this is TCG; elsewhere either is fine.
        let facts = HostFacts::probe();
        let c = choose(None, &facts).unwrap();
        if facts.kvm_pvm {
            assert_eq!(c.accel, Accel::Tcg);
        }
    }
}

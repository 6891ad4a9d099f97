//! The branch helpers of [`Machine`] built on [`MachineBackend::branch`] (SPEC §4.8):
//! `branch_batch` (all-or-nothing: a failure deletes the clones already made), `reward_fork` (a
//! throw-away clone that runs one command) and the deprecated aliases `fork` / `fork_batch`.
//! Arguments are checked here, before the backend sees any call.

use super::Machine;
use crate::config::{BranchOptions, ExecOptions, ExecResult, PortSpec};
use crate::error::{Error, Result};

/// The most clones one [`Machine::branch_batch`] makes (SPEC §4.8: count 1..64).
pub const MAX_BRANCH_BATCH: usize = 64;

/// The default `name_prefix` of a local [`Machine::branch_batch`]: clones `branch-1`,
/// `branch-2`, ...
pub const DEFAULT_BRANCH_PREFIX: &str = "branch";

/// Options of [`Machine::branch_batch`] (SPEC §4.8 `branch_batch` / `branchBatch`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BranchBatchOptions {
    /// How many clones, 1..=64, named `{name_prefix}-{n}` with n from 1. Ignored when `names`
    /// is not empty.
    pub count: Option<usize>,
    /// The clones' names (wins over `count`); at most 64, no duplicates.
    pub names: Vec<String>,
    /// The prefix of generated names; `"branch"` when `None`.
    pub name_prefix: Option<String>,
    /// Ports published on every clone (host -> guest); empty republishes the source's guest
    /// ports on free host ports. With more than one clone a fixed host port (not 0) is refused.
    pub ports: Vec<PortSpec>,
    /// Every clone is a branch source too.
    pub branchable: bool,
    /// The source becomes a frozen base at the first clone (see
    /// [`BranchOptions::freeze_source`]); the others are branched from that base.
    pub freeze_source: bool,
}

impl BranchBatchOptions {
    /// The clone names these options ask for, checked (SPEC §4.8): `names` if not empty, else
    /// `count` generated names; neither is an `InvalidConfig` error.
    pub fn clone_names(&self) -> Result<Vec<String>> {
        let names: Vec<String> = if !self.names.is_empty() {
            if self.names.len() > MAX_BRANCH_BATCH {
                return Err(Error::invalid(format!(
                    "branch_batch takes at most {MAX_BRANCH_BATCH} names, got {}",
                    self.names.len()
                )));
            }
            self.names.clone()
        } else {
            let count = match self.count {
                None | Some(0) => {
                    return Err(Error::invalid(
                        "branch_batch requires count >= 1 or a non-empty names",
                    ))
                }
                Some(n) if n > MAX_BRANCH_BATCH => {
                    return Err(Error::invalid(format!(
                        "branch_batch count must be 1..={MAX_BRANCH_BATCH}, got {n}"
                    )))
                }
                Some(n) => n,
            };
            let prefix = self.name_prefix.as_deref().unwrap_or(DEFAULT_BRANCH_PREFIX);
            (1..=count).map(|n| format!("{prefix}-{n}")).collect()
        };
        for (i, n) in names.iter().enumerate() {
            crate::config::validate_name(n)?;
            if names[..i].contains(n) {
                return Err(Error::invalid(format!(
                    "branch_batch names must be distinct, {n:?} is given twice"
                )));
            }
        }
        check_ports(&self.ports)?;
        if names.len() > 1 {
            if let Some(p) = self.ports.iter().find(|p| p.host != 0) {
                return Err(Error::invalid(format!(
                    "host port {} cannot be published by {} clones; use host 0 (a free port)",
                    p.host,
                    names.len()
                )));
            }
        }
        Ok(names)
    }
}

fn check_ports(ports: &[PortSpec]) -> Result<()> {
    if ports.iter().any(|p| p.guest == 0) {
        return Err(Error::invalid("guest ports must be 1..=65535"));
    }
    Ok(())
}

/// The name of a [`Machine::reward_fork`] clone: `{base}-rf-{8 hex}`, the base cut so that the
/// name fits the 63 characters of a machine name.
fn reward_fork_name(base: &str) -> Result<String> {
    const SUFFIX: usize = "-rf-".len() + 8;
    let cut: String = base.chars().take(63 - SUFFIX).collect();
    let name = format!("{cut}-rf-{:08x}", rand::random::<u32>());
    crate::config::validate_name(&name)?;
    Ok(name)
}

impl Machine {
    /// Checks the arguments of a branch: the clone's name and its ports.
    pub(super) fn check_branch(name: &str, opts: &BranchOptions) -> Result<()> {
        crate::config::validate_name(name)?;
        check_ports(&opts.ports)
    }

    /// Several running clones of this running, branchable machine (SPEC §4.8 `branch_batch`),
    /// in the order of their names: `opts.names`, or `opts.count` names `{prefix}-{n}` (n from
    /// 1, prefix `"branch"` by default). All or nothing: when one clone fails, the clones made
    /// so far are deleted and that error is returned. The clones are made one after the other
    /// (each one pauses the source for its own window). A frozen source stays frozen when a
    /// later clone fails.
    pub async fn branch_batch(&self, opts: BranchBatchOptions) -> Result<Vec<Machine>> {
        let names = opts.clone_names()?;
        let one = BranchOptions {
            ports: opts.ports.clone(),
            branchable: opts.branchable,
            freeze_source: opts.freeze_source,
        };
        let mut made: Vec<Machine> = Vec::with_capacity(names.len());
        for name in &names {
            match self.inner.branch(name, &one).await {
                Ok(inner) => made.push(Machine { inner }),
                Err(e) => {
                    tracing::warn!(
                        machine = %self.name(), clone = %name, error = %e,
                        "branch_batch: a clone failed; deleting the {} made before it", made.len()
                    );
                    for m in made.iter().rev() {
                        if let Err(d) = m.delete().await {
                            tracing::warn!(
                                clone = %m.name(), error = %d,
                                "branch_batch: cannot delete a clone of the failed batch"
                            );
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(made)
    }

    /// Runs `argv` in a throw-away clone of this running, branchable machine and returns its
    /// result (SPEC §4.8 `reward_fork`): the clone is named `{name}-rf-{8 hex}` (`name`: this
    /// machine's name by default) and is always deleted afterwards; a failed delete is logged,
    /// not returned. The command is checked before the clone is made.
    pub async fn reward_fork(
        &self,
        argv: &[String],
        opts: ExecOptions,
        name: Option<&str>,
    ) -> Result<ExecResult> {
        super::check_argv(argv)?;
        opts.validate()?;
        if let Some(n) = name {
            crate::config::validate_name(n)?;
        }
        let clone_name = reward_fork_name(name.unwrap_or(self.name()))?;
        let clone = Machine {
            inner: self
                .inner
                .branch(&clone_name, &BranchOptions::default())
                .await?,
        };
        let result = clone.inner.exec(argv, &opts).await;
        if let Err(e) = clone.delete().await {
            tracing::warn!(clone = %clone_name, error = %e, "reward_fork: cannot delete the clone");
        }
        result
    }

    /// Deprecated alias of [`Machine::branch`] (SPEC §4.8 `fork`).
    #[deprecated(note = "use Machine::branch")]
    pub async fn fork(&self, name: &str, ports: Vec<PortSpec>) -> Result<Machine> {
        self.branch(name, ports).await
    }

    /// Deprecated alias of [`Machine::branch_batch`] (SPEC §4.8 `fork_batch`), the same
    /// defaults (prefix `"branch"`).
    #[deprecated(note = "use Machine::branch_batch")]
    pub async fn fork_batch(&self, opts: BranchBatchOptions) -> Result<Vec<Machine>> {
        self.branch_batch(opts).await
    }
}

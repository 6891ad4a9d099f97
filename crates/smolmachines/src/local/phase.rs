//! The lifecycle of one local machine: a [`Phase`] and the only place its transitions are
//! decided ([`Phase::on`]).
//!
//! ```text
//!  Creating ──Boot──► Booting ──Booted──► Running ──Stop──► Stopping ──Halted──► Stopped
//!                        │                 │  ▲                                    │
//!                   BootFailed          Pause Resume                              Boot
//!                        ▼                 ▼  │                                    ▼
//!                      Failed ──Boot──►  Paused                                 Booting
//!  Running ──Freeze──► Frozen (a branch base: no VM; Exited keeps it, only Delete leaves it)
//!  (any but Deleted) ──Delete──► Deleting ──Removed──► Deleted
//!  Running / Paused / Stopping ──Exited (the VMM ended)──► Stopped
//! ```
//!
//! `Exited` during `Booting` leaves the phase to the boot, which ends in `Booted` or
//! `BootFailed`. `Paused` is `pause()` (vCPUs stopped over QMP, `resume()` goes on); a branch
//! stops the source's vCPUs for its pause window without leaving `Running`.
//! The public [`MachineState`] is derived from the phase ([`Phase::public`]).

use crate::config::MachineState;

/// Where a machine is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The record is reserved and the disk being made; not booted yet.
    Creating,
    /// The VMM is starting and the agent has not answered yet.
    Booting,
    /// The VM runs and its agent answers.
    Running,
    /// The VM is paused (`pause()`): vCPUs stopped, memory kept.
    Paused,
    /// A frozen branch base: no VM, its RAM, device state and disk kept as files; it can be
    /// branched, never booted again.
    Frozen,
    /// A stop is under way.
    Stopping,
    /// No VM runs (stopped, powered off, crashed or killed).
    Stopped,
    /// The last boot failed; the VM is gone. `Boot` may try again.
    Failed,
    /// A delete is under way.
    Deleting,
    /// Deleted: every further operation fails.
    Deleted,
}

/// What happens to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A boot begins.
    Boot,
    /// The agent answered.
    Booted,
    /// The boot failed (the VM was ended).
    BootFailed,
    /// A stop begins.
    Stop,
    /// The stop finished (the VMM is gone).
    Halted,
    /// The VMM process ended, whoever ended it.
    Exited,
    /// Pause the VM.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// A branch with `freeze_source` made this machine a frozen base.
    Freeze,
    /// A delete begins.
    Delete,
    /// Everything of the machine is removed.
    Removed,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not allowed while the machine is {from:?}")]
pub struct Refused {
    /// The phase the machine was in.
    pub from: Phase,
    /// What was asked.
    pub event: Event,
}

impl Phase {
    /// The phase after `event`, or why `event` is refused in this phase.
    pub fn on(self, event: Event) -> Result<Phase, Refused> {
        use Event as E;
        use Phase as P;
        let next = match (self, event) {
            (P::Creating | P::Stopped | P::Failed, E::Boot) => P::Booting,
            (P::Booting, E::Booted) => P::Running,
            (P::Booting, E::BootFailed) => P::Failed,
            (P::Running | P::Paused, E::Stop) => P::Stopping,
            (P::Stopping | P::Stopped, E::Halted) => P::Stopped,
            (P::Running | P::Paused | P::Stopping, E::Exited) => P::Stopped,
            // the boot decides how a boot ends; nothing runs in the others
            (
                p @ (P::Booting | P::Creating | P::Stopped | P::Failed | P::Deleting | P::Deleted),
                E::Exited,
            ) => p,
            (P::Running, E::Pause) => P::Paused,
            (P::Running | P::Frozen, E::Freeze) => P::Frozen,
            // the freeze ends the VMM
            (P::Frozen, E::Exited) => P::Frozen,
            (P::Paused, E::Resume) => P::Running,
            (p, E::Delete) if p != P::Deleted => P::Deleting,
            (P::Deleting, E::Removed) => P::Deleted,
            (from, event) => return Err(Refused { from, event }),
        };
        Ok(next)
    }

    /// The public state of a machine in this phase; `booted`: it has booted at least once
    /// (a machine that never did is `created`).
    pub fn public(self, booted: bool) -> MachineState {
        let idle = if booted {
            MachineState::Stopped
        } else {
            MachineState::Created
        };
        match self {
            Phase::Creating => MachineState::Created,
            Phase::Booting | Phase::Stopped | Phase::Failed => idle,
            Phase::Paused => MachineState::Paused,
            Phase::Frozen => MachineState::Frozen,
            // a stopping VM still exists; MachineState has no word for it
            Phase::Running | Phase::Stopping => MachineState::Running,
            Phase::Deleting | Phase::Deleted => MachineState::Deleted,
        }
    }

    /// The lower-case name (for errors and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Frozen => "frozen",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
            Phase::Deleting => "deleting",
            Phase::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[path = "phase_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use Phase as P;

    const ALL: [Phase; 10] = [
        P::Creating,
        P::Booting,
        P::Running,
        P::Paused,
        P::Frozen,
        P::Stopping,
        P::Stopped,
        P::Failed,
        P::Deleting,
        P::Deleted,
    ];

    #[test]
    fn a_whole_life() {
        let mut p = P::Creating;
        for (e, want) in [
            (E::Boot, P::Booting),
            (E::Booted, P::Running),
            (E::Pause, P::Paused),
            (E::Resume, P::Running),
            (E::Stop, P::Stopping),
            (E::Exited, P::Stopped),
            (E::Halted, P::Stopped),
            (E::Boot, P::Booting),
            (E::BootFailed, P::Failed),
            (E::Boot, P::Booting),
            (E::Booted, P::Running),
            (E::Exited, P::Stopped),
            (E::Delete, P::Deleting),
            (E::Removed, P::Deleted),
        ] {
            p = p.on(e).unwrap_or_else(|r| panic!("{r}"));
            assert_eq!(p, want, "after {e:?}");
        }
    }

    #[test]
    fn only_idle_machines_boot() {
        for p in ALL {
            let ok = p.on(E::Boot).is_ok();
            assert_eq!(
                ok,
                matches!(p, P::Creating | P::Stopped | P::Failed),
                "{p:?}"
            );
        }
        // a second boot while one runs is refused: the caller waits for the first instead
        assert_eq!(
            P::Booting.on(E::Boot),
            Err(Refused {
                from: P::Booting,
                event: E::Boot
            })
        );
    }

    #[test]
    fn only_live_machines_stop_and_deleted_is_final() {
        for p in ALL {
            assert_eq!(
                p.on(E::Stop).is_ok(),
                matches!(p, P::Running | P::Paused),
                "{p:?}"
            );
            assert_eq!(p.on(E::Delete).is_ok(), p != P::Deleted, "{p:?}");
        }
        for e in [
            E::Boot,
            E::Booted,
            E::Stop,
            E::Pause,
            E::Resume,
            E::Delete,
            E::Removed,
        ] {
            assert!(P::Deleted.on(e).is_err(), "{e:?}");
        }
        assert_eq!(P::Deleted.on(E::Exited), Ok(P::Deleted));
    }

    #[test]
    fn a_vm_exit_stops_a_live_machine_and_leaves_a_boot_to_the_boot() {
        for p in [P::Running, P::Paused, P::Stopping] {
            assert_eq!(p.on(E::Exited), Ok(P::Stopped), "{p:?}");
        }
        assert_eq!(P::Booting.on(E::Exited), Ok(P::Booting));
        assert_eq!(P::Deleting.on(E::Exited), Ok(P::Deleting));
        assert!(P::Running.on(E::Booted).is_err());
        assert!(P::Stopped.on(E::BootFailed).is_err());
        assert!(P::Stopped.on(E::Resume).is_err());
        assert!(P::Booting.on(E::Pause).is_err());
    }

    #[test]
    fn public_state_is_derived() {
        assert_eq!(P::Creating.public(false), MachineState::Created);
        assert_eq!(P::Stopped.public(false), MachineState::Created);
        assert_eq!(P::Stopped.public(true), MachineState::Stopped);
        assert_eq!(P::Failed.public(true), MachineState::Stopped);
        assert_eq!(P::Booting.public(true), MachineState::Stopped);
        assert_eq!(P::Running.public(true), MachineState::Running);
        assert_eq!(P::Stopping.public(true), MachineState::Running);
        assert_eq!(P::Paused.public(true), MachineState::Paused);
        assert_eq!(P::Deleting.public(true), MachineState::Deleted);
        assert_eq!(P::Deleted.public(false), MachineState::Deleted);
    }

    #[test]
    fn a_frozen_base_is_only_branched_or_deleted() {
        assert_eq!(P::Running.on(E::Freeze), Ok(P::Frozen));
        assert_eq!(P::Frozen.on(E::Freeze), Ok(P::Frozen));
        assert_eq!(P::Frozen.on(E::Exited), Ok(P::Frozen));
        assert_eq!(P::Frozen.on(E::Delete), Ok(P::Deleting));
        for e in [E::Boot, E::Stop, E::Pause, E::Resume, E::Booted] {
            assert!(P::Frozen.on(e).is_err(), "{e:?}");
        }
        assert!(P::Paused.on(E::Freeze).is_err());
        assert_eq!(P::Frozen.public(true), MachineState::Frozen);
        assert_eq!(P::Frozen.as_str(), "frozen");
    }
}

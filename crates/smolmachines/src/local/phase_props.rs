//! Property tests of the lifecycle ([`Phase::on`]): random event sequences from `Creating`
//! never take a transition the lifecycle's diagram does not have, `Deleted` is final, a frozen
//! base only ever goes to `Deleting`, a refused event names where the machine was, and every
//! phase a machine can reach can still be deleted.

use proptest::prelude::*;

use super::{Event, Phase, Refused};
use Event as E;
use Phase as P;

const EVENTS: [Event; 11] = [
    E::Boot,
    E::Booted,
    E::BootFailed,
    E::Stop,
    E::Halted,
    E::Exited,
    E::Pause,
    E::Resume,
    E::Freeze,
    E::Delete,
    E::Removed,
];

const PHASES: [Phase; 10] = [
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

/// The edges of the diagram in phase.rs, written out on their own (not from `on`): every
/// change of phase a machine may make. Staying in a phase is not listed here; which events may
/// leave a phase as it is is [`may_stay`]'s.
fn edge(from: Phase, to: Phase) -> bool {
    matches!(
        (from, to),
        (P::Creating | P::Stopped | P::Failed, P::Booting)
            | (P::Booting, P::Running | P::Failed)
            | (P::Running, P::Stopping | P::Paused | P::Frozen | P::Stopped)
            | (P::Paused, P::Running | P::Stopping | P::Stopped)
            | (P::Stopping, P::Stopped)
            | (P::Deleting, P::Deleted)
    ) || (to == P::Deleting && from != P::Deleted && from != P::Deleting)
}

/// Events a phase may accept without changing: a VMM exit where no VMM is the machine's own
/// (the boot decides, or there is none), a repeated halt, a second freeze, a second delete.
fn may_stay(p: Phase, e: Event) -> bool {
    match e {
        E::Exited => matches!(
            p,
            P::Booting
                | P::Creating
                | P::Stopped
                | P::Failed
                | P::Frozen
                | P::Deleting
                | P::Deleted
        ),
        E::Halted => p == P::Stopped,
        E::Freeze => p == P::Frozen,
        E::Delete => p == P::Deleting,
        _ => false,
    }
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec(prop::sample::select(EVENTS.to_vec()), 0..80)
}

/// Walks `events` from `Creating`, keeping only the accepted ones; returns every phase passed.
fn walk(events: &[Event]) -> Vec<Phase> {
    let mut p = P::Creating;
    let mut seen = vec![p];
    for &e in events {
        if let Ok(next) = p.on(e) {
            p = next;
            seen.push(p);
        }
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_illegal_transition_is_reachable(events in events()) {
        let mut p = P::Creating;
        for e in events {
            match p.on(e) {
                Ok(next) if next == p => prop_assert!(may_stay(p, e), "{p:?} stays on {e:?}"),
                Ok(next) => prop_assert!(edge(p, next), "{p:?} --{e:?}--> {next:?}"),
                Err(r) => prop_assert_eq!(r, Refused { from: p, event: e }),
            }
            p = p.on(e).unwrap_or(p);
        }
    }

    #[test]
    fn deleted_is_final_and_a_frozen_base_is_only_deleted(events in events()) {
        let seen = walk(&events);
        if let Some(i) = seen.iter().position(|&p| p == P::Deleted) {
            prop_assert!(seen[i..].iter().all(|&p| p == P::Deleted), "{seen:?}");
        }
        if let Some(i) = seen.iter().position(|&p| p == P::Frozen) {
            prop_assert!(
                seen[i..].iter().all(|&p| matches!(p, P::Frozen | P::Deleting | P::Deleted)),
                "{seen:?}"
            );
        }
    }

    #[test]
    fn every_reachable_phase_can_still_be_deleted(events in events()) {
        let p = *walk(&events).last().expect("the walk starts somewhere");
        if p != P::Deleted {
            let deleting = p.on(E::Delete);
            prop_assert_eq!(deleting, Ok(P::Deleting));
            prop_assert_eq!(P::Deleting.on(E::Removed), Ok(P::Deleted));
        }
    }

    #[test]
    fn only_a_booted_machine_runs(events in events()) {
        // Running (and what only a running VM leads to) is never reached without a Booted
        let mut booted = false;
        let mut p = P::Creating;
        for e in events {
            if let Ok(next) = p.on(e) {
                booted |= e == E::Booted;
                if matches!(next, P::Running | P::Paused | P::Stopping | P::Frozen) {
                    prop_assert!(booted, "{next:?} before any Booted");
                }
                p = next;
            }
        }
    }
}

/// The same rules over every (phase, event) pair, reachable or not.
#[test]
fn every_pair_is_an_edge_a_stay_or_refused() {
    for p in PHASES {
        for e in EVENTS {
            match p.on(e) {
                Ok(next) if next == p => assert!(may_stay(p, e), "{p:?} stays on {e:?}"),
                Ok(next) => assert!(edge(p, next), "{p:?} --{e:?}--> {next:?}"),
                Err(r) => assert_eq!(r, Refused { from: p, event: e }),
            }
        }
    }
}

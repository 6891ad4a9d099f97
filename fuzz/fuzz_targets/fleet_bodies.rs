//! The fleet's request bodies (smolmachines::wire, read by smol-fleet) and the cloud client's
//! SSE decoder: the first byte picks the body type, the rest is the JSON (or SSE) bytes. A body
//! that reads is converted as the server converts it (validated config, exec options, branch
//! options); errors are answers, a panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolmachines::wire::{
    BranchBatchBody, BranchBody, CommandBody, CreateMachineBody, CredentialBody, SetPortsBody,
    SseDecoder,
};
use smolmachines::MachineConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 7 {
        0 => {
            if let Ok(b) = serde_json::from_slice::<CreateMachineBody>(body) {
                let _ = MachineConfig::try_from(b);
            }
        }
        1 => {
            if let Ok(b) = serde_json::from_slice::<CommandBody>(body) {
                let _ = b.into_exec(None);
            }
        }
        2 => {
            if let Ok(b) = serde_json::from_slice::<BranchBody>(body) {
                let _ = b.wants_branchable();
                let _ = b.into_options();
            }
        }
        3 => {
            if let Ok(b) = serde_json::from_slice::<BranchBatchBody>(body) {
                let _ = b.into_options("fuzz");
            }
        }
        4 => {
            let _ = serde_json::from_slice::<SetPortsBody>(body);
        }
        5 => {
            let _ = serde_json::from_slice::<CredentialBody>(body);
        }
        _ => {
            // SSE in two pushes, split where the second byte says: events may span pushes
            let mut d = SseDecoder::new();
            let at = body.first().map_or(0, |&b| usize::from(b).min(body.len()));
            let _ = d.push(&body[..at]);
            let _ = d.push(&body[at..]);
        }
    }
});

//! The smolfleet `/v1` REST shapes (SPEC §10.2-§10.5, `../shared/research/CLOUD-CLIENTS.md`):
//! camelCase JSON exactly as the published clients send and read it, shared by the cloud
//! client, the fleet server and the bindings, with conversions from and to the core types of
//! [`crate::config`].
//!
//! Reading is tolerant, as the clients are: unknown fields are dropped, `null` reads as the
//! field's default, a list comes bare or as `{"machines": [...]}`. Writing emits what the
//! Python client 1.32.2 emits (including its `null`s), so a server written against it sees the
//! same bytes.

mod branch;
mod checkpoint;
mod exec;
mod machine;

pub use branch::{BranchBatchBody, BranchBatchResponse, BranchBody, BranchRoute};
pub use checkpoint::{rfc3339, CheckpointInfo, RestoreBody};
pub use exec::{CommandBody, CommandLine, ExecResponse, SseDecoder, StreamEvent, TEXT_CAP};
pub use machine::{
    CreateMachineBody, CreateResources, CredentialBody, MachineInfo, MachineList, MachineResources,
    NetworkMode, NetworkPolicy, PortInfo, PortRequest, SetPortsBody, Source, SourceKind,
};

use serde::{Deserialize, Deserializer};

/// Reads `null` as `T::default()` (servers send `"ports": null`, `"labels": null`).
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

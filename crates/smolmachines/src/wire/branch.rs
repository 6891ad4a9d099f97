//! The branch bodies of SPEC §10.5.10: `POST /v1/machines/{id}/branches` and its legacy
//! twin `POST /v1/machines/{id}/fork`, as the published Python client 1.32.2 sends them
//! (CLOUD-CLIENTS.md §3, `transport.py` `fork`): `{"name", "ports": [{"port", "hostPort"}]}`
//! always, `"branchable": true` (branches) or `"forkable": true` (fork) and
//! `"freezeSource": true` only when asked for.

use serde::{Deserialize, Serialize};

use super::{nullable, PortRequest};
use crate::config::{BranchOptions, PortSpec};
use crate::error::{Error, Result};

/// Which of the two routes a body is for: they differ only in the alias of `branchable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchRoute {
    /// `POST …/branches` (`branchable`).
    Branches,
    /// `POST …/fork`, the legacy route (`forkable`).
    Fork,
}

impl BranchRoute {
    /// The path of this route for the (already encoded) machine id segment.
    pub fn path(self, id_segment: &str) -> String {
        match self {
            BranchRoute::Branches => format!("/v1/machines/{id_segment}/branches"),
            BranchRoute::Fork => format!("/v1/machines/{id_segment}/fork"),
        }
    }
}

/// `POST /v1/machines/{id}/branches` / `…/fork`: a running clone of a branchable source.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchBody {
    /// The clone's name (required; unique per tenant).
    pub name: String,
    /// The clone's published ports; `hostPort` 0 or absent lets the server pick. Empty: each
    /// port the source publishes is published again on a free host port.
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<PortRequest>,
    /// The clone is a branch source too (the `branches` route's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branchable: Option<bool>,
    /// The legacy `fork` route's name of `branchable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forkable: Option<bool>,
    /// The source becomes a frozen base (state `frozen`) that can be branched again and
    /// never runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_source: Option<bool>,
}

impl BranchBody {
    /// The body the published client sends on `route` for `name` with `opts`.
    pub fn new(route: BranchRoute, name: &str, opts: &BranchOptions) -> BranchBody {
        let flag = opts.branchable.then_some(true);
        BranchBody {
            name: name.to_string(),
            ports: opts
                .ports
                .iter()
                .map(|p| PortRequest {
                    port: p.guest,
                    host_port: Some(p.host),
                })
                .collect(),
            branchable: if route == BranchRoute::Branches {
                flag
            } else {
                None
            },
            forkable: if route == BranchRoute::Fork {
                flag
            } else {
                None
            },
            freeze_source: opts.freeze_source.then_some(true),
        }
    }

    /// Whether the clone is to be a branch source: `branchable` or its alias `forkable`
    /// (either route takes either; the two set to different values are `InvalidConfig`).
    pub fn wants_branchable(&self) -> Result<bool> {
        match (self.branchable, self.forkable) {
            (Some(a), Some(b)) if a != b => Err(Error::invalid(
                "branchable and forkable are aliases of one field; they disagree",
            )),
            (a, b) => Ok(a.or(b).unwrap_or(false)),
        }
    }

    /// The engine's options of this body. Port 0 is `InvalidConfig`.
    pub fn into_options(self) -> Result<BranchOptions> {
        let branchable = self.wants_branchable()?;
        let mut ports = Vec::with_capacity(self.ports.len());
        for p in &self.ports {
            if p.port == 0 {
                return Err(Error::invalid("ports: guest ports must be 1..=65535"));
            }
            ports.push(PortSpec {
                host: p.host_port.unwrap_or(0),
                guest: p.port,
            });
        }
        Ok(BranchOptions {
            ports,
            branchable,
            freeze_source: self.freeze_source == Some(true),
        })
    }
}

/// `POST /v1/machines/{id}/branches/batch` / `…/fork-batch` (SPEC §10.5.10), as
/// `transport.py` `fork_batch` sends it: `ports` always, `names` when not empty, `count` and
/// `namePrefix` when set, `freezeSource` only when true. The server names clones
/// `{namePrefix}-{n}` (n from 1; the prefix defaults to the source's name).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchBatchBody {
    /// Ports published on every clone (`hostPort` must be 0 or absent for more than one).
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<PortRequest>,
    /// The clones' names (wins over `count`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub names: Vec<String>,
    /// How many clones (1..=64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// The prefix of generated names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_prefix: Option<String>,
    /// The source becomes a frozen base at the first clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_source: Option<bool>,
}

impl BranchBatchBody {
    /// The engine's options of this body, with `default_prefix` when it names none. Port 0 is
    /// `InvalidConfig`; names and counts are checked by
    /// [`BranchBatchOptions::clone_names`](crate::BranchBatchOptions::clone_names).
    pub fn into_options(self, default_prefix: &str) -> Result<crate::BranchBatchOptions> {
        let mut ports = Vec::with_capacity(self.ports.len());
        for p in &self.ports {
            if p.port == 0 {
                return Err(Error::invalid("ports: guest ports must be 1..=65535"));
            }
            ports.push(PortSpec {
                host: p.host_port.unwrap_or(0),
                guest: p.port,
            });
        }
        Ok(crate::BranchBatchOptions {
            count: self.count,
            names: self.names,
            name_prefix: Some(
                self.name_prefix
                    .unwrap_or_else(|| default_prefix.to_string()),
            ),
            ports,
            branchable: false,
            freeze_source: self.freeze_source == Some(true),
        })
    }
}

/// The answer of a batch: `{"clones": [MachineInfo…]}` (201).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BranchBatchResponse {
    /// The running clones, in the order of their names.
    #[serde(default, deserialize_with = "nullable")]
    pub clones: Vec<super::MachineInfo>,
}

#[cfg(test)]
#[path = "branch_tests.rs"]
mod tests;

//! smolfleet: the self-hostable fleet server. One process speaks the `/v1` REST API of SPEC
//! §10 (the shapes of [`smolmachines::wire`], errors from the core's one mapping) over an
//! embedded SQLite database (tenants, API keys, machines) and the local engine as its node.
//!
//! * [`Fleet::open`] opens a home (`fleet.db`, `engine/`), creating the first tenant and its
//!   admin key on first start; [`Fleet::router`] is the HTTP service; [`Fleet::serve`] runs it.
//! * Machines are created detached and persistent on the engine: they outlive the server, and
//!   a restarted server finds them again through its database.
//! * [`testing::spawn`] starts a server on `127.0.0.1:0` for tests (ours and other crates').

mod branch;
pub mod cache;
mod checkpoint;
mod db;
pub mod epochs;
mod error;
pub mod fleetca;
mod http;
pub mod ingress;
pub mod keys;
pub mod labels;
mod lastknown;
pub mod limit;
mod metrics;
pub mod nodeagent;
pub mod nodeapi;
pub mod nodedoor;
mod nodepool;
pub mod nodes;
pub mod openapi;
mod operations;
pub mod placement;
mod proxy;
pub mod reconcile;
pub mod remote;
mod remotebranch;
mod remotecheckpoint;
mod routes;
pub mod scopes;
mod server;
pub mod store;
mod stream;
pub mod sweeper;
pub mod testing;
pub mod tls;

pub use db::{rfc3339, AuthKey, CheckpointDeleted, CheckpointRow, KeyRow, MachineRow, Restored};
pub use error::{ApiError, FleetError};
pub use limit::RateLimit;
pub use server::{Fleet, Tenant, FILE_LIMIT, JSON_LIMIT};
pub use store::{Db, Store};
pub use sweeper::{Busy, SweepReport};

//! The OpenAPI 3.1 document of the server, generated from the code: the operations of
//! [`OPERATIONS`] (the routes of `server.rs`, their scopes from `scopes.rs`) and the schemas
//! of the core's wire types (`utoipa::ToSchema`, feature `openapi` of smolmachines). Served
//! at `GET /openapi.json`, printed by `smolfleet openapi`, checked in at
//! `crates/smol-fleet/openapi.json`.

use axum::http::Method;
use axum::Json;
use smolmachines::wire::{
    BranchBatchBody, BranchBatchResponse, BranchBody, CheckpointInfo, CommandBody,
    CreateMachineBody, ExecResponse, MachineInfo, RestoreBody, SetPortsBody,
};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ArrayBuilder, ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi,
    OpenApiBuilder, Paths, Ref, RefOr, Required, ResponseBuilder, Schema, Type,
};
use utoipa::ToSchema;

use crate::scopes;

/// A body or an answer's shape.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// None.
    Empty,
    /// A JSON schema of the components.
    Json(&'static str),
    /// A JSON array of a schema.
    JsonArray(&'static str),
    /// Any JSON object.
    AnyJson,
    /// Raw bytes.
    Bytes,
    /// Server-Sent Events.
    Events,
    /// Prometheus text.
    Text,
}

/// One operation: method, path (axum's pattern), id, summary, request, success status and
/// answer.
pub type Operation = (
    Method,
    &'static str,
    &'static str,
    &'static str,
    Shape,
    u16,
    Shape,
);

/// Every route the server answers.
pub const OPERATIONS: &[Operation] = &[
    (
        Method::GET,
        "/health",
        "health",
        "Cluster summary (no key needed)",
        Shape::Empty,
        200,
        Shape::AnyJson,
    ),
    (
        Method::GET,
        "/livez",
        "livez",
        "Liveness",
        Shape::Empty,
        200,
        Shape::AnyJson,
    ),
    (
        Method::GET,
        "/readyz",
        "readyz",
        "Readiness (the database answers)",
        Shape::Empty,
        200,
        Shape::AnyJson,
    ),
    (
        Method::GET,
        "/metrics",
        "metrics",
        "Prometheus metrics (text format 0.0.4)",
        Shape::Empty,
        200,
        Shape::Text,
    ),
    (
        Method::GET,
        "/openapi.json",
        "openapi",
        "This document",
        Shape::Empty,
        200,
        Shape::AnyJson,
    ),
    (
        Method::POST,
        "/v1/machines",
        "createMachine",
        "Create a machine",
        Shape::Json("CreateMachineBody"),
        201,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::GET,
        "/v1/machines",
        "listMachines",
        "List the tenant's machines (?label=k=v, repeated)",
        Shape::Empty,
        200,
        Shape::JsonArray("MachineInfo"),
    ),
    (
        Method::GET,
        "/v1/machines/{id}",
        "getMachine",
        "A machine",
        Shape::Empty,
        200,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::DELETE,
        "/v1/machines/{id}",
        "deleteMachine",
        "Delete a machine (204; 202 with the machine `deleting` while its node is lost: the delete runs when the node returns)",
        Shape::Empty,
        204,
        Shape::Empty,
    ),
    (
        Method::POST,
        "/v1/machines/{id}/start",
        "startMachine",
        "Start a machine (returns once ready)",
        Shape::Empty,
        200,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/stop",
        "stopMachine",
        "Stop a machine (clean power-off; the disk stays)",
        Shape::Empty,
        200,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/pause",
        "pauseMachine",
        "Pause a running machine (vCPUs stop, memory kept; exec and files 409 until resumed)",
        Shape::Empty,
        200,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/resume",
        "resumeMachine",
        "Resume a paused machine (idempotent)",
        Shape::Empty,
        200,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/branches",
        "branchMachine",
        "A running clone of a running branchable machine (409 when not branchable; \
         freezeSource is 422 NOT_SUPPORTED)",
        Shape::Json("BranchBody"),
        201,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/fork",
        "forkMachine",
        "Legacy name of branchMachine (forkable for branchable)",
        Shape::Json("BranchBody"),
        201,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/branches/batch",
        "branchBatch",
        "Several running clones, all or nothing (names, or count with namePrefix)",
        Shape::Json("BranchBatchBody"),
        201,
        Shape::Json("BranchBatchResponse"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/fork-batch",
        "forkBatch",
        "Legacy name of branchBatch",
        Shape::Json("BranchBatchBody"),
        201,
        Shape::Json("BranchBatchResponse"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/checkpoints",
        "createCheckpoint",
        "A portable checkpoint of a running branchable machine, kept by the server (201; 409 \
         when the machine is not branchable or is stopped)",
        Shape::Empty,
        201,
        Shape::Json("CheckpointInfo"),
    ),
    (
        Method::GET,
        "/v1/machines/{id}/checkpoints",
        "listCheckpoints",
        "The checkpoints taken of a machine (also once it is deleted)",
        Shape::Empty,
        200,
        Shape::JsonArray("CheckpointInfo"),
    ),
    (
        Method::POST,
        "/v1/checkpoints/{id}/restore",
        "restoreCheckpoint",
        "A new machine from a checkpoint, restored live (201; 409 on a taken name)",
        Shape::Json("RestoreBody"),
        201,
        Shape::Json("MachineInfo"),
    ),
    (
        Method::DELETE,
        "/v1/checkpoints/{id}",
        "deleteCheckpoint",
        "Delete a checkpoint (204; 409 while a machine restored from it exists)",
        Shape::Empty,
        204,
        Shape::Empty,
    ),
    (
        Method::POST,
        "/v1/machines/{id}/exec",
        "exec",
        "Run a command (auto-starts a stopped machine)",
        Shape::Json("CommandBody"),
        200,
        Shape::Json("ExecResponse"),
    ),
    (
        Method::POST,
        "/v1/machines/{id}/exec/stream",
        "execStream",
        "Run a command, output as Server-Sent Events",
        Shape::Json("CommandBody"),
        200,
        Shape::Events,
    ),
    (
        Method::GET,
        "/v1/machines/{id}/files/{*path}",
        "readFile",
        "Read a file, streamed (files//abs or files/rel; 100 MiB at most, 413 past it)",
        Shape::Empty,
        200,
        Shape::Bytes,
    ),
    (
        Method::PUT,
        "/v1/machines/{id}/files/{*path}",
        "writeFile",
        "Write a file, streamed (100 MiB at most, 413 past it; 204)",
        Shape::Bytes,
        204,
        Shape::Empty,
    ),
    (
        Method::PUT,
        "/v1/machines/{id}/ports",
        "setPorts",
        "Publish exactly these guest ports (TCP; starts a stopped machine)",
        Shape::Json("SetPortsBody"),
        200,
        Shape::Json("MachineInfo"),
    ),
    // the connect bridge takes any method and WebSocket upgrades; two are listed
    (
        Method::GET,
        "/v1/machines/{id}/connect/{port}/{*path}",
        "connectGet",
        "Proxy to a published guest port (any method, WebSocket upgrades; also connect/{port})",
        Shape::Empty,
        200,
        Shape::Bytes,
    ),
    (
        Method::POST,
        "/v1/machines/{id}/connect/{port}/{*path}",
        "connectPost",
        "Proxy to a published guest port (the body streams to the guest)",
        Shape::Bytes,
        200,
        Shape::Bytes,
    ),
];

fn add<T: ToSchema>(out: &mut Vec<(String, RefOr<Schema>)>) {
    out.push((T::name().into_owned(), T::schema()));
    T::schemas(out);
}

fn content(shape: Shape) -> Option<(&'static str, utoipa::openapi::Content)> {
    let schema = |s: RefOr<Schema>| ContentBuilder::new().schema(Some(s)).build();
    let string = || {
        RefOr::T(Schema::Object(
            ObjectBuilder::new().schema_type(Type::String).build(),
        ))
    };
    Some(match shape {
        Shape::Empty => return None,
        Shape::Json(name) => (
            "application/json",
            schema(RefOr::Ref(Ref::from_schema_name(name))),
        ),
        Shape::JsonArray(name) => (
            "application/json",
            schema(RefOr::T(Schema::Array(
                ArrayBuilder::new()
                    .items(RefOr::Ref(Ref::from_schema_name(name)))
                    .build(),
            ))),
        ),
        Shape::AnyJson => (
            "application/json",
            schema(RefOr::T(Schema::Object(
                ObjectBuilder::new().schema_type(Type::Object).build(),
            ))),
        ),
        Shape::Bytes => (
            "application/octet-stream",
            schema(RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::Binary,
                    )))
                    .build(),
            ))),
        ),
        // OpenAPI 3.1 has no `itemSchema`: the schema describes each event (as schemathesis
        // and other tools read it), `exit` last with `{"exitCode": N}` as its data
        Shape::Events => (
            "text/event-stream",
            schema(RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .property(
                        "event",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(["stdout", "stderr", "exit", "error"])),
                    )
                    .required("event")
                    .property("data", string())
                    .required("data")
                    .build(),
            ))),
        ),
        Shape::Text => ("text/plain; version=0.0.4", schema(string())),
    })
}

fn http_method(m: &Method) -> HttpMethod {
    match *m {
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::DELETE => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(RefOr::T(Schema::Object(
                    ObjectBuilder::new().schema_type(Type::Object).build(),
                ))))
                .build(),
        )
        .build()
}

/// The document.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for (method, route, id, summary, request, status, answer) in OPERATIONS {
        let path = route.replace("{*", "{");
        let mut op = OperationBuilder::new()
            .operation_id(Some(*id))
            .summary(Some(*summary));
        for name in ["id", "port", "path"] {
            if path.contains(&format!("{{{name}}}")) {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
                );
            }
        }
        if let Some((ct, c)) = content(*request) {
            // no bytes at all are a file's empty content, not a missing body
            let required = match request {
                Shape::Bytes => Required::False,
                _ => Required::True,
            };
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content(ct, c)
                    .required(Some(required))
                    .build(),
            ));
        }
        let mut ok = ResponseBuilder::new().description("success");
        if let Some((ct, c)) = content(*answer) {
            ok = ok.content(ct, c);
        }
        op = op.response(status.to_string(), ok.build());
        if *route == "/health" {
            op = op.security(SecurityRequirement::default());
        } else {
            op = op.response(
                "401",
                ResponseBuilder::new()
                    .description("no valid key (empty body)")
                    .build(),
            );
            op = op.response("429", problem("rate limited (Retry-After)"));
        }
        if let Some(scope) = scopes::required(method, route) {
            op = op.description(Some(format!("Needs the `{scope}` scope.")));
            op = op.response(
                "403",
                ResponseBuilder::new()
                    .description(format!("text/plain `missing scope: {scope}`"))
                    .build(),
            );
        }
        if route.starts_with("/v1/") {
            op = op.response("4XX", problem("refused (problem+json)"));
            op = op.response("5XX", problem("failed (problem+json)"));
        }
        paths.add_path_operation(path, vec![http_method(method)], op.build());
    }
    let mut schemas = Vec::new();
    add::<CreateMachineBody>(&mut schemas);
    add::<MachineInfo>(&mut schemas);
    add::<CommandBody>(&mut schemas);
    add::<ExecResponse>(&mut schemas);
    add::<SetPortsBody>(&mut schemas);
    add::<BranchBody>(&mut schemas);
    add::<BranchBatchBody>(&mut schemas);
    add::<BranchBatchResponse>(&mut schemas);
    add::<CheckpointInfo>(&mut schemas);
    add::<RestoreBody>(&mut schemas);
    schemas.sort_by(|a, b| a.0.cmp(&b.0));
    schemas.dedup_by(|a, b| a.0 == b.0);
    let components = ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("smolfleet API")
                .version("0.1.0")
                .build(),
        )
        .paths(paths)
        .components(Some(components))
        .security(Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]))
        .build()
}

/// The document as checked in: pretty JSON with a final newline.
pub fn document_json() -> String {
    match document().to_pretty_json() {
        Ok(s) => s + "\n",
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise the OpenAPI document");
            String::new()
        }
    }
}

/// `GET /openapi.json` (any valid key).
pub async fn openapi_json() -> Json<OpenApi> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scoped_route_is_documented() {
        for (m, r, _) in scopes::ROUTE_SCOPES {
            assert!(
                OPERATIONS.iter().any(|(om, or, ..)| om == m && or == r),
                "{m} {r} is not in OPERATIONS"
            );
        }
        let doc = serde_json::to_value(document()).unwrap();
        assert!(doc["components"]["schemas"]["CreateMachineBody"].is_object());
        assert!(doc["paths"]["/v1/machines/{id}/files/{path}"]["put"].is_object());
    }
}

//! Portable checkpoints on the cloud target (SPEC §4.8, §10.5.9): the server keeps them.
//!
//! * `checkpoint` → `POST /v1/machines/{id}/checkpoints` (30 min, never retried: it captures
//!   live memory), `checkpoints` → `GET …/checkpoints`;
//! * `restore_checkpoint(id, name)` → `POST /v1/checkpoints/{id}/restore {name, network?}`
//!   (30 min), then, as SPEC says the client does, `POST …/start` and readiness (§9.4) of
//!   the new machine; a machine that does not get ready is deleted;
//! * `delete_checkpoint(id)` → `DELETE /v1/checkpoints/{id}`.
//!
//! Not here yet: restoring a local `.smolcheckpoint` file on the cloud (SPEC's upload first,
//! §10.5.9 `POST /v1/checkpoints`): `NotSupported`.

use std::sync::Arc;

use super::http::{encode_segment, Client, Req, LONG_TIMEOUT};
use super::machine::{CloudMachine, DeleteGuard};
use crate::config::RestoreOptions;
use crate::error::{Error, ErrorCode, Result};
use crate::wire::{MachineInfo, RestoreBody};

/// `POST /v1/machines/{id}/checkpoints` (no body).
pub(crate) fn create_request(machine_id: &str) -> Req {
    Req::post(format!(
        "/v1/machines/{}/checkpoints",
        encode_segment(machine_id)
    ))
    .timeout(LONG_TIMEOUT)
}

/// `GET /v1/machines/{id}/checkpoints`.
pub(crate) fn list_request(machine_id: &str) -> Req {
    Req::get(format!(
        "/v1/machines/{}/checkpoints",
        encode_segment(machine_id)
    ))
}

/// `POST /v1/checkpoints/{id}/restore` of `opts`: `network` `true` → `{"mode": "open"}`,
/// `false` → `{"mode": "blocked"}`, unset → absent (the server's default: blocked). Ports
/// cannot be asked for on this target (the body has none).
pub(crate) fn restore_request(id: &str, name: &str, opts: &RestoreOptions) -> Result<Req> {
    if !opts.ports.is_empty() {
        return Err(Error::NotSupported {
            message: "restore ports are local only; on the cloud a restored machine publishes \
                      the checkpointed machine's ports"
                .into(),
        });
    }
    let body = RestoreBody {
        name: name.to_string(),
        network: opts
            .network
            .map(|on| serde_json::json!({"mode": if on { "open" } else { "blocked" }})),
    };
    Ok(
        Req::post(format!("/v1/checkpoints/{}/restore", encode_segment(id)))
            .json(&body)
            .timeout(LONG_TIMEOUT),
    )
}

/// `DELETE /v1/checkpoints/{id}` (idempotent: retried like any DELETE).
pub(crate) fn delete_request(id: &str) -> Req {
    Req::delete(format!("/v1/checkpoints/{}", encode_segment(id)))
}

/// A local file given as a cloud checkpoint id.
fn refuse_local_file(id: &str) -> Result<()> {
    if std::path::Path::new(id).is_file() {
        return Err(Error::NotSupported {
            message: format!(
                "{id} is a local file: restoring a .smolcheckpoint file on the cloud needs an \
                 upload (upload_checkpoint), which is not built yet; restore it locally"
            ),
        });
    }
    Ok(())
}

/// The restore of cloud checkpoint `id` as machine `name`: the request, the new machine's
/// start (best effort, as at create) and readiness; deleted when it does not get ready.
pub(crate) async fn restore(
    client: &Arc<Client>,
    id: &str,
    name: &str,
    opts: &RestoreOptions,
) -> Result<CloudMachine> {
    refuse_local_file(id)?;
    let req = restore_request(id, name, opts)?;
    let info: MachineInfo = client.json(&req).await?;
    if info.id.is_empty() {
        return Err(Error::coded(
            ErrorCode::SmolvmError,
            format!("{}: the restored machine's record has no id", req.what()),
        ));
    }
    let m = CloudMachine::new(client.clone(), info);
    let guard = DeleteGuard::new(&m);
    let started = m.start_request(false).await.err();
    if let Some(e) = &started {
        tracing::warn!(machine = %m.id(), error = %e, "start of the restored machine failed; waiting for readiness anyway");
    }
    match m.wait_ready(super::DEFAULT_READY_TIMEOUT, true).await {
        Ok(()) => {
            guard.disarm();
            Ok(m)
        }
        Err(e) => {
            guard.delete_now().await;
            Err(match started {
                Some(s) => super::http::append_message(e, &format!(" (start failed: {s})")),
                None => e,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::http::Body;
    use super::*;
    use crate::config::PortSpec;

    fn body_json(r: &Req) -> Option<serde_json::Value> {
        match &r.body {
            Body::Json(b) => Some(serde_json::from_slice(b).unwrap()),
            _ => None,
        }
    }

    #[test]
    fn requests_have_the_contract_s_paths_bodies_and_deadlines() {
        let c = create_request("mach-1");
        assert_eq!(c.what(), "cloud POST /v1/machines/mach-1/checkpoints");
        assert_eq!(
            list_request("a b").what(),
            "cloud GET /v1/machines/a%20b/checkpoints"
        );
        assert_eq!(
            delete_request("ckpt-1").what(),
            "cloud DELETE /v1/checkpoints/ckpt-1"
        );
        let r = restore_request("ckpt-1", "web", &RestoreOptions::default()).unwrap();
        assert_eq!(r.what(), "cloud POST /v1/checkpoints/ckpt-1/restore");
        assert_eq!(body_json(&r), Some(serde_json::json!({"name": "web"})));
        assert_eq!(r.timeout, Some(LONG_TIMEOUT));
        assert!(
            !r.idempotent && !c.idempotent,
            "a restore and a checkpoint are never repeated"
        );
        assert_eq!((c.timeout, &c.body), (Some(LONG_TIMEOUT), &Body::Empty));
        for (on, mode) in [(true, "open"), (false, "blocked")] {
            let r = restore_request(
                "ckpt-1",
                "web",
                &RestoreOptions {
                    network: Some(on),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(
                body_json(&r),
                Some(serde_json::json!({"name": "web", "network": {"mode": mode}}))
            );
        }
        let e = restore_request(
            "ckpt-1",
            "web",
            &RestoreOptions {
                ports: vec![PortSpec { host: 0, guest: 80 }],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotSupported, "{e}");
    }

    #[test]
    fn a_local_file_is_not_sent_as_a_cloud_id() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = refuse_local_file(&f.path().display().to_string()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotSupported, "{e}");
        refuse_local_file("ckpt-0123").unwrap();
    }
}

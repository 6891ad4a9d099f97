//! SPEC §3 `PortableCheckpointInfo` / §10.5.9 `Checkpoint`: what a checkpoint is, on both
//! targets. One type for the local engine (the id is the file's absolute path, status
//! `"available"`, with the local-only `path`, `sourcePauseMs`, `elapsedMs`) and the fleet's
//! `/v1/…/checkpoints` routes (camelCase, as the server sends it).

use serde::{Deserialize, Serialize};

/// A portable checkpoint (SPEC §3 `PortableCheckpointInfo`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    /// Locally the absolute path of the `.smolcheckpoint` file; on the cloud `ckpt-…`.
    pub id: String,
    /// The machine it was taken of (its id: the name locally).
    pub machine_id: String,
    /// `"available"` (local), `"ready"` once restorable (cloud), `"uploading"`.
    pub status: String,
    /// Bytes of the checkpoint file.
    pub size_bytes: u64,
    /// Guest architecture (`x86_64`); restores only on the same one.
    pub arch: String,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// Where to download it (cloud; `None` locally).
    #[serde(default)]
    pub download_url: Option<String>,
    /// Bytes a chunk store already had (with `store`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_bytes: Option<u64>,
    /// The file (local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How long the source's vCPUs were stopped (local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pause_ms: Option<u64>,
    /// How long the checkpoint took, call to file in place (local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
}

/// `POST /v1/checkpoints/{id}/restore`: a new machine from a checkpoint (SPEC says stopped; the
/// fleet answers it running and ready, its memory restored: docs/FLEET.md).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBody {
    /// The new machine's name.
    pub name: String,
    /// Guest egress (`{"mode": "open"}`); absent: blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
}

/// RFC 3339 (UTC, seconds) of a Unix time: the one of `config`.
pub use crate::config::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_and_local_fields_only_when_set() {
        let c = CheckpointInfo {
            id: "/tmp/a.smolcheckpoint".into(),
            machine_id: "web".into(),
            status: "available".into(),
            size_bytes: 7,
            arch: "x86_64".into(),
            created_at: rfc3339(0),
            download_url: None,
            reused_bytes: None,
            path: Some("/tmp/a.smolcheckpoint".into()),
            source_pause_ms: Some(3),
            elapsed_ms: None,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["machineId"], "web");
        assert_eq!(v["sizeBytes"], 7);
        assert_eq!(v["createdAt"], "1970-01-01T00:00:00Z");
        assert_eq!(v["sourcePauseMs"], 3);
        assert!(v["downloadUrl"].is_null());
        assert!(v.get("elapsedMs").is_none() && v.get("reusedBytes").is_none());
        let back: CheckpointInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
        // what a server sends, unknown fields and all
        let s: CheckpointInfo = serde_json::from_str(
            r#"{"id":"ckpt-1","machineId":"mach-1","status":"ready","sizeBytes":1,
                "arch":"x86_64","createdAt":"2026-01-01T00:00:00Z","downloadUrl":"https://x","extra":1}"#,
        )
        .unwrap();
        assert_eq!(s.download_url.as_deref(), Some("https://x"));
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}

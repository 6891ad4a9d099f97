//! The JS shapes of SPEC §2-§3 (camelCase), parsed from the JSON the JS wrapper sends, and
//! turned into the core's types. Unknown fields are `INVALID_CONFIG` (a typo must not be ignored);
//! SPEC fields the core does not implement yet are `NOT_SUPPORTED` when set to anything but their
//! default, never silently dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use smolmachines::{
    ConnectOptions, Error, ExecOptions, MachineConfig, MountSpec, PortSpec, ResourceSpec, Target,
};

type Result<T> = std::result::Result<T, Error>;

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidConfig {
        message: message.into(),
    }
}

fn unsupported(field: &str) -> Error {
    Error::NotSupported {
        message: format!(
            "{field} is not supported by the local engine yet; leave it unset (it is not ignored \
             silently)"
        ),
    }
}

/// Parses `json` as `T`; a shape error is `INVALID_CONFIG` naming `what`.
pub fn parse<T: for<'de> Deserialize<'de>>(what: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| invalid(format!("{what}: {e}")))
}

/// `ConnectOptions` (SPEC §2.1, TS fields).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsConnect {
    target: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    /// Handled by the JS wrapper (SIGINT/SIGTERM cleanup).
    #[allow(dead_code)]
    handle_signals: Option<bool>,
    egress_interceptor: Option<serde_json::Value>,
}

impl JsConnect {
    /// The core's options; the backend is resolved by the core (`backend_for`).
    pub fn into_core(self) -> Result<ConnectOptions> {
        let target = match self.target.as_deref() {
            None => None,
            Some("local") => Some(Target::Local),
            Some("cloud") => Some(Target::Cloud),
            Some(other) => {
                return Err(invalid(format!(
                    "target must be \"local\" or \"cloud\", got {other:?}"
                )))
            }
        };
        let conn = ConnectOptions {
            target,
            base_url: self.base_url,
            api_key: self.api_key,
        };
        if self.egress_interceptor.is_some_and(|v| !v.is_null()) {
            if conn.resolve_target() == Target::Cloud {
                return Err(Error::NotSupported {
                    message: "egressInterceptor is local-only".into(),
                });
            }
            return Err(unsupported("ConnectOptions.egressInterceptor"));
        }
        Ok(conn)
    }
}

/// `ResourceSpec` (SPEC §3.1).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsResources {
    cpus: Option<u32>,
    memory_mb: Option<u32>,
    network: Option<bool>,
    storage_gb: Option<u32>,
    allow_cidrs: Option<Vec<String>>,
    allow_hosts: Option<Vec<String>>,
    overlay_gb: Option<u32>,
    gpu: Option<bool>,
    gpu_vram_mib: Option<u32>,
    cuda: Option<bool>,
    network_backend: Option<String>,
    disk_durability: Option<String>,
}

/// `MountSpec` (SPEC §3.2).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsMount {
    source: String,
    target: String,
    read_only: Option<bool>,
    /// Deprecated alias; wins when set.
    readonly: Option<bool>,
    staged: Option<bool>,
}

/// `PortSpec` (SPEC §3.3).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsPort {
    host: u16,
    guest: u16,
}

/// `MachineConfig` (SPEC §3.4, TS fields, plus the Python-only ones (`command`, `cacheDisk`) so
/// that they are refused rather than reported as typos).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsConfig {
    name: Option<String>,
    image: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    mounts: Option<Vec<JsMount>>,
    ports: Option<Vec<JsPort>>,
    resources: Option<JsResources>,
    network: Option<bool>,
    persistent: Option<bool>,
    detach: Option<bool>,
    /// Cloud only; ignored by the local target (SPEC §11).
    auto_stop_seconds: Option<f64>,
    /// Cloud only; ignored by the local target (SPEC §11).
    ttl_seconds: Option<f64>,
    branchable: Option<bool>,
    forkable: Option<bool>,
    checkpoint: Option<bool>,
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    user: Option<String>,
    command: Option<Vec<String>>,
    egress_interceptor: Option<serde_json::Value>,
    credentials: Option<Vec<serde_json::Value>>,
    cache_disk: Option<serde_json::Value>,
    /// Create's readiness deadline in seconds (SPEC: fixed 120 s in Node; accepted here).
    ready_timeout_seconds: Option<f64>,
}

fn set<T>(v: &Option<T>) -> bool {
    v.is_some()
}

fn non_empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_empty())
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    if s.is_nan() || s <= 0.0 {
        return Err(invalid(format!("{what} must be > 0, got {s}")));
    }
    Duration::try_from_secs_f64(s).map_err(|e| invalid(format!("{what}: {e}")))
}

impl JsConfig {
    /// The core's config, or the first field that cannot be honoured.
    pub fn into_core(self) -> Result<MachineConfig> {
        if set(&self.command) {
            // SPEC §3.4: `command` is a Python-only field; the TS workload is the image's
            // Entrypoint + Cmd. Refused (not read as a typo, not ignored).
            return Err(Error::NotSupported {
                message: "MachineConfig.command is not part of the TypeScript API (SPEC §3.4); \
                          the workload launched at create is the image's Entrypoint + Cmd (use \
                          exec() for other commands)"
                    .into(),
            });
        }
        let unsupported_fields: &[(&str, bool)] = &[
            (
                "MachineConfig.egressInterceptor",
                self.egress_interceptor
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            ("MachineConfig.credentials", non_empty(&self.credentials)),
            (
                "MachineConfig.cacheDisk",
                self.cache_disk.as_ref().is_some_and(|v| !v.is_null()),
            ),
            ("MachineConfig.branchable", self.branchable == Some(true)),
            ("MachineConfig.forkable", self.forkable == Some(true)),
            ("MachineConfig.checkpoint", self.checkpoint == Some(true)),
            (
                "MountSpec.staged",
                self.mounts.iter().flatten().any(|m| m.staged == Some(true)),
            ),
        ];
        if let Some((field, _)) = unsupported_fields.iter().find(|(_, on)| *on) {
            return Err(unsupported(field));
        }
        let r = self.resources.unwrap_or_default();
        let unsupported_resources: &[(&str, bool)] = &[
            ("ResourceSpec.allowCidrs", non_empty(&r.allow_cidrs)),
            ("ResourceSpec.allowHosts", non_empty(&r.allow_hosts)),
            ("ResourceSpec.overlayGb", set(&r.overlay_gb)),
            ("ResourceSpec.gpu", r.gpu == Some(true)),
            ("ResourceSpec.gpuVramMib", set(&r.gpu_vram_mib)),
            ("ResourceSpec.cuda", r.cuda == Some(true)),
            ("ResourceSpec.networkBackend", set(&r.network_backend)),
            (
                "ResourceSpec.diskDurability",
                r.disk_durability.as_deref().is_some_and(|d| d != "full"),
            ),
        ];
        if let Some((field, _)) = unsupported_resources.iter().find(|(_, on)| *on) {
            return Err(unsupported(field));
        }
        for (what, v) in [
            ("autoStopSeconds", self.auto_stop_seconds),
            ("ttlSeconds", self.ttl_seconds),
        ] {
            if let Some(s) = v {
                seconds(what, s)?;
            }
        }
        let ready_timeout = self
            .ready_timeout_seconds
            .map(|s| seconds("readyTimeoutSeconds", s))
            .transpose()?;
        Ok(MachineConfig {
            name: self.name,
            image: self.image,
            mounts: self
                .mounts
                .unwrap_or_default()
                .into_iter()
                .map(|m| MountSpec {
                    source: m.source,
                    target: m.target,
                    read_only: m.readonly.or(m.read_only).unwrap_or(false),
                })
                .collect(),
            ports: self
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| PortSpec {
                    host: p.host,
                    guest: p.guest,
                })
                .collect(),
            resources: ResourceSpec {
                cpus: r.cpus,
                memory_mb: r.memory_mb,
                network: r.network,
                storage_gb: r.storage_gb,
            },
            network: self.network,
            persistent: self.persistent.unwrap_or(false),
            detach: self.detach.unwrap_or(false),
            labels: self.labels.unwrap_or_default(),
            ready_timeout,
            // The image workload's environment and working directory (SPEC §3.4); the core
            // checks them (absolute workdir, env names, a workload to apply to).
            env: self.env.unwrap_or_default(),
            workdir: self.workdir,
            command: None,
            user: self.user,
        })
    }
}

/// `ExecOptions` (SPEC §3.6, TS fields). `stdin` (bytes) and `signal` travel beside it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsExecOptions {
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    timeout: Option<f64>,
    user: Option<String>,
    /// Cloud only: ignored locally (SPEC §3.6).
    output: Option<String>,
}

impl JsExecOptions {
    /// The core's options, with `stdin`.
    pub fn into_core(self, stdin: Option<Vec<u8>>) -> Result<ExecOptions> {
        if let Some(o) = self.output.as_deref() {
            if !matches!(o, "text" | "b64" | "both") {
                return Err(invalid(format!(
                    "output must be \"text\", \"b64\" or \"both\", got {o:?}"
                )));
            }
        }
        Ok(ExecOptions {
            env: self.env.unwrap_or_default(),
            workdir: self.workdir,
            timeout: self.timeout.map(|t| seconds("timeout", t)).transpose()?,
            user: self.user,
            stdin,
            background: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<MachineConfig> {
        parse::<JsConfig>("config", json)?.into_core()
    }

    #[test]
    fn config_fields_map_and_unknown_ones_are_refused() {
        let c = config(
            r#"{"name":"a","resources":{"cpus":2,"memoryMb":1024,"storageGb":3},
                "mounts":[{"source":"/s","target":"/t","readonly":true,"readOnly":false}],
                "ports":[{"host":8080,"guest":80}],"labels":{"k":"v"},"persistent":true,
                "forkable":false,"autoStopSeconds":5,"readyTimeoutSeconds":1.5}"#,
        )
        .unwrap();
        assert_eq!(c.resources.cpus, Some(2));
        assert_eq!(c.resources.memory_mb, Some(1024));
        assert!(c.mounts[0].read_only, "the readonly alias wins");
        assert_eq!(c.ports[0].guest, 80);
        assert_eq!(c.ready_timeout, Some(Duration::from_millis(1500)));
        assert!(c.persistent && !c.detach);
        let e = config(r#"{"memoryMB":1}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
        assert!(e.to_string().contains("memoryMB"), "{e}");
        let e = config(r#"{"ports":[{"host":70000,"guest":1}]}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
        let e = config(r#"{"resources":{"cpus":-1}}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
        let e = config(r#"{"ttlSeconds":0}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
    }

    #[test]
    fn fields_the_core_lacks_are_not_supported() {
        for json in [
            r#"{"command":["x"]}"#,
            r#"{"credentials":[{"name":"x"}]}"#,
            r#"{"branchable":true}"#,
            r#"{"resources":{"gpu":true}}"#,
            r#"{"resources":{"allowHosts":["a.example"]}}"#,
            r#"{"mounts":[{"source":"/s","target":"/t","staged":true}]}"#,
            r#"{"egressInterceptor":{"address":"127.0.0.1:1","token":"x"}}"#,
        ] {
            let e = config(json).unwrap_err();
            assert_eq!(e.code(), "NOT_SUPPORTED", "{json}: {e}");
        }
        assert!(config(r#"{"env":{},"credentials":[],"branchable":false}"#).is_ok());
    }

    #[test]
    fn the_workload_env_and_workdir_reach_the_core() {
        let c = config(r#"{"image":"x","env":{"A":"b","C":"d"},"workdir":"/srv"}"#).unwrap();
        assert_eq!(c.env.get("A").map(String::as_str), Some("b"));
        assert_eq!(c.env.len(), 2);
        assert_eq!(c.workdir.as_deref(), Some("/srv"));
        assert_eq!(c.command, None);
        let c = config(r#"{"image":"x"}"#).unwrap();
        assert!(c.env.is_empty() && c.workdir.is_none() && c.user.is_none());
        let c = config(r#"{"image":"x","user":"nobody"}"#).unwrap();
        assert_eq!(c.user.as_deref(), Some("nobody"));
        // `command` is Python only (SPEC §3.4)
        let e = config(r#"{"image":"x","command":["sh"]}"#).unwrap_err();
        assert_eq!(e.code(), "NOT_SUPPORTED");
        assert!(e.to_string().contains("command"), "{e}");
        // shapes are still checked
        let e = config(r#"{"env":{"A":1}}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
        let e = config(r#"{"workdir":7}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
    }

    #[test]
    fn connect_and_exec_options() {
        let c = parse::<JsConnect>("conn", r#"{"target":"cloud","apiKey":"smk_x"}"#)
            .unwrap()
            .into_core()
            .unwrap();
        assert_eq!(c.resolve_target(), Target::Cloud);
        let e = parse::<JsConnect>("conn", r#"{"target":"moon"}"#)
            .unwrap()
            .into_core()
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
        let o = parse::<JsExecOptions>("opts", r#"{"timeout":0.0015,"env":{"A":"1"}}"#)
            .unwrap()
            .into_core(None)
            .unwrap();
        assert_eq!(o.timeout, Some(Duration::from_micros(1500)));
        for bad in [r#"{"timeout":-1}"#, r#"{"timeout":0}"#, r#"{"output":"x"}"#] {
            let e = parse::<JsExecOptions>("opts", bad)
                .and_then(|o| o.into_core(None))
                .unwrap_err();
            assert_eq!(e.code(), "INVALID_CONFIG", "{bad}");
        }
        assert!(parse::<JsExecOptions>("opts", r#"{"cwd":"/"}"#).is_err());
    }
}

//! The JS shapes of SPEC §2-§3 (camelCase), parsed from the JSON the JS wrapper sends, and
//! turned into the core's types. This module only converts shapes: unknown fields are
//! `INVALID_CONFIG` (a typo must not be ignored), values are checked by the core
//! (`MachineConfig::validate`), and a field the target cannot honour is refused by its backend
//! (`NOT_SUPPORTED` naming the field and the target), never here.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use smolmachines::{
    BranchBatchOptions, BranchOptions, CacheDiskRef, CheckpointOptions, ConnectOptions,
    CredentialSpec, DiskDurability, EgressInterceptor, Error, ExecOptions, ExecOutput,
    MachineConfig, MountSpec, NetworkBackend, PortSpec, ResourceSpec, RestoreOptions, Target,
};

type Result<T> = std::result::Result<T, Error>;

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidConfig {
        message: message.into(),
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
        let conn = ConnectOptions {
            target: Target::parse_opt(self.target.as_deref())?,
            base_url: self.base_url,
            api_key: self.api_key,
        };
        if self.egress_interceptor.is_some_and(|v| !v.is_null()) {
            // (ConnectOptions has no interceptor in the core yet)
            return Err(Error::NotSupported {
                message: format!(
                    "ConnectOptions.egressInterceptor is not supported on the {} target",
                    conn.resolve_target()
                ),
            });
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
    network_backend: Option<NetworkBackend>,
    disk_durability: Option<DiskDurability>,
}

/// `MountSpec` (SPEC §3.2).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsMount {
    source: String,
    target: String,
    read_only: Option<bool>,
    /// Deprecated alias; wins when set (`readOnly ?? readonly`, SPEC §3.2).
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

/// `CredentialSpec` (SPEC §3.5, the shape that reaches the cloud).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsCredential {
    name: String,
    env_var: String,
    hosts: Vec<String>,
    value: Option<String>,
    methods: Option<Vec<String>>,
}

/// `CacheDiskRef` (SPEC §7.3).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsCacheDisk {
    cache: String,
    version: Option<u64>,
    mount_path: Option<String>,
    slot: Option<bool>,
}

/// `MachineConfig` (SPEC §3.4, TS fields, plus the Python-only ones (`command`, `cacheDisk`,
/// `credentials`, `waitForPorts`) in camelCase).
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
    auto_stop_seconds: Option<u64>,
    /// Cloud only; ignored by the local target (SPEC §11).
    ttl_seconds: Option<u64>,
    branchable: Option<bool>,
    forkable: Option<bool>,
    checkpoint: Option<bool>,
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    user: Option<String>,
    command: Option<Vec<String>>,
    egress_interceptor: Option<EgressInterceptor>,
    credentials: Option<Vec<JsCredential>>,
    cache_disk: Option<JsCacheDisk>,
    wait_for_ports: Option<bool>,
    /// Create's readiness deadline in seconds (SPEC: fixed 120 s in Node; accepted here).
    ready_timeout_seconds: Option<f64>,
}

/// Seconds from JS as a deadline: the core's one conversion (a huge value is the longest wait,
/// `MAX_WAIT`; NaN, infinite or <= 0 is `InvalidConfig`).
fn seconds(what: &str, s: f64) -> Result<Duration> {
    smolmachines::config::seconds(what, s)
}

impl JsConfig {
    /// The core's config (shapes only: the core validates it and the backend refuses what it
    /// cannot honour).
    pub fn into_core(self) -> Result<MachineConfig> {
        let r = self.resources.unwrap_or_default();
        let ready_timeout = self
            .ready_timeout_seconds
            .map(|s| seconds("readyTimeoutSeconds", s))
            .transpose()?;
        // SPEC §3.4: `branchable ?? forkable ?? checkpoint`, one field in the core.
        let branchable = self
            .branchable
            .or(self.forkable)
            .or(self.checkpoint.filter(|c| *c));
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
                    staged: m.staged.unwrap_or(false),
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
                allow_cidrs: r.allow_cidrs.unwrap_or_default(),
                allow_hosts: r.allow_hosts.unwrap_or_default(),
                storage_gb: r.storage_gb,
                overlay_gb: r.overlay_gb,
                gpu: r.gpu,
                gpu_vram_mib: r.gpu_vram_mib,
                disk_durability: r.disk_durability,
                cuda: r.cuda,
                network_backend: r.network_backend,
            },
            network: self.network,
            persistent: self.persistent.unwrap_or(false),
            detach: self.detach.unwrap_or(false),
            labels: self.labels.unwrap_or_default(),
            ready_timeout,
            wait_for_ports: self.wait_for_ports,
            auto_stop_seconds: self.auto_stop_seconds,
            ttl_seconds: self.ttl_seconds,
            branchable,
            forkable: None,
            env: self.env.unwrap_or_default(),
            workdir: self.workdir,
            user: self.user,
            command: self.command,
            egress_interceptor: self.egress_interceptor,
            credentials: self
                .credentials
                .unwrap_or_default()
                .into_iter()
                .map(|c| CredentialSpec {
                    name: c.name,
                    env_var: c.env_var,
                    hosts: c.hosts,
                    value: c.value,
                    methods: c.methods,
                })
                .collect(),
            cache_disk: self.cache_disk.map(|c| CacheDiskRef {
                cache: c.cache,
                version: c.version,
                mount_path: c.mount_path,
                slot: c.slot.unwrap_or(false),
            }),
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
    output: Option<ExecOutput>,
}

impl JsExecOptions {
    /// The core's options, with `stdin`.
    pub fn into_core(self, stdin: Option<Vec<u8>>) -> Result<ExecOptions> {
        Ok(ExecOptions {
            env: self.env.unwrap_or_default(),
            workdir: self.workdir,
            timeout: self.timeout.map(|t| seconds("timeout", t)).transpose()?,
            user: self.user,
            stdin,
            background: false,
            output: self.output,
        })
    }
}

fn port_specs(ports: Option<Vec<JsPort>>) -> Vec<PortSpec> {
    ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| PortSpec {
            host: p.host,
            guest: p.guest,
        })
        .collect()
}

/// `branch(name, options)` (SPEC §4.8; the JS wrapper turns a `PortSpec[]` into `{ports}`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsBranchOptions {
    ports: Option<Vec<JsPort>>,
    branchable: Option<bool>,
    checkpointable: Option<bool>,
    freeze_source: Option<bool>,
}

/// `checkpointable: true`: the engine has no checkpoint of a clone yet, so it is refused by
/// name rather than ignored.
fn refuse_checkpointable(checkpointable: Option<bool>) -> Result<()> {
    if checkpointable == Some(true) {
        return Err(Error::NotSupported {
            message: "branch({checkpointable: true}) is not supported yet: a clone cannot be \
                      checkpointed"
                .into(),
        });
    }
    Ok(())
}

impl JsBranchOptions {
    /// The core's options.
    pub fn into_core(self) -> Result<BranchOptions> {
        refuse_checkpointable(self.checkpointable)?;
        Ok(BranchOptions {
            ports: port_specs(self.ports),
            branchable: self.branchable.unwrap_or(false),
            freeze_source: self.freeze_source.unwrap_or(false),
        })
    }
}

/// `branchBatch({count, names, namePrefix, ports, branchable, freezeSource})` (SPEC §4.8).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsBranchBatchOptions {
    count: Option<usize>,
    names: Option<Vec<String>>,
    name_prefix: Option<String>,
    ports: Option<Vec<JsPort>>,
    branchable: Option<bool>,
    checkpointable: Option<bool>,
    freeze_source: Option<bool>,
}

impl JsBranchBatchOptions {
    /// The core's options (the core checks count, names and prefix).
    pub fn into_core(self) -> Result<BranchBatchOptions> {
        refuse_checkpointable(self.checkpointable)?;
        Ok(BranchBatchOptions {
            count: self.count,
            names: self.names.unwrap_or_default(),
            name_prefix: self.name_prefix,
            ports: port_specs(self.ports),
            branchable: self.branchable.unwrap_or(false),
            freeze_source: self.freeze_source.unwrap_or(false),
        })
    }
}

/// `checkpoint(output?, {store}?)` (SPEC §4.8); the JS wrapper folds `output` in.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsCheckpointOptions {
    output: Option<String>,
    store: Option<String>,
}

impl JsCheckpointOptions {
    /// The core's options (the core checks output and store per target).
    pub fn into_core(self) -> CheckpointOptions {
        CheckpointOptions {
            output: self.output.map(Into::into),
            store: self.store.map(Into::into),
        }
    }
}

/// `networkPolicy` of `restoreCheckpoint`: `"allow-all"`, `"deny-all"` or `{allowHosts,
/// allowCidrs}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
// The allow-list is parsed (so its shape is checked) but a restore cannot honour it.
#[allow(dead_code)]
enum JsNetworkPolicy {
    Mode(String),
    Allow(JsAllowList),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JsAllowList {
    #[allow(dead_code)]
    allow_hosts: Option<Vec<String>>,
    #[allow(dead_code)]
    allow_cidrs: Option<Vec<String>>,
}

/// `Machine.restoreCheckpoint(id, name, conn?, {ports, keepIdentity, networkPolicy})` (SPEC §4.8).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsRestoreOptions {
    ports: Option<Vec<JsPort>>,
    keep_identity: Option<bool>,
    network_policy: Option<JsNetworkPolicy>,
}

impl JsRestoreOptions {
    /// The core's options; an allow-list policy is `NOT_SUPPORTED` (a restore's egress is open
    /// or blocked).
    pub fn into_core(self) -> Result<RestoreOptions> {
        let network = match self.network_policy {
            None => None,
            Some(JsNetworkPolicy::Mode(m)) => match m.as_str() {
                "allow-all" => Some(true),
                "deny-all" => Some(false),
                other => {
                    return Err(invalid(format!(
                        "networkPolicy must be \"allow-all\", \"deny-all\" or {{allowHosts, \
                         allowCidrs}}, got {other:?}"
                    )))
                }
            },
            Some(JsNetworkPolicy::Allow(_)) => {
                return Err(Error::NotSupported {
                    message: "restoreCheckpoint({networkPolicy: {allowHosts, allowCidrs}}) is not \
                              supported: a restored machine's egress is \"allow-all\" or \
                              \"deny-all\""
                        .into(),
                })
            }
        };
        Ok(RestoreOptions {
            ports: port_specs(self.ports),
            keep_identity: self.keep_identity.unwrap_or(false),
            network,
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
        // a value out of range is the core's to refuse, with the core's limits
        let e = config(r#"{"resources":{"cpus":1000}}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("resources.cpus"), "{e}");
    }

    #[test]
    fn every_spec_field_reaches_the_core_and_the_local_backend_refuses_what_it_lacks() {
        use smolmachines::Capabilities;
        let c = config(
            r#"{"image":"x","branchable":true,"autoStopSeconds":60,"ttlSeconds":600,
                "waitForPorts":false,"command":["sh"],
                "credentials":[{"name":"gh","envVar":"T","hosts":["api.github.com"],"value":"v"}],
                "cacheDisk":{"cache":"deps","mountPath":"/cache"},
                "resources":{"allowHosts":["pypi.org"],"allowCidrs":["10.0.0.0/8"],
                             "diskDurability":"deferred","networkBackend":"virtio-net",
                             "gpu":true,"overlayGb":3},
                "mounts":[{"source":"/s","target":"/t","staged":true}]}"#,
        )
        .unwrap();
        assert!(c.is_branchable());
        assert_eq!((c.auto_stop_seconds, c.ttl_seconds), (Some(60), Some(600)));
        assert_eq!(c.command, Some(vec!["sh".to_string()]));
        assert_eq!(c.credentials[0].env_var, "T");
        assert_eq!(
            c.cache_disk.as_ref().unwrap().mount_path.as_deref(),
            Some("/cache")
        );
        assert_eq!(c.resources.allow_hosts, vec!["pypi.org".to_string()]);
        assert_eq!(c.resources.disk_durability, Some(DiskDurability::Deferred));
        assert!(c.mounts[0].staged);
        c.validate().unwrap();
        // the conversion refuses nothing; the local backend does, naming field and target
        let e = c.refuse_unsupported(&Capabilities::LOCAL).unwrap_err();
        assert_eq!(e.code(), "NOT_SUPPORTED");
        assert!(e.to_string().contains("local target"), "{e}");
        for json in [
            r#"{"credentials":[{"name":"x","envVar":"T","hosts":["h"]}]}"#,
            r#"{"resources":{"gpu":true}}"#,
            r#"{"mounts":[{"source":"/s","target":"/t","staged":true}]}"#,
            r#"{"egressInterceptor":{"address":"127.0.0.1:1","token":"x"}}"#,
        ] {
            let c = config(json).unwrap();
            assert!(
                c.unsupported_on(&Capabilities::LOCAL).is_some(),
                "{json} accepted locally"
            );
        }
        // egress allow-lists are enforced locally (local/egress)
        let c = config(r#"{"resources":{"allowHosts":["a.example"]}}"#).unwrap();
        assert_eq!(c.unsupported_on(&Capabilities::LOCAL), None);
        // branchable machines (and their aliases) run locally
        for json in [
            r#"{"branchable":true}"#,
            r#"{"forkable":true}"#,
            r#"{"checkpoint":true}"#,
        ] {
            let c = config(json).unwrap();
            assert!(c.is_branchable(), "{json}");
            assert_eq!(c.unsupported_on(&Capabilities::LOCAL), None, "{json}");
        }
        // aliases: `branchable ?? forkable ?? checkpoint`
        let c = config(r#"{"branchable":false,"forkable":true}"#).unwrap();
        assert!(!c.is_branchable());
        let c = config(r#"{"checkpoint":false}"#).unwrap();
        assert_eq!(c.unsupported_on(&Capabilities::LOCAL), None);
        // ignored locally (SPEC §11)
        let c = config(r#"{"autoStopSeconds":5,"ttlSeconds":9}"#).unwrap();
        assert_eq!(c.unsupported_on(&Capabilities::LOCAL), None);
        assert_eq!(
            config(r#"{"env":{},"credentials":[],"branchable":false}"#)
                .unwrap()
                .unsupported_on(&Capabilities::LOCAL),
            None
        );
        // enum shapes are checked here (type conversion), values by the core
        for bad in [
            r#"{"resources":{"diskDurability":"sometimes"}}"#,
            r#"{"resources":{"networkBackend":"x"}}"#,
            r#"{"ttlSeconds":1.5}"#,
        ] {
            assert_eq!(config(bad).unwrap_err().code(), "INVALID_CONFIG", "{bad}");
        }
        let e = config(r#"{"ttlSeconds":0}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_CONFIG");
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
        // `command` (Python's in SPEC §3.4) is taken too
        let c = config(r#"{"image":"x","command":["sh"]}"#).unwrap();
        assert_eq!(c.command, Some(vec!["sh".to_string()]));
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
        // a huge timeout is the longest wait, not an error
        let o = parse::<JsExecOptions>("opts", r#"{"timeout":1e300}"#)
            .unwrap()
            .into_core(None)
            .unwrap();
        assert_eq!(o.timeout, Some(smolmachines::MAX_WAIT));
    }

    #[test]
    fn checkpoint_and_restore_options_shapes() {
        let o = parse::<JsCheckpointOptions>("o", r#"{"output":"/tmp/a.smolcheckpoint"}"#)
            .unwrap()
            .into_core();
        assert_eq!(o.output.unwrap().to_str(), Some("/tmp/a.smolcheckpoint"));
        assert!(parse::<JsCheckpointOptions>("o", r#"{"outptu":"x"}"#).is_err());
        assert!(parse::<JsCheckpointOptions>("o", r#"{"output":5}"#).is_err());

        let r = |json: &str| parse::<JsRestoreOptions>("o", json).and_then(|o| o.into_core());
        let o = r(r#"{"ports":[{"host":0,"guest":80}],"keepIdentity":true}"#).unwrap();
        assert_eq!(
            (o.ports[0].guest, o.keep_identity, o.network),
            (80, true, None)
        );
        assert_eq!(
            r(r#"{"networkPolicy":"allow-all"}"#).unwrap().network,
            Some(true)
        );
        assert_eq!(
            r(r#"{"networkPolicy":"deny-all"}"#).unwrap().network,
            Some(false)
        );
        assert!(matches!(
            r(r#"{"networkPolicy":"open"}"#),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            r(r#"{"networkPolicy":{"allowHosts":["a.example"]}}"#),
            Err(Error::NotSupported { .. })
        ));
        for bad in [
            r#"{"keepIdentity":"yes"}"#,
            r#"{"keepidentity":true}"#,
            r#"{"networkPolicy":5}"#,
            r#"{"networkPolicy":{"hosts":[]}}"#,
        ] {
            assert!(matches!(r(bad), Err(Error::InvalidConfig { .. })), "{bad}");
        }
    }

    #[test]
    fn branch_options_shapes() {
        let o = parse::<JsBranchOptions>(
            "o",
            r#"{"ports":[{"host":0,"guest":80}],"branchable":true}"#,
        )
        .unwrap()
        .into_core()
        .unwrap();
        assert_eq!(
            (o.ports[0].guest, o.branchable, o.freeze_source),
            (80, true, false)
        );
        let e = parse::<JsBranchOptions>("o", r#"{"checkpointable":true}"#)
            .unwrap()
            .into_core()
            .unwrap_err();
        assert!(
            matches!(&e, Error::NotSupported { message } if message.contains("checkpointable"))
        );
        assert!(parse::<JsBranchOptions>("o", r#"{"bogus":1}"#).is_err());
        let b = parse::<JsBranchBatchOptions>("o", r#"{"count":3,"namePrefix":"rl"}"#)
            .unwrap()
            .into_core()
            .unwrap();
        assert_eq!(b.clone_names().unwrap(), ["rl-1", "rl-2", "rl-3"]);
        for bad in [r#"{"count":-1}"#, r#"{"count":1.5}"#, r#"{"names":"a"}"#] {
            assert!(parse::<JsBranchBatchOptions>("o", bad).is_err(), "{bad}");
        }
    }
}

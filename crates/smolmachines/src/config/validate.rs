//! The one validation of [`MachineConfig`] and [`ExecOptions`]: values every target must
//! refuse, whoever sends them (Rust callers, the CLI, the bindings, the fleet server). Whether a
//! target can honour a field is [`super::Capabilities`]'s question, not this one.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::limits::{
    MAX_CPUS, MAX_CREDENTIALS, MAX_DISK_GB, MAX_MEMORY_MB, MAX_PORTS, MIN_MEMORY_MB,
};
use super::{validate_name, CredentialSpec, ExecOptions, MachineConfig, MAX_WAIT};
use crate::error::{Error, Result};

fn range(what: &str, v: Option<u32>, lo: u32, hi: u32) -> Result<()> {
    match v {
        Some(v) if !(lo..=hi).contains(&v) => Err(Error::invalid(format!(
            "{what} must be {lo}..={hi}, got {v}"
        ))),
        _ => Ok(()),
    }
}

fn absolute(what: &str, path: &str) -> Result<()> {
    if path.contains('\0') {
        return Err(Error::invalid(format!(
            "{what} {path:?} contains a NUL byte"
        )));
    }
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} must be an absolute guest path, got {path:?}"
        )))
    }
}

fn non_empty_items(what: &str, items: &[String]) -> Result<()> {
    if items.iter().any(|i| i.trim().is_empty()) {
        return Err(Error::invalid(format!(
            "{what} must not contain empty strings"
        )));
    }
    Ok(())
}

fn env_names<'a>(what: &str, names: impl Iterator<Item = &'a String>) -> Result<()> {
    for k in names {
        let why = if k.is_empty() {
            "is empty"
        } else if k.contains('=') {
            "contains '=' (the guest would read it as another name and value)"
        } else if k.contains('\0') {
            "contains a NUL byte"
        } else {
            continue;
        };
        return Err(Error::invalid(format!(
            "{what} name {k:?} {why}: names must be non-empty, without '=' or NUL"
        )));
    }
    Ok(())
}

/// Names and values of an environment: see [`env_names`]; a value cannot hold a NUL byte
/// (execve would cut it there).
fn env(what: &str, env: &BTreeMap<String, String>) -> Result<()> {
    env_names(what, env.keys())?;
    match env.iter().find(|(_, v)| v.contains('\0')) {
        Some((k, _)) => Err(Error::invalid(format!(
            "{what} value of {k:?} contains a NUL byte, which a process environment cannot hold"
        ))),
        None => Ok(()),
    }
}

/// An argv every target can pass to execve: not empty, a non-empty program, no NUL byte in
/// any argument (`InvalidConfig` naming the index).
pub(crate) fn argv(what: &str, argv: &[String]) -> Result<()> {
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::invalid(format!(
            "{what} must be a non-empty argv list"
        )));
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(Error::invalid(format!(
            "{what} argument {i} contains a NUL byte, which a process argument cannot hold"
        )));
    }
    Ok(())
}

/// Guest paths a mount would hide or break the guest on: `/` and the kernel's own file
/// systems (the agent needs them).
const RESERVED_TARGETS: [&str; 3] = ["/proc", "/sys", "/dev"];

fn mount_target(t: &str) -> Result<()> {
    absolute("mount target", t)?;
    let clean = t.trim_end_matches('/');
    let parts: Vec<&str> = clean.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(Error::invalid(format!(
            "mount target {t:?} must not contain '.' or '..' components"
        )));
    }
    let normal = format!("/{}", parts.join("/"));
    if normal == "/" {
        return Err(Error::invalid(
            "mount target \"/\" would hide the guest's root: mount on a directory like /mnt/data",
        ));
    }
    if let Some(r) = RESERVED_TARGETS
        .iter()
        .find(|r| normal == **r || normal.starts_with(&format!("{r}/")))
    {
        return Err(Error::invalid(format!(
            "mount target {t:?} is under {r}, which the guest kernel provides: mount on another \
             directory, like /mnt/data"
        )));
    }
    Ok(())
}

/// A number of seconds from a binding or the CLI as a deadline: NaN, infinite, zero or negative
/// is `InvalidConfig`; a finite value too large for a [`Duration`] (`1e300`) is [`MAX_WAIT`], as
/// every wait is capped.
pub fn seconds(what: &str, s: f64) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        return Err(Error::invalid(format!(
            "{what} must be a finite number of seconds > 0, got {s}"
        )));
    }
    Ok(Duration::try_from_secs_f64(s).map_or(MAX_WAIT, super::cap_wait))
}

fn credential(c: &CredentialSpec) -> Result<()> {
    let name_ok = (1..=64).contains(&c.name.len())
        && c.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !name_ok {
        return Err(Error::invalid(format!(
            "credential name {:?} must be 1-64 characters of [a-z0-9_-]",
            c.name
        )));
    }
    env_names(
        &format!("credential {:?} env_var", c.name),
        std::iter::once(&c.env_var),
    )?;
    if c.hosts.is_empty() {
        return Err(Error::invalid(format!(
            "credential {:?} needs at least one host",
            c.name
        )));
    }
    if let Some(h) = c
        .hosts
        .iter()
        .find(|h| h.is_empty() || h.contains(['*', '/', ' ']))
    {
        return Err(Error::invalid(format!(
            "credential {:?}: hosts are exact host names (no wildcards), got {h:?}",
            c.name
        )));
    }
    if let Some(m) = &c.methods {
        if let Some(bad) = m
            .iter()
            .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(Error::invalid(format!(
                "credential {:?}: methods are HTTP verbs, got {bad:?}",
                c.name
            )));
        }
    }
    Ok(())
}

impl MachineConfig {
    /// Checks every value (SPEC §3): names, sizes within [`super::limits`], ports, mounts,
    /// deadlines, aliases, credentials, the workload. `InvalidConfig` naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        if self.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            return Err(Error::invalid("image reference must not be empty"));
        }
        let r = &self.resources;
        range("resources.cpus", r.cpus, 1, MAX_CPUS)?;
        range(
            "resources.memory_mb",
            r.memory_mb,
            MIN_MEMORY_MB,
            MAX_MEMORY_MB,
        )?;
        range("resources.storage_gb", r.storage_gb, 1, MAX_DISK_GB)?;
        range("resources.overlay_gb", r.overlay_gb, 1, MAX_DISK_GB)?;
        range("resources.gpu_vram_mib", r.gpu_vram_mib, 1, MAX_MEMORY_MB)?;
        non_empty_items("resources.allow_hosts", &r.allow_hosts)?;
        for h in &r.allow_hosts {
            check_host(h)?;
        }
        for c in &r.allow_cidrs {
            check_cidr(c)?;
        }
        if self.ports.len() > MAX_PORTS {
            return Err(Error::invalid(format!(
                "at most {MAX_PORTS} ports can be published, got {}",
                self.ports.len()
            )));
        }
        let mut hosts = HashSet::new();
        for p in &self.ports {
            if p.guest == 0 {
                return Err(Error::invalid("guest ports must be 1..=65535"));
            }
            if p.host != 0 && !hosts.insert(p.host) {
                return Err(Error::invalid(format!(
                    "host port {} published twice",
                    p.host
                )));
            }
        }
        for m in &self.mounts {
            if m.source.is_empty() {
                return Err(Error::invalid("mount source must not be empty"));
            }
            mount_target(&m.target)?;
            if m.staged && m.read_only {
                return Err(Error::invalid(format!(
                    "mount {:?}: a staged mount cannot be read-only",
                    m.target
                )));
            }
        }
        if self.ready_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid("ready_timeout must be > 0"));
        }
        for (what, v) in [
            ("auto_stop_seconds", self.auto_stop_seconds),
            ("ttl_seconds", self.ttl_seconds),
        ] {
            if v == Some(0) {
                return Err(Error::invalid(format!("{what} must be > 0")));
            }
        }
        if self.branchable.is_some() && self.forkable.is_some() {
            return Err(Error::invalid(
                "branchable and forkable are one field (forkable is the deprecated alias): set one",
            ));
        }
        if let Some(i) = &self.egress_interceptor {
            if self.is_branchable() {
                return Err(Error::invalid(
                    "egress_interceptor cannot be combined with branchable",
                ));
            }
            if i.address.parse::<std::net::SocketAddr>().is_err() {
                return Err(Error::invalid(format!(
                    "egress_interceptor.address must be host:port (127.0.0.1:port), got {:?}",
                    i.address
                )));
            }
            if i.token.len() != 64 || !i.token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::invalid(
                    "egress_interceptor.token must be 64 hex digits",
                ));
            }
        }
        if self.credentials.len() > MAX_CREDENTIALS {
            return Err(Error::invalid(format!(
                "at most {MAX_CREDENTIALS} credentials, got {}",
                self.credentials.len()
            )));
        }
        let mut names = HashSet::new();
        for c in &self.credentials {
            credential(c)?;
            if !names.insert(&c.name) {
                return Err(Error::invalid(format!(
                    "credential {:?} given twice",
                    c.name
                )));
            }
        }
        if let Some(c) = &self.cache_disk {
            if c.cache.trim().is_empty() {
                return Err(Error::invalid("cache_disk.cache must not be empty"));
            }
            if let Some(p) = &c.mount_path {
                absolute("cache_disk.mount_path", p)?;
            }
        }
        self.validate_workload()
    }

    fn validate_workload(&self) -> Result<()> {
        if let Some(c) = &self.command {
            if c.iter().any(|a| a.is_empty()) {
                return Err(Error::invalid(
                    "command must be a list of non-empty strings",
                ));
            }
            if let Some(i) = c.iter().position(|a| a.contains('\0')) {
                return Err(Error::invalid(format!(
                    "command argument {i} contains a NUL byte, which a process argument cannot hold"
                )));
            }
        }
        if let Some(w) = &self.workdir {
            absolute("workdir", w)?;
        }
        if self.user.as_deref() == Some("") {
            return Err(Error::invalid("user must not be empty"));
        }
        if self.user.is_some() && self.image.is_none() {
            return Err(Error::invalid(
                "a workload user needs a machine created from an image",
            ));
        }
        env("env", &self.env)
    }
}

/// A host name of `allow_hosts`: `pypi.org` (and its subdomains), `*.pypi.org` the same.
fn check_host(h: &str) -> Result<()> {
    let name = h.trim().trim_end_matches('.');
    let name = name.strip_prefix("*.").unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "resources.allow_hosts: {h:?} is not a host name (like pypi.org or *.pypi.org)"
        )))
    }
}

/// `a.b.c.d/n` or an IPv6 `addr/n` (a bare address is a /32 or /128).
fn check_cidr(c: &str) -> Result<()> {
    let bad = || {
        Error::invalid(format!(
            "resources.allow_cidrs: {c:?} is not a CIDR (like 10.0.0.0/8)"
        ))
    };
    let (addr, bits) = match c.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u8>().map_err(|_| bad())?)),
        None => (c, None),
    };
    let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if bits.is_some_and(|b| b > max) {
        return Err(bad());
    }
    Ok(())
}

impl ExecOptions {
    /// Checks every value (SPEC §3.6): timeout > 0, absolute workdir, env names, a background
    /// command without stdin or timeout, a non-empty user.
    pub fn validate(&self) -> Result<()> {
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid("timeout must be > 0"));
        }
        if let Some(w) = &self.workdir {
            absolute("workdir", w)?;
        }
        env("env", &self.env)?;
        if self.background && (self.stdin.is_some() || self.timeout.is_some()) {
            return Err(Error::invalid(
                "a background command takes no stdin and no timeout",
            ));
        }
        // (whether the machine can take a user at all is the backend's to say)
        match self.user.as_deref() {
            Some("") => Err(Error::invalid("user must not be empty")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MountSpec;

    fn message(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidConfig { message }) => message,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    fn exec_env(k: &str, v: &str) -> ExecOptions {
        ExecOptions {
            env: [(k.to_string(), v.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn env_names_and_values_are_refused_by_name() {
        let m = message(exec_env("A=B", "c").validate());
        assert!(m.contains("\"A=B\"") && m.contains("'='"), "{m}");
        let m = message(exec_env("", "c").validate());
        assert!(m.contains("name \"\" is empty"), "{m}");
        let m = message(exec_env("A\0B", "c").validate());
        assert!(m.contains("NUL"), "{m}");
        let m = message(exec_env("GOOD", "x\0y").validate());
        assert!(m.contains("\"GOOD\"") && m.contains("NUL"), "{m}");
        assert!(exec_env("GOOD", "b=c").validate().is_ok());
        let cfg = MachineConfig {
            env: [("X=Y".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        assert!(message(cfg.validate()).contains("\"X=Y\""));
        let cfg = MachineConfig {
            env: [("X".to_string(), "a\0".to_string())].into(),
            ..Default::default()
        };
        assert!(message(cfg.validate()).contains("NUL"));
    }

    #[test]
    fn argv_with_a_nul_names_the_argument() {
        let a = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(argv("command", &a(&["echo", "hi"])).is_ok());
        let m = message(argv("command", &a(&["echo", "a", "b\0c"])));
        assert!(m.contains("argument 2") && m.contains("NUL"), "{m}");
        assert!(message(argv("command", &a(&[]))).contains("non-empty"));
        assert!(message(argv("command", &a(&[""]))).contains("non-empty"));
        let cfg = MachineConfig {
            command: Some(a(&["sh", "x\0"])),
            ..Default::default()
        };
        assert!(message(cfg.validate()).contains("argument 1"));
        let o = ExecOptions {
            workdir: Some("/tmp\0x".into()),
            ..Default::default()
        };
        assert!(message(o.validate()).contains("NUL"));
    }

    #[test]
    fn mount_targets_of_the_kernel_and_root_are_refused() {
        let cfg = |t: &str| MachineConfig {
            mounts: vec![MountSpec {
                source: "/srv".into(),
                target: t.into(),
                read_only: false,
                staged: false,
            }],
            ..Default::default()
        };
        for bad in [
            "/",
            "//",
            "/proc",
            "/proc/",
            "/sys",
            "/sys/fs/x",
            "/dev",
            "/dev/shm",
            "/./dev",
            "/mnt/../proc",
            "relative",
        ] {
            message(cfg(bad).validate());
        }
        assert!(message(cfg("/proc/1").validate()).contains("under /proc"));
        for ok in ["/mnt/data", "/devices", "/process", "/system", "/work"] {
            assert!(cfg(ok).validate().is_ok(), "{ok}");
        }
    }

    #[test]
    fn seconds_caps_huge_values_and_refuses_the_rest() {
        assert_eq!(seconds("t", 1.5).unwrap(), Duration::from_millis(1500));
        assert_eq!(seconds("t", 1e300).unwrap(), MAX_WAIT);
        assert_eq!(seconds("t", 1e10).unwrap(), MAX_WAIT);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            match seconds("timeout", bad) {
                Err(Error::InvalidConfig { message }) => {
                    assert!(message.starts_with("timeout must be"), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}

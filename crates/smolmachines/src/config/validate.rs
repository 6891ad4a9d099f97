//! The one validation of [`MachineConfig`] and [`ExecOptions`]: values every target must
//! refuse, whoever sends them (Rust callers, the CLI, the bindings, the fleet server). Whether a
//! target can honour a field is [`super::Capabilities`]'s question, not this one.

use std::collections::HashSet;

use super::limits::{
    MAX_CPUS, MAX_CREDENTIALS, MAX_DISK_GB, MAX_MEMORY_MB, MAX_PORTS, MIN_MEMORY_MB,
};
use super::{validate_name, CredentialSpec, ExecOptions, MachineConfig};
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

fn env_names<'a>(what: &str, mut names: impl Iterator<Item = &'a String>) -> Result<()> {
    if names.any(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(Error::invalid(format!(
            "{what} names must be non-empty and contain no '='"
        )));
    }
    Ok(())
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
            absolute("mount target", &m.target)?;
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
        env_names("env", self.env.keys())
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
        env_names("env", self.env.keys())?;
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

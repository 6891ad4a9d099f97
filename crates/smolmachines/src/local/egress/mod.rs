//! The egress policy of a networked machine, enforced outside the guest (docs/NETWORK.md).
//!
//! A relay ([`relay`]) sits between QEMU's `-netdev stream` and passt's socket (both speak
//! Ethernet frames behind a 4-byte big-endian length). Every frame from the guest goes through
//! [`Filter::outbound`] before passt sees it; every frame passt sends the guest goes through
//! [`Filter::inbound`], which learns the addresses of allowed names from DNS answers. Nothing in
//! the guest takes part, so the guest's root cannot lift the policy.
//!
//! The parsers (`packet`, `dns`) read hostile bytes: bounds-checked slices, no panics (fuzzed:
//! fuzz/fuzz_targets/egress_frame.rs).

mod dns;
pub mod node;
mod packet;
pub(crate) mod relay;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use packet::{Ip, Transport};

/// Addresses learned from DNS answers at most (the soonest to expire goes first when full).
pub const MAX_LEARNED: usize = 4096;
/// Connections remembered at most (a connection opened while its address was allowed keeps
/// working after the address's TTL has passed, while it is active).
pub const MAX_FLOWS: usize = 16384;
/// A remembered connection idle this long is forgotten.
pub const FLOW_IDLE: Duration = Duration::from_secs(300);
/// A learned address is allowed at least this long (a TTL of 0 would deny the connection that
/// follows the lookup) and at most a day.
pub const MIN_TTL: Duration = Duration::from_secs(2);
const MAX_TTL: Duration = Duration::from_secs(86400);

/// Always denied, whatever the policy: the host's loopback and "this host" (0.0.0.0 reaches
/// the loopback), link-local (cloud metadata at 169.254.169.254), multicast and broadcast.
const ALWAYS_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
];

/// An address block (`10.0.0.0/8`, `fd00::/8`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `addr/bits` or a bare address; `None` when it is neither.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, bits) = match s.trim().split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { addr, bits })
    }

    /// Whether `ip` lies in the block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// What a machine may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `open`: everything but the denied blocks.
    pub open: bool,
    /// Allowed blocks (allow-list mode).
    pub cidrs: Vec<Cidr>,
    /// Allowed names and their subdomains (lower case, no trailing dot).
    pub hosts: Vec<String>,
    /// Denied in every mode: [`ALWAYS_DENIED`] plus the engine's list (`SMOL_EGRESS_DENY`).
    pub denied: Vec<Cidr>,
    /// The guest's DNS forwarder (passt's `--dns-forward` address).
    pub dns: Ipv4Addr,
}

/// `SMOL_EGRESS_DENY`: more blocks denied in every mode, comma- or space-separated (the fleet
/// passes its node's private networks). A word that is not a block is logged and skipped.
pub const DENY_ENV: &str = "SMOL_EGRESS_DENY";

impl Policy {
    /// The policy of a machine: `open` without allow-lists, else the lists; `extra_denied`
    /// adds to the always-denied blocks.
    pub fn new(cidrs: &[String], hosts: &[String], extra_denied: &[String]) -> Policy {
        let parse_all = |list: &[String], what: &str| -> Vec<Cidr> {
            list.iter()
                .filter_map(|c| {
                    let p = Cidr::parse(c);
                    if p.is_none() {
                        tracing::warn!(block = %c, "{what}: not an address block, skipped");
                    }
                    p
                })
                .collect()
        };
        let mut denied: Vec<Cidr> = ALWAYS_DENIED
            .iter()
            .filter_map(|c| Cidr::parse(c))
            .collect();
        denied.extend(parse_all(extra_denied, DENY_ENV));
        Policy {
            open: cidrs.is_empty() && hosts.is_empty(),
            cidrs: parse_all(cidrs, "allow_cidrs"),
            hosts: hosts.iter().map(|h| normalize(h)).collect(),
            denied,
            dns: super::net::DNS.parse().expect("DNS is an IPv4 address"),
        }
    }

    /// The engine's extra denied blocks, from [`DENY_ENV`] and [`node::deny_also`] (the
    /// fleet's node networks).
    pub fn denied_from_env() -> Vec<String> {
        let mut blocks: Vec<String> = std::env::var(DENY_ENV)
            .unwrap_or_default()
            .split([',', ' '])
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        blocks.extend(node::also_denied());
        blocks
    }

    /// Denied whatever the policy.
    pub fn always_denied(&self, ip: IpAddr) -> bool {
        self.denied.iter().any(|c| c.contains(ip))
    }

    /// Whether a DNS question for `name` may go to the resolver.
    pub fn name_allowed(&self, name: &str) -> bool {
        if self.open {
            return true;
        }
        let name = normalize(name);
        self.hosts.iter().any(|h| {
            name == *h
                || (name.len() > h.len()
                    && name.ends_with(h.as_str())
                    && name.as_bytes()[name.len() - h.len() - 1] == b'.')
        })
    }
}

fn normalize(h: &str) -> String {
    let h = h.trim().trim_end_matches('.');
    h.strip_prefix("*.").unwrap_or(h).to_ascii_lowercase()
}

/// What becomes of a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// To passt.
    Forward,
    /// Nowhere (the reason is logged).
    Drop(&'static str),
    /// Not to passt; this frame goes back to the guest instead (a TCP reset, a refused DNS
    /// answer).
    Reply(Vec<u8>, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
}

/// A machine's policy and what it has learned: addresses of allowed names (until their TTL
/// passes) and the connections opened while their address was allowed.
#[derive(Debug)]
pub struct Filter {
    policy: Policy,
    learned: HashMap<IpAddr, Instant>,
    flows: HashMap<FlowKey, Instant>,
}

impl Filter {
    /// The filter of a machine's record: its allow-lists, plus what `SMOL_EGRESS_DENY` denies.
    pub(crate) fn of_record(r: &super::record::Record) -> Filter {
        Filter::new(Policy::new(
            &r.allow_cidrs,
            &r.allow_hosts,
            &Policy::denied_from_env(),
        ))
    }

    /// A filter with nothing learned yet.
    pub fn new(policy: Policy) -> Filter {
        Filter {
            policy,
            learned: HashMap::new(),
            flows: HashMap::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Addresses learned from DNS answers and not expired at `now`.
    pub fn learned(&self, now: Instant) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .learned
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(ip, _)| *ip)
            .collect();
        v.sort();
        v
    }

    fn ip_allowed(&self, ip: IpAddr, now: Instant) -> bool {
        if self.policy.always_denied(ip) {
            return false;
        }
        let ip = unmap(ip);
        self.policy.open
            || self.policy.cidrs.iter().any(|c| c.contains(ip))
            || self.learned.get(&ip).is_some_and(|t| *t > now)
    }

    /// The verdict on a frame from the guest.
    pub fn outbound(&mut self, frame: &[u8], now: Instant) -> Outcome {
        let Some(eth) = packet::Eth::parse(frame) else {
            return Outcome::Drop("short Ethernet frame");
        };
        let ip = match eth.ethertype {
            packet::ETH_ARP => return Outcome::Forward,
            packet::ETH_IPV4 | packet::ETH_IPV6 => {
                match packet::parse_ip(eth.ethertype, eth.payload) {
                    Some(ip) => ip,
                    None => return Outcome::Drop("malformed IP packet"),
                }
            }
            _ => return Outcome::Drop("not ARP or IP"),
        };
        if self.policy.always_denied(ip.dst) {
            return self.deny(
                frame,
                &ip,
                "always denied (loopback, link-local, metadata, or the engine's list)",
            );
        }
        // DNS to the forwarder: checked by question name
        if ip.dst == IpAddr::V4(self.policy.dns) {
            match ip.transport {
                Transport::Udp {
                    dst_port: 53,
                    payload,
                    ..
                } => {
                    return match dns::question(payload) {
                        Some((_, name)) if self.policy.name_allowed(&name) => Outcome::Forward,
                        Some(_) => match packet::dns_refused(frame, &ip) {
                            Some(reply) => Outcome::Reply(reply, "DNS name not allowed"),
                            None => Outcome::Drop("DNS name not allowed"),
                        },
                        None => Outcome::Drop("malformed DNS query"),
                    };
                }
                // names in a TCP stream are not checked: only open machines use DNS over TCP
                Transport::Tcp { dst_port: 53, .. } if !self.policy.open => {
                    return self.deny(frame, &ip, "DNS over TCP in an allow-list mode");
                }
                _ => {}
            }
        }
        if self.policy.open {
            return Outcome::Forward;
        }
        let key = match ip.transport {
            Transport::Tcp {
                src_port, dst_port, ..
            } => Some(FlowKey {
                proto: 6,
                src_port,
                dst: ip.dst,
                dst_port,
            }),
            Transport::Udp {
                src_port, dst_port, ..
            } => Some(FlowKey {
                proto: 17,
                src_port,
                dst: ip.dst,
                dst_port,
            }),
            _ => None,
        };
        // a new connection needs its address allowed now
        let opening = matches!(ip.transport, Transport::Tcp { flags, .. } if flags & packet::TCP_SYN != 0 && flags & packet::TCP_ACK == 0);
        if self.ip_allowed(ip.dst, now) {
            if let Some(k) = key {
                self.remember(k, now);
            }
            return Outcome::Forward;
        }
        if !opening {
            if let Some(t) = key.and_then(|k| self.flows.get_mut(&k)) {
                if now.saturating_duration_since(*t) < FLOW_IDLE {
                    *t = now;
                    return Outcome::Forward;
                }
            }
        }
        self.deny(frame, &ip, "destination not allowed")
    }

    fn deny(&self, frame: &[u8], ip: &Ip, reason: &'static str) -> Outcome {
        match packet::tcp_reset(frame, ip) {
            Some(rst) => Outcome::Reply(rst, reason),
            None => Outcome::Drop(reason),
        }
    }

    fn remember(&mut self, k: FlowKey, now: Instant) {
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&k) {
            self.flows
                .retain(|_, t| now.saturating_duration_since(*t) < FLOW_IDLE);
            if self.flows.len() >= MAX_FLOWS {
                // the oldest goes: it is the one most likely finished
                if let Some(old) = self.flows.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                    self.flows.remove(&old);
                }
            }
        }
        self.flows.insert(k, now);
    }

    /// Reads a frame passt sends the guest: a DNS answer from the forwarder for an allowed
    /// name adds its A/AAAA addresses, each for its TTL. The frame itself always goes on.
    pub fn inbound(&mut self, frame: &[u8], now: Instant) {
        if self.policy.open {
            return;
        }
        let Some(eth) = packet::Eth::parse(frame) else {
            return;
        };
        let Some(ip) = packet::parse_ip(eth.ethertype, eth.payload) else {
            return;
        };
        let Transport::Udp {
            src_port: 53,
            payload,
            ..
        } = ip.transport
        else {
            return;
        };
        if ip.src != IpAddr::V4(self.policy.dns) {
            return;
        }
        let Some(answer) = dns::answer(payload) else {
            return;
        };
        if !self.policy.name_allowed(&answer.name) {
            return;
        }
        for (addr, ttl) in answer.addrs {
            if self.policy.always_denied(addr) {
                tracing::debug!(name = %answer.name, %addr, "a DNS answer names a denied address: not learned");
                continue;
            }
            let ttl = Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL);
            self.learn(unmap(addr), now + ttl, now);
            tracing::debug!(name = %answer.name, %addr, ttl_s = ttl.as_secs(), "egress: learned");
        }
    }

    fn learn(&mut self, ip: IpAddr, until: Instant, now: Instant) {
        if self.learned.len() >= MAX_LEARNED && !self.learned.contains_key(&ip) {
            self.learned.retain(|_, t| *t > now);
            if self.learned.len() >= MAX_LEARNED {
                if let Some(first) = self
                    .learned
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| *k)
                {
                    self.learned.remove(&first);
                }
            }
        }
        // a shorter TTL in a later answer shortens it: the name moved
        self.learned.insert(ip, until);
    }
}

static BYPASS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Machines this process starts from now on talk to passt without the filter: for measuring
/// what the filter costs (tests/egress.rs), never in a product path. Only Rust code in this
/// process can set it (no environment variable, nothing a binding or a guest reaches).
#[doc(hidden)]
pub fn bypass_for_measurement(on: bool) {
    BYPASS.store(on, std::sync::atomic::Ordering::SeqCst);
}

pub(crate) fn bypassed() -> bool {
    BYPASS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs both directions of the filter over arbitrary bytes (the fuzz target's entry point):
/// an allow-list policy, `data` read as a frame from the guest and as one from passt.
#[doc(hidden)]
pub fn fuzz_frame(data: &[u8]) {
    let policy = Policy::new(
        &["10.0.0.0/8".into(), "2001:db8::/32".into()],
        &["example.com".into()],
        &["192.168.0.0/16".into()],
    );
    let mut f = Filter::new(policy);
    let now = Instant::now();
    f.inbound(data, now);
    if let Outcome::Reply(r, _) = f.outbound(data, now) {
        // what the filter writes back must itself be a frame it can read
        assert!(packet::Eth::parse(&r).is_some(), "an unreadable reply");
    }
}

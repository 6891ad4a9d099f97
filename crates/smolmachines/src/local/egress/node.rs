//! The node's own networks, denied to every guest on the fleet (issue 14: "on the fleet the
//! private ranges of the node's own networks").
//!
//! [`node_private_networks`] reads the host's interface addresses (`getifaddrs`) and keeps the
//! networks that are not globally routable (RFC 1918, shared address space, documentation and
//! benchmarking blocks, unique-local IPv6) as blocks (the address masked to its prefix). The
//! fleet server hands them to [`deny_also`] at start; every machine the process starts after
//! that denies them in every mode, as it denies `SMOL_EGRESS_DENY`'s blocks.

use std::net::IpAddr;
use std::sync::RwLock;

use super::Cidr;

static ALSO_DENIED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds blocks to this process's always-denied list (beyond `SMOL_EGRESS_DENY`), for the
/// machines started after the call. Repeated blocks are kept once.
pub fn deny_also(blocks: impl IntoIterator<Item = String>) {
    let mut list = ALSO_DENIED.write().unwrap_or_else(|e| e.into_inner());
    for b in blocks {
        if !list.contains(&b) {
            list.push(b);
        }
    }
}

/// What [`deny_also`] added so far.
pub fn also_denied() -> Vec<String> {
    ALSO_DENIED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Whether `ip` is a private (not globally routable) address of a network a node can be on:
/// RFC 1918, 100.64.0.0/10, the documentation and benchmarking blocks, fc00::/7, 2001:db8::/32.
/// Loopback, link-local and multicast are not (they are denied anyway).
pub fn is_private(ip: IpAddr) -> bool {
    let blocks: &[&str] = &[
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "fc00::/7",
        "2001:db8::/32",
    ];
    blocks
        .iter()
        .filter_map(|b| Cidr::parse(b))
        .any(|c| c.contains(ip))
}

/// The private networks among interface addresses `(address, prefix length)`, as blocks
/// (`192.168.1.0/24`), each once, in the order given.
pub fn private_networks(addrs: &[(IpAddr, u8)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for &(ip, bits) in addrs {
        if !is_private(ip) {
            continue;
        }
        let net = match ip {
            IpAddr::V4(a) => {
                let bits = bits.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = bits.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        let block = format!("{net}/{bits}");
        if !out.contains(&block) {
            out.push(block);
        }
    }
    out
}

/// The host's interface addresses and their prefix lengths (`getifaddrs`; empty if it fails).
pub fn interface_addresses() -> Vec<(IpAddr, u8)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "getifaddrs: the node's networks are unknown"
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_addr and ifa_netmask point to sockaddrs of the family sa_family says
        // (sockaddr_in for AF_INET, sockaddr_in6 for AF_INET6).
        unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                    let bits = u32::from_be(m.sin_addr.s_addr).count_ones() as u8;
                    out.push((IpAddr::V4(ip), bits));
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                    let bits = u128::from_be_bytes(m.sin6_addr.s6_addr).count_ones() as u8;
                    out.push((IpAddr::V6(ip), bits));
                }
                _ => {}
            }
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no node is used after this.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The node's own private networks ([`private_networks`] of [`interface_addresses`]).
pub fn node_private_networks() -> Vec<String> {
    private_networks(&interface_addresses())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str, bits: u8) -> (IpAddr, u8) {
        (s.parse().unwrap(), bits)
    }

    #[test]
    fn private_networks_are_the_masked_blocks_of_private_addresses_only() {
        let got = private_networks(&[
            a("127.0.0.1", 8),
            a("10.1.2.3", 16),
            a("192.168.7.9", 24),
            a("192.168.7.10", 24),
            a("8.8.8.8", 24),
            a("172.20.0.5", 12),
            a("100.100.1.1", 10),
            a("fe80::1", 64),
            a("fd00::2", 64),
            a("2a00:1450::1", 64),
            a("::1", 128),
        ]);
        assert_eq!(
            got,
            [
                "10.1.0.0/16",
                "192.168.7.0/24",
                "172.16.0.0/12",
                "100.64.0.0/10",
                "fd00::/64"
            ]
        );
    }

    #[test]
    fn denied_also_blocks_are_in_every_machines_policy() {
        deny_also(["10.99.0.0/16".to_string(), "10.99.0.0/16".to_string()]);
        assert_eq!(
            also_denied()
                .iter()
                .filter(|b| b.as_str() == "10.99.0.0/16")
                .count(),
            1
        );
        let p = super::super::Policy::new(&[], &[], &super::super::Policy::denied_from_env());
        assert!(p.always_denied("10.99.3.4".parse().unwrap()));
        assert!(!p.always_denied("10.98.3.4".parse().unwrap()));
    }

    #[test]
    fn the_hosts_interfaces_are_read() {
        let addrs = interface_addresses();
        assert!(
            addrs.iter().any(|(ip, _)| ip.is_loopback()),
            "no loopback among {addrs:?}"
        );
    }
}

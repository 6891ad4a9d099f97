//! Ethernet, IPv4/IPv6, TCP and UDP: reading the headers the policy needs from hostile bytes
//! (every slice bounds-checked, no panics) and building the frames the filter answers with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;
const ETH_HLEN: usize = 14;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// An Ethernet II frame (no VLAN tag: a tagged frame reads as an unknown ethertype).
pub struct Eth<'a> {
    pub ethertype: u16,
    pub payload: &'a [u8],
}

impl<'a> Eth<'a> {
    pub fn parse(frame: &'a [u8]) -> Option<Eth<'a>> {
        Some(Eth {
            ethertype: be16(frame, 12)?,
            payload: frame.get(ETH_HLEN..)?,
        })
    }
}

/// The transport header of an IP packet, as far as the policy needs it.
#[derive(Debug, Clone, Copy)]
pub enum Transport<'a> {
    Tcp {
        src_port: u16,
        dst_port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        /// Payload length (for the sequence number a reset acknowledges).
        len: usize,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    /// ICMP, a fragment (no ports), or another protocol.
    Other,
}

/// An IP packet's addresses and transport.
#[derive(Debug, Clone, Copy)]
pub struct Ip<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport<'a>,
}

/// Reads an IPv4 or IPv6 packet (`ethertype` says which). `None`: malformed.
pub fn parse_ip(ethertype: u16, p: &[u8]) -> Option<Ip<'_>> {
    match ethertype {
        ETH_IPV4 => parse_v4(p),
        ETH_IPV6 => parse_v6(p),
        _ => None,
    }
}

fn parse_v4(p: &[u8]) -> Option<Ip<'_>> {
    let vihl = *p.first()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(p, 2)?);
    if ihl < 20 || total < ihl || total > p.len() {
        return None;
    }
    let frag = be16(p, 6)?;
    let fragmented = frag & 0x2000 != 0 || frag & 0x1fff != 0;
    let src = Ipv4Addr::from(be32(p, 12)?);
    let dst = Ipv4Addr::from(be32(p, 16)?);
    let proto = *p.get(9)?;
    let body = p.get(ihl..total)?;
    let transport = if fragmented {
        Transport::Other
    } else {
        transport(proto, body)?
    };
    Some(Ip {
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        transport,
    })
}

fn parse_v6(p: &[u8]) -> Option<Ip<'_>> {
    if *p.first()? >> 4 != 6 {
        return None;
    }
    let plen = usize::from(be16(p, 4)?);
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
    let mut next = *p.get(6)?;
    let mut body = p.get(40..40 + plen)?;
    // extension headers: hop-by-hop, routing, destination options; a fragment has no ports
    let mut hops = 0;
    let transport = loop {
        match next {
            0 | 43 | 60 if hops < 8 => {
                let len = (usize::from(*body.get(1)?) + 1) * 8;
                next = *body.first()?;
                body = body.get(len..)?;
                hops += 1;
            }
            6 | 17 => break transport(next, body)?,
            _ => break Transport::Other,
        }
    };
    Some(Ip {
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        transport,
    })
}

fn transport(proto: u8, b: &[u8]) -> Option<Transport<'_>> {
    match proto {
        6 => {
            let off = usize::from(*b.get(12)? >> 4) * 4;
            if off < 20 || off > b.len() {
                return None;
            }
            Some(Transport::Tcp {
                src_port: be16(b, 0)?,
                dst_port: be16(b, 2)?,
                seq: be32(b, 4)?,
                ack: be32(b, 8)?,
                flags: *b.get(13)?,
                len: b.len() - off,
            })
        }
        17 => {
            let len = usize::from(be16(b, 4)?);
            if len < 8 || len > b.len() {
                return None;
            }
            Some(Transport::Udp {
                src_port: be16(b, 0)?,
                dst_port: be16(b, 2)?,
                payload: b.get(8..len)?,
            })
        }
        _ => Some(Transport::Other),
    }
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(data, 0))
}

/// The TCP/UDP checksum of `segment` with the pseudo-header of `src` → `dst`.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        _ => {}
    }
    acc += u32::from(proto);
    acc += segment.len() as u32;
    let c = fold(sum(segment, acc));
    // a computed 0 is sent as all ones (UDP: 0 means "no checksum")
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// An Ethernet + IP frame from `dst` back to `src` of `orig` (MACs swapped) carrying `segment`
/// of protocol `proto`, its checksum at `csum_at` filled in.
fn reply(orig: &[u8], ip: &Ip, proto: u8, mut segment: Vec<u8>, csum_at: usize) -> Option<Vec<u8>> {
    let dst_mac = orig.get(6..12)?;
    let src_mac = orig.get(0..6)?;
    let c = l4_checksum(ip.dst, ip.src, proto, &segment);
    segment
        .get_mut(csum_at..csum_at + 2)?
        .copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(ETH_HLEN + 40 + segment.len());
    f.extend_from_slice(dst_mac);
    f.extend_from_slice(src_mac);
    match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&ETH_IPV4.to_be_bytes());
            let total = u16::try_from(20 + segment.len()).ok()?;
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[6] = 0x40; // don't fragment
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&d.octets());
            h[16..20].copy_from_slice(&s.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&ETH_IPV6.to_be_bytes());
            let plen = u16::try_from(segment.len()).ok()?;
            let mut h = [0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&plen.to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&d.octets());
            h[24..40].copy_from_slice(&s.octets());
            f.extend_from_slice(&h);
        }
        _ => return None,
    }
    f.extend_from_slice(&segment);
    Some(f)
}

/// The TCP reset that refuses `ip` (RFC 9293 §3.10.7.1), or `None` when it is not TCP or is
/// a reset itself.
pub fn tcp_reset(orig: &[u8], ip: &Ip) -> Option<Vec<u8>> {
    let Transport::Tcp {
        src_port,
        dst_port,
        seq,
        ack,
        flags,
        len,
    } = ip.transport
    else {
        return None;
    };
    if flags & TCP_RST != 0 {
        return None;
    }
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&dst_port.to_be_bytes());
    s[2..4].copy_from_slice(&src_port.to_be_bytes());
    s[12] = 5 << 4;
    if flags & TCP_ACK != 0 {
        s[4..8].copy_from_slice(&ack.to_be_bytes());
        s[13] = TCP_RST;
    } else {
        let consumed =
            len as u32 + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        s[8..12].copy_from_slice(&seq.wrapping_add(consumed).to_be_bytes());
        s[13] = TCP_RST | TCP_ACK;
    }
    reply(orig, ip, 6, s, 16)
}

/// The DNS answer REFUSED to the UDP query `ip` (its header and question echoed), or `None`
/// when the query is not one.
pub fn dns_refused(orig: &[u8], ip: &Ip) -> Option<Vec<u8>> {
    let Transport::Udp {
        src_port,
        dst_port,
        payload,
    } = ip.transport
    else {
        return None;
    };
    let answer = super::dns::refused(payload)?;
    let len = u16::try_from(8 + answer.len()).ok()?;
    let mut s = Vec::with_capacity(usize::from(len));
    s.extend_from_slice(&dst_port.to_be_bytes());
    s.extend_from_slice(&src_port.to_be_bytes());
    s.extend_from_slice(&len.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&answer);
    reply(orig, ip, 17, s, 6)
}

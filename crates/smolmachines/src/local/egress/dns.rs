//! DNS messages (RFC 1035), read from hostile bytes: a query's one question, an answer's
//! addresses and TTLs, and the REFUSED answer to a denied query. Names follow compression
//! pointers a bounded number of times; anything malformed is `None`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Answers read from one message at most.
const MAX_ANSWERS: usize = 64;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads the name at `at`: the name (lower case, dotted, no trailing dot) and where the bytes
/// after it start.
fn name(msg: &[u8], at: usize) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut pos = at;
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg.get(pos)?;
        match len >> 6 {
            0 if len == 0 => {
                return Some((out, end.unwrap_or(pos + 1)));
            }
            0 => {
                let label = msg.get(pos + 1..pos + 1 + usize::from(len))?;
                if !out.is_empty() {
                    out.push('.');
                }
                for &c in label {
                    // a name with a dot or a control byte inside a label is not one we allow
                    if c == b'.' || !c.is_ascii_graphic() {
                        return None;
                    }
                    out.push(char::from(c.to_ascii_lowercase()));
                }
                if out.len() > 253 {
                    return None;
                }
                pos += 1 + usize::from(len);
            }
            3 => {
                jumps += 1;
                if jumps > 16 {
                    return None;
                }
                let target = usize::from(be16(msg, pos)? & 0x3fff);
                end.get_or_insert(pos + 2);
                // pointers point back only: no loops
                if target >= pos {
                    return None;
                }
                pos = target;
            }
            _ => return None,
        }
    }
}

/// A query's question: (its id, the name). `None` unless it is a query with exactly one
/// question.
pub fn question(msg: &[u8]) -> Option<(u16, String)> {
    let id = be16(msg, 0)?;
    let flags = be16(msg, 2)?;
    if flags & 0x8000 != 0 || be16(msg, 4)? != 1 {
        return None;
    }
    let (n, after) = name(msg, HEADER)?;
    // qtype and qclass must be there
    msg.get(after..after + 4)?;
    Some((id, n))
}

/// What an answer says: the question's name and the A/AAAA addresses with their TTLs.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub addrs: Vec<(IpAddr, u32)>,
}

/// Reads a successful answer with one question; `None` when it is not one.
pub fn answer(msg: &[u8]) -> Option<Answer> {
    let flags = be16(msg, 2)?;
    // a response, rcode NOERROR, one question
    if flags & 0x8000 == 0 || flags & 0x000f != 0 || be16(msg, 4)? != 1 {
        return None;
    }
    let ancount = usize::from(be16(msg, 6)?);
    let (qname, after) = name(msg, HEADER)?;
    let mut pos = after + 4;
    msg.get(pos.checked_sub(1)?)?;
    let mut addrs = Vec::new();
    for _ in 0..ancount.min(MAX_ANSWERS) {
        let (_, after) = name(msg, pos)?;
        let rtype = be16(msg, after)?;
        let class = be16(msg, after + 2)?;
        let ttl = u32::from_be_bytes(msg.get(after + 4..after + 8)?.try_into().ok()?);
        let rdlen = usize::from(be16(msg, after + 8)?);
        let rdata = msg.get(after + 10..after + 10 + rdlen)?;
        pos = after + 10 + rdlen;
        if class != CLASS_IN {
            continue;
        }
        match (rtype, rdata.len()) {
            (TYPE_A, 4) => {
                let o: [u8; 4] = rdata.try_into().ok()?;
                addrs.push((IpAddr::V4(Ipv4Addr::from(o)), ttl));
            }
            (TYPE_AAAA, 16) => {
                let o: [u8; 16] = rdata.try_into().ok()?;
                addrs.push((IpAddr::V6(Ipv6Addr::from(o)), ttl));
            }
            _ => {}
        }
    }
    Some(Answer { name: qname, addrs })
}

/// The REFUSED answer to `query`: its id and question, no records.
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    question(query)?;
    let (_, after) = name(query, HEADER)?;
    let q = query.get(HEADER..after + 4)?;
    let mut out = Vec::with_capacity(HEADER + q.len());
    out.extend_from_slice(query.get(0..2)?);
    // QR, the query's opcode and RD, RA; rcode 5 (REFUSED)
    let flags = be16(query, 2)?;
    let flags = 0x8000 | (flags & 0x7900) | 0x0080 | 5;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(q);
    Some(out)
}

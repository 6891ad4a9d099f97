//! The filter on hand-built frames: what passes, what is refused and how, what is learned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::packet::{self, checksum, l4_checksum, TCP_ACK, TCP_RST, TCP_SYN};
use super::*;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ip(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(seg);
            eth(packet::ETH_IPV4, &h)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h.extend_from_slice(seg);
            eth(packet::ETH_IPV6, &h)
        }
        _ => unreachable!(),
    }
}

fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[8..12].copy_from_slice(&7u32.to_be_bytes());
    s[12] = 5 << 4;
    s[13] = flags;
    let c = l4_checksum(src, dst, 6, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, 6, &s)
}

fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    ip(src, dst, 17, &s)
}

fn qname(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in name.split('.') {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&qname(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    m
}

/// An answer with its records' names as compression pointers to the question.
fn dns_answer(id: u16, name: &str, addrs: &[(IpAddr, u32)]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x81, 0x80, 0, 1]);
    m.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&qname(name));
    m.extend_from_slice(&[0, 1, 0, 1]);
    for (a, ttl) in addrs {
        m.extend_from_slice(&[0xc0, 12]);
        let (t, data) = match a {
            IpAddr::V4(v) => (1u16, v.octets().to_vec()),
            IpAddr::V6(v) => (28u16, v.octets().to_vec()),
        };
        m.extend_from_slice(&t.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(&data);
    }
    m
}

fn guest() -> IpAddr {
    v4(crate::local::net::GUEST_ADDR)
}

fn dns_addr() -> IpAddr {
    v4(crate::local::net::DNS)
}

fn open() -> Filter {
    Filter::new(Policy::new(&[], &[], &[]))
}

fn allow(cidrs: &[&str], hosts: &[&str]) -> Filter {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    Filter::new(Policy::new(&s(cidrs), &s(hosts), &s(&["192.168.0.0/16"])))
}

fn syn(dst: &str, port: u16) -> Vec<u8> {
    tcp(guest(), v4(dst), 40000, port, 1000, TCP_SYN)
}

/// The reset a reply frame carries: (ports, seq, ack, flags); checks both checksums.
fn reset_of(frame: &[u8]) -> (u16, u16, u32, u32, u8) {
    assert_eq!(&frame[0..6], &GUEST_MAC, "the reset goes to the guest");
    let e = packet::Eth::parse(frame).unwrap();
    assert_eq!(checksum(&e.payload[..20]), 0, "IPv4 header checksum");
    let p = packet::parse_ip(e.ethertype, e.payload).unwrap();
    assert_eq!(p.dst, guest());
    let seg = &e.payload[20..];
    assert_eq!(l4_checksum(p.src, p.dst, 6, seg), 0xffff, "TCP checksum");
    match p.transport {
        packet::Transport::Tcp {
            src_port,
            dst_port,
            seq,
            ack,
            flags,
            ..
        } => (src_port, dst_port, seq, ack, flags),
        other => panic!("not TCP: {other:?}"),
    }
}

#[test]
fn blocks_parse_and_hold_their_addresses() {
    let c = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(c.contains(v4("10.1.255.3")));
    assert!(!c.contains(v4("10.2.0.1")));
    assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(v4("8.8.8.8")));
    assert!(Cidr::parse("1.2.3.4").unwrap().contains(v4("1.2.3.4")));
    assert!(!Cidr::parse("1.2.3.4").unwrap().contains(v4("1.2.3.5")));
    let v6 = Cidr::parse("2001:db8::/32").unwrap();
    assert!(v6.contains("2001:db8::1".parse().unwrap()));
    assert!(!v6.contains("2001:db9::1".parse().unwrap()));
    // an IPv4-mapped IPv6 address is its IPv4 address
    let lo = Cidr::parse("127.0.0.0/8").unwrap();
    assert!(lo.contains("::ffff:127.0.0.1".parse().unwrap()));
    for bad in ["10.0.0.0/33", "::/129", "nope", "10.0.0/8", ""] {
        assert!(Cidr::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn names_match_themselves_and_their_subdomains_only() {
    let p = Policy::new(&[], &["PyPI.org.".into(), "*.example.com".into()], &[]);
    assert!(!p.open);
    for yes in [
        "pypi.org",
        "files.pypi.org",
        "PYPI.ORG.",
        "example.com",
        "a.b.example.com",
    ] {
        assert!(p.name_allowed(yes), "{yes}");
    }
    for no in ["evilpypi.org", "pypi.org.evil", "org", "", "xexample.com"] {
        assert!(!p.name_allowed(no), "{no}");
    }
    assert!(Policy::new(&[], &[], &[]).name_allowed("anything.test"));
}

#[test]
fn arp_passes_and_other_ethertypes_and_short_frames_do_not() {
    let mut f = allow(&[], &[]);
    let now = Instant::now();
    assert_eq!(
        f.outbound(&eth(packet::ETH_ARP, &[0; 28]), now),
        Outcome::Forward
    );
    assert!(matches!(
        f.outbound(&eth(0x8100, &[0; 40]), now),
        Outcome::Drop(_)
    ));
    assert!(matches!(f.outbound(&[0u8; 13], now), Outcome::Drop(_)));
    assert!(matches!(
        f.outbound(&eth(packet::ETH_IPV4, &[0x45, 0]), now),
        Outcome::Drop(_)
    ));
}

#[test]
fn open_mode_passes_the_world_and_refuses_loopback_link_local_and_metadata() {
    let mut f = open();
    let now = Instant::now();
    assert_eq!(
        f.outbound(&syn("93.184.216.34", 443), now),
        Outcome::Forward
    );
    assert_eq!(f.outbound(&syn("10.250.0.1", 9000), now), Outcome::Forward);
    for denied in [
        "169.254.169.254",
        "127.0.0.1",
        "127.8.9.10",
        "0.0.0.0",
        "224.0.0.1",
    ] {
        match f.outbound(&syn(denied, 80), now) {
            Outcome::Reply(r, _) => {
                let (sport, dport, seq, ack, flags) = reset_of(&r);
                assert_eq!((sport, dport), (80, 40000), "{denied}");
                assert_eq!(flags, TCP_RST | TCP_ACK, "{denied}");
                // a SYN takes one sequence number
                assert_eq!((seq, ack), (0, 1001), "{denied}");
            }
            other => panic!("{denied}: {other:?}"),
        }
    }
    // UDP to the metadata address: dropped (no reply)
    let u = udp(guest(), v4("169.254.169.254"), 5000, 80, b"x");
    assert!(matches!(f.outbound(&u, now), Outcome::Drop(_)));
    // IPv6: loopback, link-local, and loopback in IPv4-mapped form
    let g6: IpAddr = "fd00::15".parse().unwrap();
    for d in [
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
    ] {
        let p = tcp(g6, d.parse().unwrap(), 40000, 80, 5, TCP_SYN);
        assert!(matches!(f.outbound(&p, now), Outcome::Reply(..)), "{d}");
    }
    let p = tcp(
        g6,
        "2606:4700::1111".parse().unwrap(),
        40000,
        80,
        5,
        TCP_SYN,
    );
    assert_eq!(f.outbound(&p, now), Outcome::Forward);
}

#[test]
fn the_engines_denied_blocks_hold_in_every_mode_and_an_allow_list_cannot_lift_them() {
    let deny = vec!["10.9.0.0/16".to_string(), "bogus".to_string()];
    let mut open = Filter::new(Policy::new(&[], &[], &deny));
    let now = Instant::now();
    assert!(matches!(
        open.outbound(&syn("10.9.1.1", 22), now),
        Outcome::Reply(..)
    ));
    assert_eq!(open.outbound(&syn("10.8.1.1", 22), now), Outcome::Forward);
    let mut f = allow(&["0.0.0.0/0", "169.254.0.0/16", "127.0.0.0/8"], &[]);
    assert_eq!(f.outbound(&syn("8.8.8.8", 53), now), Outcome::Forward);
    for d in ["169.254.169.254", "127.0.0.1", "192.168.1.1"] {
        assert!(
            matches!(f.outbound(&syn(d, 80), now), Outcome::Reply(..)),
            "{d}"
        );
    }
}

#[test]
fn an_allow_list_passes_its_blocks_and_refuses_the_rest_with_a_reset() {
    let mut f = allow(&["10.250.0.100/32", "203.0.113.0/24"], &[]);
    let now = Instant::now();
    assert_eq!(
        f.outbound(&syn("10.250.0.100", 9000), now),
        Outcome::Forward
    );
    assert_eq!(f.outbound(&syn("203.0.113.77", 443), now), Outcome::Forward);
    // a segment with ACK is answered by a reset at its acknowledgement number
    let p = tcp(guest(), v4("10.250.0.9"), 40001, 9000, 55, TCP_ACK);
    match f.outbound(&p, now) {
        Outcome::Reply(r, _) => {
            let (_, _, seq, _, flags) = reset_of(&r);
            assert_eq!((seq, flags), (7, TCP_RST));
        }
        other => panic!("{other:?}"),
    }
    // a reset is never answered
    let p = tcp(guest(), v4("10.250.0.9"), 40001, 9000, 55, TCP_RST);
    assert!(matches!(f.outbound(&p, now), Outcome::Drop(_)));
    // ICMP to a denied address: dropped
    let p = ip(guest(), v4("10.250.0.9"), 1, &[8, 0, 0, 0, 0, 0, 0, 0]);
    assert!(matches!(f.outbound(&p, now), Outcome::Drop(_)));
}

#[test]
fn dns_for_a_denied_name_is_refused_and_for_an_allowed_one_goes_on() {
    let mut f = allow(&[], &["allowed.test"]);
    let now = Instant::now();
    let q = udp(
        guest(),
        dns_addr(),
        33333,
        53,
        &dns_query(0xbeef, "www.allowed.test"),
    );
    assert_eq!(f.outbound(&q, now), Outcome::Forward);
    let q = udp(
        guest(),
        dns_addr(),
        33334,
        53,
        &dns_query(0x1234, "Denied.test"),
    );
    let Outcome::Reply(r, _) = f.outbound(&q, now) else {
        panic!("no refusal");
    };
    let e = packet::Eth::parse(&r).unwrap();
    assert_eq!(checksum(&e.payload[..20]), 0);
    let p = packet::parse_ip(e.ethertype, e.payload).unwrap();
    assert_eq!((p.src, p.dst), (dns_addr(), guest()));
    let packet::Transport::Udp {
        src_port,
        dst_port,
        payload,
    } = p.transport
    else {
        panic!("not UDP");
    };
    assert_eq!((src_port, dst_port), (53, 33334));
    assert_eq!(l4_checksum(p.src, p.dst, 17, &e.payload[20..]), 0xffff);
    assert_eq!(&payload[0..2], &[0x12, 0x34], "the query's id");
    assert_eq!(payload[2] & 0x80, 0x80, "a response");
    assert_eq!(payload[3] & 0x0f, 5, "REFUSED");
    assert_eq!(
        super::dns::question(&dns_query(1, "denied.test"))
            .unwrap()
            .1,
        "denied.test"
    );
    // a query with two questions or none, or garbage, is dropped
    let mut two = dns_query(1, "allowed.test");
    two[5] = 2;
    for bad in [
        two,
        vec![0u8; 5],
        dns_query(1, "allowed.test")[..14].to_vec(),
    ] {
        let q = udp(guest(), dns_addr(), 33335, 53, &bad);
        assert!(matches!(f.outbound(&q, now), Outcome::Drop(_)));
    }
    // DNS over TCP in an allow-list mode: reset
    let t = tcp(guest(), dns_addr(), 40000, 53, 1, TCP_SYN);
    assert!(matches!(f.outbound(&t, now), Outcome::Reply(..)));
    // open: any name, and TCP
    let mut o = open();
    let q = udp(
        guest(),
        dns_addr(),
        33334,
        53,
        &dns_query(0x1234, "denied.test"),
    );
    assert_eq!(o.outbound(&q, now), Outcome::Forward);
    assert_eq!(o.outbound(&t, now), Outcome::Forward);
}

#[test]
fn answers_for_allowed_names_open_their_addresses_for_their_ttl() {
    let mut f = allow(&[], &["allowed.test"]);
    let t0 = Instant::now();
    assert!(matches!(
        f.outbound(&syn("198.51.100.7", 443), t0),
        Outcome::Reply(..)
    ));
    let a = dns_answer(
        9,
        "api.allowed.test",
        &[
            (v4("198.51.100.7"), 30),
            (v4("169.254.169.254"), 30),
            ("2001:db8::7".parse().unwrap(), 30),
        ],
    );
    f.inbound(&udp(dns_addr(), guest(), 53, 33333, &a), t0);
    // the metadata address in an answer is not learned
    assert_eq!(
        f.learned(t0),
        vec![
            v4("198.51.100.7"),
            "2001:db8::7".parse::<Ipv6Addr>().unwrap().into()
        ]
    );
    assert_eq!(f.outbound(&syn("198.51.100.7", 443), t0), Outcome::Forward);
    // an open connection keeps working past the TTL while it is active ...
    let t1 = t0 + Duration::from_secs(31);
    let data = tcp(guest(), v4("198.51.100.7"), 40000, 443, 1001, TCP_ACK);
    assert_eq!(f.outbound(&data, t1), Outcome::Forward);
    // ... a new one needs the name answered again
    let again = tcp(guest(), v4("198.51.100.7"), 40002, 443, 1, TCP_SYN);
    assert!(matches!(f.outbound(&again, t1), Outcome::Reply(..)));
    assert!(f.learned(t1).is_empty());
    // the name moved: the new address is followed
    let moved = dns_answer(10, "api.allowed.test", &[(v4("198.51.100.8"), 0)]);
    f.inbound(&udp(dns_addr(), guest(), 53, 33333, &moved), t1);
    assert_eq!(f.outbound(&syn("198.51.100.8", 443), t1), Outcome::Forward);
    // a TTL of 0 still holds for MIN_TTL, then not
    let t2 = t1 + MIN_TTL + Duration::from_millis(1);
    let late = tcp(guest(), v4("198.51.100.8"), 40003, 443, 1, TCP_SYN);
    assert!(matches!(f.outbound(&late, t2), Outcome::Reply(..)));
}

#[test]
fn answers_that_do_not_count_teach_nothing() {
    let mut f = allow(&[], &["allowed.test"]);
    let now = Instant::now();
    let ip7 = v4("198.51.100.7");
    // a name not allowed
    let a = dns_answer(1, "evil.test", &[(ip7, 300)]);
    f.inbound(&udp(dns_addr(), guest(), 53, 3, &a), now);
    // from another address than the forwarder (the guest cannot forge passt's side, but a
    // server it reaches could answer from port 53)
    let a = dns_answer(1, "allowed.test", &[(ip7, 300)]);
    f.inbound(&udp(v4("203.0.113.53"), guest(), 53, 3, &a), now);
    // an error answer
    let mut nx = dns_answer(1, "allowed.test", &[(ip7, 300)]);
    nx[3] |= 3;
    f.inbound(&udp(dns_addr(), guest(), 53, 3, &nx), now);
    // truncated
    let a = dns_answer(1, "allowed.test", &[(ip7, 300)]);
    f.inbound(&udp(dns_addr(), guest(), 53, 3, &a[..a.len() - 2]), now);
    assert!(f.learned(now).is_empty());
    // a frame that is the guest's own (a query) in the inbound direction: nothing
    let q = dns_query(1, "allowed.test");
    f.inbound(&udp(dns_addr(), guest(), 53, 3, &q), now);
    assert!(f.learned(now).is_empty());
}

#[test]
fn the_learned_set_is_bounded() {
    let mut f = allow(&[], &["allowed.test"]);
    let now = Instant::now();
    for i in 0..(MAX_LEARNED as u32 + 50) {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let a = dns_answer(1, "allowed.test", &[(ip, 60 + i % 7)]);
        f.inbound(&udp(dns_addr(), guest(), 53, 3, &a), now);
    }
    assert!(f.learned(now).len() <= MAX_LEARNED);
    assert!(f.learned(now).len() > MAX_LEARNED - 10);
}

#[test]
fn names_with_pointer_loops_or_forward_pointers_are_rejected() {
    // the question's name is a pointer to itself
    let mut m = vec![
        0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ];
    assert!(super::dns::answer(&m).is_none());
    m[13] = 14; // forward
    assert!(super::dns::answer(&m).is_none());
    // a label longer than the message
    let m = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 40, b'a'];
    assert!(super::dns::question(&m).is_none());
}

#[test]
fn every_prefix_and_mutation_of_real_frames_is_handled_without_a_panic() {
    let frames = [
        syn("10.250.0.1", 80),
        udp(guest(), dns_addr(), 1, 53, &dns_query(7, "a.allowed.test")),
        udp(
            dns_addr(),
            guest(),
            53,
            1,
            &dns_answer(7, "example.com", &[(v4("1.2.3.4"), 5)]),
        ),
        tcp(
            "fd00::15".parse().unwrap(),
            "::1".parse().unwrap(),
            1,
            2,
            3,
            TCP_SYN,
        ),
    ];
    for f in &frames {
        for n in 0..=f.len() {
            fuzz_frame(&f[..n]);
        }
        for i in 0..f.len() {
            for b in [0u8, 0xff, 0x3f, 0xc0] {
                let mut m = f.clone();
                m[i] = b;
                fuzz_frame(&m);
            }
        }
    }
}

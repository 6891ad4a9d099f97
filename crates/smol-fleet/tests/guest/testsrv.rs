//! The guest side of the ingress tests (tests/ingress.rs): a tiny HTTP/1.1 server on
//! `0.0.0.0:<argv[1]>`, std only, built static by the test with rustc and copied into the
//! machine. One thread per connection, every response `Connection: close`.
//!
//! * `GET /ws` (WebSocket upgrade): echoes each text / binary frame, answers ping, closes.
//! * `GET /sse`: `text/event-stream`; `data: one`, then waits for `/tmp/sse-go` to exist,
//!   then `data: two` and the end.
//! * `POST /duplex` (chunked body): a chunked answer echoing each chunk as soon as it arrives.
//! * `POST /echo` (content-length body): the body back.
//! * `/dump...`: the request head as it arrived, as the body.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: testsrv PORT");
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            if let Err(e) = serve(conn) {
                eprintln!("testsrv: {e}");
            }
        });
    }
}

fn serve(conn: TcpStream) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut rd = BufReader::new(conn);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if rd.read_until(b'\n', &mut line)? == 0 {
            return Ok(()); // a readiness probe: connected, said nothing
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let path = target.split('?').next().unwrap_or("").to_string();
    match (method.as_str(), path.as_str()) {
        ("GET", "/ws") => websocket(rd, out, header("sec-websocket-key").unwrap_or_default()),
        ("GET", "/sse") => {
            out.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n",
            )?;
            out.write_all(b"data: one\n\n")?;
            out.flush()?;
            for _ in 0..6000 {
                if Path::new("/tmp/sse-go").exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            out.write_all(b"data: two\n\n")?;
            out.flush()
        }
        ("POST", "/duplex") => {
            out.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            )?;
            out.flush()?;
            loop {
                let mut size = String::new();
                if rd.read_line(&mut size)? == 0 {
                    return Ok(());
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|e| std::io::Error::other(format!("chunk size {size:?}: {e}")))?;
                let mut data = vec![0u8; n + 2];
                rd.read_exact(&mut data)?;
                if n == 0 {
                    out.write_all(b"0\r\n\r\n")?;
                    return out.flush();
                }
                out.write_all(format!("{n:x}\r\n").as_bytes())?;
                out.write_all(&data)?; // the chunk and its CRLF
                out.flush()?;
            }
        }
        ("POST", "/echo") => {
            let n: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; n];
            rd.read_exact(&mut body)?;
            out.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )?;
            out.write_all(&body)?;
            out.flush()
        }
        (_, p) if p.starts_with("/dump") => {
            out.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-guest: testsrv\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", head.len())
                    .as_bytes(),
            )?;
            out.write_all(&head)?;
            out.flush()
        }
        _ => {
            out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\nconnection: close\r\n\r\nnot found\n")?;
            out.flush()
        }
    }
}

fn websocket(mut rd: BufReader<TcpStream>, mut out: TcpStream, key: String) -> std::io::Result<()> {
    let accept = base64(&sha1(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    out.write_all(
        format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n")
            .as_bytes(),
    )?;
    out.flush()?;
    loop {
        let mut h = [0u8; 2];
        if rd.read_exact(&mut h).is_err() {
            return Ok(());
        }
        let (fin_op, masked, len7) = (h[0], h[1] & 0x80 != 0, (h[1] & 0x7f) as u64);
        let len = match len7 {
            126 => {
                let mut b = [0u8; 2];
                rd.read_exact(&mut b)?;
                u16::from_be_bytes(b) as u64
            }
            127 => {
                let mut b = [0u8; 8];
                rd.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => n,
        };
        let mut mask = [0u8; 4];
        if masked {
            rd.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; len as usize];
        rd.read_exact(&mut payload)?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let opcode = fin_op & 0x0f;
        let reply = match opcode {
            0x9 => 0x80 | 0xA, // ping -> pong
            0xA => continue,   // pong
            _ => fin_op,       // text, binary, continuation, close: echoed as they are
        };
        let mut frame = vec![reply];
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n <= 0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&payload);
        out.write_all(&frame)?;
        out.flush()?;
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

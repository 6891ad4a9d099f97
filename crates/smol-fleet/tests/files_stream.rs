//! File bodies stream through the fleet: a 64 MiB binary goes in and comes back byte-exact
//! while the `smolfleet serve` process's peak RSS stays well below the file's size; the
//! 100 MiB limit is a 413 problem for a chunked upload without `content-length` (the guest
//! keeps the old content) and for a download of a bigger file; a missing file is a 404
//! problem. Real VMs, the test registry on 127.0.0.1, the server as a child process.

mod child;
#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::time::Duration;

use rand::RngCore;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use child::{unpooled, with_server, Server};
use support::{content_type, problem};

const MIB: u64 = 1 << 20;
/// The server's limit per file (SPEC §10.5.5).
const LIMIT: u64 = 100 * MIB;
/// How much the server's peak RSS may grow while a 64 MiB file goes through it.
const GROWTH_BOUND: u64 = 48 * MIB;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `total` bytes of `fill` as a chunked PUT (no `content-length`) of `path`, 1 MiB a
/// chunk, while reading the answer; returns its status line's code and the raw response.
async fn chunked_put(srv: &Server, path: &str, total: u64) -> (u16, String) {
    let addr = srv.url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n",
        srv.key
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; MIB as usize];
        let mut sent = 0;
        while sent < total {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
            sent += chunk.len() as u64;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        // keep the write half open until the answer came
        std::future::pending::<()>().await;
        Ok::<(), std::io::Error>(())
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(300), rd.read_to_end(&mut buf)).await;
    writer.abort();
    assert!(read.is_ok(), "no answer to the chunked upload");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

async fn scenario(srv: Server, image: String) {
    let c = unpooled();
    let m = srv.create(&c, &image, Some("files")).await;
    let id = m["id"].as_str().unwrap().to_string();
    let mpath = |p: &str| srv.url(&format!("/v1/machines/{id}{p}"));

    // 64 MiB of random bytes in with the client's double slash, out with the relative form
    let mut blob = vec![0u8; 64 << 20];
    rand::thread_rng().fill_bytes(&mut blob);
    let digest = hex(&Sha256::digest(&blob));
    let base = srv.mem("VmRSS");
    srv.reset_peak();
    let r = c
        .put(mpath("/files//data/big.bin"))
        .bearer_auth(&srv.key)
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{:?}", r.text().await);
    let peak = srv.mem("VmHWM");
    eprintln!("upload: RSS {base} -> peak {peak}");
    assert!(
        peak.saturating_sub(base) < GROWTH_BOUND,
        "the server's peak RSS grew by {} bytes for a 64 MiB upload",
        peak - base
    );
    // the guest has the same bytes
    let out = srv
        .run(
            &c,
            &id,
            "sha256sum /data/big.bin && stat -c %s /data/big.bin",
        )
        .await;
    assert!(out.starts_with(&digest), "{out}");

    let base = srv.mem("VmRSS");
    srv.reset_peak();
    let mut r = c
        .get(mpath("/files/data/big.bin"))
        .bearer_auth(&srv.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(content_type(&r), "application/octet-stream");
    let mut got = Vec::with_capacity(blob.len());
    while let Some(chunk) = r.chunk().await.expect("download chunk") {
        got.extend_from_slice(&chunk);
    }
    let peak = srv.mem("VmHWM");
    eprintln!("download: RSS {base} -> peak {peak}");
    assert_eq!(got.len(), blob.len());
    assert!(got == blob, "the downloaded bytes differ");
    assert!(
        peak.saturating_sub(base) < GROWTH_BOUND,
        "the server's peak RSS grew by {} bytes for a 64 MiB download",
        peak - base
    );
    drop(got);

    // a chunked upload over the limit: 413, the guest keeps the old content, no temp file
    let base = srv.mem("VmRSS");
    srv.reset_peak();
    let (status, text) = chunked_put(
        &srv,
        &format!("/v1/machines/{id}/files//data/big.bin"),
        LIMIT + 4 * MIB,
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(
        text.to_lowercase()
            .contains("content-type: application/problem+json"),
        "{text}"
    );
    assert!(text.contains("\"code\":\"invalid_config\""), "{text}");
    let peak = srv.mem("VmHWM");
    assert!(
        peak.saturating_sub(base) < GROWTH_BOUND,
        "the server's peak RSS grew by {} bytes for an oversized upload",
        peak - base
    );
    let out = srv
        .run(&c, &id, "sha256sum /data/big.bin; ls -a /data")
        .await;
    assert!(out.starts_with(&digest), "{out}");
    assert!(!out.contains(".smol-"), "a temp file was left: {out}");

    // an upload whose client goes away part way: the guest file is unchanged, no temp file
    {
        let addr = srv.url.trim_start_matches("http://").to_string();
        let mut sock = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "PUT /v1/machines/{id}/files//data/big.bin HTTP/1.1\r\nhost: {addr}\r\n\
             authorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
            srv.key
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'y'; MIB as usize];
        for _ in 0..8 {
            sock.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await
                .unwrap();
            sock.write_all(&chunk).await.unwrap();
            sock.write_all(b"\r\n").await.unwrap();
        }
        drop(sock);
    }
    let mut out = String::new();
    for _ in 0..300 {
        out = srv
            .run(&c, &id, "sha256sum /data/big.bin; ls -a /data")
            .await;
        if !out.contains(".smol-") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(out.starts_with(&digest), "{out}");
    assert!(!out.contains(".smol-"), "a temp file was left: {out}");

    // a download of a file over the limit: 413 before any byte
    srv.run(
        &c,
        &id,
        "dd if=/dev/zero of=/data/huge bs=1048576 count=101 2>/dev/null && stat -c %s /data/huge",
    )
    .await;
    let r = c
        .get(mpath("/files//data/huge"))
        .bearer_auth(&srv.key)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PAYLOAD_TOO_LARGE, "invalid_config").await;

    // exactly the limit is fine (streamed, not held)
    srv.run(&c, &id, "busybox truncate -s 104857600 /data/huge")
        .await;
    let mut r = c
        .get(mpath("/files/data/huge"))
        .bearer_auth(&srv.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.expect("download chunk") {
        n += chunk.len() as u64;
    }
    assert_eq!(n, LIMIT);

    // an empty file and a missing one
    let r = c
        .put(mpath("/files/data/empty"))
        .bearer_auth(&srv.key)
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .get(mpath("/files//data/empty"))
        .bearer_auth(&srv.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = c
        .get(mpath("/files//data/no/such"))
        .bearer_auth(&srv.key)
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND, "not_found").await;
    // a directory is refused with its type, before any byte
    let r = c
        .get(mpath("/files//data"))
        .bearer_auth(&srv.key)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error() || r.status().is_server_error(),
        "{}",
        r.status()
    );
    assert_eq!(content_type(&r), "application/problem+json");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_64_mib_file_streams_through_the_fleet_in_bounded_memory() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = common_registry::shared().reference("test/busybox:latest");
    with_server("sfs", move |srv| scenario(srv, image)).await;
}

//! The fleet when things go wrong, against real VMs and a `smolfleet serve` child process (so
//! its descriptors can be counted): a machine deleted during an exec, a VMM killed with
//! SIGKILL during one, an exec stream whose client goes away, 100 concurrent execs over four
//! machines, a full disk under the fleet's home, a registry that does not answer during a
//! create. Each answer is a typed problem, never a bare 500, and nothing leaks or half-stays.

mod child;
#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;
mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use child::{qemu_pids, serve_with, unpooled, with_server, Server};
use support::{content_type, json_ok};

fn image() -> String {
    common_registry::shared().reference("test/busybox:latest")
}

/// A problem+json answer: its status and body (a typed `code` asserted).
async fn typed_problem(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let ct = content_type(&r);
    let text = r.text().await.expect("body");
    assert_eq!(ct, "application/problem+json", "{status}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        v["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{status}: {text}"
    );
    assert_eq!(v["status"], status.as_u16(), "{text}");
    (status, v)
}

/// Waits (at most 60 s) until the guest file `path` of machine `id` exists.
async fn wait_for_file(srv: &Server, c: &reqwest::Client, id: &str, path: &str) {
    for _ in 0..600 {
        let r = c
            .get(srv.url(&format!("/v1/machines/{id}/files/{path}")))
            .bearer_auth(&srv.key)
            .send()
            .await
            .expect("read file");
        if r.status() == StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} never appeared in {id}");
}

async fn get(srv: &Server, c: &reqwest::Client, p: &str) -> reqwest::Response {
    c.get(srv.url(p))
        .bearer_auth(&srv.key)
        .send()
        .await
        .expect("GET")
}

/// (a) DELETE while an exec runs: the exec ends with a typed problem (the machine went away
/// under it), not a 500; the machine is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_deleted_during_an_exec() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = image();
    with_server("sfa", move |srv| async move {
        let c = unpooled();
        let id = srv.create(&c, &image, None).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (s2, c2, id2) = (srv.url(""), c.clone(), id.clone());
        let key = srv.key.clone();
        let running = tokio::spawn(async move {
            c2.post(format!("{s2}/v1/machines/{id2}/exec"))
                .bearer_auth(&key)
                .json(&json!({"command": ["sh", "-c", "echo $$ > /data/pid; sleep 300"]}))
                .send()
                .await
                .expect("exec")
        });
        wait_for_file(&srv, &c, &id, "data/pid").await;
        let r = c
            .delete(srv.url(&format!("/v1/machines/{id}")))
            .bearer_auth(&srv.key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let (status, p) = typed_problem(running.await.unwrap()).await;
        eprintln!("exec under a delete: {status} {p}");
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{p}");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{p}");
        assert_eq!(p["code"], "machine_interrupted", "{p}");
        assert_eq!(p["machine"], id.as_str(), "{p}");
        // it says the machine was deleted, not how its VMM ended
        let detail = p["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("deleted") && !detail.contains("SIGKILL"),
            "{p}"
        );
        let r = get(&srv, &c, &format!("/v1/machines/{id}")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(qemu_pids(&id).is_empty(), "a VMM outlived the delete");
    })
    .await;
}

/// (b) The VMM killed with SIGKILL during an exec: `machine_interrupted`, the record says
/// stopped, and the next exec boots the machine again.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_on_a_machine_whose_vmm_was_killed() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = image();
    with_server("sfb", move |srv| async move {
        let c = unpooled();
        let id = srv.create(&c, &image, None).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        srv.run(&c, &id, "echo kept > /data/kept").await;
        let (s2, c2, id2) = (srv.url(""), c.clone(), id.clone());
        let key = srv.key.clone();
        let running = tokio::spawn(async move {
            c2.post(format!("{s2}/v1/machines/{id2}/exec"))
                .bearer_auth(&key)
                .json(&json!({"command": ["sh", "-c", "busybox sync; echo $$ > /tmp/pid; sleep 300"]}))
                .send()
                .await
                .expect("exec")
        });
        wait_for_file(&srv, &c, &id, "tmp/pid").await;
        let pids = qemu_pids(&id);
        assert_eq!(pids.len(), 1, "one VMM for {id}: {pids:?}");
        let st = std::process::Command::new("kill")
            .args(["-9", &pids[0].to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -9 {}", pids[0]);
        let (status, p) = typed_problem(running.await.unwrap()).await;
        eprintln!("exec under a killed VMM: {status} {p}");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{p}");
        assert_eq!(p["code"], "machine_interrupted", "{p}");
        // the record is reconciled: not running (the VMM is gone)
        let g = json_ok(
            get(&srv, &c, &format!("/v1/machines/{id}")).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(g["state"], "stopped", "{g}");
        assert_eq!(g["ready"], false, "{g}");
        // the next exec boots it again; the disk kept what was synced
        assert_eq!(srv.run(&c, &id, "cat /data/kept").await, "kept\n");
        let g = json_ok(
            get(&srv, &c, &format!("/v1/machines/{id}")).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(g["state"], "running", "{g}");
    })
    .await;
}

/// (c) A client that goes away in the middle of an exec stream: the command is killed in the
/// guest, and the server's descriptors come back to where they were.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_stream_whose_client_goes_away() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = image();
    with_server("sfc", move |srv| async move {
        let c = unpooled();
        let id = srv.create(&c, &image, None).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        srv.run(&c, &id, "true").await;
        let baseline = srv.fds_steady().await;
        for round in 0..3 {
            let pidfile = format!("/data/stream-{round}");
            // a chatty command, then one that goes silent after its first line
            let script = if round < 2 {
                format!("echo $$ > {pidfile}; while :; do echo tick; busybox sleep 0.1; done")
            } else {
                format!("echo $$ > {pidfile}; echo tick; exec busybox sleep 600")
            };
            let streamer = unpooled();
            let mut r = streamer
                .post(srv.url(&format!("/v1/machines/{id}/exec/stream")))
                .bearer_auth(&srv.key)
                .json(&json!({"command": ["sh", "-c", script]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let mut seen = String::new();
            while !seen.contains("tick") {
                let chunk = r.chunk().await.unwrap().expect("an event before the end");
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
            // the client goes away mid-stream
            drop(r);
            drop(streamer);
            let check = format!("kill -0 $(cat {pidfile}) 2>/dev/null && echo alive || echo gone");
            let mut state = String::new();
            for _ in 0..300 {
                state = srv.run(&c, &id, &check).await;
                if state == "gone\n" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(state, "gone\n", "the command outlived its client");
        }
        let after = srv.fds_settle(baseline).await;
        assert!(
            after <= baseline,
            "the server holds {after} descriptors, {baseline} before the streams"
        );
    })
    .await;
}

/// (d) 100 concurrent execs over HTTP against four machines: every output is the right one
/// (from the right machine), and the server's descriptors come back to the baseline.
#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_execs_on_four_machines() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = image();
    with_server("sfd", move |srv| async move {
        let c = unpooled();
        let made = futures::future::join_all((0..4).map(|_| srv.create(&c, &image, None))).await;
        let ids: Vec<String> = made
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        for id in &ids {
            srv.run(&c, id, "true").await;
        }
        let baseline = srv.fds_steady().await;
        let srv = std::sync::Arc::new(srv);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let (srv, c, id) = (srv.clone(), c.clone(), ids[i % 4].clone());
                tokio::spawn(async move {
                    let script = format!("echo {i}; hostname; head -c 65536 /dev/zero | wc -c");
                    let out = srv.run(&c, &id, &script).await;
                    (i, id, out)
                })
            })
            .collect();
        for t in tasks {
            let (i, id, out) = t.await.expect("exec task");
            assert_eq!(out, format!("{i}\n{id}\n65536\n"), "exec {i} on {id}");
        }
        let after = srv.fds_settle(baseline).await;
        assert!(
            after <= baseline,
            "the server holds {after} descriptors, {baseline} before the execs"
        );
    })
    .await;
}

/// A tmpfs of `mib` MiB mounted on a fresh directory (unmounted when dropped), or `None`
/// where this process may not mount (the test says so and skips).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("sfe")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        if !st.success() {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("cannot unmount {}", self.0.path().display());
        }
    }
}

/// Fills the file system of `dir` with `dir/filler`: its size.
fn fill(dir: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).expect("create the filler");
    let chunk = vec![0xa5u8; 1 << 20];
    let mut n = 0u64;
    for size in [1 << 20, 4096, 1] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(w) => n += w as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
    }
    n
}

/// (e) The fleet's home on a full disk: a create and a file write are typed problems (507 or
/// a coded 5xx), nothing is corrupted: the database still opens and lists (after a restart
/// too) and the existing machine still runs commands.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_the_fleet_home() {
    if common::vm_assets().is_none() {
        return;
    }
    let Some(fs) = Tmpfs::mount(1024) else {
        return;
    };
    let image = image();
    let mnt = fs.0.path().to_path_buf();
    let home = mnt.join("fleet");
    let srv = child::serve(&home).await;
    let home2 = home.clone();
    let run = tokio::spawn(async move {
        let home = home2;
        let c = unpooled();
        let id = srv.create(&c, &image, Some("before")).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        srv.run(&c, &id, "echo ok > /data/before").await;
        let filled = fill(&mnt);
        eprintln!("filled {filled} bytes");

        // a create: a typed problem, and no record left
        let r = c
            .post(srv.url("/v1/machines"))
            .bearer_auth(&srv.key)
            .json(&json!({"name": "after", "source": {"type": "image", "reference": image}}))
            .send()
            .await
            .unwrap();
        let (status, p) = typed_problem(r).await;
        eprintln!("create on a full disk: {status} {p}");
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{p}");
        assert_eq!(p["code"], "storage_error", "{p}");
        // a file write into the machine (its disk is on the full file system): answered,
        // typed if it fails
        let r = c
            .put(srv.url(&format!("/v1/machines/{id}/files//data/after.bin")))
            .bearer_auth(&srv.key)
            .body(vec![7u8; 8 << 20])
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::NO_CONTENT {
            let (status, p) = typed_problem(r).await;
            eprintln!("write on a full disk: {status} {p}");
            assert!(status.is_client_error() || status.is_server_error());
        }
        // the guest flushes its disk onto the full file system: answered, not a paused VM
        let r = c
            .post(srv.url(&format!("/v1/machines/{id}/exec")))
            .bearer_auth(&srv.key)
            .json(&json!({"command": ["busybox", "sync"], "timeoutSeconds": 60}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        eprintln!("sync on a full disk: {status} {text}");
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_ne!(v["exitCode"], 127, "{text}");
        // a command that must reach the disk sees the host's error (the VM is not paused)
        let v = json_ok(
            srv.exec(
                &c,
                &id,
                &[
                    "busybox",
                    "dd",
                    "if=/dev/zero",
                    "of=/data/x",
                    "bs=1048576",
                    "count=16",
                    "conv=fsync",
                ],
            )
            .await,
            StatusCode::OK,
        )
        .await;
        eprintln!("dd on a full disk: {v}");
        assert_ne!(v["exitCode"], 0, "{v}");
        // the machine still runs commands and reads what it had
        let v = json_ok(
            srv.exec(&c, &id, &["cat", "/data/before"]).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(v["stdout"], "ok\n", "{v}");
        // the database lists exactly the one machine
        let list = json_ok(get(&srv, &c, "/v1/machines").await, StatusCode::OK).await;
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["before"], "{list}");

        // space back: a restart opens the same database, and a create works again
        std::fs::remove_file(mnt.join("filler")).expect("remove the filler");
        let key = srv.key.clone();
        drop(srv);
        let srv = serve_with(&home, Some(key)).await;
        let list = json_ok(get(&srv, &c, "/v1/machines").await, StatusCode::OK).await;
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        assert_eq!(list[0]["id"], id.as_str(), "{list}");
        let v = json_ok(
            srv.exec(&c, &id, &["cat", "/data/before"]).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(v["stdout"], "ok\n", "{v}");
        let again = srv.create(&c, &image, Some("after")).await;
        assert_eq!(again["name"], "after");
    })
    .await;
    // the VMs first (their disks are on the tmpfs), then the tmpfs
    child::delete_all(&home).await;
    drop(fs);
    if let Err(e) = run {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// (f) A registry that does not answer during a create: a typed problem, and the machine is
/// not half-made (not listed, its name free again, nothing on the node).
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_down_during_a_create() {
    if common::vm_assets().is_none() {
        return;
    }
    let image = image();
    with_server("sff", move |srv| async move {
        let c = unpooled();
        // a port nothing listens on
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let down = format!("127.0.0.1:{port}/test/busybox:latest");
        let r = c
            .post(srv.url("/v1/machines"))
            .bearer_auth(&srv.key)
            .json(&json!({"name": "reg", "source": {"type": "image", "reference": down}}))
            .send()
            .await
            .unwrap();
        let (status, p) = typed_problem(r).await;
        eprintln!("create with the registry down: {status} {p}");
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{p}");
        assert_eq!(p["code"], "connection", "{p}");
        let list = json_ok(get(&srv, &c, "/v1/machines").await, StatusCode::OK).await;
        assert_eq!(list, json!([]), "a half-made machine is listed");
        let engine = smolmachines::local::LocalBackend::open_home(srv.home.join("engine"));
        let on_node = smolmachines::Machine::list_on(&*engine, &Default::default())
            .await
            .unwrap();
        assert!(on_node.is_empty(), "engine leftovers: {on_node:?}");
        let dir = srv.home.join("engine/machines");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
        // the name is free again
        let m = srv.create(&c, &image, Some("reg")).await;
        assert_eq!(m["name"], "reg");
        assert_eq!(
            json_ok(get(&srv, &c, "/v1/machines").await, StatusCode::OK)
                .await
                .as_array()
                .unwrap()
                .len(),
            1
        );
    })
    .await;
}

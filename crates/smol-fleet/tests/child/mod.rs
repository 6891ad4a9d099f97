//! A `smolfleet serve` child process for the tests that measure the server itself (its memory,
//! its open file descriptors), and the clean-up of the machines it leaves on its node.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::json_ok;

/// A running `smolfleet serve` over a home.
pub struct Server {
    pub child: Child,
    pub pid: u32,
    pub url: String,
    pub key: String,
    pub home: PathBuf,
}

/// Starts `smolfleet serve` over the fresh `home` on 127.0.0.1:0 (killed when dropped).
pub async fn serve(home: &Path) -> Server {
    serve_with(home, None).await
}

/// A `smolfleet serve` child over `home` on 127.0.0.1:0 (killed when dropped): its base URL
/// and the bootstrap key it printed (a home used before prints none).
///
/// With `SMOL_FLEET_TEST_STORE=postgres` it serves `--db` a database of the test process's own
/// PostgreSQL cluster (the same home, the same database).
pub async fn spawn(home: &Path) -> (Child, String, Option<String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smolfleet"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--home"])
        .arg(home);
    if std::env::var(smol_fleet::testing::STORE_VAR).as_deref() == Ok("postgres") {
        let url = smol_fleet::testing::pg::database_for_home(home)
            .await
            .expect("a database of the test's PostgreSQL cluster");
        cmd.args(["--db", &url]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("SMOL_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn smolfleet");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut key = None;
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(k) = line.split_whitespace().find(|w| w.starts_with("smk_")) {
                key = Some(k.to_string());
            }
            if let Some(u) = line.strip_prefix("listening on ") {
                return u.to_string();
            }
        }
        panic!("smolfleet exited before listening");
    })
    .await
    .expect("smolfleet did not start");
    // keep draining stdout so the server never blocks on it
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, key)
}

/// Starts `smolfleet serve` over `home`, used before when `key` is its bootstrap key.
pub async fn serve_with(home: &Path, known_key: Option<String>) -> Server {
    let (child, url, key) = spawn(home).await;
    let pid = child.id().expect("smolfleet pid");
    Server {
        child,
        pid,
        url,
        key: key
            .or(known_key)
            .expect("a fresh home prints the bootstrap key"),
        home: home.to_path_buf(),
    }
}

/// A client that keeps no idle connection (so the server's descriptors settle after each
/// request).
pub fn unpooled() -> Client {
    Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(300))
        .build()
        .expect("reqwest client")
}

impl Server {
    pub fn url(&self, p: &str) -> String {
        format!("{}{p}", self.url)
    }

    /// Creates a machine from `image` (201) and returns its record.
    pub async fn create(&self, c: &Client, image: &str, name: Option<&str>) -> Value {
        let r = c
            .post(self.url("/v1/machines"))
            .bearer_auth(&self.key)
            .json(&json!({"name": name, "source": {"type": "image", "reference": image}}))
            .send()
            .await
            .expect("create");
        json_ok(r, StatusCode::CREATED).await
    }

    /// `POST /exec` of `argv` on machine `id`: the response.
    pub async fn exec(&self, c: &Client, id: &str, argv: &[&str]) -> reqwest::Response {
        c.post(self.url(&format!("/v1/machines/{id}/exec")))
            .bearer_auth(&self.key)
            .json(&json!({"command": argv, "timeoutSeconds": 120}))
            .send()
            .await
            .expect("exec request")
    }

    /// A successful exec's stdout (exit 0 asserted).
    pub async fn run(&self, c: &Client, id: &str, script: &str) -> String {
        let r = self.exec(c, id, &["sh", "-c", script]).await;
        let v = json_ok(r, StatusCode::OK).await;
        assert_eq!(v["exitCode"], 0, "{script}: {v}");
        v["stdout"].as_str().unwrap_or_default().to_string()
    }

    /// The server's open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("read the server's fd dir")
            .count()
    }

    /// Waits (at most 60 s) for the server's descriptors to come back to `baseline` or below;
    /// the count seen last.
    pub async fn fds_settle(&self, baseline: usize) -> usize {
        let mut n = self.fds();
        for _ in 0..600 {
            if n <= baseline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            n = self.fds();
        }
        n
    }

    /// The server's descriptors once the count holds still for a second (at most 60 s: then
    /// the lowest seen), as a baseline.
    pub async fn fds_steady(&self) -> usize {
        let (mut last, mut same, mut low) = (self.fds(), 0, usize::MAX);
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = self.fds();
            low = low.min(n);
            same = if n == last { same + 1 } else { 0 };
            last = n;
            if same >= 10 {
                return n;
            }
        }
        low
    }

    /// `VmRSS` or `VmHWM` of the server, in bytes.
    pub fn mem(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read the server's status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        kib * 1024
    }

    /// Resets the server's peak RSS (`VmHWM`) to its current RSS (`clear_refs` 5).
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")
            .expect("reset the server's peak RSS (/proc/<pid>/clear_refs)");
    }
}

/// Deletes every machine on the node of fleet `home` (the tests' VMs are detached: they would
/// outlive the test).
pub async fn delete_all(home: &Path) {
    let engine = smolmachines::local::LocalBackend::open_home(home.join("engine"));
    let all = match smolmachines::Machine::list_on(&*engine, &Default::default()).await {
        Ok(all) => all,
        Err(e) => {
            eprintln!("cannot list the node's machines to clean up: {e}");
            return;
        }
    };
    for s in all {
        eprintln!("cleaning up machine {} ({})", s.name, s.state.as_str());
        match smolmachines::Machine::open_on(&*engine, &s.name).await {
            Ok(m) => {
                if let Err(e) = m.delete().await {
                    eprintln!("cannot delete machine {}: {e}", s.name);
                }
            }
            Err(e) => eprintln!("cannot open machine {}: {e}", s.name),
        }
    }
}

/// Runs `scenario` over a fresh home and a server, then deletes the machines left on the node
/// whatever happened; the scenario's panic is the test's.
pub async fn with_server<F, Fut>(prefix: &str, scenario: F)
where
    F: FnOnce(Server) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let home = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir");
    let srv = serve(home.path()).await;
    let run = tokio::spawn(scenario(srv)).await;
    delete_all(home.path()).await;
    if let Err(e) = run {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The pids of the QEMU processes whose command line names `needle` (a machine's engine name).
pub fn qemu_pids(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.split('\0')
                    .next()
                    .is_some_and(|p| p.contains("qemu-system"))
                    && c.contains(needle)
            })
        })
        .collect()
}

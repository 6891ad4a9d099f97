//! Fleet processes of the multi-host tests: `smolfleet` admin commands run to their end, and
//! long-running ones (`serve`, `node`) whose stdout lines are read as they come, their stderr in
//! a file; every wait bounded.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_smolfleet");
/// The most any one wait takes.
pub const WAIT: Duration = Duration::from_secs(60);

/// Runs `smolfleet ARGS` to its end; its stdout (it must succeed).
pub async fn admin(args: &[&str]) -> String {
    let out = tokio::time::timeout(WAIT, Command::new(BIN).args(args).output())
        .await
        .expect("the admin command ends")
        .expect("smolfleet runs");
    assert!(
        out.status.success(),
        "smolfleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `smolfleet ARGS`, which must fail; its stderr.
pub async fn admin_fails(args: &[&str]) -> String {
    let out = tokio::time::timeout(WAIT, Command::new(BIN).args(args).output())
        .await
        .expect("the admin command ends")
        .expect("smolfleet runs");
    assert!(!out.status.success(), "smolfleet {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

/// A running `smolfleet`, its stdout lines and its stderr in a file.
pub struct Proc {
    pub child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: std::path::PathBuf,
}

pub fn spawn(args: &[&str], stderr: &Path) -> Proc {
    spawn_with(args, stderr, &[])
}

/// [`spawn`] with `env` added to its environment.
pub fn spawn_with(args: &[&str], stderr: &Path, env: &[(&str, &Path)]) -> Proc {
    spawn_program(BIN, args, stderr, env)
}

/// `program ARGS` (e.g. `ip netns exec NS smolfleet …`), as [`spawn_with`].
pub fn spawn_program(program: &str, args: &[&str], stderr: &Path, env: &[(&str, &Path)]) -> Proc {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} starts: {e}"));
    let out = child.stdout.take().unwrap();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut out = BufReader::new(out).lines();
        while let Ok(Some(l)) = out.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Proc {
        child,
        lines,
        stderr: stderr.to_path_buf(),
    }
}

impl Proc {
    /// The first stdout line starting with `prefix`.
    pub async fn line(&mut self, prefix: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(l) = self.lines.recv().await {
                if l.starts_with(prefix) {
                    return Some(l);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(l)) => l,
            _ => panic!(
                "no line {prefix:?}; stderr: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ),
        }
    }
}

/// `node node-… of https://…; health on http://ADDR/health` as (node id, health URL).
pub fn node_line(l: &str) -> (String, String) {
    let id = l.split_whitespace().nth(1).unwrap().to_string();
    let health = l.rsplit(' ').next().unwrap().to_string();
    assert!(
        id.starts_with("node-") && health.starts_with("http://127.0.0.1:"),
        "{l}"
    );
    (id, health)
}

/// Runs a command to its end; whether it succeeded (its stderr logged when not).
pub fn sh(program: &str, args: &[&str]) -> bool {
    match std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            false
        }
    }
}

/// The pids of the VMMs (QEMU or the fake VMM, `support/fakevmm.py`) whose command line names
/// `dir`.
pub fn vmms_in(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            ((cmd.contains("qemu") || cmd.contains("fakevmm.py")) && cmd.contains(&needle))
                .then_some(pid)
        })
        .collect()
}

/// Kills, when dropped, every VMM whose command line names its directory ([`vmms_in`]): a test
/// that fails kills its `smolfleet node` processes (`kill_on_drop`), whose VMs outlive them by
/// design; this keeps them from outliving the test. Declare it after the directory (dropped
/// before).
pub struct QemuReaper(pub std::path::PathBuf);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        // the node processes were only sent SIGKILL: one may still start a VMM for a moment
        for _ in 0..5 {
            for pid in vmms_in(&self.0) {
                eprintln!("killing VMM {pid} left under {}", self.0.display());
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

//! The published Python client, `smolmachines` 1.32.2 from PyPI, unmodified, in a venv of its
//! own under `target/published-client/`, drives a real fleet (real VMs, the test registry):
//! create -> exec (exit code, 124) -> exec_stream -> write/read 1 MiB -> list by label -> stop -> connect ->
//! exec (auto-start) -> delete -> NOT_FOUND, and a bad key -> UNAUTHORIZED.
//!
//! The venv is made on first use (`pip download --no-deps smolmachines==1.32.2`); without
//! PyPI the test skips with a message (`SMOL_PUBLISHED_CLIENT=required` fails instead).

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;

use std::path::{Path, PathBuf};
use std::process::Command;

const WHEEL_VERSION: &str = "1.32.2";

fn skip_or_fail(why: &str) -> Option<PathBuf> {
    if std::env::var("SMOL_PUBLISHED_CLIENT").as_deref() == Ok("required") {
        panic!("the published client is required (SMOL_PUBLISHED_CLIENT=required) but {why}");
    }
    eprintln!("skipping the published-client test: {why}");
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The venv's python with the published client installed, made if missing.
fn published_python() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/published-client");
    let python = dir.join("venv/bin/python");
    let installed = |p: &Path| {
        Command::new(p)
            .args([
                "-c",
                "import importlib.metadata as m; print(m.version('smolmachines'))",
            ])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == WHEEL_VERSION
            })
    };
    if installed(&python) {
        return Some(python);
    }
    let made = (|| {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let spec = format!("smolmachines=={WHEEL_VERSION}");
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", &spec, "-d"])
            .arg(&dir))?;
        run(Command::new("python3")
            .args(["-m", "venv"])
            .arg(dir.join("venv")))?;
        let wheel = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&format!("smolmachines-{WHEEL_VERSION}-")) && n.ends_with(".whl")
                })
            })
            .ok_or("no wheel downloaded")?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--no-deps"])
            .arg(&wheel))
    })();
    match made {
        Ok(()) if installed(&python) => Some(python),
        Ok(()) => skip_or_fail("the installed client does not report its version"),
        Err(e) => skip_or_fail(&format!("it cannot be installed: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_published_python_client_drives_the_fleet() {
    if common::vm_assets().is_none() {
        return;
    }
    let Some(python) = published_python() else {
        return;
    };
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfp")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = smol_fleet::testing::spawn(home.path()).await.unwrap();
    let key = srv.admin_key.clone().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/published_client.py");
    let image = reg.reference("test/busybox:latest");
    let base = srv.base_url.clone();
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args([&base, &key, &image])
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("SMOL_CLOUD_TOKEN")
        .env_remove("SMOL_CLOUD_URL")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("published client: OK"), "{text}");
    let left = smolmachines::Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

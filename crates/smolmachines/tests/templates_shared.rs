//! VM tests of booted templates kept in the engine home across processes (issue 12,
//! `local::template_store`): a template built by one process is used by the next; two
//! processes building one key build it once; a template from another boot, without its RAM
//! file or with a damaged device state is rebuilt (and the create succeeds); GC removes an
//! unused one and never one in use; `SMOL_TEMPLATES=0` boots cold.
//!
//! The other processes are this test binary run again for [`child_creates_one_machine`]
//! alone. Whether a template was built or used is read from its manifest (`build_id`) and
//! from the child's count of builds, never from timings.

mod common;

use std::path::{Path, PathBuf};

use common::{config, engine, run, vm_assets};
use smolmachines::local::template_store::{self, Manifest, Policy};
use smolmachines::local::{template, LocalBackend, LocalMachine};
use smolmachines::MachineBackend;

const CHILD_HOME: &str = "SMOL_TEST_TEMPLATE_CHILD_HOME";
const CHILD_NAME: &str = "SMOL_TEST_TEMPLATE_CHILD_NAME";

/// stdout of `script`, which must succeed.
async fn out(m: &LocalMachine, script: &str) -> String {
    let r = run(m, script).await;
    assert_eq!(r.exit_code, 0, "{script}: {r:?}");
    r.stdout.trim().to_string()
}

/// Not a test of its own: what a child process runs (see the module documentation). It
/// creates one machine in `$SMOL_TEST_TEMPLATE_CHILD_HOME` (templates as `SMOL_TEMPLATES`
/// says, no warm pool), checks its hostname, deletes it and prints how many templates it built.
#[tokio::test]
async fn child_creates_one_machine() {
    let Ok(home) = std::env::var(CHILD_HOME) else {
        return;
    };
    let name = std::env::var(CHILD_NAME).expect("the child's machine name");
    let assets = vm_assets().expect("the parent had assets");
    let engine = LocalBackend::at(&home)
        .with_assets(assets)
        .with_template_pool(0);
    let m = engine.create_machine(config(Some(&name))).await.unwrap();
    assert_eq!(out(&m, "hostname").await, name);
    m.delete().await.unwrap();
    println!("CHILD builds={}", template::builds());
}

/// Runs [`child_creates_one_machine`] in a new process for `home`; how many templates it built.
async fn child(home: &Path, name: &str, templates: &str) -> usize {
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "child_creates_one_machine",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_HOME, home)
        .env(CHILD_NAME, name)
        .env("SMOL_TEMPLATES", templates)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {name}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // (the harness's "test ... " may come first on the line)
    let builds: String = stdout
        .split("CHILD builds=")
        .nth(1)
        .unwrap_or_else(|| panic!("child {name} said nothing: {stdout}"))
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    builds.parse().unwrap()
}

/// The keys of the templates kept in `home` (their manifests).
fn kept(home: &Path) -> Vec<String> {
    let mut keys: Vec<String> = std::fs::read_dir(home.join(template_store::DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_suffix(".json").map(String::from)
        })
        .collect();
    keys.sort();
    keys
}

fn manifest(home: &Path, key: &str) -> Manifest {
    template_store::read_manifest(home, key).unwrap()
}

fn ram_file(engine: &LocalBackend, key: &str) -> PathBuf {
    engine.home().join("machines").join(key).join("frozen.ram")
}

fn state_file(engine: &LocalBackend, key: &str) -> PathBuf {
    engine
        .run_dir()
        .join("machines")
        .join(key)
        .join("frozen.state")
}

/// Templates, no warm pool: every create is a clone of the kept template.
fn templated() -> Option<(LocalBackend, tempfile::TempDir)> {
    let (engine, dir) = engine()?;
    Some((engine.with_templates(true).with_template_pool(0), dir))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_built_by_one_process_is_used_by_the_next_and_rebuilt_when_unsound() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let home = dir.path();
    assert_eq!(
        child(home, "c1", "1").await,
        1,
        "the first process builds it"
    );
    let keys = kept(home);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = &keys[0];
    let first = manifest(home, key);
    assert_ne!(first.builder_pid, std::process::id());
    assert_eq!(first.boot_id, template_store::boot_id());
    // this process clones it: no build (the manifest is the child's)
    let a = engine.create_machine(config(Some("a"))).await.unwrap();
    assert_eq!(out(&a, "hostname").await, "a");
    assert_eq!(manifest(home, key), first, "used as it was, not rebuilt");
    // a reboot empties the RAM file's tmpfs: rebuilt
    std::fs::remove_file(ram_file(&engine, key)).unwrap();
    let b = engine.create_machine(config(Some("b"))).await.unwrap();
    assert_eq!(out(&b, "hostname").await, "b");
    let second = manifest(home, key);
    assert_ne!(
        second.build_id, first.build_id,
        "rebuilt without its RAM file"
    );
    assert_eq!(second.builder_pid, std::process::id());
    // a template of another boot: rebuilt
    let mut other = second.clone();
    other.boot_id = "00000000-0000-0000-0000-000000000000".into();
    std::fs::write(
        template_store::manifest_path(home, key),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    let c = engine.create_machine(config(Some("c"))).await.unwrap();
    assert_eq!(out(&c, "hostname").await, "c");
    let third = manifest(home, key);
    assert_ne!(
        third.build_id, second.build_id,
        "rebuilt after a boot id change"
    );
    assert_eq!(third.boot_id, template_store::boot_id());
    // a damaged device state: rebuilt, and the create succeeds
    let state = state_file(&engine, key);
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let d = engine.create_machine(config(Some("d"))).await.unwrap();
    assert_eq!(out(&d, "hostname").await, "d");
    let fourth = manifest(home, key);
    assert_ne!(fourth.build_id, third.build_id, "rebuilt after damage");
    assert_eq!(std::fs::metadata(&state).unwrap().len(), fourth.state_bytes);
    // every machine is its own and still works (those made of the removed templates too)
    for (m, n) in [(&a, "a"), (&b, "b"), (&c, "c"), (&d, "d")] {
        assert_eq!(out(m, "hostname").await, n);
    }
    // the next process uses the rebuilt one
    assert_eq!(child(home, "c2", "1").await, 0, "the kept template is used");
    assert_eq!(manifest(home, key), fourth);
    for m in [a, b, c, d] {
        m.delete().await.unwrap();
    }
    engine.drop_templates().await.unwrap();
    assert!(kept(home).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_that_need_one_template_build_it_once() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let home = dir.path();
    let (x, y) = tokio::join!(child(home, "x", "1"), child(home, "y", "1"));
    assert_eq!(x + y, 1, "built by one of them: {x} + {y}");
    assert_eq!(kept(home).len(), 1);
    engine.drop_templates().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_an_unused_template_never_one_in_use() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let home = dir.path();
    let m = engine.create_machine(config(Some("g"))).await.unwrap();
    let keys = kept(home);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = &keys[0];
    let none = Policy {
        max_age: std::time::Duration::ZERO,
        max: 0,
    };
    // in use (a create cloning it holds its shared lock): kept
    let lock = template_store::try_lock(&template_store::lock_path(home, key), false)
        .unwrap()
        .expect("not locked exclusively");
    assert_eq!(engine.gc_templates(none).await.unwrap(), 0);
    assert_eq!(kept(home), keys);
    assert!(ram_file(&engine, key).exists());
    drop(lock);
    // a policy that keeps it: kept
    assert_eq!(engine.gc_templates(Policy::from_env()).await.unwrap(), 0);
    assert_eq!(kept(home), keys);
    // unused and past the policy: removed, with its record and files
    assert_eq!(engine.gc_templates(none).await.unwrap(), 1);
    assert!(kept(home).is_empty());
    assert!(!ram_file(&engine, key).exists());
    assert!(!state_file(&engine, key).exists());
    assert!(!home.join("machines").join(key).exists());
    // the machine made of it does not depend on it
    assert_eq!(
        out(&m, "hostname; echo x > /tmp/f; cat /tmp/f").await,
        "g\nx"
    );
    m.delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn smol_templates_0_boots_cold() {
    let Some((_engine, dir)) = engine() else {
        return;
    };
    let home = dir.path();
    assert_eq!(child(home, "cold", "0").await, 0);
    assert!(kept(home).is_empty(), "no template: {:?}", kept(home));
}

/// A device state damaged in place (its size unchanged, so only the clone finds out): the
/// clone fails, the create boots cold and succeeds, the template is discarded (its manifest
/// removed) and the next create rebuilds it.
#[tokio::test(flavor = "multi_thread")]
async fn a_template_whose_clone_fails_is_discarded_and_the_create_boots_cold() {
    let Some((engine, dir)) = templated() else {
        return;
    };
    let home = dir.path();
    let a = engine.create_machine(config(Some("fa"))).await.unwrap();
    let keys = kept(home);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = &keys[0];
    let first = manifest(home, key);
    let state = state_file(&engine, key);
    let len = std::fs::metadata(&state).unwrap().len() as usize;
    std::fs::write(&state, vec![0u8; len]).unwrap();
    let b = engine.create_machine(config(Some("fb"))).await.unwrap();
    assert_eq!(out(&b, "hostname").await, "fb");
    // booted cold: its disk is no overlay over the template's
    let layers: Vec<String> = std::fs::read_dir(home.join("machines").join("fb"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        !layers.iter().any(|l| l.starts_with("base-frozen-")),
        "{layers:?}"
    );
    assert!(kept(home).is_empty(), "the template was discarded");
    let c = engine.create_machine(config(Some("fc"))).await.unwrap();
    assert_eq!(out(&c, "hostname").await, "fc");
    let rebuilt = manifest(home, key);
    assert_ne!(rebuilt.build_id, first.build_id, "rebuilt");
    for m in [a, b, c] {
        m.delete().await.unwrap();
    }
    engine.drop_templates().await.unwrap();
}

//! Admission control (issue 16): `smol machine create`, run inside a memory cgroup of 1.5 GiB,
//! makes 512 MiB machines until one is refused with the typed error; the earlier machines still
//! answer exec and nothing was OOM-killed. Boots real VMs; needs root (it makes the cgroup) and
//! a cgroup v1 memory hierarchy or a v2 one that lets it enable `memory` below its own cgroup.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn assets_dir() -> PathBuf {
    std::env::var_os("SMOL_ASSETS")
        .map(Into::into)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".local/share/smol/assets")
        })
}

fn vm_ready() -> bool {
    if assets_dir().join("vmlinux").is_file() {
        return true;
    }
    if std::env::var("SMOL_VM_TESTS").as_deref() == Ok("required") {
        panic!("the VM tests are required but the assets are missing: run `make setup`");
    }
    eprintln!("skipping: no guest assets (make setup)");
    false
}

const LIMIT_MIB: u64 = 1536;
const MAX_MACHINES: usize = 12;

/// A memory cgroup made for the test, removed on drop.
struct Cg {
    dir: PathBuf,
    v2: bool,
}

impl Cg {
    /// A child of this process's memory cgroup limited to `mib`, or why there is none.
    fn make(mib: u64) -> Result<Cg, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let root = Path::new("/sys/fs/cgroup");
        let name = format!("smol-admission-test-{}", std::process::id());
        for l in own.lines() {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (
                p.next().unwrap(),
                p.next().unwrap_or(""),
                p.next().unwrap_or(""),
            );
            if ctrls.split(',').any(|c| c == "memory") && root.join("memory").is_dir() {
                let dir = root
                    .join("memory")
                    .join(path.trim_start_matches('/'))
                    .join(&name);
                std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let cg = Cg { dir, v2: false };
                std::fs::write(
                    cg.dir.join("memory.limit_in_bytes"),
                    (mib << 20).to_string(),
                )
                .map_err(|e| e.to_string())?;
                return Ok(cg);
            }
        }
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v1 memory hierarchy and no v2 line")?;
        let parent = root.join(path.trim_start_matches('/'));
        std::fs::write(parent.join("cgroup.subtree_control"), "+memory")
            .map_err(|e| format!("enabling memory below {}: {e}", parent.display()))?;
        let dir = parent.join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cg = Cg { dir, v2: true };
        std::fs::write(cg.dir.join("memory.max"), (mib << 20).to_string())
            .map_err(|e| e.to_string())?;
        Ok(cg)
    }

    /// OOM kills in the cgroup so far (v2 `memory.events`, v1 `memory.oom_control`; a v1
    /// kernel without the counter: the `under_oom` flag).
    fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let get = |k: &str| {
            text.lines().find_map(|l| {
                let (a, b) = l.split_once(' ')?;
                (a == k).then(|| b.trim().parse::<u64>().ok())?
            })
        };
        get(key).or_else(|| get("under_oom")).unwrap_or(0)
    }

    /// `smol` with these arguments, its process moved into the cgroup before it runs.
    fn smol(&self, home: &Path, args: &[&str]) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .arg(env!("CARGO_BIN_EXE_smol"))
            .args(args)
            .env("SMOL_HOME", home)
            .env("SMOL_RUN_DIR", home.join("run"))
            .env("SMOL_ASSETS", assets_dir())
            .env_remove("SMOL_ADMISSION")
            .env_remove("SMOL_ADMISSION_HEADROOM_MIB")
            .output()
            .expect("run smol")
    }
}

/// Removes `dir` and the (empty) cgroups below it, deepest first.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    std::fs::remove_dir(dir)
}

impl Drop for Cg {
    fn drop(&mut self) {
        // the machines' cgroups below it (`<engine>/<machine>`) stay after an `rm` in another
        // process than the one that made them, until a reaper sweep: removed here too
        for _ in 0..100 {
            match remove_tree(&self.dir) {
                Ok(()) => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("the test cgroup {} is left behind", self.dir.display());
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_create_the_cgroup_cannot_hold_is_refused_and_the_others_keep_running() {
    if !vm_ready() {
        return;
    }
    let cg = match Cg::make(LIMIT_MIB) {
        Ok(cg) => cg,
        Err(e) if std::env::var("SMOL_VM_TESTS").as_deref() == Ok("required") => {
            panic!("cannot make the test's memory cgroup: {e}")
        }
        Err(e) => return eprintln!("skipping: cannot make a memory cgroup: {e}"),
    };
    let home = tempfile::Builder::new()
        .prefix("sma")
        .tempdir_in("/tmp")
        .unwrap();
    let mut made = Vec::new();
    let mut refused = None;
    for i in 0..MAX_MACHINES {
        let name = format!("adm{i}");
        let o = cg.smol(
            home.path(),
            &["machine", "create", "--name", &name, "--memory", "512"],
        );
        if o.status.success() {
            made.push(name);
            continue;
        }
        refused = Some(text(&o.stderr));
        break;
    }
    let execs: Vec<(String, Output)> = made
        .iter()
        .map(|n| {
            let o = cg.smol(home.path(), &["machine", "exec", n, "--", "echo", "up"]);
            (n.clone(), o)
        })
        .collect();
    let ls = text(&cg.smol(home.path(), &["machine", "ls"]).stdout);
    let kills = cg.oom_kills();
    let mut rm = vec!["machine", "rm"];
    rm.extend(made.iter().map(String::as_str));
    if !made.is_empty() {
        let o = cg.smol(home.path(), &rm);
        assert!(o.status.success(), "rm: {}", text(&o.stderr));
    }
    eprintln!(
        "{} machines of 512 MiB admitted in {LIMIT_MIB} MiB; refusal: {refused:?}",
        made.len()
    );
    let refused = refused.expect("every create passed: nothing was refused");
    assert!(!made.is_empty(), "the first create was refused: {refused}");
    assert!(
        refused.contains("needs 640 MiB of host memory"),
        "not the admission error: {refused}"
    );
    assert!(
        refused.contains("hint: stop or delete machines"),
        "{refused}"
    );
    let refused_name = format!("adm{}", made.len());
    assert!(
        !ls.contains(&refused_name),
        "the refused machine left a record: {ls}"
    );
    for (n, o) in execs {
        assert!(
            o.status.success() && text(&o.stdout).trim() == "up",
            "{n} no longer answers: {} {}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
    assert_eq!(kills, 0, "the OOM killer ran in the cgroup");
}

//! The `smol` CLI on the cloud target (`smol --cloud`, `SMOL_CLOUD_URL`, `SMOL_CLOUD_TOKEN`)
//! against a real fleet server on 127.0.0.1 over real VMs, an image from the test registry:
//! `run IMAGE -- ...` (exit code, both streams), `machine create|ls|exec|stop|exec (auto-start)
//! |rm`, a bad key, no key, and the local-only commands refused with `--cloud`.
//!
//! The `smol` binary is the one cargo built for this profile (`target/<profile>/smol`, next
//! to this test's `deps/`): `cargo build -p smol-cli` first. Without it, or without the guest
//! assets (`make setup`), the test skips with a message (`SMOL_VM_TESTS=required` fails).

#[path = "../../smolmachines/tests/common.rs"]
mod common;
#[path = "../../smolmachines/tests/common_registry/mod.rs"]
mod common_registry;

use std::path::PathBuf;
use std::process::Output;

use smol_fleet::testing::spawn;

/// `target/<profile>/smol`, the CLI built alongside this test, if it is there.
fn smol_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/smol_cli-<hash>
    let bin = exe.parent()?.parent()?.join("smol");
    if bin.is_file() {
        return Some(bin);
    }
    let why = format!("{} is not built (cargo build -p smol-cli)", bin.display());
    if std::env::var("SMOL_VM_TESTS").as_deref() == Ok("required") {
        panic!("the smol CLI is required (SMOL_VM_TESTS=required) but {why}");
    }
    eprintln!("skipping the CLI-against-fleet test: {why}");
    None
}

struct Cli {
    bin: PathBuf,
    url: String,
    key: String,
    /// A home of its own, so that nothing local is touched by mistake.
    home: tempfile::TempDir,
}

impl Cli {
    /// Runs `smol ARGS` with `SMOL_CLOUD_URL` and `SMOL_CLOUD_TOKEN=token`.
    async fn run_with(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .env("SMOL_CLOUD_URL", &self.url)
            .env("SMOL_HOME", self.home.path())
            .env("SMOL_LOG", "warn")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .env_remove("SMOL_CLOUD_TOKEN")
            .kill_on_drop(true);
        if let Some(t) = token {
            cmd.env("SMOL_CLOUD_TOKEN", t);
        }
        let out = tokio::time::timeout(std::time::Duration::from_secs(300), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("smol {args:?} ran over 300 s"))
            .expect("run smol");
        eprintln!(
            "smol {args:?} -> {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_with(Some(&self.key), args).await
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `machine ls` row of `name`: its words.
fn row(ls: &Output, name: &str) -> Option<Vec<String>> {
    text(&ls.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|w| w.first().map(String::as_str) == Some(name))
}

#[tokio::test(flavor = "multi_thread")]
async fn smol_cloud_run_and_machine_commands_through_the_fleet() {
    if common::vm_assets().is_none() {
        return;
    }
    let Some(bin) = smol_binary() else {
        return;
    };
    let reg = common_registry::shared();
    let home = tempfile::Builder::new()
        .prefix("sfl")
        .tempdir_in("/tmp")
        .unwrap();
    let srv = spawn(home.path()).await.unwrap();
    let cli = Cli {
        bin,
        url: srv.base_url.clone(),
        key: srv.admin_key.clone().unwrap(),
        home: tempfile::tempdir().unwrap(),
    };
    let image = reg.reference("test/busybox:latest");

    // run: a fresh machine on the fleet, the command's streams and exit code, then deleted
    let out = cli
        .run(&[
            "--cloud",
            "run",
            "--image",
            &image,
            "-e",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING; echo err >&2; exit 3",
        ])
        .await;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    // the image as the argument; no image is refused (the cloud needs one)
    let out = cli
        .run(&[
            "--cloud",
            "run",
            &image,
            "--",
            "sh",
            "-c",
            "echo positional",
        ])
        .await;
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "positional\n");
    let out = cli.run(&["--cloud", "run", "--", "true"]).await;
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("image"), "{}", text(&out.stderr));
    // the fleet's machines are the node's: none left by run
    let left = smolmachines::Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");

    // machine create (by SMOL_CLOUD_TOKEN alone: the key selects the cloud, SPEC 2.2)
    let name = format!("cli-{}", std::process::id());
    let out = cli
        .run(&[
            "machine",
            "create",
            "--image",
            &image,
            "--name",
            &name,
            "-l",
            "suite=cli",
        ])
        .await;
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), name);

    let ls = cli
        .run(&["--cloud", "machine", "ls", "-l", "suite=cli"])
        .await;
    assert!(ls.status.success());
    let r = row(&ls, &name).unwrap_or_else(|| panic!("{name} not listed: {}", text(&ls.stdout)));
    assert_eq!(r[1], "running", "{r:?}");
    let ls = cli.run(&["machine", "ls", "-l", "suite=other"]).await;
    assert!(ls.status.success() && row(&ls, &name).is_none());

    let out = cli
        .run(&[
            "machine",
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo kept > /root/f; cat /root/f",
        ])
        .await;
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "kept\n");

    // stop: the disk stays; exec starts it again
    assert!(cli.run(&["machine", "stop", &name]).await.status.success());
    let ls = cli.run(&["machine", "ls"]).await;
    assert_eq!(row(&ls, &name).expect("listed")[1], "stopped");
    let out = cli
        .run(&["machine", "exec", &name, "--", "cat", "/root/f"])
        .await;
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "kept\n");
    let out = cli
        .run(&["machine", "exec", &name, "--", "sh", "-c", "exit 7"])
        .await;
    assert_eq!(out.status.code(), Some(7));

    // a bad key: typed, with the hint, no key in the output; no key: the core's message
    let out = cli
        .run_with(Some("smk_not_a_key_of_this_fleet"), &["machine", "ls"])
        .await;
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("unauthorized") && err.contains("401"), "{err}");
    assert!(!err.contains("smk_not_a_key"), "{err}");
    let out = cli.run_with(None, &["--cloud", "machine", "ls"]).await;
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("SMOL_CLOUD_TOKEN"),
        "{}",
        text(&out.stderr)
    );
    // local-only commands say so instead of answering for this host
    for args in [&["--cloud", "doctor"][..], &["--cloud", "image", "ls"][..]] {
        let out = cli.run(args).await;
        assert_eq!(out.status.code(), Some(125));
        assert!(
            text(&out.stderr).contains("--cloud"),
            "{}",
            text(&out.stderr)
        );
    }

    // rm: gone from the fleet
    let out = cli.run(&["machine", "rm", &name]).await;
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), name);
    let ls = cli.run(&["machine", "ls"]).await;
    assert!(ls.status.success() && row(&ls, &name).is_none());
    let out = cli.run(&["machine", "exec", &name, "--", "true"]).await;
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    let left = smolmachines::Machine::list_on(&**srv.fleet.engine(), &Default::default())
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

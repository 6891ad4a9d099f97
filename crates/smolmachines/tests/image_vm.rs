//! Machines that boot into an OCI image pulled from the test registry (real registry, real VMs).

mod common;
mod common_registry;

use std::collections::BTreeMap;

use common::{argv, config, engine, sh};
use smolmachines::{Error, ExecOptions, MachineBackend};

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_runs_in_its_image() {
    let reg = common_registry::shared();
    let (engine, _dir) = engine();

    // a real-world image: Debian minbase with python3
    let mut cfg = config(Some("py"));
    cfg.image = Some(reg.reference("library/python:3.12"));
    let m = engine.create_machine(cfg).await.unwrap();
    let r = m
        .exec(
            &argv(&["python3", "-c", "print(2**10)"]),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "1024\n"), "{r:?}");
    let r = m
        .exec(&argv(&["cat", "/etc/os-release"]), &ExecOptions::default())
        .await
        .unwrap();
    assert!(r.stdout.contains("bookworm"), "{r:?}");
    // writes land on the machine's disk, over the read-only image
    m.write_file("/root/note", b"kept", None).await.unwrap();
    m.stop().await.unwrap();
    m.start().await.unwrap();
    assert_eq!(m.read_file("/root/note").await.unwrap(), b"kept");
    m.delete().await.unwrap();

    // the image config: Env under the caller's, WorkingDir unless the caller names one
    let mut cfg = config(Some("bb"));
    cfg.image = Some(reg.reference("test/busybox:latest"));
    let m = engine.create_machine(cfg).await.unwrap();
    let r = m
        .exec(
            &sh("echo $SMOL_FIXTURE; pwd; cat /etc/motd"),
            &ExecOptions::default(),
        )
        .await
        .unwrap();
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("busybox"), "{r:?}");
    assert_eq!(lines.next(), Some("/data"), "{r:?}");
    let opts = ExecOptions {
        env: BTreeMap::from([("SMOL_FIXTURE".to_string(), "mine".to_string())]),
        workdir: Some("/tmp".into()),
        ..Default::default()
    };
    let r = m.exec(&sh("echo $SMOL_FIXTURE; pwd"), &opts).await.unwrap();
    assert_eq!(r.stdout, "mine\n/tmp\n");
    m.delete().await.unwrap();

    // the Machine API's image calls use the same cache: the images above are listed, and a
    // pull of a cached image needs nothing new
    let pm = smolmachines::Machine::from_backend(std::sync::Arc::new(
        engine.create_machine(config(Some("lister"))).await.unwrap(),
    ));
    let listed: Vec<String> = pm
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert!(
        listed.iter().any(|r| r.ends_with("library/python:3.12")),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|r| r.ends_with("test/busybox:latest")),
        "{listed:?}"
    );
    let info = pm
        .pull_image(&reg.reference("test/busybox:latest"))
        .await
        .unwrap();
    assert!(
        info.digest.starts_with("sha256:") && info.architecture == "amd64" && info.os == "linux"
    );
    let e = pm
        .pull_image(&reg.reference("library/nope:2"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    pm.delete().await.unwrap();

    // an unknown image is a typed error naming it, and leaves no machine behind
    let mut cfg = config(Some("ghost"));
    let missing = reg.reference("library/nope:1");
    cfg.image = Some(missing.clone());
    let e = engine.create_machine(cfg).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { what } if what.contains("nope")),
        "{e:?}"
    );
    assert!(engine
        .list_machines(&BTreeMap::new())
        .await
        .unwrap()
        .is_empty());
}

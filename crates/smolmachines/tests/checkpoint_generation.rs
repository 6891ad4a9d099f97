//! VM test of a checkpoint whose agent speaks an older protocol generation (issue 12's failure
//! case "restore from a checkpoint of a previous protocol generation"): the agent of the source
//! is capped at generation 3 (`smol.protocol_max=3`, set by the test-only
//! `SMOL_TEST_AGENT_PROTOCOL_MAX`; crates/smol-protocol/VERSIONING.md), the machine is
//! checkpointed and restored, and the restored machine's host negotiates down to the
//! generation of the agent inside the checkpoint. Its own test binary: the variable is
//! process-wide, and no other test here may boot under it.
//! `SMOL_INITRD=$(scripts/dev-initramfs.sh) cargo test --release -p smolmachines --test
//! checkpoint_generation`.

mod common;

use std::sync::Arc;

use common::{config, engine, run};
use smolmachines::local::checkpoint_file;
use smolmachines::{CheckpointOptions, Machine, MachineBackend, RestoreOptions};

/// The first generation with the identity operation (hostname and RNG of a restored machine).
const IDENTITY: u16 = 4;
// this test caps the agent below the identity generation
const _: () = assert!(smol_protocol::PROTOCOL_VERSION >= IDENTITY);

#[tokio::test]
async fn a_checkpoint_of_an_older_agent_restores_speaking_its_generation() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    // the only test of this binary: nothing else boots while it is set
    std::env::set_var("SMOL_TEST_AGENT_PROTOCOL_MAX", "3");
    let mut c = config(Some("gen3-src"));
    c.branchable = Some(true);
    c.resources.memory_mb = Some(256);
    let src = engine
        .create_machine(c)
        .await
        .expect("create a capped agent");
    std::env::remove_var("SMOL_TEST_AGENT_PROTOCOL_MAX");
    assert_eq!(src.protocol_generation(), Some(3), "the agent was capped");
    let r = run(&src, "echo kept > /root/k && hostname").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(r.stdout.trim(), "gen3-src");

    let file = dir.path().join("g3.smolcheckpoint");
    let handle = Machine::from_backend(Arc::new(src.clone()));
    handle
        .checkpoint(CheckpointOptions {
            output: Some(file.clone()),
            store: None,
        })
        .await
        .expect("checkpoint of a generation-3 agent");
    let verified = checkpoint_file::verify(&file).expect("a valid checkpoint file");
    assert_eq!(verified.manifest.protocol_generation, 3);
    src.delete().await.unwrap();

    // no cap for the restore: the generation comes from the agent inside the checkpoint
    let restored = Machine::restore_checkpoint_on(
        &engine,
        file.to_str().unwrap(),
        "gen3-r",
        RestoreOptions::default(),
    )
    .await
    .expect("restore of a generation-3 checkpoint");
    let local = engine.live_machine("gen3-r").expect("the restored machine");
    assert_eq!(
        local.protocol_generation(),
        Some(3),
        "negotiated down to the agent's"
    );
    let r = run(&local, "cat /root/k; hostname").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    // generation 3 has no identity operation: the checkpointed hostname stays (documented in
    // docs/CHECKPOINTS.md), the machine is otherwise a machine like any other
    assert_eq!(r.stdout, "kept\ngen3-src\n");
    restored.write_file("/root/w", "w", None).await.unwrap();
    assert_eq!(restored.read_file("/root/w").await.unwrap(), b"w");
    restored.delete().await.unwrap();
}

//! The uid drop of a VMM started as root (`local::runas`, docs/threat-model.md section 6), with
//! real VMs: as root, every QEMU runs at a uid of its own (not 0, in the range, different for
//! each machine, no supplementary group), under its seccomp filter, and the machine works:
//! exec, files both ways, the agent reconnected (by descriptor), stop and start, a branch (the
//! source and the clone both dropped), a checkpoint and its restore; `SMOL_VMM_USER` drops
//! every VMM to one named user instead. A binary of its own: the variables are the process's.
//! Not root: nothing drops, the test says so and ends.

mod common;

use common::{config, engine, run};
use smolmachines::local::{runas, LocalBackend, LocalMachine};
use smolmachines::{BranchOptions, CheckpointOptions, Machine, MachineBackend, RestoreOptions};

/// The real, effective, saved and file-system uids of `pid`.
fn ids(pid: u32, field: &str) -> Vec<u32> {
    common::status_field(pid, field)
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect()
}

/// The one uid QEMU `pid` runs as, checked: every uid and gid the same, not root, the gid the
/// uid's number and the only group, seccomp on, no capabilities.
fn dropped_uid(pid: u32) -> u32 {
    let uids = ids(pid, "Uid");
    let uid = uids[0];
    assert_ne!(uid, 0, "QEMU {pid} runs as root");
    assert_eq!(uids, [uid; 4], "QEMU's uids");
    assert_eq!(ids(pid, "Gid"), [uid; 4], "QEMU's gids");
    assert_eq!(ids(pid, "Groups"), [uid], "QEMU's groups");
    assert_eq!(common::status_field(pid, "Seccomp"), "2", "-sandbox");
    assert_eq!(common::status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(common::status_field(pid, "CapEff"), "0000000000000000");
    uid
}

async fn branchable(engine: &LocalBackend, name: &str) -> LocalMachine {
    let mut c = config(Some(name));
    c.branchable = Some(true);
    c.resources.memory_mb = Some(256);
    engine.create_machine(c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_engines_vmms_run_as_uids_of_their_own_and_the_machines_work() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: nothing drops; skipped");
        return;
    }
    let claims = tempfile::tempdir().unwrap();
    // SAFETY: set before this binary's only test starts a machine; nothing else reads them yet.
    unsafe {
        std::env::remove_var(runas::USER_ENV);
        std::env::set_var(runas::RANGE_ENV, "1879500000-1879500999");
        std::env::set_var("SMOL_VMM_UID_CLAIMS", claims.path());
    }
    let Some((engine, dir)) = engine() else {
        return;
    };
    let in_range = |u: u32| (1_879_500_000..1_879_501_000).contains(&u);
    let mut c = config(Some("dropped"));
    c.resources.memory_mb = Some(256);
    let m = engine.create_machine(c).await.unwrap();
    let qemu = m.pid().unwrap();
    let uid = dropped_uid(qemu);
    assert!(in_range(uid), "{uid}");
    assert!(claims.path().join(uid.to_string()).exists(), "its claim");

    // it works: exec, files both ways, the agent reconnected by descriptor (QEMU cannot
    // reach the socket's path under the test's 0700 directory)
    assert_eq!(run(&m, "echo ok").await.stdout, "ok\n");
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    m.write_file("/root/f", &data, None).await.unwrap();
    assert_eq!(m.read_file("/root/f").await.unwrap(), data);
    m.reconnect().await.unwrap();
    assert_eq!(run(&m, "echo again").await.stdout, "again\n");

    // a branchable machine drops too, to another uid; it branches, source and clone go on,
    // the clone at a third uid
    let b = branchable(&engine, "dropped-src").await;
    let buid = dropped_uid(b.pid().unwrap());
    assert_ne!(buid, uid, "two machines share a uid");
    assert_eq!(run(&b, "echo 41 > /root/n").await.exit_code, 0);
    let (clone, _) = b
        .branch_machine("dropped-clone", &BranchOptions::default())
        .await
        .unwrap();
    let cuid = dropped_uid(clone.pid().unwrap());
    assert!(in_range(buid) && in_range(cuid));
    assert!(cuid != buid && cuid != uid, "{uid} {buid} {cuid}");
    assert_eq!(run(&clone, "cat /root/n").await.stdout, "41\n");
    // both disks are writable after the migration (the image was not reopened read-only)
    assert_eq!(
        run(&clone, "echo c > /root/w && sync && cat /root/w")
            .await
            .stdout,
        "c\n"
    );
    assert_eq!(
        run(&b, "echo s > /root/w && sync && cat /root/w")
            .await
            .stdout,
        "s\n"
    );

    // a checkpoint of the dropped source, restored: the restore drops as well
    let file = dir.path().join("r.smolcheckpoint");
    b.checkpoint(&CheckpointOptions {
        output: Some(file.clone()),
        store: None,
    })
    .await
    .unwrap();
    assert_eq!(run(&b, "cat /root/w").await.stdout, "s\n");
    let r = Machine::restore_checkpoint_on(
        &engine,
        file.to_str().unwrap(),
        "dropped-restored",
        RestoreOptions::default(),
    )
    .await
    .unwrap();
    let rr = r
        .exec(
            &["sh".into(), "-c".into(), "cat /root/n /root/w".into()],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(rr.stdout, "41\ns\n");
    r.delete().await.unwrap();

    // stop and start: the new QEMU drops again, the disk is there
    m.stop().await.unwrap();
    m.start().await.unwrap();
    let qemu2 = m.pid().unwrap();
    assert_ne!(qemu2, qemu);
    assert!(in_range(dropped_uid(qemu2)));
    assert_eq!(m.read_file("/root/f").await.unwrap(), data);
    m.stop().await.unwrap();

    // SMOL_VMM_USER: every VMM drops to that one user (nobody here: every Debian host has it)
    if let Some(nobody) = runas::uid_of("nobody") {
        // SAFETY: no machine of this binary is starting concurrently.
        unsafe { std::env::set_var(runas::USER_ENV, "nobody") };
        m.start().await.unwrap();
        assert_eq!(ids(m.pid().unwrap(), "Uid"), [nobody; 4]);
        assert_eq!(run(&m, "echo named").await.stdout, "named\n");
    }
    clone.delete().await.unwrap();
    b.delete().await.unwrap();
    m.delete().await.unwrap();
}

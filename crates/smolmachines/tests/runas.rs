//! The uid drop of a VMM started as root (`local::runas`, docs/threat-model.md section 6), with
//! real VMs: the engine as root with `SMOL_VMM_USER` set, every QEMU of its machines runs at
//! that user's uid (not 0), under its seccomp filter, and the machine works: exec, files both
//! ways, the agent reconnected (by descriptor), stop and start; a branchable machine stays root
//! and branches (`runas::drops`). A binary of its own:
//! the variable is the process's, set before any machine of it starts.
//!
//! The user is `nobody` here (on every Debian host, so the test makes no user); an operator
//! makes `smol` (`adduser --system --group --no-create-home smol`), the default.

mod common;

use common::{config, engine, run};
use smolmachines::local::runas;
use smolmachines::{BranchOptions, MachineBackend};

/// The real, effective, saved and file-system uids of `pid`.
fn uids(pid: u32) -> Vec<u32> {
    common::status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_engines_vmm_runs_as_an_unprivileged_user_and_the_machine_works() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: nothing drops; skipped");
        return;
    }
    let Some(uid) = runas::uid_of("nobody") else {
        eprintln!("no user nobody on this host: skipped");
        return;
    };
    // SAFETY: set before this binary's only test starts a machine; nothing else reads it yet.
    unsafe { std::env::set_var(runas::USER_ENV, "nobody") };
    assert_eq!(runas::user().as_deref(), Some("nobody"));
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let mut c = config(Some("dropped"));
    c.resources.memory_mb = Some(256);
    let m = engine.create_machine(c).await.unwrap();
    let qemu = m.pid().unwrap();
    assert_eq!(uids(qemu), [uid; 4], "QEMU's uids");
    assert_eq!(
        common::status_field(qemu, "Seccomp"),
        "2",
        "QEMU's -sandbox filter"
    );
    assert_eq!(common::status_field(qemu, "NoNewPrivs"), "1");
    let caps = common::status_field(qemu, "CapEff");
    assert_eq!(caps, "0000000000000000", "QEMU keeps capabilities");

    // it works: exec, files both ways
    assert_eq!(run(&m, "echo ok").await.stdout, "ok\n");
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    m.write_file("/root/f", &data, None).await.unwrap();
    assert_eq!(m.read_file("/root/f").await.unwrap(), data);
    // the agent reconnected: QEMU is handed a connected descriptor (it cannot reach the
    // socket's path as nobody under the test's 0700 directory)
    m.reconnect().await.unwrap();
    assert_eq!(run(&m, "echo again").await.stdout, "again\n");

    // stop and start: the new QEMU drops too, the disk is there
    m.stop().await.unwrap();
    m.start().await.unwrap();
    let qemu2 = m.pid().unwrap();
    assert_ne!(qemu2, qemu);
    assert_eq!(uids(qemu2), [uid; 4]);
    assert_eq!(m.read_file("/root/f").await.unwrap(), data);

    // a branchable machine's VMM does not drop yet (after a branch QEMU reopens its disk by
    // name: local::runas::drops); it works as before
    let mut c = config(Some("kept-root"));
    c.branchable = Some(true);
    c.resources.memory_mb = Some(256);
    let b = engine.create_machine(c).await.unwrap();
    assert_eq!(uids(b.pid().unwrap()), [0; 4]);
    let (clone, _) = b
        .branch_machine("kept-root-clone", &BranchOptions::default())
        .await
        .unwrap();
    assert_eq!(run(&clone, "echo clone").await.stdout, "clone\n");
    assert_eq!(run(&b, "echo source").await.stdout, "source\n");
    clone.delete().await.unwrap();
    b.delete().await.unwrap();
    m.delete().await.unwrap();
}

use super::*;

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
}

fn fixed(mib: u64) -> impl FnOnce() -> Vec<Bound> {
    move || {
        vec![Bound {
            source: "test".into(),
            available: mib * MIB,
            limit: Some(mib * MIB),
        }]
    }
}

const ON: Policy = Policy {
    enabled: true,
    headroom: 0,
};

#[test]
fn this_hosts_meminfo_and_cgroup_are_read() {
    let b = bounds();
    let host = b
        .iter()
        .find(|b| b.source.contains("MemAvailable"))
        .expect("MemAvailable");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        host.available > 0 && host.available <= total * 1024,
        "{b:?}"
    );
    // the cgroup this test runs in is found in the real hierarchy (limited or not)
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    if let Some((mount, dir)) = own_memory_cgroup(Path::new("/sys/fs/cgroup"), &own) {
        assert!(dir.starts_with(&mount) && dir.is_dir(), "{dir:?}");
    }
}

#[test]
fn cgroup_limits_less_usage_less_reclaimable_cache() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // v1: /memory/a limited to 1536 MiB, 600 MiB used of which 100 MiB inactive file cache;
    // /memory/a/b unlimited; the root has no limit file of interest
    let a = r.join("memory/a");
    write(&a, "memory.limit_in_bytes", &(1536 * MIB).to_string());
    write(&a, "memory.usage_in_bytes", &(600 * MIB).to_string());
    write(
        &a,
        "memory.stat",
        &format!("cache 1\ntotal_inactive_file {}\n", 100 * MIB),
    );
    let b = a.join("b");
    write(&b, "memory.limit_in_bytes", "9223372036854771712\n");
    write(&b, "memory.usage_in_bytes", "1");
    let meminfo = "MemTotal: 100 kB\nMemAvailable:   24000000 kB\n";
    let got = bounds_at(r, meminfo, "9:pids:/\n4:memory:/a/b\n0::/\n");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].available, 24_000_000 * 1024);
    assert_eq!(got[1].available, (1536 - 500) * MIB);
    assert_eq!(got[1].source, a.display().to_string());
    // v2: memory.max, memory.current, inactive_file; "max" is no limit
    let v2 = tempfile::tempdir().unwrap();
    let r2 = v2.path();
    write(r2, "cgroup.controllers", "cpu memory pids\n");
    let c = r2.join("x");
    write(&c, "memory.max", &(8192 * MIB).to_string());
    write(&c, "memory.current", &(1000 * MIB).to_string());
    write(
        &c,
        "memory.stat",
        &format!("anon 5\ninactive_file {}\n", 200 * MIB),
    );
    let d = c.join("y");
    write(&d, "memory.max", "max\n");
    write(&d, "memory.current", "5");
    let got = bounds_at(r2, meminfo, "0::/x/y\n");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].available, (8192 - 800) * MIB);
    // usage above the limit (a cgroup that was shrunk): nothing left, not an underflow
    write(&c, "memory.current", &(9000 * MIB).to_string());
    assert_eq!(cgroup_bound(&c).unwrap().available, 0);
}

#[test]
fn the_tightest_bound_less_reservations_and_headroom_decides() {
    let b = vec![
        Bound {
            source: "/proc/meminfo MemAvailable".into(),
            available: 20_000 * MIB,
            limit: None,
        },
        Bound {
            source: "/sys/fs/cgroup/memory/t".into(),
            available: 1_000 * MIB,
            limit: Some(1536 * MIB),
        },
    ];
    assert!(decide("m", ask(512), &b, 0, 0, 256 * MIB).is_ok());
    let e = decide("m", ask(512), &b, 640 * MIB, 1, 0).unwrap_err();
    assert_eq!(e.code(), "INSUFFICIENT_MEMORY");
    match &e {
        Error::InsufficientMemory {
            name,
            requested_mib,
            available_mib,
            reason,
        } => {
            assert_eq!(name, "m");
            assert_eq!(*requested_mib, 512 + VMM_OVERHEAD_MIB);
            assert_eq!(*available_mib, 1000 - 640);
            assert!(reason.contains("/sys/fs/cgroup/memory/t"), "{reason}");
            assert!(reason.contains("limit 1536 MiB"), "{reason}");
            assert!(reason.contains("1 machine(s) starting"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("640 MiB"), "{e}");
    assert!(e.hint().unwrap().contains("smaller"), "{e:?}");
    assert!(e.retryable());
    // the headroom alone can refuse
    assert!(decide("m", ask(512), &b, 0, 0, 400 * MIB).is_err());
    // no figure at all: admitted
    assert!(decide("m", ask(512), &[], 0, 0, 0).is_ok());
}

#[test]
fn concurrent_starts_are_counted_until_their_start_ends() {
    let run = tempfile::tempdir().unwrap();
    let machines = run.path().join("machines");
    std::fs::create_dir_all(&machines).unwrap();
    // 1400 MiB free: one 512 MiB machine (640 with its VMM) fits twice, not three times
    let a = admit_with(&machines, "a", 512, ON, fixed(1400)).unwrap();
    let b = admit_with(&machines, "b", 512, ON, fixed(1400)).unwrap();
    assert!(a.is_some() && b.is_some());
    let e = admit_with(&machines, "c", 512, ON, fixed(1400)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InsufficientMemory {
                available_mib: 120,
                ..
            }
        ),
        "{e:?}"
    );
    // a start that ended frees its reservation
    drop(a);
    let c = admit_with(&machines, "c", 512, ON, fixed(1400)).unwrap();
    assert!(c.is_some());
    drop((b, c));
    let ledger = ledger_dir(&machines);
    assert_eq!(reserved(&ledger), (0, 0));
    // the reservation of a process that is gone does not count, and is removed
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leftover = ledger.join(format!("x.{dead}.res"));
    std::fs::write(&leftover, (10_000 * MIB).to_string()).unwrap();
    assert!(admit_with(&machines, "d", 512, ON, fixed(700))
        .unwrap()
        .is_some());
    assert!(!leftover.exists());
    // off: no check, no reservation
    let off = Policy {
        enabled: false,
        headroom: 0,
    };
    assert!(admit_with(&machines, "e", 512, off, fixed(1))
        .unwrap()
        .is_none());
}

#[test]
fn the_ask_is_guest_ram_plus_the_vmm() {
    assert_eq!(ask(512), (512 + VMM_OVERHEAD_MIB) * MIB);
    assert_eq!(mem_available("MemAvailable: 2048 kB\n"), Some(2 * MIB));
    assert_eq!(mem_available("MemFree: 1 kB\n"), None);
}

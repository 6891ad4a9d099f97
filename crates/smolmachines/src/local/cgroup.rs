//! One cgroup per machine: its VMM, virtiofsd and passt share a memory limit (guest RAM plus
//! the VMM's own overhead, [`limits`]), a pids limit and a CPU quota of `resources.cpus`.
//!
//! Where: under the caller's own cgroup, so a limit the caller lives under still covers its
//! machines (`<own cgroup>/smol-<engine>/<machine>`, `<engine>` a hash of the engine's run
//! directory). cgroup v2 where the host's v2 hierarchy has the memory, pids and cpu controllers
//! (and lets us enable them below our own cgroup: a delegated subtree), v1 otherwise (one
//! directory in each of the memory, pids and cpu hierarchies). These hosts are v1 with an empty
//! v2 `unified` mount, so v1.
//!
//! Made before the machine's first process starts ([`create`]); each process joins it from its
//! `pre_exec`, before `exec`, by writing `0` to an already open `cgroup.procs`
//! (`local::confine`), so nothing the program does runs outside it. Removed when the VMM has
//! ended ([`remove`]) and, for an engine that crashed, by the reaper ([`sweep`]). A host where
//! it cannot be made (not root, no delegation) still runs the machine: [`create`] says why
//! confinement is partial and the engine logs it at warn level (and `smol doctor` shows it).

use std::path::{Path, PathBuf};

/// The limits of one machine's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// memory.max / memory.limit_in_bytes.
    pub memory_bytes: u64,
    /// pids.max.
    pub pids: u64,
    /// CPU quota in cores (cpu.max / cfs_quota_us of a 100 ms period).
    pub cpus: u32,
}

const MIB: u64 = 1024 * 1024;

/// What the VMM needs beyond guest RAM, measured under TCG on QEMU 7.2 (tests/confine.rs, the
/// memory hog): a 256 MiB guest that has touched all its RAM has a QEMU VmRSS of 349 MiB, 93 MiB
/// of its own (code, heap, device buffers, the TCG translation buffer, which grows with the guest
/// code run; QEMU caps it at 1 GiB), and a cgroup peak of 312 MiB.
/// The margin: 256 MiB, plus a quarter of guest RAM for large guests (page tables, dirty
/// bitmaps, virtio queues scale with it), so a hostile guest's hog hits the guest's own OOM
/// killer first and the host limit only stops what QEMU itself would take beyond that.
pub const VMM_OVERHEAD_MIB: u64 = 256;

/// Processes and threads of one machine: QEMU (vCPUs, its I/O worker pool of up to 64 threads,
/// RCU, the main loop), virtiofsd (a thread pool per mount) and passt. Far above what they use
/// (~20-90), far below a fork storm's reach; `spawn=deny` already stops QEMU forking.
pub const PIDS_MAX: u64 = 512;

/// The limits of a machine of `memory_mb` MiB and `cpus` vCPUs.
pub fn limits(memory_mb: u32, cpus: u32) -> Limits {
    let ram = u64::from(memory_mb) * MIB;
    Limits {
        memory_bytes: ram + VMM_OVERHEAD_MIB * MIB + ram / 4,
        pids: PIDS_MAX,
        cpus: cpus.max(1),
    }
}

/// The controllers a machine's cgroup uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Which cgroup hierarchy holds the controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One v2 hierarchy: (mount point, this process's cgroup in it).
    V2(PathBuf),
    /// v1: the directory of this process's cgroup in each controller's hierarchy (memory,
    /// pids, cpu, in that order).
    V1(Vec<PathBuf>),
}

/// This process's cgroup of each hierarchy line of `/proc/self/cgroup` (`id:controllers:path`).
fn own_paths(proc_cgroup: &str) -> Vec<(Vec<String>, String)> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            Some((
                ctrls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                path.to_string(),
            ))
        })
        .collect()
}

fn has_controllers(v2_mount: &Path) -> bool {
    std::fs::read_to_string(v2_mount.join("cgroup.controllers")).is_ok_and(|s| {
        let have: Vec<&str> = s.split_whitespace().collect();
        CONTROLLERS.iter().all(|c| have.contains(c))
    })
}

/// The hierarchy machines' cgroups go in, under `root` (`/sys/fs/cgroup`), or why there is none.
pub fn detect_at(root: &Path, proc_cgroup: &str) -> Result<Hierarchy, String> {
    let own = own_paths(proc_cgroup);
    let v2_own = own
        .iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| p.trim_start_matches('/').to_string());
    for mount in [root.to_path_buf(), root.join("unified")] {
        if let Some(own) = &v2_own {
            if has_controllers(&mount) {
                return Ok(Hierarchy::V2(mount.join(own)));
            }
        }
    }
    let mut dirs = Vec::new();
    for c in CONTROLLERS {
        let (_, path) = own
            .iter()
            .find(|(cs, _)| cs.iter().any(|x| x == c))
            .ok_or_else(|| {
                format!("no cgroup v1 {c} hierarchy (and no v2 one with memory, pids and cpu)")
            })?;
        let mount = root.join(c);
        if !mount.is_dir() {
            return Err(format!("{} is not mounted", mount.display()));
        }
        dirs.push(mount.join(path.trim_start_matches('/')));
    }
    Ok(Hierarchy::V1(dirs))
}

/// The host's hierarchy (`/sys/fs/cgroup`, this process's `/proc/self/cgroup`).
pub fn detect() -> Result<Hierarchy, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    detect_at(Path::new("/sys/fs/cgroup"), &own)
}

/// A short stable key of an engine (its machines' run directory), FNV-1a.
fn engine_key(machines: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in machines.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("smol-{:08x}", h as u32)
}

/// The engine's directories (one per v1 controller, or the one v2 directory) for the machines
/// whose run directories are in `machines`.
pub fn engine_dirs(h: &Hierarchy, machines: &Path) -> Vec<PathBuf> {
    let key = engine_key(machines);
    match h {
        Hierarchy::V2(own) => vec![own.join(key)],
        Hierarchy::V1(own) => own.iter().map(|d| d.join(&key)).collect(),
    }
}

/// The cgroup directories of the machine whose run directory is `dir`.
pub fn machine_dirs(h: &Hierarchy, dir: &Path) -> Vec<PathBuf> {
    let (Some(machines), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Vec::new();
    };
    engine_dirs(h, machines)
        .into_iter()
        .map(|d| d.join(name))
        .collect()
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    let p = dir.join(file);
    std::fs::write(&p, value).map_err(|e| format!("writing {value:?} to {}: {e}", p.display()))
}

fn mkdir(d: &Path) -> Result<(), String> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", d.display())),
    }
}

/// Makes the cgroup of the machine whose run directory is `dir` with `limits`; its directories,
/// or why the machine runs without one (the caller logs it: confinement is partial).
pub fn create(h: &Hierarchy, dir: &Path, limits: Limits) -> Result<Vec<PathBuf>, String> {
    let machine = machine_dirs(h, dir);
    let engine = dir
        .parent()
        .map(|m| engine_dirs(h, m))
        .ok_or("a machine directory without a parent")?;
    if let Hierarchy::V2(own) = h {
        // controllers must be enabled in each parent's subtree_control; a cgroup with
        // processes of its own (not the root) cannot (the "no internal processes" rule)
        let enable = "+memory +pids +cpu";
        write(own, "cgroup.subtree_control", enable)?;
        mkdir(&engine[0])?;
        write(&engine[0], "cgroup.subtree_control", enable)?;
        mkdir(&machine[0])?;
        let d = &machine[0];
        write(d, "memory.max", &limits.memory_bytes.to_string())?;
        write(d, "memory.swap.max", "0").or_else(|e| {
            // no swap accounting on this host: nothing to limit
            tracing::debug!(error = %e, "memory.swap.max");
            Ok::<(), String>(())
        })?;
        write(d, "pids.max", &limits.pids.to_string())?;
        write(
            d,
            "cpu.max",
            &format!("{} 100000", u64::from(limits.cpus) * 100_000),
        )?;
        return Ok(machine);
    }
    for (e, m) in engine.iter().zip(&machine) {
        mkdir(e)?;
        mkdir(m)?;
    }
    let [memory, pids, cpu] = [&machine[0], &machine[1], &machine[2]];
    write(
        memory,
        "memory.limit_in_bytes",
        &limits.memory_bytes.to_string(),
    )?;
    write(pids, "pids.max", &limits.pids.to_string())?;
    write(cpu, "cpu.cfs_period_us", "100000")?;
    write(
        cpu,
        "cpu.cfs_quota_us",
        &(u64::from(limits.cpus) * 100_000).to_string(),
    )?;
    Ok(machine)
}

/// Opens the `cgroup.procs` of each directory, for a child to join them before it execs.
pub fn open_procs(dirs: &[PathBuf]) -> std::io::Result<Vec<std::fs::File>> {
    dirs.iter()
        .map(|d| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
        })
        .collect()
}

/// Removes a machine's cgroup directories. A cgroup still holding a process (one that is
/// being killed) is tried again for up to a second; one that stays is logged and left to the
/// reaper's [`sweep`].
pub fn remove(dirs: &[PathBuf]) {
    for d in dirs {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::warn!(path = %d.display(), error = %e, "cannot remove a machine's cgroup");
                    break;
                }
            }
        }
        // the engine's directory once its last machine's is gone (busy otherwise: kept)
        if let Some(engine) = d.parent() {
            if std::fs::remove_dir(engine).is_ok() {
                tracing::debug!(path = %engine.display(), "removed the engine's cgroup");
            }
        }
    }
}

/// [`remove`] off the async runtime (on its blocking pool; inline without a runtime).
pub fn remove_later(dirs: Vec<PathBuf>) {
    if dirs.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || remove(&dirs));
        }
        Err(_) => remove(&dirs),
    }
}

/// [`remove`] on the blocking pool, waited for.
pub async fn remove_blocking(dirs: Vec<PathBuf>) {
    if dirs.is_empty() {
        return;
    }
    if let Err(e) = tokio::task::spawn_blocking(move || remove(&dirs)).await {
        tracing::warn!(error = %e, "removing a machine's cgroup panicked");
    }
}

/// A cgroup made this recently is never swept: its machine may be starting (made, its
/// processes not in it yet, the record not saying so yet).
const SWEEP_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(30);

/// The reaper's pass: removes every machine cgroup of the engine whose run directories are in
/// `machines` for which `gone(name)` holds (no record, or its VMM is gone) and that is empty.
/// How many it removed.
pub fn sweep(machines: &Path, gone: impl Fn(&str) -> bool) -> usize {
    let Ok(h) = detect() else {
        return 0;
    };
    let mut removed = 0;
    for engine in engine_dirs(&h, machines) {
        let Ok(entries) = std::fs::read_dir(&engine) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let young = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < SWEEP_MIN_AGE);
            if !e.path().is_dir() || young || !gone(&name) {
                continue;
            }
            match std::fs::remove_dir(e.path()) {
                Ok(()) => {
                    tracing::info!(machine = %name, path = %e.path().display(), "reaper: removed a leftover cgroup");
                    removed += 1;
                }
                // still has a process (a VMM ending): the next pass
                Err(err) => tracing::debug!(machine = %name, error = %err, "reaper: cgroup kept"),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchy_is_v1_here_unless_v2_has_the_controllers() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let own = "9:name=systemd:/\n8:pids:/\n4:memory:/a/b\n1:cpu,cpuacct:/\n0::/\n";
        // an empty v2 mount (as on these hosts) and no v1 mounts: no hierarchy
        std::fs::create_dir_all(r.join("unified")).unwrap();
        std::fs::write(r.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        assert!(detect_at(r, own).unwrap_err().contains("is not mounted"));
        for c in CONTROLLERS {
            std::fs::create_dir_all(r.join(c)).unwrap();
        }
        assert_eq!(
            detect_at(r, own).unwrap(),
            Hierarchy::V1(vec![r.join("memory/a/b"), r.join("pids/"), r.join("cpu/")])
        );
        // a v2 hierarchy with the three controllers wins
        std::fs::write(r.join("unified/cgroup.controllers"), "cpu memory pids io\n").unwrap();
        assert_eq!(
            detect_at(r, own).unwrap(),
            Hierarchy::V2(r.join("unified/"))
        );
        // a v1 line without a controller we need
        let no_pids = "4:memory:/\n1:cpu:/\n";
        assert!(detect_at(r, no_pids).unwrap_err().contains("pids"));
    }

    #[test]
    fn paths_are_per_engine_and_machine_and_limits_cover_ram_and_overhead() {
        let h = Hierarchy::V1(vec!["/m".into(), "/p".into(), "/c".into()]);
        let a = machine_dirs(&h, Path::new("/run/a/machines/m1"));
        let b = machine_dirs(&h, Path::new("/run/b/machines/m1"));
        assert_eq!(a.len(), 3);
        assert_ne!(a, b, "two engines' machines of one name get two cgroups");
        assert!(a[0].starts_with("/m") && a[0].ends_with("m1"), "{a:?}");
        let l = limits(256, 2);
        assert_eq!(l.memory_bytes, (256 + 256 + 64) * MIB);
        assert_eq!((l.pids, l.cpus), (PIDS_MAX, 2));
        assert_eq!(limits(1024, 0).cpus, 1);
    }
}

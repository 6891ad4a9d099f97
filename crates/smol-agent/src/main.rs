//! smol guest agent.
//!
//! Runs as PID 1 of the guest (`/init` in the initramfs). PID 1 prepares the system ([`init`]),
//! then forks: the child serves the host protocol ([`serve`]); PID 1 stays behind to reap every
//! orphaned process and restarts the agent if it ever dies. Run outside a VM, `smol-agent serve
//! <path>` serves the protocol on a unix socket, which the unit tests use, and `smol-agent
//! connect <path>` serves a host listening there (the fleet tests' fake VMM). Outside a VM a
//! shutdown request ends the agent's process, never the host (`init::power_off`).

mod cgroup;
mod container;
mod exec;
mod files;
mod identity;
mod init;
mod pending;
mod port;
mod quiet;
mod raw;
mod relay;
mod serve;
mod slot;
mod spawn;
mod user;

use std::time::Duration;

fn main() {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        let args: Vec<String> = std::env::args().collect();
        if args.len() == 3 && args[1] == "serve" {
            serve::serve_unix(&args[2]);
            return;
        }
        if args.len() == 3 && args[1] == "connect" {
            serve::connect_unix(&args[2]);
            return;
        }
        eprintln!(
            "usage: smol-agent serve|connect <unix socket path> (as PID 1 it serves virtio-serial)"
        );
        std::process::exit(2);
    }
    tune_malloc();
    let cfg = init::setup();
    match cfg.mode.as_str() {
        "boot-bench" => {
            // Baseline for the benchmark: a bare boot that reaches init and powers off.
            println!("SMOL_INIT_REACHED");
            init::power_off();
        }
        "raw" => raw::run(),
        _ => supervise(&cfg),
    }
}

/// Keeps large buffers (frames of up to 256 KiB) on the heap instead of fresh mmaps: under TCG
/// the page faults of a new mapping per frame cost more than the copy.
fn tune_malloc() {
    // SAFETY: mallopt only adjusts allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// PID 1 loop: fork the agent, reap every child, restart the agent when it exits.
fn supervise(cfg: &init::Config) -> ! {
    let mut restarted = false;
    loop {
        // SAFETY: PID 1 is single-threaded here (no runtime started yet), so fork is sound; the
        // child only calls async-signal-safe code until it builds its own runtime.
        let child = unsafe { libc::fork() };
        if child == 0 {
            serve::serve_port(cfg, restarted);
        }
        if child < 0 {
            eprintln!("smol-agent: fork failed; serving from PID 1");
            serve::serve_port(cfg, restarted);
        }
        restarted = true;
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid == child {
                eprintln!("smol-agent: agent exited (status {status}); restarting");
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            if pid < 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

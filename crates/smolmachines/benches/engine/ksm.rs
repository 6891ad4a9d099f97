//! Kernel samepage merging for the density bench (`SMOL_BENCH_KSM=1`): QEMU marks guest RAM
//! mergeable by default (`-machine mem-merge=on`), so idle guests of one kernel share their
//! identical pages once the host's `ksmd` runs. KSM is host-wide and off by default (a
//! cross-tenant side channel: docs/threat-model.md), so the bench turns it on only for its
//! measurement and puts every setting back as it found it, unmerging what it merged.

use std::path::Path;
use std::time::{Duration, Instant};

const KSM: &str = "/sys/kernel/mm/ksm";

/// The host's KSM settings, put back on drop.
pub struct Ksm {
    saved: Vec<(&'static str, String)>,
}

fn read(name: &str) -> Option<String> {
    std::fs::read_to_string(Path::new(KSM).join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

fn write(name: &str, value: &str) -> Result<(), String> {
    std::fs::write(Path::new(KSM).join(name), value)
        .map_err(|e| format!("writing {value} to {KSM}/{name}: {e}"))
}

fn counter(name: &str) -> u64 {
    read(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl Ksm {
    /// Turns KSM on with a fast scan; `Err` says why it cannot be (no KSM, not root).
    pub fn on() -> Result<Ksm, String> {
        let mut saved = Vec::new();
        for name in ["run", "pages_to_scan", "sleep_millisecs"] {
            let v = read(name).ok_or_else(|| format!("{KSM}/{name} cannot be read"))?;
            saved.push((name, v));
        }
        let ksm = Ksm { saved };
        write("pages_to_scan", "20000")?;
        write("sleep_millisecs", "20")?;
        write("run", "1")?;
        Ok(ksm)
    }

    /// Waits (at most `limit`) until ksmd has scanned everything twice more (a page merges on
    /// the scan after the one that saw it unchanged); the pages it shares then.
    pub fn settle(&self, limit: Duration) -> (u64, u64) {
        let start = counter("full_scans");
        let until = Instant::now() + limit;
        while counter("full_scans") < start + 3 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
        }
        (counter("pages_shared"), counter("pages_sharing"))
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        // 2 unmerges every merged page; then the host's own settings
        if let Err(e) = write("run", "2") {
            eprintln!("ksm: {e}");
        }
        for (name, v) in self.saved.iter().rev() {
            if let Err(e) = write(name, v) {
                eprintln!("ksm: {e}: the host's KSM setting was not restored");
            }
        }
    }
}

//! `smol image pull|ls|rm|prune`: the local image cache (`$SMOL_HOME/images`).
//!
//! A pull shows one progress bar per layer on a terminal (indicatif) and plain lines otherwise
//! (one per layer when it is done, then the unpack and block image steps).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use smolmachines::image::{LayerStatus, Progress, PullEvent};
use smolmachines::local::LocalBackend;
use smolmachines::Error;

/// `smol image ...`
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image into the local cache: a registry reference (`alpine`,
    /// `127.0.0.1:5000/library/python:3.12`), `oci:DIR[:TAG]`, `docker-archive:FILE[:REPO:TAG]`
    /// or a root file system directory. Prints the reference and digest.
    Pull {
        /// The image.
        image: String,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List cached images.
    Ls,
    /// Remove images from the cache, with the blobs and block images only they use.
    Rm {
        /// The images (as pulled).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Delete what no cached image uses: blobs of moved tags or refused pulls, leftovers of
    /// interrupted pulls.
    Prune,
}

/// Runs an image command; returns the exit code.
/// Pull progress on stderr: bars on a terminal (finish them when done), plain lines otherwise.
fn reporter() -> (Option<Progress>, Option<Arc<Bars>>) {
    if std::io::stderr().is_terminal() {
        let (p, bars) = bars();
        (Some(p), Some(bars))
    } else {
        (Some(lines()), None)
    }
}

/// Makes `image` ready in the cache before a machine boots it, showing the pull on stderr (bars
/// on a terminal, lines otherwise) when it is not cached yet; nothing when it is.
pub async fn prepare(image: &str) -> Result<(), Error> {
    let store = LocalBackend::open_env().image_store()?;
    let (progress, done) = reporter();
    let result = store.ensure(image, progress).await;
    if let Some(bars) = done {
        bars.finish();
    }
    result?;
    Ok(())
}

pub async fn run(cmd: ImageCommand) -> Result<u8, Error> {
    let store = LocalBackend::open_env().image_store()?;
    match cmd {
        ImageCommand::Pull { image, quiet } => {
            let (progress, done) = if quiet { (None, None) } else { reporter() };
            let result = store.pull(&image, progress).await;
            if let Some(bars) = done {
                bars.finish();
            }
            let info = result?;
            println!("{} {}", info.reference, info.digest);
            Ok(0)
        }
        ImageCommand::Ls => {
            let list = store.list()?;
            println!(
                "{:<56} {:<19} {:>9} {:<12}",
                "REFERENCE", "DIGEST", "SIZE", "PLATFORM"
            );
            for i in list {
                let short = i.digest.trim_start_matches("sha256:");
                println!(
                    "{:<56} {:<19} {:>9} {:<12}",
                    i.reference,
                    format!("sha256:{}", &short[..short.len().min(12)]),
                    human(i.size),
                    format!("{}/{}", i.os, i.architecture)
                );
            }
            Ok(0)
        }
        ImageCommand::Rm { images } => {
            let mut freed = 0;
            for image in images {
                let report = store.remove(&image).await?;
                freed += report.bytes_freed;
                for r in report.refs_removed {
                    println!("removed {r}");
                }
            }
            println!("reclaimed {}", human(freed));
            Ok(0)
        }
        ImageCommand::Prune => {
            let r = store.prune().await?;
            println!(
                "deleted {} blobs, {} block images, {} leftovers; reclaimed {}",
                r.blobs_removed,
                r.rootfs_removed,
                r.tmp_removed,
                human(r.bytes_freed)
            );
            Ok(0)
        }
    }
}

/// `12.3 MB`.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(digest: &str) -> String {
    let h = digest.trim_start_matches("sha256:");
    h[..h.len().min(12)].to_string()
}

/// Plain lines (not a terminal): one per layer when it is done, then the later steps.
fn lines() -> Progress {
    let reported = Mutex::new(std::collections::HashSet::new());
    Arc::new(move |ev: &PullEvent| {
        let mut err = std::io::stderr().lock();
        let written = match ev {
            PullEvent::Resolved {
                reference,
                digest,
                layers,
            } => writeln!(
                err,
                "{reference}: {} ({} layers, {})",
                digest,
                layers.len(),
                human(layers.iter().map(|l| l.1).sum())
            ),
            PullEvent::Layer {
                index,
                digest,
                total,
                status,
                ..
            } => match status {
                LayerStatus::Downloading => Ok(()),
                LayerStatus::Cached | LayerStatus::Complete => {
                    if reported.lock().unwrap().insert(*index) {
                        let what = if *status == LayerStatus::Cached {
                            "already cached"
                        } else {
                            "downloaded"
                        };
                        writeln!(
                            err,
                            "layer {} {}: {what} ({})",
                            index + 1,
                            short(digest),
                            human(*total)
                        )
                    } else {
                        Ok(())
                    }
                }
            },
            PullEvent::Unpacking { index, count } => {
                writeln!(err, "unpacking layer {}/{count}", index + 1)
            }
            PullEvent::Building { format } => {
                writeln!(err, "making the {} block image", format.fstype())
            }
        };
        if let Err(e) = written {
            // progress is best-effort: the pull goes on without its reader
            tracing::debug!(error = %e, "pull progress not written to stderr");
        }
    })
}

/// The bars of a pull on a terminal.
struct Bars {
    multi: MultiProgress,
    layers: Mutex<BTreeMap<usize, ProgressBar>>,
    step: ProgressBar,
}

impl Bars {
    fn finish(&self) {
        for b in self.layers.lock().unwrap().values() {
            b.abandon();
        }
        self.step.finish_and_clear();
    }
}

fn bars() -> (Progress, Arc<Bars>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let step = multi.add(ProgressBar::new_spinner());
    step.enable_steady_tick(Duration::from_millis(120));
    step.set_message("resolving");
    let bars = Arc::new(Bars {
        multi,
        layers: Mutex::new(BTreeMap::new()),
        step,
    });
    let style =
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .expect("template")
            .progress_chars("=> ");
    let b = bars.clone();
    let progress: Progress = Arc::new(move |ev: &PullEvent| match ev {
        PullEvent::Resolved { layers, .. } => {
            let mut map = b.layers.lock().unwrap();
            for (i, (digest, size)) in layers.iter().enumerate() {
                let bar = b.multi.insert_before(&b.step, ProgressBar::new(*size));
                bar.set_style(style.clone());
                bar.set_prefix(short(digest));
                bar.set_message("waiting");
                map.insert(i, bar);
            }
            b.step.set_message("downloading");
        }
        PullEvent::Layer {
            index,
            done,
            status,
            ..
        } => {
            if let Some(bar) = b.layers.lock().unwrap().get(index) {
                bar.set_position(*done);
                match status {
                    LayerStatus::Downloading => bar.set_message("downloading"),
                    LayerStatus::Cached => bar.finish_with_message("already cached"),
                    LayerStatus::Complete => bar.finish_with_message("verified"),
                }
            }
        }
        PullEvent::Unpacking { index, count } => {
            b.step
                .set_message(format!("unpacking layer {}/{count}", index + 1));
        }
        PullEvent::Building { format } => {
            b.step
                .set_message(format!("making the {} block image", format.fstype()));
        }
    });
    (progress, bars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(57_133_379), "57.1 MB");
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
    }
}

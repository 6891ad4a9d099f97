//! `Op::WriteFile`, `Op::ReadFile` and `Op::ReadFileStream`.
//!
//! File system calls run off the agent's (single-threaded) event loop: on the blocking pool,
//! and a read's chunks on a thread of its own, each step within [`STALL`]. A file that never
//! answers fails its own operation and every other operation goes on being served.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use smol_protocol::mux::Stream;
use smol_protocol::{Chan, ErrorKind, Frame, RemoteError, MAX_CHUNK};
use tokio::sync::mpsc;

#[cfg(doc)]
use smol_protocol::READ_FILE_LIMIT;

fn absolute(path: &str) -> Result<&Path, RemoteError> {
    if !path.starts_with('/') {
        return Err(crate::serve::invalid(format!(
            "path must be absolute, got {path:?}"
        )));
    }
    Ok(Path::new(path))
}

fn closed(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(ErrorKind::Io, e.to_string())
}

/// Runs the file system step `f` on the blocking pool within [`STALL`] (`doing` and `path`
/// name it when it stalls).
async fn off_loop<T: Send + 'static>(
    doing: &str,
    path: &str,
    f: impl FnOnce() -> Result<T, RemoteError> + Send + 'static,
) -> Result<T, RemoteError> {
    match tokio::time::timeout(STALL, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(closed(join)),
        Err(_) => Err(stalled(path, doing)),
    }
}

/// Where a write goes: the open file, the path written (`tmp`, beside `target` unless the
/// target is written in place), and the final mode.
struct Dest {
    file: fs::File,
    tmp: PathBuf,
    target: PathBuf,
    in_place: bool,
    mode: u32,
    /// The temporary file listed until the write ends (`pending`).
    _listed: Option<crate::pending::InFlight>,
}

fn prepare_write(path: &str, mode: Option<u32>, id: u32) -> Result<Dest, RemoteError> {
    let target = Path::new(path);
    // Write through a symlink to its target.
    let target: PathBuf = match fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf())
        }
        _ => target.to_path_buf(),
    };
    let existing = fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(RemoteError::new(
            ErrorKind::IsADirectory,
            format!("{path}: is a directory"),
        ));
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| RemoteError::from_io(&e, &parent.display().to_string()))?;
    }
    let in_place = existing.as_ref().is_some_and(|m| !m.is_file());
    let mode = mode.unwrap_or_else(|| {
        existing
            .as_ref()
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644)
    });
    let tmp = if in_place {
        target.clone()
    } else {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        target.with_file_name(format!(".{name}.smol-{id}"))
    };
    // listed before it exists: a VMM killed from here on leaves nothing the next boot keeps
    let listed = (!in_place).then(|| crate::pending::InFlight::begin(&tmp));
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| RemoteError::from_io(&e, path))?;
    Ok(Dest {
        file,
        tmp,
        target,
        in_place,
        mode,
        _listed: listed,
    })
}

/// Writes the bytes that follow on `stream` to `path`. A regular file is replaced atomically
/// (written beside it, synced, then renamed), so a failed write leaves the old content intact
/// and a write that returns is on the disk. Every file system step runs off the event loop,
/// within [`STALL`].
pub async fn write(stream: Stream, path: &str, mode: Option<u32>) -> Result<Frame, RemoteError> {
    let Stream { tx, mut rx } = stream;
    absolute(path)?;
    let (owned, id) = (path.to_string(), tx.id());
    let Dest {
        file,
        tmp,
        target,
        in_place,
        mode,
        _listed,
    } = off_loop("opening", path, move || prepare_write(&owned, mode, id)).await?;
    let io_err = |path: &str, e: std::io::Error| RemoteError::from_io(&e, path);
    let result: Result<(), RemoteError> = async {
        let file = if on_loop(&file) {
            receive_on_loop(&mut rx, file, path).await?
        } else {
            receive_into(&mut rx, file, path).await?
        };
        if in_place {
            drop(file);
        } else {
            let (tmp, target, p) = (tmp.clone(), target.clone(), path.to_string());
            off_loop("syncing and renaming", path, move || {
                // the content reaches the disk before it replaces the old one: a disk that
                // fails (or fills on the host) fails this write, and the old content stays
                file.sync_all().map_err(|e| io_err(&p, e))?;
                drop(file);
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                    .map_err(|e| io_err(&p, e))?;
                fs::rename(&tmp, &target).map_err(|e| io_err(&p, e))?;
                // the rename reaches the disk too: without it a VMM killed right after the
                // write returned could come back without the file (or with the old one)
                sync_parent(&target);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
    .await;
    if result.is_err() && !in_place {
        crate::quiet::remove_quietly(&tmp);
    }
    result.map(|_| Frame::Done { id: tx.id() })
}

/// Syncs the directory holding `target` (its new entry after a rename). Best effort, and
/// silent: a file system that cannot sync a directory (some FUSE ones, virtio-fs without
/// support) keeps the write, which is in place.
fn sync_parent(target: &Path) {
    if let Some(dir) = target.parent() {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
}

/// The most bytes received and not yet written a write holds in the guest; past it the
/// agent stops taking frames (and so, through the stream's credit, the host stops sending).
const WRITE_AHEAD: usize = 4 * MAX_CHUNK;

/// A write of chunks running on the blocking pool; it gives the file back.
type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<fs::File, RemoteError>> + Send>>;

/// Writes `chunks` to `file` on the blocking pool within [`STALL`].
fn write_chunks(mut file: fs::File, chunks: Vec<bytes::Bytes>, path: &str) -> Pending {
    let path = path.to_string();
    Box::pin(async move {
        let p = path.clone();
        off_loop("writing", &path, move || {
            for c in &chunks {
                file.write_all(c)
                    .map_err(|e| RemoteError::from_io(&e, &p))?;
            }
            Ok(file)
        })
        .await
    })
}

/// Magic numbers (`statfs.f_type`) of the file systems whose I/O runs on the event loop.
const LOOP_FS: &[i64] = &[
    0x0102_1994, // tmpfs
    0x8584_58f6, // ramfs (the initramfs root)
    0xef53,      // ext2/3/4: the machine's own disk
    0x794c_7630, // overlay (the root: initramfs or image under the disk)
    0xe0f5_e1e2, // erofs (container images)
];

/// Whether `file` is a regular file on a file system held in memory or on the machine's own
/// disk ([`LOOP_FS`]): its reads and writes finish on their own (a disk error is reported,
/// not waited on), so they run on the event loop, where a chunk costs no hand-off between
/// threads (under TCG a thread wake-up costs more than copying the chunk). Anything else (FUSE,
/// virtio-fs, NFS, devices, pipes) may never answer and is read and written off the loop,
/// within [`STALL`].
fn on_loop(file: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    // SAFETY: statfs is plain old data; fstatfs fills it for the open descriptor and touches
    // nothing else.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call and `st` is writable.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i32 or i64 by target
    let kind = st.f_type as i64;
    LOOP_FS.contains(&kind)
}

/// [`receive_into`] for a file that [`on_loop`] allows: each chunk written as it arrives.
async fn receive_on_loop(
    rx: &mut smol_protocol::mux::StreamReceiver,
    mut file: fs::File,
    path: &str,
) -> Result<fs::File, RemoteError> {
    loop {
        match rx.recv().await.map_err(closed)? {
            Frame::Data {
                chan: Chan::File,
                data,
                ..
            } => file
                .write_all(&data)
                .map_err(|e| RemoteError::from_io(&e, path))?,
            Frame::Eof {
                chan: Chan::File, ..
            } => return Ok(file),
            Frame::Cancel { .. } => return Err(closed("write cancelled by the host")),
            _ => {}
        }
    }
}

/// Receives the `File` data of a write and writes it to `file`, pipelined: while one batch
/// of chunks is written off the event loop, the next is received (at most [`WRITE_AHEAD`]
/// bytes), so the loop and the disk work at once and the hand-offs to the blocking pool are
/// one per batch, not one per chunk. Returns the file once the host's `Eof` is written.
async fn receive_into(
    rx: &mut smol_protocol::mux::StreamReceiver,
    file: fs::File,
    path: &str,
) -> Result<fs::File, RemoteError> {
    let mut idle = Some(file);
    let mut pending: Option<Pending> = None;
    let mut batch: Vec<bytes::Bytes> = Vec::new();
    let mut held = 0usize;
    let mut eof = false;
    loop {
        if let Some(f) = idle.take() {
            if !batch.is_empty() {
                held = 0;
                pending = Some(write_chunks(f, std::mem::take(&mut batch), path));
            } else if eof {
                return Ok(f);
            } else {
                idle = Some(f);
            }
        }
        let room = !eof && held < WRITE_AHEAD;
        tokio::select! {
            done = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                idle = Some(done?);
            }
            frame = rx.recv(), if room => match frame.map_err(closed)? {
                Frame::Data { chan: Chan::File, data, .. } => {
                    held += data.len();
                    batch.push(data);
                }
                Frame::Eof { chan: Chan::File, .. } => eof = true,
                Frame::Cancel { .. } => return Err(closed("write cancelled by the host")),
                _ => {}
            },
        }
    }
}

/// How long one step of a file operation (an open, a chunk read or written) may take in the
/// guest before the agent gives up on the operation (a file on a wedged file system, a device
/// that never answers). The host has its own, shorter deadline for reads; this one also ends
/// the operation for an older host that would wait for ever.
const STALL: Duration = Duration::from_secs(60);

/// What kind of file `t` is, for messages.
fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Refuses anything but a regular file: `path` (symlinks resolved, named in the message) is of
/// type `t`.
fn refuse_type(path: &str, t: fs::FileType) -> Result<(), RemoteError> {
    if t.is_file() {
        return Ok(());
    }
    if t.is_dir() {
        return Err(RemoteError::new(
            ErrorKind::IsADirectory,
            format!("{path}: is a directory"),
        ));
    }
    let resolved = fs::canonicalize(path)
        .ok()
        .filter(|r| r.as_os_str() != path)
        .map(|r| format!(" (resolves to {})", r.display()))
        .unwrap_or_default();
    Err(RemoteError::new(
        ErrorKind::Unsupported,
        format!(
            "{path}{resolved} is {}: only regular files can be read (read a device or a pipe \
             with exec, e.g. head -c)",
            kind_of(t)
        ),
    ))
}

fn too_large(path: &str, size: Option<u64>, limit: u64) -> RemoteError {
    let size = match size {
        Some(s) => format!("is {s} bytes"),
        None => format!("grew past {limit} bytes while being read"),
    };
    RemoteError::new(
        ErrorKind::InvalidInput,
        format!(
            "{path} {size}, over the read limit of {limit} bytes: read it with \
             read_file_stream"
        ),
    )
}

/// Opens `path` for reading if it is a regular file (symlinks followed) of at most `limit`
/// bytes. The type is checked before the open (opening some devices has effects) and again on
/// the open file (the path may have changed in between); `O_NONBLOCK` keeps the open from
/// waiting for a FIFO's writer, and reads of streams that honour it (`/proc/kmsg`) from
/// waiting for data.
fn open_regular(path: &str, limit: Option<u64>) -> Result<fs::File, RemoteError> {
    let io_err = |e: std::io::Error| RemoteError::from_io(&e, path);
    refuse_type(path, fs::metadata(path).map_err(io_err)?.file_type())?;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    refuse_type(path, meta.file_type())?;
    if let Some(limit) = limit.filter(|&l| meta.len() > l) {
        return Err(too_large(path, Some(meta.len()), limit));
    }
    Ok(file)
}

/// Chunks a reader thread hands over at once: one wake-up of the event loop per this many
/// chunks, not one per chunk.
const READ_BATCH: usize = 4;

/// Reads `file` in chunks on a thread of its own (a read that blocks never holds the agent's
/// event loop), at most `max` bytes in all; batches of up to [`READ_BATCH`] chunks arrive on
/// the returned channel, which ends at the end of the file (an error comes after the chunks
/// read before it). The thread ends after its current batch once the receiver is gone.
fn reader(mut file: fs::File, max: u64) -> std::io::Result<mpsc::Receiver<ReadBatch>> {
    let (tx, rx) = mpsc::channel(2);
    std::thread::Builder::new()
        .name("smol-read".into())
        .spawn(move || {
            let mut left = max;
            loop {
                let (chunks, failed, end) = read_batch(&mut file, &mut left);
                if !chunks.is_empty() && tx.blocking_send(Ok(chunks)).is_err() {
                    return; // the operation ended (cancelled or failed)
                }
                if let Some(e) = failed {
                    // a receiver that is gone ended the operation with its own outcome
                    let _delivered = tx.blocking_send(Err(e)).is_ok();
                    return;
                }
                if end {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// Reads up to [`READ_BATCH`] chunks of `file`, at most `left` bytes (counted down): the
/// chunks, the error that stopped the read, and whether the read is over (end of file, the
/// limit, or an error).
fn read_batch(file: &mut fs::File, left: &mut u64) -> (Vec<Vec<u8>>, Option<std::io::Error>, bool) {
    let mut chunks = Vec::with_capacity(READ_BATCH);
    let mut end = *left == 0;
    while !end && chunks.len() < READ_BATCH {
        let want = (*left).min(MAX_CHUNK as u64);
        let mut buf = Vec::with_capacity(want as usize);
        match file.take(want).read_to_end(&mut buf) {
            Ok(n) => {
                *left -= n as u64;
                // short of what was asked: the end of the file
                end = (n as u64) < want || *left == 0;
                if n > 0 {
                    chunks.push(buf);
                }
            }
            Err(e) => return (chunks, Some(e), true),
        }
    }
    (chunks, None, end)
}

/// Where a read's chunks come from: a reader thread, or the event loop itself for a file
/// [`on_loop`] allows.
enum Source {
    Thread(mpsc::Receiver<ReadBatch>),
    Loop {
        file: fs::File,
        left: u64,
        over: bool,
        failed: Option<std::io::Error>,
    },
}

impl Source {
    fn new(file: fs::File, max: u64) -> std::io::Result<Source> {
        Ok(if on_loop(&file) {
            Source::Loop {
                file,
                left: max,
                over: false,
                failed: None,
            }
        } else {
            Source::Thread(reader(file, max)?)
        })
    }

    /// The next batch (`None`: the end), within [`STALL`] for a thread.
    async fn next(&mut self, path: &str) -> Result<Option<ReadBatch>, RemoteError> {
        match self {
            Source::Thread(rx) => tokio::time::timeout(STALL, rx.recv())
                .await
                .map_err(|_| stalled(path, "reading")),
            Source::Loop {
                file,
                left,
                over,
                failed,
            } => {
                if let Some(e) = failed.take() {
                    return Ok(Some(Err(e)));
                }
                if *over {
                    return Ok(None);
                }
                let (chunks, e, end) = read_batch(file, left);
                *over = end;
                *failed = e;
                if chunks.is_empty() {
                    return Ok(failed.take().map(Err));
                }
                Ok(Some(Ok(chunks)))
            }
        }
    }
}

/// What a reader thread hands over: chunks in order, or the error that ended the read.
type ReadBatch = std::io::Result<Vec<Vec<u8>>>;

/// Sends the content of the regular file `path` on `stream`: at most `limit` bytes
/// (`Op::ReadFile`: [`READ_FILE_LIMIT`]; a bigger file is refused before anything is sent,
/// one that grows past it while read fails at `limit + 1`), or all of it (`None`,
/// `Op::ReadFileStream`). Anything but a regular file is refused (`Unsupported`, naming the
/// path, what it resolves to and its type). The file is opened and read off the event loop,
/// each chunk within [`STALL`].
pub async fn read(stream: Stream, path: &str, limit: Option<u64>) -> Result<Frame, RemoteError> {
    let Stream { tx, mut rx } = stream;
    absolute(path)?;
    let owned = path.to_string();
    let file = tokio::select! {
        r = off_loop("opening", path, move || open_regular(&owned, limit)) => r?,
        _ = cancelled(&mut rx) => return Err(closed("read cancelled by the host")),
    };
    let mut source = Source::new(file, limit.map_or(u64::MAX, |l| l.saturating_add(1)))
        .map_err(|e| RemoteError::from_io(&e, "starting a reader thread"))?;
    let mut total = 0u64;
    loop {
        let chunk = tokio::select! {
            c = source.next(path) => c?,
            _ = cancelled(&mut rx) => return Err(closed("read cancelled by the host")),
        };
        let chunks = match chunk {
            None => break,
            Some(Ok(chunks)) => chunks,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(RemoteError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{path} has no data to read without waiting: it is a stream, not a \
                         file's content (read it with exec, e.g. timeout 1 cat {path})"
                    ),
                ))
            }
            Some(Err(e)) => return Err(RemoteError::from_io(&e, path)),
        };
        for buf in chunks {
            total += buf.len() as u64;
            if let Some(limit) = limit.filter(|&l| total > l) {
                return Err(too_large(path, None, limit));
            }
            tokio::select! {
                r = tx.send_owned(Chan::File, buf) => r.map_err(closed)?,
                _ = cancelled(&mut rx) => return Err(closed("read cancelled by the host")),
            }
        }
    }
    Ok(Frame::Done { id: tx.id() })
}

/// Waits for the host to cancel the stream (or the session to end); other frames are ignored.
async fn cancelled(rx: &mut smol_protocol::mux::StreamReceiver) {
    loop {
        match rx.recv().await {
            Ok(Frame::Cancel { .. }) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn stalled(path: &str, doing: &str) -> RemoteError {
    RemoteError::new(
        ErrorKind::Io,
        format!("{path}: {doing} made no progress for {STALL:?} in the guest: gave up"),
    )
}

#[cfg(test)]
mod tests {
    //! Both ways a write's chunks reach the file (on the loop, and pipelined off it), and both
    //! ways a read's come from it, each driven directly whatever file system the test runs on.
    use super::*;
    use smol_protocol::mux::{Incoming, Mux};

    /// A host mux and the agent's side of one stream it opened.
    async fn stream_pair() -> (Stream, Stream, Mux, Mux) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (agent, mut incoming) = Mux::spawn(ar, aw);
        let (host, _) = Mux::spawn(br, bw);
        let s = host
            .open(smol_protocol::Op::WriteFile {
                path: "/x".into(),
                mode: None,
            })
            .unwrap();
        let theirs = loop {
            match incoming.recv().await.unwrap() {
                Incoming::Open(st, _) => break st,
                Incoming::Hello(_) => {}
            }
        };
        (s, theirs, host, agent)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 253) as u8).collect()
    }

    #[tokio::test]
    async fn both_write_paths_keep_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for pipelined in [false, true] {
            let (host, agent, _h, _a) = stream_pair().await;
            let data = pattern(5 << 20);
            let sender = tokio::spawn({
                let data = data.clone();
                async move {
                    for c in data.chunks(100_003) {
                        host.tx.send_data(Chan::File, c).await.unwrap();
                    }
                    host.tx.send_eof(Chan::File).unwrap();
                    host
                }
            });
            let path = dir.path().join(format!("f{pipelined}"));
            let file = fs::File::create(&path).unwrap();
            let mut rx = agent.rx;
            let p = path.to_str().unwrap();
            let file = if pipelined {
                receive_into(&mut rx, file, p).await.unwrap()
            } else {
                receive_on_loop(&mut rx, file, p).await.unwrap()
            };
            drop(file);
            sender.await.unwrap();
            assert!(fs::read(&path).unwrap() == data, "pipelined={pipelined}");
        }
    }

    #[tokio::test]
    async fn both_read_sources_give_every_byte_and_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(3 * MAX_CHUNK * READ_BATCH + 17);
        fs::write(&path, &data).unwrap();
        for threaded in [false, true] {
            for max in [u64::MAX, 1_000_000] {
                let file = fs::File::open(&path).unwrap();
                let mut source = if threaded {
                    Source::Thread(reader(file, max).unwrap())
                } else {
                    Source::Loop {
                        file,
                        left: max,
                        over: false,
                        failed: None,
                    }
                };
                let mut back = Vec::new();
                while let Some(batch) = source.next("f").await.unwrap() {
                    for c in batch.unwrap() {
                        assert!(!c.is_empty() && c.len() <= MAX_CHUNK);
                        back.extend(c);
                    }
                }
                let want = data.len().min(max as usize);
                assert!(back == data[..want], "threaded={threaded} max={max}");
            }
        }
    }
}

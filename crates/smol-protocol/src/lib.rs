//! The host <-> guest agent protocol of smol.
//!
//! One byte stream (a virtio-serial port on the guest side, a unix socket on the host side)
//! carries length-delimited frames ([`codec`]), each a postcard-encoded [`Frame`]. Many
//! operations run at once on one connection: every operation is a *stream* with an id, opened by
//! the host with [`Frame::Open`], and data in either direction is flow-controlled per stream with
//! credits ([`mux`]). Bytes travel as bytes, never base64, and `Data`
//! payloads are neither copied into nor out of a frame buffer ([`codec`]).
//!
//! # Versioning
//! [`PROTOCOL_VERSION`] is a single generation counter; this crate speaks every generation from
//! [`MIN_PROTOCOL_VERSION`] to it ([`Generations::CURRENT`]). Both sides send [`Hello`] first,
//! saying the range they speak; each side then speaks the lower of the two newest generations
//! ([`negotiate`]), and the [`mux`] encodes every frame the way that generation did
//! ([`generation`]). An operation the negotiated generation does not have is refused on the
//! sending side ([`NotInGeneration`]), never sent. The wire encoding of each generation is frozen
//! by a snapshot test in this crate: new fields or variants mean a new generation, and variants
//! are only ever appended. `VERSIONING.md` next to this crate's manifest has the rules.

pub mod codec;
pub mod generation;
pub mod mux;

#[cfg(test)]
mod interop;
#[cfg(test)]
mod snapshots;

pub use generation::{negotiate, Generations, NotInGeneration, VersionMismatch};

use serde::{Deserialize, Serialize};

/// Newest protocol generation spoken by this crate.
pub const PROTOCOL_VERSION: u16 = 4;

/// Oldest protocol generation this crate still speaks: a peer whose newest generation is older
/// is refused. See `VERSIONING.md` for how long a generation stays accepted.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Name of the virtio-serial port that carries the protocol.
pub const PORT_NAME: &str = "smol.agent";

/// Initial per-stream receive window, in bytes, in each direction.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Largest payload of one [`Frame::Data`].
pub const MAX_CHUNK: usize = 256 * 1024;

/// Largest encoded frame accepted by the codec.
pub const MAX_FRAME: usize = MAX_CHUNK + 64 * 1024;

/// Most bytes an `Op::ReadFile` answers (256 MiB): the agent refuses a larger file with
/// `Error(InvalidInput)` naming its size and this limit before it sends any of it, and stops a
/// file that grows past it while being read at `limit + 1` bytes. `Op::ReadFileStream` has no
/// limit. Changing it is a behaviour of both sides: the host enforces it too, for older agents.
pub const READ_FILE_LIMIT: u64 = 256 * 1024 * 1024;

/// Exit code of a command killed because its timeout expired (the `timeout(1)` convention).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code of a command that could not be executed (as a shell reports it).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code of a command that was not found (as a shell reports it).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Whether this crate speaks generation `other` (one of [`Generations::CURRENT`]).
pub fn compatible(other: u16) -> bool {
    Generations::CURRENT.contains(other)
}

/// First frame each side sends on a new connection.
///
/// Its encoding is the same in every generation (it is read before a generation is agreed):
/// the four fields of generation 1, then `min_version`. Fields are only ever appended here, and
/// a decoder ignores the bytes after the fields it knows, so every generation reads every
/// generation's hello; a hello without `min_version` (generation 1 and early generation-2 peers
/// sent none) means the sender speaks only `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Newest protocol generation the sender speaks.
    pub version: u16,
    /// Software version of the sender (crate version).
    pub software: String,
    /// Guest kernel release (`uname -r`); empty when sent by the host.
    pub kernel: String,
    /// Guest uptime in milliseconds when the hello was sent; 0 from the host.
    pub uptime_ms: u64,
    /// Oldest protocol generation the sender speaks (equal to `version` when the peer did not
    /// say).
    pub min_version: u16,
    /// Which host session the hello belongs to. A host's hello carries a fresh random nonce; an
    /// agent's hello echoes the nonce of the host hello it answers (or that its session began
    /// with), and is `Some(0)` when it has had none yet. `None`: a peer from before the field
    /// existed. A host takes only a hello that echoes its own nonce (or `None`), so a hello and
    /// frames of an earlier session still in flight (a branched clone's channel holds its
    /// source's) are never taken for the new session's.
    pub session: Option<u64>,
}

impl Hello {
    /// The generations the sender speaks, `min_version..=version` (a `min_version` above
    /// `version` is taken as `version`).
    pub fn speaks(&self) -> Generations {
        Generations {
            min: self.min_version.min(self.version),
            max: self.version,
        }
    }
}

/// Sub-channel of a stream that a [`Frame::Data`] or [`Frame::Eof`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chan {
    /// Command standard input (host -> guest).
    Stdin,
    /// Command standard output (guest -> host).
    Stdout,
    /// Command standard error (guest -> host).
    Stderr,
    /// File content (either direction).
    File,
}

/// An operation the host asks the agent to perform; it opens a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Run a command. Answered by `Data(Stdout|Stderr)*`, then `Exit` (or `Error`).
    Exec(ExecRequest),
    /// Write a file. The host then sends `Data(File)*` and `Eof(File)`; answered by `Done`.
    WriteFile {
        /// Absolute guest path.
        path: String,
        /// Permission bits; `None` keeps an existing file's mode, else 0o644.
        mode: Option<u32>,
    },
    /// Read a file. Answered by `Data(File)*` then `Done` (or `Error`). Since generation 3 the
    /// agent reads only regular files (symlinks followed; anything else is `Error(Unsupported)`
    /// naming the path and its type) of at most [`READ_FILE_LIMIT`] bytes
    /// (`Error(InvalidInput)` naming the size and the limit).
    ReadFile {
        /// Absolute guest path.
        path: String,
    },
    /// Answered by `Done` at once; measures the round trip.
    Ping,
    /// Flush file systems and power the guest off. Not answered: the VM exits.
    Shutdown,
    /// Open a TCP connection to `127.0.0.1:port` in the guest and relay it: the host sends
    /// `Data(Stdin)*`/`Eof(Stdin)`, the agent answers `Data(Stdout)*`/`Eof(Stdout)`, then `Done`
    /// once both directions ended (or `Error` when the connection is refused).
    Connect {
        /// Guest TCP port.
        port: u16,
    },
    /// (Generation 2.) Attach the read-only file system image at `path` (a guest file of
    /// exactly `size` bytes) to a loop device and mount it at `target`; answered by `Done`
    /// (also when `target` is mounted already), or `Error(NotFound)` when the file is missing or
    /// not `size` bytes long (the host then sends it again).
    MountImage {
        /// Guest path of the image file.
        path: String,
        /// Its file system type (`erofs`, `ext4`).
        fstype: String,
        /// Its expected length in bytes.
        size: u64,
        /// Guest directory to mount it on.
        target: String,
    },
    /// (Generation 2.) Run a command in a container over `rootfs` (a mounted image): its own
    /// mount namespace, root = an overlay of a fresh tmpfs over `rootfs`, with `/proc`, `/dev`
    /// and a `/tmp` of its own; `argv[0]` is looked up in the container's `PATH`. Answered
    /// like `Exec`.
    ExecIn {
        /// The command (its workdir is a path inside the container).
        exec: ExecRequest,
        /// Guest directory of the image's root file system.
        rootfs: String,
    },
    /// (Generation 2.) Start a command in the background, in a session of its own, stdin from
    /// `/dev/null`, stdout and stderr appended to `log` (or discarded). Answered at once by
    /// `Data(Stdout) "pid=<n>\n"` and `Exit(0)` (or `Exit(127)` and a line on stderr when the
    /// program is not found, as `Exec`). `exec.stdin` and `exec.timeout_ms` are ignored.
    Spawn {
        /// The command.
        exec: ExecRequest,
        /// Guest file that collects its output.
        log: Option<String>,
    },
    /// (Generation 3.) Read a regular file of any size as a stream: answered like `ReadFile`
    /// (non-regular files refused the same way) but without [`READ_FILE_LIMIT`]; the host's
    /// credit paces the agent.
    ReadFileStream {
        /// Absolute guest path.
        path: String,
    },
    /// (Generation 4.) Give a cloned guest its own identity (a branch of a running machine
    /// shares its source's memory): set the hostname (and `/etc/hostname`) to `hostname`, mix
    /// `seed` (host randomness, credited as entropy) into the kernel's RNG and reseed it at once
    /// (`RNDADDENTROPY` + `RNDRESEEDCRNG`), so that two clones never produce the same random
    /// bytes. Answered by `Done` (or `Error`).
    Identity {
        /// The new hostname (the machine's name).
        hostname: String,
        /// Host randomness to mix into the guest RNG (32..=512 bytes).
        seed: Vec<u8>,
    },
}

/// A protocol feature (an operation, a field, a frame) and the generation that added it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// What it is, for messages (`"MountImage"`, `"ExecRequest.user"`).
    pub name: &'static str,
    /// The oldest generation that has it.
    pub since: u16,
}

impl Feature {
    const fn new(name: &'static str, since: u16) -> Self {
        Self { name, since }
    }
}

impl Op {
    /// The newest feature this operation uses: it can only be sent to a peer that speaks
    /// generation `since` or newer.
    pub fn feature(&self) -> Feature {
        match self {
            Op::Exec(ExecRequest { user: Some(_), .. }) => {
                Feature::new("Exec with a user (ExecRequest.user)", 2)
            }
            Op::Exec(_) => Feature::new("Exec", 1),
            Op::WriteFile { .. } => Feature::new("WriteFile", 1),
            Op::ReadFile { .. } => Feature::new("ReadFile", 1),
            Op::Ping => Feature::new("Ping", 1),
            Op::Shutdown => Feature::new("Shutdown", 1),
            Op::Connect { .. } => Feature::new("Connect", 1),
            Op::MountImage { .. } => Feature::new("MountImage (container images)", 2),
            Op::ExecIn { .. } => Feature::new("ExecIn (containers)", 2),
            Op::Spawn { .. } => Feature::new("Spawn (background commands)", 2),
            Op::ReadFileStream { .. } => Feature::new("ReadFileStream (streaming file reads)", 3),
            Op::Identity { .. } => Feature::new("Identity (hostname and RNG reseed of a clone)", 4),
        }
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// argv; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing) the agent's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when `None`.
    pub workdir: Option<String>,
    /// Kill the command's process group after this many milliseconds (exit 124).
    pub timeout_ms: Option<u64>,
    /// When true the host sends `Data(Stdin)*` and `Eof(Stdin)`; otherwise stdin is `/dev/null`.
    pub stdin: bool,
    /// (Generation 2.) Run as this user: a name from the guest's `/etc/passwd`, or
    /// `uid[:gid]`, or `name:group`; `None` is root.
    pub user: Option<String>,
}

/// Category of an error reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A path does not exist.
    NotFound,
    /// A file operation named a directory.
    IsADirectory,
    /// A path component is not a directory.
    NotADirectory,
    /// Permission denied.
    PermissionDenied,
    /// The request itself is malformed (relative path, empty argv, ...).
    InvalidInput,
    /// The guest file system is full.
    NoSpace,
    /// The operation is not known to this agent.
    Unsupported,
    /// Any other I/O error.
    Io,
}

/// An error answered by the agent for one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// Category, mapped to a typed error on the host.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}

impl RemoteError {
    /// Builds an error from a kind and message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Maps an I/O error on `what` to a remote error.
    pub fn from_io(err: &std::io::Error, what: &str) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::InvalidInput => ErrorKind::InvalidInput,
            _ => match err.raw_os_error() {
                Some(21) => ErrorKind::IsADirectory,
                Some(20) => ErrorKind::NotADirectory,
                Some(28) => ErrorKind::NoSpace,
                _ => ErrorKind::Io,
            },
        };
        Self::new(kind, format!("{what}: {err}"))
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// One protocol frame. Variant order is the wire format: append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame on a connection, from each side.
    Hello(Hello),
    /// Host opens stream `id` for an operation.
    Open {
        /// Stream id, chosen by the host, unique per connection.
        id: u32,
        /// What to do.
        op: Op,
    },
    /// Bytes on a sub-channel of stream `id`; counts against the receiver's window.
    Data {
        /// Stream id.
        id: u32,
        /// Sub-channel.
        chan: Chan,
        /// Payload, at most [`MAX_CHUNK`] bytes.
        data: bytes::Bytes,
    },
    /// End of a sub-channel of stream `id`.
    Eof {
        /// Stream id.
        id: u32,
        /// Sub-channel that ended.
        chan: Chan,
    },
    /// The receiver consumed `bytes` more of stream `id`: the sender may send that much more.
    Credit {
        /// Stream id.
        id: u32,
        /// Bytes granted.
        bytes: u32,
    },
    /// Host abandons stream `id`: the agent kills its command / stops its transfer.
    Cancel {
        /// Stream id.
        id: u32,
    },
    /// The command of stream `id` ended. Ends the stream.
    Exit {
        /// Stream id.
        id: u32,
        /// Exit status; 128+N for a signal N; 124 on timeout.
        code: i32,
        /// True when the timeout killed the command.
        timed_out: bool,
    },
    /// The operation of stream `id` succeeded. Ends the stream.
    Done {
        /// Stream id.
        id: u32,
    },
    /// The operation of stream `id` failed. Ends the stream.
    Error {
        /// Stream id.
        id: u32,
        /// What went wrong.
        error: RemoteError,
    },
    /// (Generation 2.) The sender ends the connection, saying why (it could not decode a
    /// frame): the receiver fails every open operation with this reason instead of waiting.
    Goodbye {
        /// Why.
        reason: String,
    },
}

impl Frame {
    /// The newest feature this frame uses (for an `Open`, its operation's).
    pub fn feature(&self) -> Feature {
        match self {
            Frame::Hello(_) => Feature::new("Hello", 1),
            Frame::Open { op, .. } => op.feature(),
            Frame::Data { .. } => Feature::new("Data", 1),
            Frame::Eof { .. } => Feature::new("Eof", 1),
            Frame::Credit { .. } => Feature::new("Credit", 1),
            Frame::Cancel { .. } => Feature::new("Cancel", 1),
            Frame::Exit { .. } => Feature::new("Exit", 1),
            Frame::Done { .. } => Feature::new("Done", 1),
            Frame::Error { .. } => Feature::new("Error", 1),
            Frame::Goodbye { .. } => Feature::new("Goodbye", 2),
        }
    }

    /// Stream id a frame belongs to, `None` for connection-level frames.
    pub fn stream_id(&self) -> Option<u32> {
        match self {
            Frame::Hello(_) | Frame::Goodbye { .. } => None,
            Frame::Open { id, .. }
            | Frame::Data { id, .. }
            | Frame::Eof { id, .. }
            | Frame::Credit { id, .. }
            | Frame::Cancel { id }
            | Frame::Exit { id, .. }
            | Frame::Done { id }
            | Frame::Error { id, .. } => Some(*id),
        }
    }

    /// Whether this frame ends its stream (sent by the agent).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Frame::Exit { .. } | Frame::Done { .. } | Frame::Error { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_kinds() {
        let e = std::io::Error::from_raw_os_error(21);
        assert_eq!(RemoteError::from_io(&e, "p").kind, ErrorKind::IsADirectory);
        let e = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(RemoteError::from_io(&e, "p").kind, ErrorKind::NotFound);
        let e = std::io::Error::from_raw_os_error(28);
        assert_eq!(RemoteError::from_io(&e, "p").kind, ErrorKind::NoSpace);
    }

    #[test]
    fn version_gate() {
        assert!(compatible(PROTOCOL_VERSION));
        assert!(compatible(MIN_PROTOCOL_VERSION));
        assert!(!compatible(PROTOCOL_VERSION + 1));
        assert!(!compatible(MIN_PROTOCOL_VERSION - 1));
    }

    /// What each generation added, as the sending side checks it.
    #[test]
    fn features_name_their_generation() {
        let req = |user: Option<&str>| ExecRequest {
            argv: vec!["true".into()],
            env: vec![],
            workdir: None,
            timeout_ms: None,
            stdin: false,
            user: user.map(str::to_string),
        };
        assert_eq!(Op::Exec(req(None)).feature().since, 1);
        assert_eq!(Op::Exec(req(Some("u"))).feature().since, 2);
        assert_eq!(Op::Connect { port: 1 }.feature().since, 1);
        let spawn = Op::Spawn {
            exec: req(None),
            log: None,
        };
        assert_eq!(
            spawn.feature(),
            Feature::new("Spawn (background commands)", 2)
        );
        assert_eq!(Frame::Goodbye { reason: "r".into() }.feature().since, 2);
        let stream = Op::ReadFileStream { path: "/f".into() };
        assert_eq!(stream.feature().since, 3);
        let identity = Op::Identity {
            hostname: "h".into(),
            seed: vec![1],
        };
        assert_eq!(identity.feature().since, 4);
        assert_eq!(Frame::Done { id: 1 }.feature().since, 1);
    }
}

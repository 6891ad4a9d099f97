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
//! [`PROTOCOL_VERSION`] is a single generation counter. Both sides send [`Hello`] first; a host
//! refuses an agent whose generation it does not speak ([`compatible`]). The wire encoding of each
//! generation is frozen by the snapshot test in this crate: new fields or variants mean a new
//! generation, and variants are only ever appended.

pub mod codec;
pub mod mux;

use serde::{Deserialize, Serialize};

/// Protocol generation spoken by this crate.
pub const PROTOCOL_VERSION: u16 = 2;

/// Name of the virtio-serial port that carries the protocol.
pub const PORT_NAME: &str = "smol.agent";

/// Initial per-stream receive window, in bytes, in each direction.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Largest payload of one [`Frame::Data`].
pub const MAX_CHUNK: usize = 256 * 1024;

/// Largest encoded frame accepted by the codec.
pub const MAX_FRAME: usize = MAX_CHUNK + 64 * 1024;

/// Exit code of a command killed because its timeout expired (the `timeout(1)` convention).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code of a command that could not be executed (as a shell reports it).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code of a command that was not found (as a shell reports it).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Whether a peer speaking generation `other` can talk to this crate.
pub fn compatible(other: u16) -> bool {
    other == PROTOCOL_VERSION
}

/// First frame each side sends on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol generation of the sender.
    pub version: u16,
    /// Software version of the sender (crate version).
    pub software: String,
    /// Guest kernel release (`uname -r`); empty when sent by the host.
    pub kernel: String,
    /// Guest uptime in milliseconds when the hello was sent; 0 from the host.
    pub uptime_ms: u64,
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
    /// Read a file. Answered by `Data(File)*` then `Done` (or `Error`).
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

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Freezes the encoding of generation 2 (generation 1 plus three appended ops and
    /// `ExecRequest.user`). If this fails, the wire format changed: bump
    /// PROTOCOL_VERSION and update the snapshot deliberately.
    #[test]
    fn wire_snapshot_generation_2() {
        assert_eq!(PROTOCOL_VERSION, 2);
        let frames = vec![
            Frame::Hello(Hello {
                version: 1,
                software: "x".into(),
                kernel: "k".into(),
                uptime_ms: 300,
            }),
            Frame::Open {
                id: 1,
                op: Op::Exec(ExecRequest {
                    argv: vec!["ls".into()],
                    env: vec![("A".into(), "b".into())],
                    workdir: Some("/".into()),
                    timeout_ms: Some(5),
                    stdin: true,
                    user: Some("u".into()),
                }),
            },
            Frame::Open {
                id: 2,
                op: Op::WriteFile {
                    path: "/f".into(),
                    mode: Some(0o755),
                },
            },
            Frame::Open {
                id: 3,
                op: Op::ReadFile { path: "/f".into() },
            },
            Frame::Open {
                id: 4,
                op: Op::Ping,
            },
            Frame::Open {
                id: 5,
                op: Op::Shutdown,
            },
            Frame::Open {
                id: 6,
                op: Op::Connect { port: 8080 },
            },
            Frame::Open {
                id: 7,
                op: Op::MountImage {
                    path: "/i".into(),
                    fstype: "erofs".into(),
                    size: 4096,
                    target: "/m".into(),
                },
            },
            Frame::Open {
                id: 8,
                op: Op::ExecIn {
                    exec: ExecRequest {
                        argv: vec!["ls".into()],
                        env: vec![],
                        workdir: None,
                        timeout_ms: None,
                        stdin: false,
                        user: None,
                    },
                    rootfs: "/m".into(),
                },
            },
            Frame::Open {
                id: 9,
                op: Op::Spawn {
                    exec: ExecRequest {
                        argv: vec!["ls".into()],
                        env: vec![],
                        workdir: None,
                        timeout_ms: None,
                        stdin: false,
                        user: None,
                    },
                    log: Some("/l".into()),
                },
            },
            Frame::Data {
                id: 1,
                chan: Chan::Stdout,
                data: bytes::Bytes::from_static(&[0, 255]),
            },
            Frame::Eof {
                id: 1,
                chan: Chan::Stdin,
            },
            Frame::Credit { id: 1, bytes: 128 },
            Frame::Cancel { id: 1 },
            Frame::Exit {
                id: 1,
                code: -1,
                timed_out: true,
            },
            Frame::Done { id: 2 },
            Frame::Error {
                id: 3,
                error: RemoteError::new(ErrorKind::NoSpace, "m"),
            },
            Frame::Goodbye { reason: "r".into() },
        ];
        let encoded: Vec<String> = frames
            .iter()
            .map(|f| hex(&postcard::to_allocvec(f).unwrap()))
            .collect();
        let expected = vec![
            "00010178016bac02",
            "01010001026c73010141016201012f010501010175",
            "010201022f6601ed03",
            "010302022f66",
            "010403",
            "010504",
            "010605903f",
            "010706022f690565726f66738020022f6d",
            "01080701026c730000000000022f6d",
            "01090801026c73000000000001022f6c",
            "0201010200ff",
            "030100",
            "04018001",
            "0501",
            "06010101",
            "0702",
            "080305016d",
            "090172",
        ];
        assert_eq!(encoded, expected);
        for f in frames {
            let back: Frame = postcard::from_bytes(&postcard::to_allocvec(&f).unwrap()).unwrap();
            assert_eq!(back, f);
        }
    }

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
        assert!(!compatible(PROTOCOL_VERSION + 1));
    }
}

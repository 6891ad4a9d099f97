//! Protocol generations: the range each side speaks, the negotiation, and the encoding of every
//! frame the way each generation wrote it.
//!
//! The in-memory types of this crate ([`Frame`], [`Op`](crate::Op),
//! [`ExecRequest`](crate::ExecRequest)) are those of the newest generation. An older generation
//! is encoded through a private mirror of its own types (module `v1`), whose bytes are frozen by
//! that generation's snapshot test; decoding goes the other way and fills what the old
//! generation did not have with its meaning there (`ExecRequest.user: None` = root).
//!
//! [`Hello`] is the exception: it is read before a generation is agreed, so its encoding is the
//! same in every generation ([`decode`] reads it whatever the generation).

use std::fmt;

use serde::Deserialize;

use crate::codec::CodecError;
use crate::{Frame, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// A range of protocol generations, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Generations {
    /// Oldest generation spoken.
    pub min: u16,
    /// Newest generation spoken.
    pub max: u16,
}

impl Generations {
    /// What this crate speaks: [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`].
    pub const CURRENT: Generations = Generations {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// `min..=max`.
    pub const fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    /// Exactly one generation (a peer of that generation, in tests).
    pub const fn only(generation: u16) -> Self {
        Self {
            min: generation,
            max: generation,
        }
    }

    /// Whether `generation` is in the range.
    pub fn contains(&self, generation: u16) -> bool {
        (self.min..=self.max).contains(&generation)
    }
}

impl Default for Generations {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl fmt::Display for Generations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.max)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

/// Two sides that have no generation in common.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionMismatch {
    /// Every generation the peer speaks is older than the oldest this side still speaks.
    #[error(
        "the peer speaks protocol generation {peer}, older than the oldest this side speaks \
         (it speaks {ours})"
    )]
    PeerTooOld {
        /// What the peer speaks.
        peer: Generations,
        /// What this side speaks.
        ours: Generations,
    },
    /// Every generation the peer speaks is newer than the newest this side speaks: the peer
    /// cannot go down far enough.
    #[error(
        "the peer speaks protocol generation {peer} and cannot go down to {newest}, the newest \
         this side speaks (it speaks {ours})",
        newest = ours.max
    )]
    PeerTooNew {
        /// What the peer speaks.
        peer: Generations,
        /// What this side speaks.
        ours: Generations,
    },
}

/// The generation two sides speak: the lower of their newest ones, if both still speak it.
/// Both sides compute it from the two hellos and get the same answer.
pub fn negotiate(ours: Generations, peer: &Hello) -> Result<u16, VersionMismatch> {
    let peer = peer.speaks();
    let generation = ours.max.min(peer.max);
    if generation < ours.min {
        Err(VersionMismatch::PeerTooOld { peer, ours })
    } else if generation < peer.min {
        Err(VersionMismatch::PeerTooNew { peer, ours })
    } else {
        Ok(generation)
    }
}

/// A frame (an operation, a field of one) that the generation spoken with the peer does not
/// have: it is refused on this side instead of being sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{feature} needs protocol generation {needs} or newer; the peer speaks generation {generation}"
)]
pub struct NotInGeneration {
    /// What was refused ([`crate::Feature::name`]).
    pub feature: &'static str,
    /// The generation that added it.
    pub needs: u16,
    /// The generation spoken with the peer.
    pub generation: u16,
}

/// Whether `frame` exists in `generation`.
pub fn check(frame: &Frame, generation: u16) -> Result<(), NotInGeneration> {
    let feature = frame.feature();
    if feature.since > generation {
        return Err(NotInGeneration {
            feature: feature.name,
            needs: feature.since,
            generation,
        });
    }
    Ok(())
}

/// Encodes `frame` (without the length prefix) as `generation` does.
pub fn encode(frame: Frame, generation: u16) -> Result<Vec<u8>, CodecError> {
    check(&frame, generation)?;
    Ok(if generation <= 1 {
        postcard::to_allocvec(&v1::Frame::from_current(frame)?)?
    } else {
        postcard::to_allocvec(&frame)?
    })
}

/// postcard's index of the `Hello` variant of [`Frame`], the same in every generation.
const HELLO_VARIANT: u8 = 0;

/// Decodes one frame (without the length prefix) as `generation` wrote it.
pub fn decode(buf: &[u8], generation: u16) -> Result<Frame, postcard::Error> {
    if buf.first() == Some(&HELLO_VARIANT) {
        return decode_hello(&buf[1..]).map(Frame::Hello);
    }
    if generation <= 1 {
        Ok(postcard::from_bytes::<v1::Frame>(buf)?.into_current())
    } else {
        postcard::from_bytes(buf)
    }
}

/// The hello fields of generation 1, which every hello starts with.
#[derive(Deserialize)]
struct HelloV1 {
    version: u16,
    software: String,
    kernel: String,
    uptime_ms: u64,
}

/// Reads a hello of any generation: the generation-1 fields, then `min_version` and `session`
/// if the sender wrote them; bytes after the fields known here are a newer sender's appended
/// fields.
fn decode_hello(buf: &[u8]) -> Result<Hello, postcard::Error> {
    let (base, rest): (HelloV1, &[u8]) = postcard::take_from_bytes(buf)?;
    let (min_version, rest) = if rest.is_empty() {
        (base.version, rest)
    } else {
        postcard::take_from_bytes::<u16>(rest)?
    };
    let session = if rest.is_empty() {
        None
    } else {
        postcard::take_from_bytes::<Option<u64>>(rest)?.0
    };
    Ok(Hello {
        version: base.version,
        software: base.software,
        kernel: base.kernel,
        uptime_ms: base.uptime_ms,
        min_version,
        session,
    })
}

/// Generation 1 (the protocol of the first release, up to commit da92c19): five operations
/// and `Connect`, an `ExecRequest` without `user`, no `Goodbye`. Variant and field order is the
/// wire format; `snapshots::generation_1` freezes it.
mod v1 {
    use serde::{Deserialize, Serialize};

    use super::NotInGeneration;
    use crate::{Chan, Hello, RemoteError};

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum Frame {
        Hello(Hello),
        Open {
            id: u32,
            op: Op,
        },
        Data {
            id: u32,
            chan: Chan,
            data: bytes::Bytes,
        },
        Eof {
            id: u32,
            chan: Chan,
        },
        Credit {
            id: u32,
            bytes: u32,
        },
        Cancel {
            id: u32,
        },
        Exit {
            id: u32,
            code: i32,
            timed_out: bool,
        },
        Done {
            id: u32,
        },
        Error {
            id: u32,
            error: RemoteError,
        },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum Op {
        Exec(ExecRequest),
        WriteFile { path: String, mode: Option<u32> },
        ReadFile { path: String },
        Ping,
        Shutdown,
        Connect { port: u16 },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct ExecRequest {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        workdir: Option<String>,
        timeout_ms: Option<u64>,
        stdin: bool,
    }

    fn missing(frame: &crate::Frame) -> NotInGeneration {
        let feature = frame.feature();
        NotInGeneration {
            feature: feature.name,
            needs: feature.since,
            generation: 1,
        }
    }

    impl Frame {
        /// The generation-1 form of a frame; `Err` when generation 1 has no such frame.
        pub(super) fn from_current(frame: crate::Frame) -> Result<Self, NotInGeneration> {
            use crate::Frame as F;
            Ok(match frame {
                F::Hello(h) => Frame::Hello(h),
                F::Open { id, op } => {
                    let op = match op {
                        crate::Op::Exec(crate::ExecRequest {
                            argv,
                            env,
                            workdir,
                            timeout_ms,
                            stdin,
                            user: None,
                        }) => Op::Exec(ExecRequest {
                            argv,
                            env,
                            workdir,
                            timeout_ms,
                            stdin,
                        }),
                        crate::Op::WriteFile { path, mode } => Op::WriteFile { path, mode },
                        crate::Op::ReadFile { path } => Op::ReadFile { path },
                        crate::Op::Ping => Op::Ping,
                        crate::Op::Shutdown => Op::Shutdown,
                        crate::Op::Connect { port } => Op::Connect { port },
                        op => return Err(missing(&F::Open { id, op })),
                    };
                    Frame::Open { id, op }
                }
                F::Data { id, chan, data } => Frame::Data { id, chan, data },
                F::Eof { id, chan } => Frame::Eof { id, chan },
                F::Credit { id, bytes } => Frame::Credit { id, bytes },
                F::Cancel { id } => Frame::Cancel { id },
                F::Exit {
                    id,
                    code,
                    timed_out,
                } => Frame::Exit {
                    id,
                    code,
                    timed_out,
                },
                F::Done { id } => Frame::Done { id },
                F::Error { id, error } => Frame::Error { id, error },
                f @ F::Goodbye { .. } => return Err(missing(&f)),
            })
        }

        /// The frame in today's types, with what generation 1 did not have set to what it
        /// meant there.
        pub(super) fn into_current(self) -> crate::Frame {
            use crate::Frame as F;
            match self {
                Frame::Hello(h) => F::Hello(h),
                Frame::Open { id, op } => F::Open {
                    id,
                    op: match op {
                        Op::Exec(ExecRequest {
                            argv,
                            env,
                            workdir,
                            timeout_ms,
                            stdin,
                        }) => crate::Op::Exec(crate::ExecRequest {
                            argv,
                            env,
                            workdir,
                            timeout_ms,
                            stdin,
                            user: None,
                        }),
                        Op::WriteFile { path, mode } => crate::Op::WriteFile { path, mode },
                        Op::ReadFile { path } => crate::Op::ReadFile { path },
                        Op::Ping => crate::Op::Ping,
                        Op::Shutdown => crate::Op::Shutdown,
                        Op::Connect { port } => crate::Op::Connect { port },
                    },
                },
                Frame::Data { id, chan, data } => F::Data { id, chan, data },
                Frame::Eof { id, chan } => F::Eof { id, chan },
                Frame::Credit { id, bytes } => F::Credit { id, bytes },
                Frame::Cancel { id } => F::Cancel { id },
                Frame::Exit {
                    id,
                    code,
                    timed_out,
                } => F::Exit {
                    id,
                    code,
                    timed_out,
                },
                Frame::Done { id } => F::Done { id },
                Frame::Error { id, error } => F::Error { id, error },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min_version: u16, version: u16) -> Hello {
        Hello {
            version,
            software: "t".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version,
            session: None,
        }
    }

    /// Both sides pick the lower newest generation, and agree on it.
    #[test]
    fn negotiation_picks_the_lower_newest_generation() {
        let cases = [
            // (ours, peer's hello min..=max, expected)
            (Generations::new(1, 2), (1, 2), Ok(2)),
            (Generations::new(1, 2), (1, 1), Ok(1)),
            (Generations::new(1, 1), (1, 2), Ok(1)),
            (Generations::new(1, 2), (2, 2), Ok(2)),
            (Generations::new(1, 3), (1, 2), Ok(2)),
            (Generations::new(2, 3), (1, 1), Err("old")),
            (Generations::new(1, 2), (3, 4), Err("new")),
            (Generations::new(2, 2), (1, 1), Err("old")),
        ];
        for (ours, (pmin, pmax), want) in cases {
            let peer = hello(pmin, pmax);
            let got = negotiate(ours, &peer);
            match (want, &got) {
                (Ok(g), Ok(h)) => assert_eq!(g, *h, "{ours:?} with {pmin}..={pmax}"),
                (Err("old"), Err(VersionMismatch::PeerTooOld { .. })) => {}
                (Err("new"), Err(VersionMismatch::PeerTooNew { .. })) => {}
                _ => panic!("{ours:?} with {pmin}..={pmax}: {got:?}"),
            }
            // the peer, negotiating with our hello, reaches the same answer
            let back = negotiate(Generations::new(pmin, pmax), &hello(ours.min, ours.max));
            assert_eq!(got.is_ok(), back.is_ok(), "{ours:?} with {pmin}..={pmax}");
            if let (Ok(a), Ok(b)) = (&got, &back) {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn mismatches_name_both_ranges() {
        let e = negotiate(Generations::new(2, 3), &hello(1, 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the peer speaks protocol generation 1, older than the oldest this side speaks (it \
             speaks 2 to 3)"
        );
        let e = negotiate(Generations::new(1, 2), &hello(3, 4)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the peer speaks protocol generation 3 to 4 and cannot go down to 2, the newest this \
             side speaks (it speaks 1 to 2)"
        );
    }

    /// A hello that says no `min_version` (generation 1, early generation 2) speaks only its
    /// `version`, one without `session` knows no session nonces; bytes after the known fields
    /// (a newer peer's) are ignored.
    #[test]
    fn hellos_of_every_generation_decode() {
        let v1 = [0x00, 0x01, 0x01, 0x78, 0x01, 0x6b, 0xac, 0x02];
        let Frame::Hello(h) = decode(&v1, 2).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!(h.speaks(), Generations::only(1));
        assert_eq!(h.session, None);
        let mut ranged = v1.to_vec();
        ranged.push(0x01); // min_version 1, no session (before the field existed)
        let Frame::Hello(h) = decode(&ranged, 1).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!((h.speaks(), h.session), (Generations::new(1, 1), None));
        let mut newer = ranged.clone();
        // session Some(7), then fields from the future
        newer.extend([0x01, 0x07, 0x55, 0x66]);
        let Frame::Hello(h) = decode(&newer, 1).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!(h.speaks(), Generations::new(1, 1));
        assert_eq!(h.uptime_ms, 300);
        assert_eq!(h.session, Some(7));
    }

    #[test]
    fn frames_a_generation_lacks_are_refused_not_encoded() {
        let e = encode(Frame::Goodbye { reason: "r".into() }, 1).unwrap_err();
        match e {
            CodecError::NotInGeneration(n) => {
                assert_eq!((n.feature, n.needs, n.generation), ("Goodbye", 2, 1))
            }
            other => panic!("{other:?}"),
        }
        assert!(encode(Frame::Goodbye { reason: "r".into() }, 2).is_ok());
    }
}

//! Framing: a 4-byte big-endian length, then a postcard-encoded [`Frame`].
//!
//! `Data` frames take a fast path with the same bytes on the wire: the decoder hands out the
//! payload as a slice of the frame buffer, and [`encode_data_header`] lets a writer send the
//! payload straight from its own buffer. Under TCG every guest-side copy of a payload costs
//! throughput, so these matter. `Data` frames are the same in every generation; every other
//! frame is encoded and decoded as the codec's protocol generation does ([`crate::generation`]).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::generation::{self, NotInGeneration};
use crate::{Chan, Frame, MAX_FRAME, PROTOCOL_VERSION};

/// postcard's index of the `Data` variant of [`Frame`].
const DATA_VARIANT: u8 = 2;

fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn chan_index(chan: Chan) -> u8 {
    match chan {
        Chan::Stdin => 0,
        Chan::Stdout => 1,
        Chan::Stderr => 2,
        Chan::File => 3,
    }
}

fn chan_from(index: u64) -> Option<Chan> {
    Some(match index {
        0 => Chan::Stdin,
        1 => Chan::Stdout,
        2 => Chan::Stderr,
        3 => Chan::File,
        _ => return None,
    })
}

/// Writes the length prefix and postcard header of a `Data` frame whose payload has `len`
/// bytes; the payload itself must follow on the wire.
pub fn encode_data_header(id: u32, chan: Chan, len: usize, dst: &mut BytesMut) {
    let mut hdr = BytesMut::with_capacity(16);
    hdr.put_u8(DATA_VARIANT);
    put_varint(&mut hdr, u64::from(id));
    hdr.put_u8(chan_index(chan));
    put_varint(&mut hdr, len as u64);
    dst.put_u32((hdr.len() + len) as u32);
    dst.extend_from_slice(&hdr);
}

/// Decodes a `Data` frame without copying its payload.
fn decode_data(mut buf: BytesMut) -> Option<Frame> {
    let mut pos = 1;
    let id = u32::try_from(get_varint(&buf, &mut pos)?).ok()?;
    let chan = chan_from(get_varint(&buf, &mut pos)?)?;
    let len = usize::try_from(get_varint(&buf, &mut pos)?).ok()?;
    if buf.len() - pos != len {
        return None;
    }
    buf.advance(pos);
    Some(Frame::Data {
        id,
        chan,
        data: buf.freeze(),
    })
}

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying byte stream failed (or a frame exceeded [`MAX_FRAME`]).
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame did not decode: the peers disagree on the protocol.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The frame does not exist in the codec's generation.
    #[error(transparent)]
    NotInGeneration(#[from] NotInGeneration),
}

/// tokio-util codec turning a byte stream into [`Frame`]s and back, in one protocol generation
/// (which a [`crate::mux::Mux`] changes once the hellos agreed on one).
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    generation: Arc<AtomicU16>,
}

impl Default for FrameCodec {
    /// A codec of the newest generation, [`PROTOCOL_VERSION`].
    fn default() -> Self {
        Self::new(PROTOCOL_VERSION)
    }
}

impl FrameCodec {
    /// A codec of `generation`.
    pub fn new(generation: u16) -> Self {
        Self::shared(Arc::new(AtomicU16::new(generation)))
    }

    /// A codec whose generation is whatever `generation` holds when a frame is encoded or
    /// decoded (a mux sets it once negotiated).
    pub fn shared(generation: Arc<AtomicU16>) -> Self {
        Self {
            inner: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec(),
            generation,
        }
    }

    /// The generation frames are encoded and decoded in now.
    pub fn generation(&self) -> u16 {
        self.generation.load(Ordering::Acquire)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.inner.decode(src)? {
            Some(buf) if buf.first() == Some(&DATA_VARIANT) => match decode_data(buf) {
                Some(f) => Ok(Some(f)),
                None => Err(CodecError::Malformed(
                    postcard::Error::DeserializeBadEncoding,
                )),
            },
            Some(buf) => {
                // A frame newer than the generation spoken is the peer breaking the agreement
                // (the writer never sends one): refused like the writer refuses it.
                let generation = self.generation();
                let frame = generation::decode(&buf, generation)?;
                generation::check(&frame, generation)?;
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        if let Frame::Data { id, chan, data } = &frame {
            encode_data_header(*id, *chan, data.len(), dst);
            dst.extend_from_slice(data);
            return Ok(());
        }
        let buf = generation::encode(frame, self.generation())?;
        self.inner.encode(Bytes::from(buf), dst)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Chan;

    #[test]
    fn roundtrip_and_partial_input() {
        let mut c = FrameCodec::default();
        let mut buf = BytesMut::new();
        let f = Frame::Data {
            id: 7,
            chan: Chan::File,
            data: Bytes::from(vec![1; 1000]),
        };
        c.encode(f.clone(), &mut buf).unwrap();
        let mut part = buf.split_to(10);
        assert!(c.decode(&mut part).unwrap().is_none());
        part.unsplit(buf);
        assert_eq!(c.decode(&mut part).unwrap(), Some(f));
    }

    /// The fast path puts exactly postcard's bytes on the wire, for every channel and for ids
    /// and lengths that need multi-byte varints.
    #[test]
    fn data_fast_path_matches_postcard() {
        for (id, chan, len) in [
            (1, Chan::Stdin, 0),
            (300, Chan::Stdout, 200),
            (u32::MAX, Chan::File, 70_000),
            (5, Chan::Stderr, 1),
        ] {
            let f = Frame::Data {
                id,
                chan,
                data: Bytes::from(vec![9u8; len]),
            };
            let mut fast = BytesMut::new();
            FrameCodec::default().encode(f.clone(), &mut fast).unwrap();
            let slow = postcard::to_allocvec(&f).unwrap();
            assert_eq!(&fast[4..], &slow[..]);
            assert_eq!(
                u32::from_be_bytes(fast[..4].try_into().unwrap()) as usize,
                slow.len()
            );
            assert_eq!(FrameCodec::default().decode(&mut fast).unwrap(), Some(f));
        }
        // a Data frame whose declared length disagrees with the frame is malformed
        let mut bad = BytesMut::from(&[0, 0, 0, 5, 2, 1, 1, 9, 0][..]);
        assert!(FrameCodec::default().decode(&mut bad).is_err());
    }

    /// Found by the frame_codec fuzz target (docs/FUZZING.md): a generation-2 codec decoded
    /// an `Open` of `ReadFileStream` (generation 3), a frame it then could not encode.
    #[test]
    fn a_frame_newer_than_the_generation_is_refused() {
        let crash: &[u8] = &[0x0, 0x0, 0x0, 0x4, 0x1, 0x4, 0x9, 0x0, 0x80, 0x0];
        let mut buf = BytesMut::from(crash);
        assert!(matches!(
            FrameCodec::new(2).decode(&mut buf),
            Err(CodecError::NotInGeneration(NotInGeneration {
                needs: 3,
                ..
            }))
        ));
        let mut buf = BytesMut::from(crash);
        let f = FrameCodec::new(3).decode(&mut buf).unwrap().unwrap();
        assert!(matches!(
            f,
            Frame::Open {
                id: 4,
                op: crate::Op::ReadFileStream { .. }
            }
        ));
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut c = FrameCodec::default();
        let mut buf = BytesMut::from(&((MAX_FRAME as u32 + 1).to_be_bytes())[..]);
        assert!(c.decode(&mut buf).is_err());
        let mut c = FrameCodec::default();
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(c.decode(&mut buf), Err(CodecError::Malformed(_))));
    }
}

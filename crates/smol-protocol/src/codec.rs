//! Framing: a 4-byte big-endian length, then a postcard-encoded [`Frame`].

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::{Frame, MAX_FRAME};

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying byte stream failed (or a frame exceeded [`MAX_FRAME`]).
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame did not decode: the peers disagree on the protocol.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

/// tokio-util codec turning a byte stream into [`Frame`]s and back.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self {
            inner: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .new_codec(),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.inner.decode(src)? {
            Some(buf) => Ok(Some(postcard::from_bytes(&buf)?)),
            None => Ok(None),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let buf = postcard::to_allocvec(&frame)?;
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
            data: vec![1; 1000],
        };
        c.encode(f.clone(), &mut buf).unwrap();
        let mut part = buf.split_to(10);
        assert!(c.decode(&mut part).unwrap().is_none());
        part.unsplit(buf);
        assert_eq!(c.decode(&mut part).unwrap(), Some(f));
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

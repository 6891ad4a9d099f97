//! The frame decoder of both sides (smol_protocol::codec::FrameCodec), in every generation this
//! crate speaks: bytes from the guest (host side) or from the host (agent side). Every frame
//! that decodes must encode again in the same generation and decode to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use smol_protocol::codec::FrameCodec;
use smol_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    for generation in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
        let mut codec = FrameCodec::new(generation);
        let mut buf = BytesMut::from(data);
        // Each decoded frame consumes bytes, so this ends; an error ends the stream.
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            let mut again = BytesMut::new();
            codec
                .encode(frame.clone(), &mut again)
                .unwrap_or_else(|e| panic!("a decoded frame does not encode: {e}: {frame:?}"));
            let back = codec
                .decode(&mut again)
                .unwrap_or_else(|e| panic!("a re-encoded frame does not decode: {e}: {frame:?}"));
            assert_eq!(back.as_ref(), Some(&frame), "generation {generation}");
            assert!(again.is_empty(), "a re-encoded frame left bytes behind");
        }
    }
});

//! [`FileReader`]: a guest file read as a stream ([`Machine::read_file_stream`]).
//!
//! [`Machine::read_file_stream`]: crate::Machine::read_file_stream

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// The content of a guest file, chunk by chunk, paced by the reader (the agent reads ahead at
/// most one flow-control window, 8 MiB). Also an [`AsyncRead`] (its errors are
/// `std::io::Error`s wrapping the [`Error`]: `e.get_ref()` and downcast). Dropping it stops
/// the read in the guest.
#[derive(Debug)]
pub struct FileReader {
    rx: mpsc::Receiver<Result<Vec<u8>>>,
    pending: Vec<u8>,
    offset: usize,
}

impl FileReader {
    /// Wraps a receiver of chunks that ends after the last one (for backends).
    pub fn new(rx: mpsc::Receiver<Result<Vec<u8>>>) -> Self {
        Self {
            rx,
            pending: Vec::new(),
            offset: 0,
        }
    }

    /// The next chunk; `None` at the end of the file. An error ends the stream.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<u8>>> {
        if self.offset < self.pending.len() {
            let rest = self.pending.split_off(self.offset);
            self.pending.clear();
            self.offset = 0;
            return Some(Ok(rest));
        }
        self.rx.recv().await
    }
}

impl AsyncRead for FileReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.offset >= this.pending.len() {
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(std::io::Error::other(e))),
                Poll::Ready(Some(Ok(chunk))) => {
                    this.pending = chunk;
                    this.offset = 0;
                }
            }
        }
        let n = buf.remaining().min(this.pending.len() - this.offset);
        buf.put_slice(&this.pending[this.offset..this.offset + n]);
        this.offset += n;
        Poll::Ready(Ok(()))
    }
}

/// The error of a backend without streaming reads.
pub(crate) fn not_supported() -> Error {
    Error::NotSupported {
        message: "read_file_stream is not available on this target; use read_file".into(),
    }
}

//! A layer's tar stream, decompressed and hashed on a helper thread while the caller applies
//! it: decompression (and the diff_id hash) overlap with the file system work.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SendError, SyncSender};
use std::thread::JoinHandle;

use super::oci::{LayerCompression, Sha256};
use super::unpack::decompress;

const CHUNK: usize = 256 * 1024;

/// Reads the decompressed layer; [`LayerStream::finish`] gives its `sha256:` digest.
pub(crate) struct LayerStream {
    rx: Option<Receiver<io::Result<Vec<u8>>>>,
    cur: Vec<u8>,
    pos: usize,
    worker: Option<JoinHandle<io::Result<String>>>,
}

impl LayerStream {
    /// Opens the blob at `path` (compression sniffed from its first bytes) and starts the
    /// helper thread.
    pub fn open(path: &Path) -> io::Result<Self> {
        let f = File::open(path)?;
        let mut br = BufReader::with_capacity(1 << 20, f);
        let compression = LayerCompression::sniff(br.fill_buf()?);
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(16);
        let worker = std::thread::Builder::new()
            .name("smol-layer".into())
            .spawn(move || -> io::Result<String> {
                let mut dec = match decompress(compression, br) {
                    Ok(d) => d,
                    Err(e) => return Err(report(&tx, e)),
                };
                let mut h = Sha256::new();
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let mut n = 0;
                    // Fill the chunk (decoders return little at a time).
                    while n < CHUNK {
                        match dec.read(&mut buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(report(&tx, e)),
                        }
                    }
                    if n == 0 {
                        return Ok(h.finish());
                    }
                    buf.truncate(n);
                    h.update(&buf);
                    if tx.send(Ok(buf)).is_err() {
                        // The reader gave up (an error on its side, or dropped): stop.
                        return Err(reader_closed());
                    }
                }
            })?;
        Ok(LayerStream {
            rx: Some(rx),
            cur: Vec::new(),
            pos: 0,
            worker: Some(worker),
        })
    }

    /// Reads the rest (a tar stream ends before its padding), waits for the helper and
    /// returns the digest of the whole decompressed stream.
    pub fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        self.rx.take();
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            _ => Err(io::Error::other("layer decompression thread panicked")),
        }
    }
}

impl Read for LayerStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The helper finished: end of stream.
                Err(_) => {
                    self.rx = None;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        // Closing the channel stops the helper at its next chunk; wait for it so no thread
        // outlives the unpack.
        self.rx.take();
        match self.worker.take().map(|w| w.join()) {
            None | Some(Ok(Ok(_))) => {}
            // The expected end of a stream dropped half-way.
            Some(Ok(Err(e))) if e.kind() == io::ErrorKind::BrokenPipe => {}
            // An error the reader never read (it stopped first): nobody else will see it.
            Some(Ok(Err(e))) => {
                tracing::debug!(error = %e, "layer stream dropped; its decompression had failed")
            }
            Some(Err(_)) => tracing::warn!("layer decompression thread panicked"),
        }
    }
}

/// The helper's error when the reader is gone (BrokenPipe: what `Drop` expects).
fn reader_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "layer reader closed")
}

/// Hands a decompression error to the reader and returns a copy of it for the helper's
/// result. A reader gone already (closed channel) is the expected case: logged at debug.
fn report(tx: &SyncSender<io::Result<Vec<u8>>>, e: io::Error) -> io::Error {
    // Kind Other: BrokenPipe stays unambiguous (the reader closed).
    let copy = io::Error::other(e.to_string());
    if let Err(SendError(Err(e))) = tx.send(Err(e)) {
        tracing::debug!(error = %e, "layer reader gone before a decompression error");
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn streams_and_hashes_gzip_and_plain() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let plain = d.path().join("plain");
        std::fs::write(&plain, &data).unwrap();
        let gz = d.path().join("gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let want = super::super::oci::sha256_digest(&data);
        for p in [&plain, &gz] {
            let mut s = LayerStream::open(p).unwrap();
            let mut head = vec![0u8; 1000];
            s.read_exact(&mut head).unwrap();
            assert_eq!(head, data[..1000]);
            assert_eq!(s.finish().unwrap(), want);
        }
        // Dropped half-way: the helper stops, nothing hangs.
        let mut s = LayerStream::open(&gz).unwrap();
        s.read_exact(&mut [0u8; 10]).unwrap();
        drop(s);
        // A corrupt stream is an error, not a short read.
        let mut bad = std::fs::read(&gz).unwrap();
        let n = bad.len();
        bad.truncate(n / 2);
        std::fs::write(&gz, bad).unwrap();
        let s = LayerStream::open(&gz).unwrap();
        assert!(s.finish().is_err());
    }
}

//! Writing a guest file from a stream of chunks: `Op::WriteFile` (every generation), its
//! `Data(File)` frames sent as the chunks arrive, paced by the agent's credit, so the host holds
//! at most a chunk and a flow-control window whatever the file's size. The agent writes beside
//! the target and renames at the end: a write that fails or is cancelled part way (the source
//! failed, the agent refused) leaves the old content.

use futures::StreamExt;
use smol_protocol::{Chan, Op, MAX_CHUNK};

use super::{guard, terminal, AgentConn, AgentError};
use crate::backend::FileChunks;
use crate::error::Error;

/// Why a streamed write failed: the agent (mapped like every agent error) or the source of the
/// bytes (its error as it is; the write was cancelled in the guest).
#[derive(Debug)]
pub enum WriteError {
    /// The agent or its channel failed.
    Agent(AgentError),
    /// The stream of bytes failed.
    Source(Error),
}

impl From<AgentError> for WriteError {
    fn from(e: AgentError) -> Self {
        WriteError::Agent(e)
    }
}

impl From<smol_protocol::mux::Closed> for WriteError {
    fn from(e: smol_protocol::mux::Closed) -> Self {
        WriteError::Agent(AgentError::Closed(e))
    }
}

impl AgentConn {
    /// Writes the bytes of `chunks` to `path` in the guest (`mode`, or the existing file's, or
    /// 0o644). A failing `chunks` cancels the write (the old content stays) and is returned as
    /// [`WriteError::Source`]; an agent that refuses early (a directory, a full disk) stops the
    /// sending.
    pub async fn write_file_stream(
        &self,
        path: &str,
        mode: Option<u32>,
        mut chunks: FileChunks,
    ) -> Result<(), WriteError> {
        let mut s = self
            .mux
            .open(Op::WriteFile {
                path: path.to_string(),
                mode,
            })
            .map_err(AgentError::from)?;
        let mut g = guard(&s);
        let tx = s.tx.clone();
        let send = async move {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(WriteError::Source)?;
                if chunk.is_empty() {
                    continue;
                }
                if chunk.len() <= MAX_CHUNK {
                    tx.send_owned(Chan::File, chunk).await?; // no copy
                } else {
                    tx.send_data(Chan::File, &chunk).await?; // copied piece by piece
                }
            }
            tx.send_eof(Chan::File)?;
            Ok::<(), WriteError>(())
        };
        // On an error of the source the guard (not done) cancels the write in the guest.
        let early = tokio::select! {
            r = send => { r?; None }
            f = s.rx.recv() => Some(f?),
        };
        let frame = match early {
            Some(f) => f,
            None => s.rx.recv().await?,
        };
        g.done = true;
        terminal(frame).map_err(WriteError::Agent)
    }
}

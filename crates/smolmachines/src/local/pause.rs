//! `pause()` / `resume()` of a local machine: QMP `stop` / `cont`. A paused machine keeps its
//! memory and its VMM; its public state is `paused`, and exec and file operations are
//! `InvalidState` naming that state (an operation already in flight waits). `stop` resumes it
//! first (so the guest powers off cleanly), `delete` kills it as it is.
//!
//! The pause is this handle's: the record does not hold it, so another process's `connect`
//! of a paused machine waits for an agent that does not answer (a later slice records it).

use super::super::qmp::Qmp;
use super::*;

impl LocalMachine {
    /// One QMP command on this machine's VMM; a failure is a `Protocol` error naming `what`.
    pub(super) async fn qmp_command(&self, command: &str, what: &str) -> Result<()> {
        let failed = |e: super::super::qmp::QmpError| Error::Protocol {
            message: format!(
                "cannot {what} machine {:?} (QMP {command}): {e}",
                self.inner.name
            ),
        };
        let mut qmp = Qmp::connect(&self.inner.spec.qmp_socket())
            .await
            .map_err(failed)?;
        qmp.execute(command, None).await.map_err(failed)?;
        Ok(())
    }

    /// Stops the vCPUs (phase `Paused`). Pausing a paused machine is a no-op; anything but a
    /// running or paused machine is `InvalidState`.
    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    pub(crate) async fn pause_vm(&self) -> Result<()> {
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        if self.phase() == Phase::Paused {
            return Ok(());
        }
        // the phase first: operations that start from now on are refused
        self.apply(Event::Pause, "pause")?;
        if let Err(e) = self.qmp_command("stop", "pause").await {
            Self::note(&self.inner, Event::Resume);
            return Err(e);
        }
        tracing::info!("paused");
        Ok(())
    }

    /// Lets the vCPUs go on (phase `Running`). Resuming a running machine is a no-op.
    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    pub(crate) async fn resume_vm(&self) -> Result<()> {
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        match self.phase() {
            Phase::Running => return Ok(()),
            Phase::Paused => {}
            _ => return Err(self.invalid_state("resume")),
        }
        self.qmp_command("cont", "resume").await?;
        self.apply(Event::Resume, "resume")?;
        tracing::info!("resumed");
        Ok(())
    }

    /// Before a stop of a paused machine: let its vCPUs go on so the guest can power off
    /// cleanly (a failure only means the stop ends the VMM the hard way, after its timeout).
    pub(super) async fn unpause_for_stop(&self) {
        if let Err(e) = self.qmp_command("cont", "resume before stopping").await {
            tracing::warn!(machine = %self.inner.name, error = %e, "a paused machine is stopped without resuming it");
        }
    }
}

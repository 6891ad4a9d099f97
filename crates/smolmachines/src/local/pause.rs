//! `pause()` / `resume()` of a local machine: QMP `stop` / `cont`. A paused machine keeps its
//! memory and its VMM; its public state is `paused`, and exec and file operations are
//! `InvalidState` naming that state (an operation already in flight waits). `stop` resumes it
//! first (so the guest powers off cleanly), `delete` kills it as it is.
//!
//! The record holds the pause (`Record.paused`), so another process (or handle) sees it:
//! `list` reports `paused`, and `open` / `connect` attach to the VMM without waiting for the
//! agent (which cannot answer while the vCPUs are stopped). Such a handle is `Paused`; its
//! `resume()` sends `cont`, then connects to the agent as an attach does.

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
        // the record before the VM: a process that dies in between leaves a running VM
        // recorded as paused, which a later handle's resume() (a no-op `cont`) sets right
        self.save_record(|r| r.paused = true).await;
        if let Err(e) = self.qmp_command("stop", "pause").await {
            self.save_record(|r| r.paused = false).await;
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
        self.save_record(|r| r.paused = false).await;
        self.apply(Event::Resume, "resume")?;
        // a handle that attached to the paused VM has no agent yet: the guest answers now
        let attached = self.inner.conn.lock().expect("conn lock").is_some();
        if !attached {
            tracing::debug!("connecting to the agent of the resumed VM");
            self.reconnect().await?;
        }
        tracing::info!("resumed");
        Ok(())
    }

    /// Attaches to the VMM of a machine recorded as paused (another process or handle paused
    /// it): watches the VMM, waits for no agent (its vCPUs are stopped), and leaves the phase
    /// `Paused`. `resume()` connects to the agent.
    #[tracing::instrument(skip(self), fields(machine = %self.inner.name, pid = vmm_id.pid))]
    pub(crate) async fn attach_paused(&self, vmm_id: ProcId) -> Result<()> {
        self.apply(Event::Boot, "attach")?;
        self.watch_foreign_vmm(vmm_id);
        self.apply(Event::Booted, "attach")?;
        self.apply(Event::Pause, "attach")?;
        tracing::info!("attached to a paused machine");
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

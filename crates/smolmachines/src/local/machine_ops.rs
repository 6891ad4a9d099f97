//! [`MachineBackend`] for [`LocalMachine`]: the seam's operations on one local machine
//! (exec, files, ports, and the lifecycle operations, one at a time per machine).

use smol_protocol::Op;

use super::super::agent::{ReadError, WriteError, READ_IDLE_TIMEOUT};
use super::*;

/// How long a readiness probe waits for an older agent's connect to be refused (this tree's
/// agent answers at once either way).
const PORT_PROBE_WAIT: Duration = Duration::from_secs(2);

impl LocalMachine {
    /// After attaching to a networked machine of another process: its egress filter ended
    /// with that process (a detached machine), so this process starts it again and holds the
    /// guest's link (`net::resume`); nothing when another process's filter still serves it.
    /// A failure is logged: the machine stays usable, its link down (fail closed).
    pub(super) fn resume_network(&self) {
        let (network, filter) = {
            let r = self.inner.record.lock().expect("record lock");
            (r.network, crate::local::egress::Filter::of_record(&r))
        };
        if !network {
            return;
        }
        match crate::local::net::resume(
            &self.inner.spec.dir,
            &self.inner.passt,
            &self.inner.name,
            filter,
        ) {
            Ok(Some(child)) => self.inner.helpers.lock().expect("helpers lock").push(child),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(machine = %self.inner.name, error = %e, "the guest's network could not be resumed: its link stays down")
            }
        }
    }

    /// Maps a failed read: the agent's errors as every agent error, the host's limits as they
    /// are.
    async fn map_read_err(&self, e: ReadError) -> Error {
        match e {
            ReadError::Agent(e) => self.map_err(e).await,
            ReadError::Host(e) => e,
        }
    }
}

#[async_trait::async_trait]
impl MachineBackend for LocalMachine {
    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn state(&self) -> Result<MachineState> {
        Ok(self.current_state())
    }

    async fn exec(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecResult> {
        if opts.background {
            let op = Op::Spawn {
                exec: self.request(argv, opts)?,
                log: None,
            };
            let mut r = self.exec_op(op, argv, opts).await?;
            if r.exit_code == 0 {
                r.pid = r
                    .stdout
                    .trim()
                    .strip_prefix("pid=")
                    .and_then(|p| p.parse().ok());
            }
            return Ok(r);
        }
        self.exec_op(Op::Exec(self.request(argv, opts)?), argv, opts)
            .await
    }

    async fn run(&self, image: &str, argv: &[String], opts: &ExecOptions) -> Result<ExecResult> {
        self.run_in_image(image, argv, opts).await
    }

    async fn exec_stream(&self, argv: &[String], opts: &ExecOptions) -> Result<ExecStream> {
        let req = self.request(argv, opts)?;
        let conn = self.conn("exec")?;
        // The same safety net as a buffered exec: the timeout plus a grace.
        let deadline = opts.timeout.map(|t| t + super::EXEC_GRACE);
        match conn.exec_stream(req, opts.stdin.clone(), deadline) {
            Ok((rx, kill)) => Ok(ExecStream::new(rx, kill)),
            Err(e) => Err(self.map_err(e).await),
        }
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        let conn = self.conn("write a file")?;
        match conn.write_file(path, data, mode).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.map_err(e).await),
        }
    }

    async fn write_file_stream(
        &self,
        path: &str,
        chunks: crate::FileChunks,
        mode: Option<u32>,
    ) -> Result<()> {
        let conn = self.conn("write a file")?;
        match conn.write_file_stream(path, mode, chunks).await {
            Ok(()) => Ok(()),
            Err(WriteError::Agent(e)) => Err(self.map_err(e).await),
            Err(WriteError::Source(e)) => Err(e),
        }
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let conn = self.conn("read a file")?;
        let limit = smol_protocol::READ_FILE_LIMIT;
        match conn.read_file(path, limit, READ_IDLE_TIMEOUT).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.map_read_err(e).await),
        }
    }

    async fn read_file_stream(&self, path: &str) -> Result<crate::FileReader> {
        let conn = self.conn("read a file")?;
        let mut chunks = match conn.read_file_stream(path, READ_IDLE_TIMEOUT) {
            Ok(rx) => rx,
            Err(e) => return Err(self.map_err(e).await),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let machine = self.clone();
        tokio::spawn(async move {
            while let Some(item) = chunks.recv().await {
                let item = match item {
                    Ok(chunk) => Ok(chunk),
                    Err(e) => Err(machine.map_read_err(e).await),
                };
                if tx.send(item).await.is_err() {
                    return; // the reader was dropped: dropping `chunks` cancels the read
                }
            }
        });
        Ok(crate::FileReader::new(rx))
    }

    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    async fn start(&self) -> Result<()> {
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        match self.phase() {
            Phase::Running | Phase::Paused => Ok(()),
            Phase::Creating | Phase::Stopped | Phase::Failed => self.boot().await,
            Phase::Booting => {
                // under the lifecycle lock nobody boots: a boot whose caller gave up
                tracing::warn!("ending an abandoned boot");
                self.kill_and_wait().await;
                Self::note(&self.inner, Event::BootFailed);
                self.boot().await
            }
            Phase::Stopping | Phase::Frozen | Phase::Deleting | Phase::Deleted => {
                Err(self.invalid_state("start"))
            }
        }
    }

    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    async fn stop(&self) -> Result<()> {
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        match self.phase() {
            Phase::Deleting | Phase::Deleted => return Err(self.invalid_state("stop")),
            // a frozen base has no VM to stop
            Phase::Creating | Phase::Stopped | Phase::Failed | Phase::Frozen => return Ok(()),
            // a stop whose caller gave up carries on here
            Phase::Stopping => {}
            Phase::Running | Phase::Paused | Phase::Booting => {
                let paused = self.phase() == Phase::Paused;
                if self.phase() != Phase::Booting {
                    self.apply(Event::Stop, "stop")?;
                }
                if paused {
                    self.unpause_for_stop().await;
                }
            }
        }
        let conn = self.inner.conn.lock().expect("conn lock").clone();
        let asked = conn.map(|c| c.shutdown().is_ok()).unwrap_or(false);
        if !(asked && self.wait_exit(STOP_TIMEOUT).await) {
            if let Err(e) = self.inner.vmm.quit(&self.inner.spec).await {
                tracing::debug!(error = %e, "QMP quit failed; killing the VMM");
            }
            if !self.wait_exit(KILL_WAIT).await {
                self.kill_and_wait().await;
            }
        }
        if self.phase() == Phase::Booting {
            Self::note(&self.inner, Event::BootFailed);
        } else {
            Self::note(&self.inner, Event::Halted);
        }
        tracing::info!("stopped");
        Ok(())
    }

    async fn publish(&self, guest: u16, host: Option<u16>) -> Result<crate::config::PortSpec> {
        if self.current_state() != MachineState::Running {
            return Err(self.invalid_state("publish a port"));
        }
        let listener = super::super::ports::bind(&[(host.unwrap_or(0), guest)]).await?;
        let port = listener[0].0.local_addr().map(|a| a.port()).unwrap_or(0);
        self.serve_ports(listener);
        self.save_record(|r| r.ports.push((port, guest))).await;
        Ok(crate::config::PortSpec { host: port, guest })
    }

    async fn unpublish(&self, guest: Option<u16>, host: Option<u16>) -> Result<()> {
        let matches = |h: u16, g: u16| guest.is_none_or(|x| x == g) && host.is_none_or(|x| x == h);
        let gone: Vec<u16> = self
            .record()
            .ports
            .iter()
            .filter(|&&(h, g)| matches(h, g))
            .map(|&(h, _)| h)
            .collect();
        if gone.is_empty() {
            return Err(Error::NotFound {
                what: format!(
                    "a published port of machine {:?} with guest {guest:?} and host {host:?}",
                    self.inner.name
                ),
            });
        }
        let closing: Vec<_> = {
            let mut ports = self.inner.ports.lock().expect("ports lock");
            let (closing, kept) = ports.drain(..).partition(|(h, _)| gone.contains(h));
            *ports = kept;
            closing
        };
        close_ports(closing).await;
        self.save_record(|r| r.ports.retain(|&(h, g)| !matches(h, g)))
            .await;
        Ok(())
    }

    async fn ready(&self) -> Result<bool> {
        if self.current_state() != MachineState::Running {
            return Ok(false);
        }
        let ports = MachineBackend::ports(self);
        if ports.is_empty() {
            return Ok(true);
        }
        // each published port's guest listener, asked of the agent (not inferred from how long
        // a host connection stays open: a clone's first connects are slow under TCG)
        let Ok(conn) = self.conn("ready") else {
            return Ok(false);
        };
        for p in ports {
            match conn.port_listens(p.guest, PORT_PROBE_WAIT).await {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(e) => {
                    tracing::debug!(machine = %self.inner.name, port = p.guest, error = %e,
                        "readiness probe of a guest port");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn endpoint(&self, guest_port: u16, path: Option<&str>) -> Result<crate::config::PortEndpoint> {
        let host = self
            .record()
            .ports
            .iter()
            .find(|&&(_, g)| g == guest_port)
            .map(|&(h, _)| h)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "guest port {guest_port} is not published on machine {:?}",
                    self.inner.name
                ))
            })?;
        Ok(super::super::ports::endpoint(host, path))
    }

    fn check_protocol(&self, protocol: &str) -> Result<()> {
        super::super::ports::check_protocol(protocol)
    }

    fn ports(&self) -> Vec<crate::config::PortSpec> {
        self.record()
            .ports
            .iter()
            .map(|&(host, guest)| crate::config::PortSpec { host, guest })
            .collect()
    }

    async fn pull_image(&self, image: &str) -> Result<crate::image::ImageInfo> {
        let store = self.image_store()?;
        let image = image.to_string();
        super::super::on_own_thread(move || async move { store.pull(&image, None).await }).await
    }

    async fn list_images(&self) -> Result<Vec<crate::image::ImageInfo>> {
        Ok(self.image_store()?.list()?)
    }

    async fn pause(&self) -> Result<()> {
        self.pause_vm().await
    }

    async fn resume(&self) -> Result<()> {
        self.resume_vm().await
    }

    async fn branch(
        &self,
        name: &str,
        opts: &crate::config::BranchOptions,
    ) -> Result<std::sync::Arc<dyn MachineBackend>> {
        Ok(std::sync::Arc::new(
            self.branch_machine(name, opts).await?.0,
        ))
    }

    async fn checkpoint(
        &self,
        opts: &crate::config::CheckpointOptions,
    ) -> Result<crate::wire::CheckpointInfo> {
        self.checkpoint_to(opts).await
    }

    #[tracing::instrument(skip(self), fields(machine = %self.inner.name))]
    async fn delete(&self) -> Result<()> {
        let _one_at_a_time = self.inner.lifecycle.lock().await;
        if self.phase() == Phase::Deleted {
            return Ok(());
        }
        self.destroy().await
    }
}

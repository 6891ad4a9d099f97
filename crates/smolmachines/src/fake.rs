//! An in-memory test double of the [`Backend`] seam: no QEMU, no guest, no files.
//!
//! It stands in for *a backend*, not for QEMU or the local engine: it keeps machines in a map,
//! answers `exec` by echoing its argv, keeps written files in memory, and records every call
//! that reaches it ([`FakeBackend::calls`]), so a test can check that [`crate::Machine`]
//! refused bad arguments before the backend saw them, and that the seam's contracts hold
//! (names are unique, a deleted machine is gone, `open` does not boot). Unlike the local
//! engine it relays UDP ports, so a rule that is one backend's decision can be seen to differ.
//! It pauses, resumes and branches (a clone copies the source's files) like the local engine's
//! contract, and [`FakeBackend::fail_branch`] makes the branch to one name fail, so the
//! clean-up of a failed batch can be tested.
//! Available in this crate's tests and with the `fake` feature.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::backend::{Backend, ExecStream, MachineBackend};
use crate::config::{
    BranchOptions, ExecEvent, ExecOptions, ExecResult, MachineConfig, MachineState, MachineSummary,
    PortEndpoint, PortSpec, Target,
};
use crate::config::{CheckpointOptions, RestoreOptions};
use crate::error::{Error, Result};
use crate::wire::CheckpointInfo;

/// The in-memory backend. Cheap to clone; clones share their machines.
#[derive(Debug, Clone, Default)]
pub struct FakeBackend {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    machines: BTreeMap<String, Arc<FakeMachine>>,
    calls: Vec<String>,
    next: u32,
    /// Clone names whose branch fails (`BootFailed`).
    fail_branch: Vec<String>,
    /// Checkpoints by id: the machine's files and ports at the checkpoint.
    checkpoints: BTreeMap<String, FakeCheckpoint>,
}

#[derive(Debug, Clone)]
struct FakeCheckpoint {
    info: CheckpointInfo,
    labels: BTreeMap<String, String>,
    files: BTreeMap<String, Vec<u8>>,
    ports: Vec<PortSpec>,
}

/// A machine of the [`FakeBackend`].
#[derive(Debug)]
pub struct FakeMachine {
    name: String,
    labels: BTreeMap<String, String>,
    state: Mutex<MachineState>,
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    ports: Mutex<Vec<PortSpec>>,
    branchable: bool,
    backend: FakeBackend,
}

impl FakeBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call that reached the backend or one of its machines, in order (`"create m"`,
    /// `"exec m echo hi"`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.inner.lock().expect("fake lock").calls.clone()
    }

    /// Makes every later branch to `name` fail with `BootFailed` (after the backend saw it),
    /// as a clone whose boot failed would.
    pub fn fail_branch(&self, name: &str) {
        self.inner
            .lock()
            .expect("fake lock")
            .fail_branch
            .push(name.into());
    }

    /// The names of the machines that exist now.
    pub fn names(&self) -> Vec<String> {
        let st = self.inner.lock().expect("fake lock");
        st.machines.keys().cloned().collect()
    }

    fn record(&self, call: String) {
        self.inner.lock().expect("fake lock").calls.push(call);
    }

    fn get(&self, name: &str) -> Result<Arc<FakeMachine>> {
        self.inner
            .lock()
            .expect("fake lock")
            .machines
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: format!("machine {name:?}"),
            })
    }
}

#[async_trait::async_trait]
impl Backend for FakeBackend {
    fn target(&self) -> Target {
        Target::Local
    }

    async fn create(&self, config: MachineConfig) -> Result<Arc<dyn MachineBackend>> {
        let mut st = self.inner.lock().expect("fake lock");
        let name = config.name.clone().unwrap_or_else(|| {
            st.next += 1;
            format!("fake-{}", st.next)
        });
        st.calls.push(format!("create {name}"));
        if st.machines.contains_key(&name) {
            return Err(Error::Conflict { name });
        }
        let m = Arc::new(FakeMachine {
            name: name.clone(),
            labels: config.labels.clone(),
            state: Mutex::new(MachineState::Running),
            files: Mutex::default(),
            ports: Mutex::new(config.ports.clone()),
            branchable: config.is_branchable(),
            backend: self.clone(),
        });
        st.machines.insert(name, m.clone());
        Ok(m)
    }

    async fn connect(&self, name: &str) -> Result<Arc<dyn MachineBackend>> {
        self.record(format!("connect {name}"));
        let m = self.get(name)?;
        *m.state.lock().expect("fake lock") = MachineState::Running;
        Ok(m)
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn MachineBackend>> {
        self.record(format!("open {name}"));
        Ok(self.get(name)?)
    }

    async fn restore_checkpoint(
        &self,
        id: &str,
        name: &str,
        opts: &RestoreOptions,
    ) -> Result<Arc<dyn MachineBackend>> {
        let mut st = self.inner.lock().expect("fake lock");
        st.calls.push(format!("restore_checkpoint {id} {name}"));
        let c = st
            .checkpoints
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: format!("checkpoint {id:?}"),
            })?;
        if st.machines.contains_key(name) {
            return Err(Error::Conflict { name: name.into() });
        }
        let m = Arc::new(FakeMachine {
            name: name.into(),
            labels: c.labels,
            state: Mutex::new(MachineState::Running),
            files: Mutex::new(c.files),
            ports: Mutex::new(if opts.ports.is_empty() {
                c.ports
            } else {
                opts.ports.clone()
            }),
            branchable: true,
            backend: self.clone(),
        });
        st.machines.insert(name.into(), m.clone());
        Ok(m)
    }

    async fn delete_checkpoint(&self, id: &str) -> Result<()> {
        let mut st = self.inner.lock().expect("fake lock");
        st.calls.push(format!("delete_checkpoint {id}"));
        st.checkpoints
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound {
                what: format!("checkpoint {id:?}"),
            })
    }

    async fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<MachineSummary>> {
        self.record("list".into());
        let st = self.inner.lock().expect("fake lock");
        Ok(st
            .machines
            .values()
            .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(v)))
            .map(|m| MachineSummary {
                id: m.name.clone(),
                name: m.name.clone(),
                state: *m.state.lock().expect("fake lock"),
                cpus: 1,
                memory_mb: 512,
                pid: None,
                accel: "fake".into(),
                labels: m.labels.clone(),
                persistent: false,
                detached: false,
                image: None,
                created_unix: 0,
                storage_gb: 1,
                ports: m.ports.lock().expect("fake lock").clone(),
                branchable: m.branchable,
            })
            .collect())
    }
}

impl FakeMachine {
    fn running(&self, op: &str) -> Result<()> {
        let st = *self.state.lock().expect("fake lock");
        if st == MachineState::Running {
            Ok(())
        } else {
            Err(Error::InvalidState {
                name: self.name.clone(),
                state: st.to_string(),
                op: op.into(),
            })
        }
    }

    fn call(&self, what: &str, rest: &str) {
        self.backend.record(if rest.is_empty() {
            format!("{what} {}", self.name)
        } else {
            format!("{what} {} {rest}", self.name)
        });
    }
}

#[async_trait::async_trait]
impl MachineBackend for FakeMachine {
    fn name(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<MachineState> {
        Ok(*self.state.lock().expect("fake lock"))
    }

    async fn exec(&self, argv: &[String], _opts: &ExecOptions) -> Result<ExecResult> {
        self.call("exec", &argv.join(" "));
        self.running("exec")?;
        Ok(ExecResult::from_bytes(
            0,
            false,
            format!("{}\n", argv.join(" ")).into_bytes(),
            Vec::new(),
        ))
    }

    async fn exec_stream(&self, argv: &[String], _opts: &ExecOptions) -> Result<ExecStream> {
        self.call("exec_stream", &argv.join(" "));
        self.running("exec")?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (kill, _killed) = tokio::sync::oneshot::channel();
        let out = format!("{}\n", argv.join(" ")).into_bytes();
        for ev in [ExecEvent::Stdout(out), ExecEvent::Exit(0)] {
            if tx.try_send(ev).is_err() {
                tracing::debug!("fake exec stream: receiver gone");
            }
        }
        Ok(ExecStream::new(rx, kill))
    }

    async fn write_file(&self, path: &str, data: &[u8], _mode: Option<u32>) -> Result<()> {
        self.call("write_file", path);
        self.running("write a file")?;
        self.files
            .lock()
            .expect("fake lock")
            .insert(path.into(), data.to_vec());
        Ok(())
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.call("read_file", path);
        self.running("read a file")?;
        self.files
            .lock()
            .expect("fake lock")
            .get(path)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: format!("guest file {path:?}"),
            })
    }

    async fn start(&self) -> Result<()> {
        self.call("start", "");
        let mut st = self.state.lock().expect("fake lock");
        if *st == MachineState::Deleted {
            return Err(Error::InvalidState {
                name: self.name.clone(),
                state: st.to_string(),
                op: "start".into(),
            });
        }
        *st = MachineState::Running;
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        self.call("stop", "");
        let mut st = self.state.lock().expect("fake lock");
        if *st != MachineState::Deleted {
            *st = MachineState::Stopped;
        }
        Ok(())
    }

    async fn delete(&self) -> Result<()> {
        self.call("delete", "");
        *self.state.lock().expect("fake lock") = MachineState::Deleted;
        self.backend
            .inner
            .lock()
            .expect("fake lock")
            .machines
            .remove(&self.name);
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        self.call("pause", "");
        let mut st = self.state.lock().expect("fake lock");
        match *st {
            MachineState::Running | MachineState::Paused => {
                *st = MachineState::Paused;
                Ok(())
            }
            other => Err(Error::InvalidState {
                name: self.name.clone(),
                state: other.to_string(),
                op: "pause".into(),
            }),
        }
    }

    async fn resume(&self) -> Result<()> {
        self.call("resume", "");
        let mut st = self.state.lock().expect("fake lock");
        match *st {
            MachineState::Running | MachineState::Paused => {
                *st = MachineState::Running;
                Ok(())
            }
            other => Err(Error::InvalidState {
                name: self.name.clone(),
                state: other.to_string(),
                op: "resume".into(),
            }),
        }
    }

    async fn branch(&self, name: &str, opts: &BranchOptions) -> Result<Arc<dyn MachineBackend>> {
        self.call("branch", name);
        if *self.state.lock().expect("fake lock") != MachineState::Frozen {
            self.running("branch")?;
        }
        if !self.branchable {
            return Err(Error::InvalidState {
                name: self.name.clone(),
                state: "running but not branchable".into(),
                op: "branch".into(),
            });
        }
        let mut st = self.backend.inner.lock().expect("fake lock");
        if st.fail_branch.iter().any(|n| n == name) {
            return Err(Error::BootFailed {
                name: name.into(),
                reason: "the fake was told to fail this branch".into(),
                log_tail: String::new(),
            });
        }
        if st.machines.contains_key(name) {
            return Err(Error::Conflict { name: name.into() });
        }
        let ports = if opts.ports.is_empty() {
            self.ports()
        } else {
            opts.ports.clone()
        };
        let m = Arc::new(FakeMachine {
            name: name.into(),
            labels: self.labels.clone(),
            state: Mutex::new(MachineState::Running),
            files: Mutex::new(self.files.lock().expect("fake lock").clone()),
            ports: Mutex::new(ports),
            branchable: opts.branchable,
            backend: self.backend.clone(),
        });
        st.machines.insert(name.into(), m.clone());
        if opts.freeze_source {
            *self.state.lock().expect("fake lock") = MachineState::Frozen;
        }
        Ok(m)
    }

    async fn checkpoint(&self, opts: &CheckpointOptions) -> Result<CheckpointInfo> {
        let out = opts.output.clone().unwrap_or_default();
        self.call("checkpoint", &out.display().to_string());
        let st = *self.state.lock().expect("fake lock");
        if !matches!(st, MachineState::Running | MachineState::Paused) {
            return Err(Error::InvalidState {
                name: self.name.clone(),
                state: st.to_string(),
                op: "checkpoint".into(),
            });
        }
        let files = self.files.lock().expect("fake lock").clone();
        let id = std::path::absolute(&out)
            .unwrap_or(out)
            .display()
            .to_string();
        let info = CheckpointInfo {
            id: id.clone(),
            machine_id: self.name.clone(),
            status: "available".into(),
            size_bytes: files.values().map(|f| f.len() as u64).sum(),
            arch: std::env::consts::ARCH.into(),
            created_at: crate::wire::rfc3339(0),
            download_url: None,
            reused_bytes: None,
            path: Some(id.clone()),
            source_pause_ms: Some(0),
            elapsed_ms: Some(0),
        };
        let c = FakeCheckpoint {
            info: info.clone(),
            labels: self.labels.clone(),
            files,
            ports: self.ports(),
        };
        self.backend
            .inner
            .lock()
            .expect("fake lock")
            .checkpoints
            .insert(id, c);
        Ok(info)
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        self.call("checkpoints", "");
        let st = self.backend.inner.lock().expect("fake lock");
        Ok(st
            .checkpoints
            .values()
            .filter(|c| c.info.machine_id == self.name)
            .map(|c| c.info.clone())
            .collect())
    }

    fn ports(&self) -> Vec<PortSpec> {
        self.ports.lock().expect("fake lock").clone()
    }

    async fn publish(&self, guest: u16, host: Option<u16>) -> Result<PortSpec> {
        self.call("publish", &format!("{guest} {host:?}"));
        self.running("publish a port")?;
        let p = PortSpec {
            host: host.unwrap_or(40_000 + guest % 1000),
            guest,
        };
        self.ports.lock().expect("fake lock").push(p);
        Ok(p)
    }

    async fn unpublish(&self, guest: Option<u16>, host: Option<u16>) -> Result<()> {
        self.call("unpublish", &format!("{guest:?} {host:?}"));
        let mut ports = self.ports.lock().expect("fake lock");
        let before = ports.len();
        ports.retain(|p| !(guest.is_none_or(|g| g == p.guest) && host.is_none_or(|h| h == p.host)));
        if ports.len() == before {
            return Err(Error::NotFound {
                what: "a matching published port".into(),
            });
        }
        Ok(())
    }

    fn endpoint(&self, guest_port: u16, path: Option<&str>) -> Result<PortEndpoint> {
        self.call("endpoint", &guest_port.to_string());
        let p = self
            .ports()
            .into_iter()
            .find(|p| p.guest == guest_port)
            .ok_or_else(|| Error::invalid(format!("guest port {guest_port} is not published")))?;
        let path = path.unwrap_or("").trim_start_matches('/');
        Ok(PortEndpoint {
            http_url: format!("http://fake.invalid:{}/{path}", p.host),
            ws_url: format!("ws://fake.invalid:{}/{path}", p.host),
            headers: BTreeMap::new(),
        })
    }
}

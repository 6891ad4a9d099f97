//! `smol._native.Machine`: a handle to one core machine. The public `smol.Machine` wraps it and
//! turns the plain values returned here into the SPEC's dataclasses.

use std::collections::BTreeMap;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use smolmachines as core;
use smolmachines::Error;

use crate::errors::to_py_err;
use crate::stream::ExecStream;
use crate::{block, CancelToken};

/// `(exit_code, stdout_bytes, stderr_bytes, stdout_truncated, stderr_truncated, timed_out,
/// pid)`; `pid` is set for a background command. The text is decoded once, in Python, from the
/// bytes (one copy of the output crosses, not a `str` and a `bytes` of each stream).
type ExecOut<'py> = (
    i32,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    bool,
    bool,
    bool,
    Option<u32>,
);

/// `(name, env_var, hosts, value, methods)` of a `smol.CredentialSpec`.
type Credential = (
    String,
    String,
    Vec<String>,
    Option<String>,
    Option<Vec<String>>,
);

/// `(reference, digest, size, architecture, os)`.
type ImageOut = (String, String, u64, String, String);

/// One row of `Machine.list` as the keyword arguments of `smol.MachineSummary` (SPEC §3.10),
/// mapped once here: `id, name, state, labels, image, persistent, detached, branchable,
/// created_at, pid, accel`, `resources` as `(cpus, memory_mib, storage_gib)` and `ports` as
/// `[(guest, host, protocol)]` (the dataclasses are built from those tuples).
fn summary_out(py: Python<'_>, s: core::MachineSummary) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("created_at", s.created_at())?;
    d.set_item("id", s.id)?;
    d.set_item("name", s.name)?;
    d.set_item("state", s.state.as_str())?;
    d.set_item("labels", s.labels)?;
    d.set_item("image", s.image)?;
    d.set_item("persistent", s.persistent)?;
    d.set_item("detached", s.detached)?;
    d.set_item("branchable", s.branchable)?;
    d.set_item("pid", s.pid)?;
    d.set_item("accel", Some(s.accel).filter(|a| !a.is_empty()))?;
    let storage = Some(s.storage_gb).filter(|&g| g > 0);
    d.set_item("resources", (s.cpus, s.memory_mb, storage))?;
    let ports: Vec<(u16, u16, &str)> = s.ports.iter().map(|p| (p.guest, p.host, "tcp")).collect();
    d.set_item("ports", ports)?;
    Ok(d)
}

/// SPEC §3 `PortableCheckpointInfo` as a dict (snake_case keys).
fn checkpoint_out(py: Python<'_>, c: core::CheckpointInfo) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", c.id)?;
    d.set_item("machine_id", c.machine_id)?;
    d.set_item("status", c.status)?;
    d.set_item("size_bytes", c.size_bytes)?;
    d.set_item("arch", c.arch)?;
    d.set_item("created_at", c.created_at)?;
    d.set_item("download_url", c.download_url)?;
    d.set_item("reused_bytes", c.reused_bytes)?;
    d.set_item("path", c.path)?;
    d.set_item("source_pause_ms", c.source_pause_ms)?;
    d.set_item("elapsed_ms", c.elapsed_ms)?;
    Ok(d)
}

fn invalid(message: String) -> Error {
    Error::InvalidConfig { message }
}

/// Seconds from Python as a deadline: the core's one conversion (a huge value is the longest
/// wait, `MAX_WAIT`; NaN, infinite or <= 0 is `InvalidConfig`).
fn seconds(what: &str, s: Option<f64>) -> Result<Option<Duration>, Error> {
    s.map(|s| core::config::seconds(what, s)).transpose()
}

fn conn_options(
    target: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
) -> Result<core::ConnectOptions, Error> {
    Ok(core::ConnectOptions {
        target: core::Target::parse_opt(target.as_deref())?,
        base_url,
        api_key,
    })
}

fn exec_options(
    env: Option<BTreeMap<String, String>>,
    workdir: Option<String>,
    timeout: Option<f64>,
    user: Option<String>,
    stdin: Option<&Bound<'_, PyBytes>>,
    background: bool,
    output: Option<String>,
) -> Result<core::ExecOptions, Error> {
    Ok(core::ExecOptions {
        env: env.unwrap_or_default(),
        workdir,
        timeout: seconds("timeout", timeout)?,
        user,
        stdin: stdin.map(|b| b.as_bytes().to_vec()),
        background,
        output: output.as_deref().map(str::parse).transpose()?,
    })
}

fn exec_out(py: Python<'_>, r: core::ExecResult) -> ExecOut<'_> {
    let core::ExecResult {
        exit_code,
        stdout,
        stderr,
        stdout_bytes,
        stderr_bytes,
        stdout_truncated,
        stderr_truncated,
        timed_out,
        pid,
    } = r;
    // The core's text copies are not needed here: free them before the bytes are copied.
    drop((stdout, stderr));
    let out = PyBytes::new(py, &stdout_bytes);
    drop(stdout_bytes);
    let err = PyBytes::new(py, &stderr_bytes);
    (
        exit_code,
        out,
        err,
        stdout_truncated,
        stderr_truncated,
        timed_out,
        pid,
    )
}

/// `[(host, guest)]` from Python as the core's ports.
fn port_specs(ports: Vec<(u16, u16)>) -> Vec<core::PortSpec> {
    ports
        .into_iter()
        .map(|(host, guest)| core::PortSpec { host, guest })
        .collect()
}

fn image_out(i: core::ImageInfo) -> ImageOut {
    (i.reference, i.digest, i.size, i.architecture, i.os)
}

/// Raises the mapped exception for a core error found before any I/O.
fn check<T>(py: Python<'_>, r: Result<T, Error>) -> PyResult<T> {
    r.map_err(|e| to_py_err(py, e))
}

/// A handle to one machine of the core. Cheap to share between threads: every method takes
/// `&self`, and concurrent calls on one machine are allowed (they are multiplexed by the core).
#[pyclass(frozen, weakref, module = "smol._native", name = "Machine")]
pub(crate) struct Machine {
    inner: core::Machine,
}

#[pymethods]
impl Machine {
    /// Creates and starts a machine; returns once it is ready.
    #[staticmethod]
    #[pyo3(signature = (*, name=None, image=None, mounts=Vec::new(), ports=Vec::new(), cpus=None,
        memory_mb=None, network=None, storage_gb=None, top_network=None, persistent=false,
        detach=false, labels=BTreeMap::new(), ready_timeout=None, env=BTreeMap::new(),
        workdir=None, command=None, user=None, allow_cidrs=Vec::new(), allow_hosts=Vec::new(),
        overlay_gb=None, gpu=None, gpu_vram_mib=None, disk_durability=None, cuda=None,
        auto_stop_seconds=None, ttl_seconds=None, branchable=None, wait_for_ports=None,
        egress_interceptor=None, credentials=Vec::new(), cache_disk=None, target=None,
        base_url=None, api_key=None))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        name: Option<String>,
        image: Option<String>,
        mounts: Vec<(String, String, bool, bool)>,
        ports: Vec<(u16, u16)>,
        cpus: Option<u32>,
        memory_mb: Option<u32>,
        network: Option<bool>,
        storage_gb: Option<u32>,
        top_network: Option<bool>,
        persistent: bool,
        detach: bool,
        labels: BTreeMap<String, String>,
        ready_timeout: Option<f64>,
        env: BTreeMap<String, String>,
        workdir: Option<String>,
        command: Option<Vec<String>>,
        user: Option<String>,
        allow_cidrs: Vec<String>,
        allow_hosts: Vec<String>,
        overlay_gb: Option<u32>,
        gpu: Option<bool>,
        gpu_vram_mib: Option<u32>,
        disk_durability: Option<String>,
        cuda: Option<bool>,
        auto_stop_seconds: Option<u64>,
        ttl_seconds: Option<u64>,
        branchable: Option<bool>,
        wait_for_ports: Option<bool>,
        egress_interceptor: Option<(String, String)>,
        credentials: Vec<Credential>,
        cache_disk: Option<(String, Option<u64>, Option<String>, bool)>,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
    ) -> PyResult<Self> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        // SPEC §3.4: `command` is a non-empty argv. The core reads an empty list as "launch
        // nothing" (the CLI's use), which the SDK does not offer.
        if command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(to_py_err(
                py,
                invalid("command must be a non-empty list of non-empty strings".into()),
            ));
        }
        // Shapes only: the core validates (`MachineConfig::validate`) and the backend refuses
        // the fields it cannot honour.
        let disk_durability = check(py, disk_durability.as_deref().map(str::parse).transpose())?;
        let config = core::MachineConfig {
            name,
            image,
            mounts: mounts
                .into_iter()
                .map(|(source, target, read_only, staged)| core::MountSpec {
                    source,
                    target,
                    read_only,
                    staged,
                })
                .collect(),
            ports: ports
                .into_iter()
                .map(|(host, guest)| core::PortSpec { host, guest })
                .collect(),
            resources: core::ResourceSpec {
                cpus,
                memory_mb,
                network,
                allow_cidrs,
                allow_hosts,
                storage_gb,
                overlay_gb,
                gpu,
                gpu_vram_mib,
                disk_durability,
                cuda,
                network_backend: None,
            },
            network: top_network,
            persistent,
            detach,
            labels,
            ready_timeout: check(py, seconds("ready_timeout_seconds", ready_timeout))?,
            wait_for_ports,
            auto_stop_seconds,
            ttl_seconds,
            branchable,
            forkable: None,
            env,
            workdir,
            command,
            user,
            egress_interceptor: egress_interceptor
                .map(|(address, token)| core::EgressInterceptor { address, token }),
            credentials: credentials
                .into_iter()
                .map(
                    |(name, env_var, hosts, value, methods)| core::CredentialSpec {
                        name,
                        env_var,
                        hosts,
                        value,
                        methods,
                    },
                )
                .collect(),
            cache_disk: cache_disk.map(|(cache, version, mount_path, slot)| core::CacheDiskRef {
                cache,
                version,
                mount_path,
                slot,
            }),
        };
        let inner = block(py, None, core::Machine::create(config, conn))?;
        Ok(Self { inner })
    }

    /// Attaches to an existing machine by name, booting it if it is stopped.
    #[staticmethod]
    #[pyo3(signature = (name, *, target=None, base_url=None, api_key=None))]
    fn connect(
        py: Python<'_>,
        name: String,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
    ) -> PyResult<Self> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        let inner = block(py, None, core::Machine::connect(&name, conn))?;
        Ok(Self { inner })
    }

    /// A handle to an existing machine without booting it.
    #[staticmethod]
    #[pyo3(signature = (name, *, target=None, base_url=None, api_key=None))]
    fn open(
        py: Python<'_>,
        name: String,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
    ) -> PyResult<Self> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        let inner = block(py, None, core::Machine::open(&name, conn))?;
        Ok(Self { inner })
    }

    /// Every machine (of every process) that carries all of `labels`.
    #[staticmethod]
    #[pyo3(signature = (labels=BTreeMap::new(), *, target=None, base_url=None, api_key=None))]
    fn list(
        py: Python<'_>,
        labels: BTreeMap<String, String>,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
    ) -> PyResult<Vec<Bound<'_, PyDict>>> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        let list = block(
            py,
            None,
            async move { core::Machine::list(conn, &labels).await },
        )?;
        list.into_iter().map(|s| summary_out(py, s)).collect()
    }

    /// `"local"` or `"cloud"`: the target a call with these options goes to (SPEC §2.2, the
    /// core's one rule).
    #[staticmethod]
    #[pyo3(signature = (*, target=None, base_url=None, api_key=None))]
    fn resolve_target(
        py: Python<'_>,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
    ) -> PyResult<&'static str> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        Ok(conn.resolve_target().as_str())
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The target's id: the name locally, `mach-…` on the cloud.
    #[getter]
    fn id(&self) -> &str {
        self.inner.id()
    }

    /// `"local"` or `"cloud"`: where this machine is.
    #[getter]
    fn target(&self) -> &'static str {
        self.inner.target().as_str()
    }

    fn state(&self, py: Python<'_>) -> PyResult<String> {
        let s = block(py, None, self.inner.state())?;
        Ok(s.as_str().to_string())
    }

    fn url(&self) -> Option<String> {
        self.inner.url()
    }

    /// Running, and every published port has a guest listener behind it (SPEC §4.2). `cancel`
    /// (used by `AsyncMachine`) abandons the probe.
    #[pyo3(signature = (cancel=None))]
    fn ready(&self, py: Python<'_>, cancel: Option<Bound<'_, CancelToken>>) -> PyResult<bool> {
        let token = cancel.map(|c| c.get().0.clone());
        block(py, token.as_ref(), self.inner.ready())
    }

    /// Polls `ready()` every `interval_s` until it is true; `SmolTimeoutError` after
    /// `timeout_s`. Both must be > 0 (`InvalidConfigError`). `cancel` stops the wait.
    #[pyo3(signature = (timeout_s, interval_s, cancel=None))]
    fn wait_until_ready(
        &self,
        py: Python<'_>,
        timeout_s: f64,
        interval_s: f64,
        cancel: Option<Bound<'_, CancelToken>>,
    ) -> PyResult<()> {
        // (a huge value is capped at ~100 years, so it cannot overflow the core's deadline)
        let timeout = check(py, core::config::seconds("timeout_s", timeout_s))?;
        let interval = check(py, core::config::seconds("interval_s", interval_s))?;
        let token = cancel.map(|c| c.get().0.clone());
        block(
            py,
            token.as_ref(),
            self.inner.wait_until_ready(timeout, interval),
        )
    }

    /// `background=True` starts the command detached and returns at once with its pid (SPEC
    /// §3.6). Such a command cannot be given a `cancel` token (SPEC §5: the local
    /// `AsyncMachine.exec` always attaches one, so it refuses background commands).
    #[pyo3(signature = (argv, *, env=None, workdir=None, timeout=None, user=None, stdin=None,
        background=false, output=None, cancel=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        workdir: Option<String>,
        timeout: Option<f64>,
        user: Option<String>,
        stdin: Option<Bound<'py, PyBytes>>,
        background: bool,
        output: Option<String>,
        cancel: Option<Bound<'py, CancelToken>>,
    ) -> PyResult<ExecOut<'py>> {
        let opts = check(
            py,
            exec_options(
                env,
                workdir,
                timeout,
                user,
                stdin.as_ref(),
                background,
                output,
            ),
        )?;
        if background && cancel.is_some() {
            // The SPEC's message, verbatim (no "invalid configuration:" prefix of the core's).
            return Err(crate::errors::new_err(
                py,
                "INVALID_CONFIG",
                "a background command cannot be cancelled; kill its pid instead",
            ));
        }
        let token = cancel.map(|c| c.get().0.clone());
        let r = block(py, token.as_ref(), self.inner.exec(&argv, opts))?;
        Ok(exec_out(py, r))
    }

    #[pyo3(signature = (image, argv, *, env=None, workdir=None, timeout=None, user=None,
        stdin=None, background=false, output=None, cancel=None))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        image: String,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        workdir: Option<String>,
        timeout: Option<f64>,
        user: Option<String>,
        stdin: Option<Bound<'py, PyBytes>>,
        background: bool,
        output: Option<String>,
        cancel: Option<Bound<'py, CancelToken>>,
    ) -> PyResult<ExecOut<'py>> {
        let opts = check(
            py,
            exec_options(
                env,
                workdir,
                timeout,
                user,
                stdin.as_ref(),
                background,
                output,
            ),
        )?;
        let token = cancel.map(|c| c.get().0.clone());
        let r = block(py, token.as_ref(), self.inner.run(&image, &argv, opts))?;
        Ok(exec_out(py, r))
    }

    #[pyo3(signature = (argv, *, env=None, workdir=None, timeout=None, user=None, stdin=None,
        background=false, output=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec_stream(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        workdir: Option<String>,
        timeout: Option<f64>,
        user: Option<String>,
        stdin: Option<Bound<'_, PyBytes>>,
        background: bool,
        output: Option<String>,
    ) -> PyResult<ExecStream> {
        let opts = check(
            py,
            exec_options(
                env,
                workdir,
                timeout,
                user,
                stdin.as_ref(),
                background,
                output,
            ),
        )?;
        let s = block(py, None, self.inner.exec_stream(&argv, opts))?;
        Ok(ExecStream::new(s))
    }

    fn read_file<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyBytes>> {
        let data = block(py, None, self.inner.read_file(&path))?;
        Ok(PyBytes::new(py, &data))
    }

    #[pyo3(signature = (path, data, mode=None))]
    fn write_file(
        &self,
        py: Python<'_>,
        path: String,
        data: Bound<'_, PyBytes>,
        mode: Option<u32>,
    ) -> PyResult<()> {
        // `bytes` are immutable and `data` keeps the object alive for the whole call, so the
        // buffer is read in place with the GIL released.
        let bytes: &[u8] = data.as_bytes();
        block(py, None, self.inner.write_file(&path, bytes, mode))
    }

    fn pull_image(&self, py: Python<'_>, image: String) -> PyResult<ImageOut> {
        Ok(image_out(block(py, None, self.inner.pull_image(&image))?))
    }

    fn list_images(&self, py: Python<'_>) -> PyResult<Vec<ImageOut>> {
        let list = block(py, None, self.inner.list_images())?;
        Ok(list.into_iter().map(image_out).collect())
    }

    fn start(&self, py: Python<'_>) -> PyResult<()> {
        block(py, None, self.inner.start())
    }

    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        block(py, None, self.inner.stop())
    }

    fn delete(&self, py: Python<'_>) -> PyResult<()> {
        block(py, None, self.inner.delete())
    }

    /// Stops the vCPUs; the machine keeps its memory (state "paused").
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        block(py, None, self.inner.pause())
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        block(py, None, self.inner.resume())
    }

    /// A running clone of this running, branchable machine; `ports` are `[(host, guest)]`
    /// (empty: the source's guest ports on free host ports).
    #[pyo3(signature = (name, ports=Vec::new(), *, branchable=false, freeze_source=false))]
    fn branch(
        &self,
        py: Python<'_>,
        name: String,
        ports: Vec<(u16, u16)>,
        branchable: bool,
        freeze_source: bool,
    ) -> PyResult<Self> {
        let opts = core::BranchOptions {
            ports: port_specs(ports),
            branchable,
            freeze_source,
        };
        let inner = block(py, None, self.inner.branch_with(&name, opts))?;
        Ok(Self { inner })
    }

    /// A portable checkpoint of this machine (SPEC §4.8): locally `output` (a
    /// `.smolcheckpoint` path) is required; returns a PortableCheckpointInfo dict.
    #[pyo3(signature = (output=None, *, store=None))]
    fn checkpoint<'py>(
        &self,
        py: Python<'py>,
        output: Option<std::path::PathBuf>,
        store: Option<std::path::PathBuf>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = core::CheckpointOptions { output, store };
        let info = block(py, None, self.inner.checkpoint(opts))?;
        checkpoint_out(py, info)
    }

    /// The machine's checkpoints (cloud; locally NotSupportedError).
    fn checkpoints<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let list = block(py, None, self.inner.checkpoints())?;
        list.into_iter().map(|c| checkpoint_out(py, c)).collect()
    }

    /// A new running machine from a checkpoint; without `conn_given` the target is inferred
    /// from the id (SPEC §4.8).
    #[staticmethod]
    #[pyo3(signature = (checkpoint_id, name, *, target=None, base_url=None, api_key=None,
        conn_given=false, keep_identity=false, network=None))]
    #[allow(clippy::too_many_arguments)]
    fn restore_checkpoint(
        py: Python<'_>,
        checkpoint_id: String,
        name: String,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
        conn_given: bool,
        keep_identity: bool,
        network: Option<bool>,
    ) -> PyResult<Self> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        let opts = core::RestoreOptions {
            keep_identity,
            network,
            ..Default::default()
        };
        let inner = block(
            py,
            None,
            core::Machine::restore_checkpoint(
                &checkpoint_id,
                &name,
                conn_given.then_some(conn),
                opts,
            ),
        )?;
        Ok(Self { inner })
    }

    /// Removes a checkpoint (locally the file; NotFoundError if missing).
    #[staticmethod]
    #[pyo3(signature = (checkpoint_id, *, target=None, base_url=None, api_key=None,
        conn_given=false))]
    fn delete_checkpoint(
        py: Python<'_>,
        checkpoint_id: String,
        target: Option<String>,
        base_url: Option<String>,
        api_key: Option<String>,
        conn_given: bool,
    ) -> PyResult<()> {
        let conn = check(py, conn_options(target, base_url, api_key))?;
        block(
            py,
            None,
            core::Machine::delete_checkpoint(&checkpoint_id, conn_given.then_some(conn)),
        )
    }

    /// Writes a local checkpoint (one made with a chunk store, or a standalone file) as one
    /// standalone `.smolcheckpoint` file; returns the bytes written.
    #[staticmethod]
    fn export_checkpoint(
        py: Python<'_>,
        source: std::path::PathBuf,
        output: std::path::PathBuf,
    ) -> PyResult<u64> {
        block(py, None, core::Machine::export_checkpoint(&source, &output))
    }

    /// Removes the chunks of a local checkpoint store that no checkpoint names; returns the
    /// bytes freed.
    #[staticmethod]
    fn prune_checkpoint_store(py: Python<'_>, store: std::path::PathBuf) -> PyResult<u64> {
        block(py, None, core::Machine::prune_checkpoint_store(&store))
    }

    /// Several clones, all or nothing (SPEC §4.8 `branch_batch`).
    #[pyo3(signature = (count=None, *, names=Vec::new(), name_prefix=None, ports=Vec::new(),
        branchable=false, freeze_source=false))]
    #[allow(clippy::too_many_arguments)]
    fn branch_batch(
        &self,
        py: Python<'_>,
        count: Option<usize>,
        names: Vec<String>,
        name_prefix: Option<String>,
        ports: Vec<(u16, u16)>,
        branchable: bool,
        freeze_source: bool,
    ) -> PyResult<Vec<Self>> {
        let opts = core::BranchBatchOptions {
            count,
            names,
            name_prefix,
            ports: port_specs(ports),
            branchable,
            freeze_source,
        };
        let clones = block(py, None, self.inner.branch_batch(opts))?;
        Ok(clones.into_iter().map(|inner| Self { inner }).collect())
    }

    /// Runs `argv` in a throw-away clone, which is always deleted (SPEC §4.8 `reward_fork`).
    #[pyo3(signature = (argv, *, env=None, workdir=None, timeout=None, user=None, stdin=None,
        background=false, output=None, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn reward_fork<'py>(
        &self,
        py: Python<'py>,
        argv: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        workdir: Option<String>,
        timeout: Option<f64>,
        user: Option<String>,
        stdin: Option<Bound<'py, PyBytes>>,
        background: bool,
        output: Option<String>,
        name: Option<String>,
    ) -> PyResult<ExecOut<'py>> {
        let opts = check(
            py,
            exec_options(
                env,
                workdir,
                timeout,
                user,
                stdin.as_ref(),
                background,
                output,
            ),
        )?;
        let r = block(
            py,
            None,
            self.inner.reward_fork(&argv, opts, name.as_deref()),
        )?;
        Ok(exec_out(py, r))
    }

    /// `[(host, guest)]`.
    fn ports(&self) -> Vec<(u16, u16)> {
        self.inner
            .ports()
            .into_iter()
            .map(|p| (p.host, p.guest))
            .collect()
    }

    /// Publishes guest port `guest` on host `127.0.0.1:host` (a free host port when `host` is
    /// None) of the running machine; returns `(host, guest)`. `protocol` is "tcp" ("udp":
    /// `NotSupportedError` locally; anything else: `InvalidConfigError`).
    #[pyo3(signature = (guest, host=None, protocol="tcp"))]
    fn publish(
        &self,
        py: Python<'_>,
        guest: u16,
        host: Option<u16>,
        protocol: &str,
    ) -> PyResult<(u16, u16)> {
        let p = block(py, None, self.inner.publish(guest, host, protocol))?;
        Ok((p.host, p.guest))
    }

    /// Stops publishing the ports matching `guest` and/or `host` (one is needed); open
    /// connections carry on. No match is `NotFoundError`.
    #[pyo3(signature = (guest=None, host=None, protocol="tcp"))]
    fn unpublish(
        &self,
        py: Python<'_>,
        guest: Option<u16>,
        host: Option<u16>,
        protocol: &str,
    ) -> PyResult<()> {
        block(py, None, self.inner.unpublish(guest, host, protocol))
    }

    /// `(http_url, ws_url, headers)`.
    #[pyo3(signature = (port, path=None))]
    fn endpoint<'py>(
        &self,
        py: Python<'py>,
        port: u16,
        path: Option<String>,
    ) -> PyResult<(String, String, Bound<'py, PyDict>)> {
        let e = check(py, self.inner.endpoint(port, path.as_deref()))?;
        let headers = PyDict::new(py);
        for (k, v) in e.headers {
            headers.set_item(k, v)?;
        }
        Ok((e.http_url, e.ws_url, headers))
    }

    /// Benchmark helper: runs `exec(argv)` `n` times from Rust on this machine, one after the
    /// other on the binding's runtime, and returns each call's wall time in seconds.
    #[pyo3(signature = (n, argv=vec!["true".to_string()]))]
    fn bench_exec(&self, py: Python<'_>, n: usize, argv: Vec<String>) -> PyResult<Vec<f64>> {
        let m = self.inner.clone();
        block(py, None, async move {
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let t = std::time::Instant::now();
                m.exec(&argv, core::ExecOptions::default()).await?;
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(times)
        })
    }

    fn __repr__(&self) -> String {
        format!("<smol._native.Machine {:?}>", self.inner.name())
    }
}

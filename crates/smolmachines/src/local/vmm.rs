//! The VMM seam: a [`Vmm`] turns a [`VmSpec`] into one supervised OS process per machine. QEMU
//! (`-M microvm`) is the implementation today; a native VMM would implement the same trait.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::accel::{Accel, AccelChoice};
use super::assets::{Assets, KernelFlavor};
use super::qmp::{Qmp, QmpError};

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Machine name (the guest hostname).
    pub name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Kernel and initramfs.
    pub assets: Assets,
    /// Accelerator.
    pub accel: AccelChoice,
    /// The machine's directory: sockets and logs live here.
    pub dir: PathBuf,
    /// The writable disk (qcow2), the upper layer of the guest's root.
    pub disk: Option<PathBuf>,
    /// The guest powers itself off when the host has been away this long (machines that must
    /// not outlive their process); `None` for detached machines.
    pub linger_ms: Option<u64>,
    /// virtio-fs shares: (guest target, read-only), served on `mounts::socket(dir, i)`.
    pub mounts: Vec<(String, bool)>,
    /// A virtio-net device backed by passt on `net::socket(dir)`.
    pub network: bool,
    /// Read-only root file system image and its type: the lower layer of the guest's root.
    pub image: Option<(PathBuf, String)>,
    /// Guest RAM in this file (`memory-backend-file`, `share=on`, on tmpfs): a branch source
    /// (`local::ram`). `None`: anonymous RAM (a memfd with mounts).
    pub ram_file: Option<PathBuf>,
    /// Start as a clone (a branch) instead of booting: see [`Restore`].
    pub restore: Option<Restore>,
    /// Image slots (`local::slots`): read-only virtio-blk devices for `run(image)`, each empty
    /// (a 4 KiB placeholder) or backed by an image file. Always the last devices.
    pub image_slots: Vec<Option<PathBuf>>,
}

/// How a clone's VMM starts: its RAM mapped from the frozen copy of the source's, and
/// `-incoming defer` (the device state is loaded over QMP, `local::branch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// The frozen RAM file.
    pub ram: PathBuf,
    /// `share=on` (the clone's own RAM file, so it is a branch source too) or `share=off`
    /// (`MAP_PRIVATE` of the frozen file: copy on write, its pages shared with other clones).
    pub shared: bool,
}

impl VmSpec {
    /// Unix socket the host listens on for the agent channel.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// QMP control socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// Guest serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// VMM stderr log.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
}

/// Errors of the VMM layer.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary is not there.
    #[error("{binary} not found ({detail})")]
    BinaryMissing {
        /// What was looked for.
        binary: String,
        /// Why it is not usable.
        detail: String,
    },
    /// Starting the process failed.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A log file could not be created.
    #[error("creating {}: {source}", path.display())]
    Log {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The control channel failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// A virtual machine monitor that runs one VM per OS process.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// Short name (`qemu`).
    fn name(&self) -> &str;
    /// Version string, or why the VMM cannot be used.
    fn version(&self) -> Result<String, VmmError>;
    /// Starts the VM in its own session. The agent socket must already be listening.
    fn spawn(&self, spec: &VmSpec) -> Result<tokio::process::Child, VmmError>;
    /// Asks the VMM to exit now (the guest gets no say), over its control channel.
    async fn quit(&self, spec: &VmSpec) -> Result<(), VmmError>;
    /// Asks the VMM to connect its agent channel again now, rather than on its next retry
    /// (the host just started listening again). Best effort.
    async fn reconnect_agent(&self, _spec: &VmSpec) -> Result<(), VmmError> {
        Ok(())
    }
}

/// QEMU `-M microvm`.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The binary (`SMOL_QEMU`, default `qemu-system-x86_64` from `PATH`).
    pub binary: PathBuf,
}

impl Qemu {
    /// QEMU from `SMOL_QEMU` or `PATH`.
    pub fn from_env() -> Self {
        let binary = std::env::var_os("SMOL_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        Self { binary }
    }

    fn resolved(&self) -> Result<PathBuf, VmmError> {
        let name = self.binary.display().to_string();
        if self.binary.components().count() > 1 {
            return if self.binary.is_file() {
                Ok(self.binary.clone())
            } else {
                Err(VmmError::BinaryMissing {
                    binary: name,
                    detail: "no such file".into(),
                })
            };
        }
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(&self.binary))
            .find(|p| p.is_file())
            .ok_or(VmmError::BinaryMissing {
                binary: name,
                detail: "not in PATH".into(),
            })
    }
}

/// Host TSC frequency in kHz, from `/proc/cpuinfo`. Under TCG the guest TSC runs at the host
/// rate, and microvm has no HPET or PM timer to calibrate against: without `tsc_early_khz` guests
/// hang at random when the host is busy (TCG-NOTES §1).
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// The kernel command line for a spec.
pub fn kernel_cmdline(spec: &VmSpec, tsc_khz: Option<u64>) -> String {
    let mut words = vec![
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "cryptomgr.notests",
        "random.trust_cpu=on",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    if spec.assets.flavor == KernelFlavor::Smol {
        // no ACPI: no PIT-verified APIC calibration (noapictimer is only safe with acpi=off),
        // and reboot=t makes the final reboot exit QEMU at once (KERNEL-NOTES problems 4, 5)
        words.extend(["acpi=off", "noapictimer", "no_timer_check", "reboot=t"].map(String::from));
    }
    if spec.accel.accel == Accel::Tcg {
        if let Some(khz) = tsc_khz {
            words.push(format!("tsc_early_khz={khz}"));
        }
    }
    if spec.disk.is_some() {
        words.push("smol.disk=1".into());
    }
    if let Some(ms) = spec.linger_ms {
        words.push(format!("smol.linger_ms={ms}"));
    }
    if spec.network {
        words.push("smol.net=1".into());
    }
    // Test-only: an agent that speaks at most generation N, as an older one would
    // (crates/smol-protocol/VERSIONING.md; tests/checkpoint_generation.rs).
    if let Some(n) = std::env::var("SMOL_TEST_AGENT_PROTOCOL_MAX")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
    {
        words.push(format!("smol.protocol_max={n}"));
    }
    if let Some((_, fstype)) = &spec.image {
        words.push(format!("smol.image={fstype}"));
    }
    for (i, (target, ro)) in spec.mounts.iter().enumerate() {
        let tag = super::mounts::tag(i);
        words.push(format!(
            "smol.mount={tag}:{target}{}",
            if *ro { ":ro" } else { "" }
        ));
    }
    words.push(format!("smol.name={}", spec.name));
    words.join(" ")
}

/// The full QEMU argument list for a spec.
pub fn qemu_args(spec: &VmSpec, tsc_khz: Option<u64>) -> Vec<String> {
    let mut machine = match spec.assets.flavor {
        KernelFlavor::Smol => "microvm,acpi=off",
        KernelFlavor::DebianCloud => "microvm",
    }
    .to_string();
    // vhost-user (virtiofsd) needs guest RAM it can map: a shared memfd (or the RAM file of a
    // branch source, which it can map too); a branch source's RAM is a file on tmpfs
    let ram_backend = match (&spec.restore, &spec.ram_file) {
        (Some(r), _) => Some(format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
            spec.memory_mb,
            r.ram.display(),
            if r.shared { "on" } else { "off" }
        )),
        (None, Some(f)) => Some(format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
            spec.memory_mb,
            f.display()
        )),
        (None, None) if !spec.mounts.is_empty() => Some(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            spec.memory_mb
        )),
        (None, None) => None,
    };
    if ram_backend.is_some() {
        machine.push_str(",memory-backend=mem");
    }
    let mut a: Vec<String> = vec![
        "-M".into(),
        machine,
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
    ];
    match spec.accel.accel {
        Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
        Accel::Tcg => a.extend(["-accel", "tcg"].map(String::from)),
    }
    a.extend([
        "-m".into(),
        spec.memory_mb.to_string(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        spec.assets.kernel.display().to_string(),
        "-initrd".into(),
        spec.assets.initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(spec, tsc_khz),
        // append=on: the supervisor trims the log (local::console) and QEMU's next write lands
        // at the new end
        "-chardev".into(),
        format!(
            "file,id=con,path={},append=on",
            spec.console_log().display()
        ),
        "-serial".into(),
        "chardev:con".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},reconnect=1",
            spec.agent_socket().display()
        ),
        "-device".into(),
        "virtio-serial-device,max_ports=2".into(),
        "-device".into(),
        format!(
            "virtserialport,chardev=agent,name={}",
            smol_protocol::PORT_NAME
        ),
        "-device".into(),
        "virtio-rng-device".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", spec.qmp_socket().display()),
        "-sandbox".into(),
        super::confine::SANDBOX.into(),
    ]);
    if let Some(backend) = ram_backend {
        a.extend(["-object".into(), backend]);
    }
    if spec.restore.is_some() {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    if !spec.mounts.is_empty() {
        for i in 0..spec.mounts.len() {
            a.extend([
                "-chardev".into(),
                format!(
                    "socket,id=fs{i},path={}",
                    super::mounts::socket(&spec.dir, i).display()
                ),
                "-device".into(),
                format!(
                    "vhost-user-fs-device,chardev=fs{i},tag={}",
                    super::mounts::tag(i)
                ),
            ]);
        }
    }
    if spec.network {
        // QEMU listens; the egress filter connects (local::net::vm_socket), and a filter of
        // another process can take over once it ends. Measuring without the filter, QEMU
        // connects to passt itself.
        let netdev = if super::egress::bypassed() {
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                super::net::socket(&spec.dir).display()
            )
        } else {
            format!(
                "stream,id=net0,server=on,addr.type=unix,addr.path={}",
                super::net::vm_socket(&spec.dir).display()
            )
        };
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-device,netdev=net0".into(),
        ]);
    }
    if let Some((rootfs, _)) = &spec.image {
        a.extend([
            "-drive".into(),
            format!(
                "if=none,id=img0,file={},format=raw,readonly=on",
                rootfs.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=img0,serial=smol-image".into(),
        ]);
    }
    if let Some(disk) = &spec.disk {
        // werror/rerror=report: a host write that fails (the host disk is full) is an I/O
        // error in the guest, where the command that wrote sees it; QEMU's default for
        // ENOSPC pauses the whole VM, so every later exec would hang until its deadline.
        // auto-read-only=off: the image stays open read-write through a migration (a branch,
        // a checkpoint), instead of being reopened by name, which a VMM that dropped its uid
        // cannot do (local::runas).
        a.extend([
            "-drive".into(),
            format!(
                "if=none,id=disk0,file={},format=qcow2,cache=writeback,discard=unmap,\
                 werror=report,rerror=report,auto-read-only=off",
                disk.display()
            ),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=disk0,serial={}",
                super::disk::SERIAL
            ),
        ]);
    }
    if free_page_reporting(spec) {
        a.extend([
            "-device".into(),
            "virtio-balloon-device,free-page-reporting=on".into(),
        ]);
    }
    // last: the devices before them keep their virtio-mmio transports whatever the slots
    for (i, file) in spec.image_slots.iter().enumerate() {
        let backing = match file.as_deref().filter(|f| f.exists()) {
            Some(f) => format!(
                "driver=file,node-name={},filename={},read-only=on",
                super::slots::boot_node(i),
                f.display()
            ),
            None => {
                if let Some(f) = file {
                    tracing::warn!(file = %f.display(), slot = i, "image slot file missing: the slot boots empty");
                }
                format!(
                    "driver=null-co,node-name={},size={},read-zeroes=on",
                    super::slots::boot_node(i),
                    super::slots::PLACEHOLDER
                )
            }
        };
        a.extend([
            "-blockdev".into(),
            backing,
            "-blockdev".into(),
            format!(
                "driver=raw,node-name={},file={},read-only=on",
                super::slots::node(i),
                super::slots::boot_node(i)
            ),
            "-device".into(),
            format!(
                "virtio-blk-device,drive={},serial={}",
                super::slots::node(i),
                super::slots::serial(i)
            ),
        ]);
    }
    a
}

/// The virtio-mmio transports of QEMU's microvm (`VIRTIO_NUM_TRANSPORTS`): one per device.
pub const VIRTIO_TRANSPORTS: usize = 8;

/// The transports `spec`'s devices leave free for image slots (its own slots not counted).
pub fn free_transports(spec: &VmSpec) -> usize {
    let devices = 2 // virtio-serial, virtio-rng
        + spec.mounts.len()
        + usize::from(spec.network)
        + usize::from(spec.image.is_some())
        + usize::from(spec.disk.is_some())
        + usize::from(free_page_reporting(spec));
    VIRTIO_TRANSPORTS.saturating_sub(devices)
}

/// The agent chardev of a QEMU that dropped its uid (`local::runas`) reconnected by
/// descriptor: the engine connects to its own listener and hands QEMU that connection
/// (`getfd`, then `chardev-change` to the `fd` address), since the dropped user may not reach
/// the socket's path.
async fn reconnect_agent_by_fd(spec: &VmSpec) -> Result<(), VmmError> {
    use std::os::fd::AsFd;
    let stream =
        std::os::unix::net::UnixStream::connect(spec.agent_socket()).map_err(QmpError::from)?;
    let mut qmp = Qmp::connect(&spec.qmp_socket()).await?;
    qmp.send_fd("agent-reconnect", stream.as_fd()).await?;
    qmp.execute(
        "chardev-change",
        Some(serde_json::json!({
            "id": "agent",
            "backend": {"type": "socket", "data": {
                "addr": {"type": "fd", "data": {"str": "agent-reconnect"}},
                "server": false
            }}
        })),
    )
    .await?;
    Ok(())
}

/// Whether the machine gets a virtio-balloon device with free page reporting: the guest hands
/// the pages it frees back (QEMU discards them), so QEMU's RSS follows what the guest uses
/// instead of staying at its high-water mark. Not for machines whose RAM is a file that others
/// share or may share (branch sources, clones, restores, whose device lists must match the
/// source's): QEMU 7.2 discards a page of a file-backed RAM by punching a hole in the file, even
/// for a `share=off` clone of a frozen base, which would zero that page for every other clone.
/// `SMOL_FREE_PAGE_REPORTING=0` turns it off (to measure without it).
pub fn free_page_reporting(spec: &VmSpec) -> bool {
    spec.ram_file.is_none()
        && spec.restore.is_none()
        && std::env::var("SMOL_FREE_PAGE_REPORTING").as_deref() != Ok("0")
}

#[async_trait::async_trait]
impl Vmm for Qemu {
    fn name(&self) -> &str {
        "qemu"
    }

    fn version(&self) -> Result<String, VmmError> {
        let bin = self.resolved()?;
        let out = std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .map_err(|source| VmmError::Spawn {
                binary: bin.display().to_string(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    fn spawn(&self, spec: &VmSpec) -> Result<tokio::process::Child, VmmError> {
        let bin = self.resolved()?;
        // QEMU truncates the console file: the previous boot's (a panic, say) is kept aside.
        keep_previous(&spec.console_log());
        keep_previous(&spec.vmm_log());
        let log_path = spec.vmm_log();
        let log = std::fs::File::create(&log_path).map_err(|source| VmmError::Log {
            path: log_path.clone(),
            source,
        })?;
        let mut args = qemu_args(spec, host_tsc_khz());
        // started as root: QEMU drops to an unprivileged user once its files are open
        if let Some(who) = super::runas::claim(&spec.dir) {
            tracing::debug!(runas = %who.arg(), "the VMM drops to this uid (-runas)");
            args = super::runas::with_runas(args, &who);
        }
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it puts the VMM
        // in its own session so terminal signals aimed at the caller do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let plan = super::confine::vmm(spec, &bin);
        super::confine::warn_partial("qemu", &plan);
        super::confine::apply(cmd.as_std_mut(), plan);
        cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: bin.display().to_string(),
            source,
        })
    }

    async fn reconnect_agent(&self, spec: &VmSpec) -> Result<(), VmmError> {
        if super::runas::policy().is_some() {
            return reconnect_agent_by_fd(spec).await;
        }
        // Replacing the chardev backend with an identical one makes QEMU connect at once
        // (its own retry would come up to a second later).
        let mut qmp = Qmp::connect(&spec.qmp_socket()).await?;
        let path = spec.agent_socket().display().to_string();
        qmp.execute(
            "chardev-change",
            Some(serde_json::json!({
                "id": "agent",
                "backend": {"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": path}},
                    "server": false,
                    "reconnect": 1
                }}
            })),
        )
        .await?;
        Ok(())
    }

    async fn quit(&self, spec: &VmSpec) -> Result<(), VmmError> {
        let mut qmp = Qmp::connect(&spec.qmp_socket()).await?;
        match qmp.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The previous boot's copy of a log file: `console.log` -> `console.log.1`.
pub fn previous(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    path.with_file_name(name)
}

/// Moves a log file of the previous boot to [`previous`] (replacing the one before it), so that
/// a new boot does not wipe what the last one printed. A log that is not there is fine.
fn keep_previous(path: &Path) {
    match std::fs::rename(path, previous(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the previous boot's log")
        }
    }
}

/// How much of the end of a log file [`tail`] reads: a guest can make its console log huge.
const TAIL_BYTES: u64 = 64 * 1024;

/// Last `lines` lines of a log file (within its last 64 KiB), for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    let read = std::fs::File::open(path).and_then(|mut f| {
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        f.take(TAIL_BYTES).read_to_end(&mut text)
    });
    if let Err(e) = read {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "cannot read the log");
        }
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How many console lines a crash report carries.
const CRASH_LINES: usize = 20;

/// If the guest's console says its kernel panicked (with `panic=-1` and `-no-reboot` a panic
/// ends QEMU with status 0, like a power-off): "the VM crashed: <panic line>" and the console's
/// last lines. `None` when the console shows no panic.
pub fn crash_report(console: &Path) -> Option<String> {
    let last = tail(console, 400);
    let lines: Vec<&str> = last.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| l.contains("Kernel panic - not syncing"))?;
    let panic = lines[at].trim();
    let panic = panic
        .find("Kernel panic")
        .map_or(panic, |i| &panic[i..])
        .trim_end_matches(" ]---");
    // the panic line and what follows (the trace), or the last lines when they include it
    let from = lines.len().saturating_sub(CRASH_LINES).min(at);
    let shown: Vec<&str> = lines[from..]
        .iter()
        .take(2 * CRASH_LINES)
        .copied()
        .collect();
    Some(format!(
        "the VM crashed: {panic} (its kernel panicked); the guest console's last lines:\n{}",
        shown.join("\n")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(flavor: KernelFlavor, accel: Accel) -> VmSpec {
        VmSpec {
            name: "m1".into(),
            cpus: 2,
            memory_mb: 256,
            assets: Assets {
                kernel: "/k".into(),
                initrd: "/i".into(),
                flavor,
            },
            accel: AccelChoice {
                accel,
                reason: String::new(),
            },
            dir: "/run/m1".into(),
            disk: Some("/home/m1/disk.qcow2".into()),
            linger_ms: Some(3000),
            mounts: vec![("/work".into(), true)],
            network: false,
            image: Some(("/img/r.erofs".into(), "erofs".into())),
            ram_file: None,
            restore: None,
            image_slots: Vec::new(),
        }
    }

    #[test]
    fn image_slots_are_the_last_devices_empty_or_backed_by_their_file() {
        let mut s = spec(KernelFlavor::Smol, Accel::Tcg);
        let img = tempfile::NamedTempFile::new().unwrap();
        s.image_slots = vec![None, Some(img.path().to_path_buf())];
        let a = qemu_args(&s, None);
        let devices: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(k, _)| *k == "-device")
            .map(|(_, v)| v)
            .collect();
        let n = devices.len();
        assert!(devices[n - 2].contains("serial=smol-slot-0"), "{devices:?}");
        assert!(devices[n - 1].contains("serial=smol-slot-1"), "{devices:?}");
        let joined = a.join(" ");
        assert!(joined.contains("driver=null-co,node-name=slot0-boot,size=4096"));
        assert!(joined.contains(&format!(
            "driver=file,node-name=slot1-boot,filename={},read-only=on",
            img.path().display()
        )));
        assert!(joined.contains("driver=raw,node-name=slot1,file=slot1-boot,read-only=on"));
        // a file gone since (another host, a pruned cache) boots the slot empty, not failing
        s.image_slots = vec![Some("/no/such/image.erofs".into())];
        let joined = qemu_args(&s, None).join(" ");
        assert!(
            joined.contains("driver=null-co,node-name=slot0-boot"),
            "{joined}"
        );
        assert!(!joined.contains("/no/such/image.erofs"));
    }

    #[test]
    fn slots_never_take_more_transports_than_microvm_has() {
        let mut s = spec(KernelFlavor::Smol, Accel::Tcg);
        // serial, rng, one mount, image, disk, balloon
        assert_eq!(free_transports(&s), 2);
        s.network = true;
        assert_eq!(free_transports(&s), 1);
        s.mounts = vec![("/a".into(), true); 4];
        assert_eq!(free_transports(&s), 0);
    }

    #[test]
    fn a_branch_source_has_its_ram_in_a_shared_file_and_a_clone_starts_incoming() {
        let mut s = spec(KernelFlavor::Smol, Accel::Tcg);
        s.mounts.clear();
        let plain = qemu_args(&s, None).join(" ");
        assert!(!plain.contains("memory-backend") && !plain.contains("-incoming"));
        // a plain machine hands freed pages back; one whose RAM is a file does not
        assert!(plain.contains("-device virtio-balloon-device,free-page-reporting=on"));
        s.ram_file = Some("/dev/shm/x/m1/ram".into());
        let joined = qemu_args(&s, None).join(" ");
        assert!(!joined.contains("balloon"), "{joined}");
        assert!(
            joined.contains("microvm,acpi=off,memory-backend=mem"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/x/m1/ram,share=on"
            ),
            "{joined}"
        );
        assert!(!joined.contains("-incoming"));
        s.restore = Some(Restore {
            ram: "/dev/shm/x/c1/base".into(),
            shared: false,
        });
        let joined = qemu_args(&s, None).join(" ");
        assert!(
            joined.contains(
                "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/x/c1/base,share=off"
            ),
            "{joined}"
        );
        assert!(joined.contains("-incoming defer"), "{joined}");
        assert_eq!(joined.matches("memory-backend-").count(), 1, "{joined}");
        assert!(!joined.contains("balloon"), "{joined}");
    }

    #[test]
    fn smol_kernel_under_tcg() {
        let s = spec(KernelFlavor::Smol, Accel::Tcg);
        let a = qemu_args(&s, Some(2_596_118));
        let joined = a.join(" ");
        assert!(joined.contains("-M microvm,acpi=off"));
        assert!(joined.contains("-accel tcg"));
        assert!(joined.contains("-smp 2 "));
        assert!(joined.contains("-m 256 "));
        assert!(joined.contains("reconnect=1"));
        assert!(joined.contains("name=smol.agent"));
        assert!(joined.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        let cmdline = kernel_cmdline(&s, Some(2_596_118));
        assert!(cmdline.contains("tsc_early_khz=2596118"));
        assert!(cmdline.contains("noapictimer"));
        assert!(cmdline.ends_with("smol.name=m1"));
        assert!(cmdline.contains("smol.disk=1") && cmdline.contains("smol.linger_ms=3000"));
        assert!(joined.contains("file=/home/m1/disk.qcow2,format=qcow2"));
        assert!(joined.contains("serial=smol-disk"));
        assert!(joined.contains("microvm,acpi=off,memory-backend=mem"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(joined.contains("vhost-user-fs-device,chardev=fs0,tag=smolfs0"));
        assert!(cmdline.contains("smol.mount=smolfs0:/work:ro"));
        assert!(cmdline.contains("smol.image=erofs"));
        assert!(joined.contains("file=/img/r.erofs,format=raw,readonly=on"));
        assert!(joined.contains("serial=smol-image"));
        // no network device unless asked
        assert!(!joined.contains("netdev") && !cmdline.contains("smol.net"));
        let mut with_net = s.clone();
        with_net.network = true;
        let joined = qemu_args(&with_net, None).join(" ");
        assert!(joined.contains(
            "-netdev stream,id=net0,server=on,addr.type=unix,addr.path=/run/m1/net-vm.sock"
        ));
        assert!(kernel_cmdline(&with_net, None).contains("smol.net=1"));
    }

    #[test]
    fn cloud_kernel_keeps_acpi_and_never_disables_the_apic_timer() {
        let s = spec(KernelFlavor::DebianCloud, Accel::Kvm);
        let a = qemu_args(&s, Some(1));
        let machine = &a[a.iter().position(|x| x == "-M").unwrap() + 1];
        assert!(
            machine.starts_with("microvm") && !machine.contains("acpi=off"),
            "{machine}"
        );
        assert!(a.join(" ").contains("-accel kvm -cpu host"));
        let cmdline = kernel_cmdline(&s, Some(1));
        assert!(!cmdline.contains("noapictimer"));
        assert!(!cmdline.contains("acpi=off"));
        assert!(!cmdline.contains("tsc_early_khz"), "KVM has kvmclock");
    }

    #[test]
    fn a_panic_on_the_console_is_a_crash_report_with_its_lines() {
        let d = tempfile::tempdir().unwrap();
        let console = d.path().join("console.log");
        // a clean boot and power-off: no crash
        std::fs::write(
            &console,
            "[    0.1] smol-agent: up\n[    9.0] reboot: Power down\n",
        )
        .unwrap();
        assert_eq!(crash_report(&console), None);
        assert_eq!(crash_report(&d.path().join("none")), None);
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("[ {i}.0] Mem-Info line {i}\n"));
        }
        text.push_str("[ 2.2] Kernel panic - not syncing: System is deadlocked on memory\n");
        for i in 0..60 {
            text.push_str(&format!("[ 2.3] trace {i}\n"));
        }
        text.push_str(
            "[ 2.4] ---[ end Kernel panic - not syncing: System is deadlocked on memory ]---\n",
        );
        std::fs::write(&console, text).unwrap();
        let r = crash_report(&console).unwrap();
        let first = r.lines().next().unwrap();
        assert!(
            first.starts_with(
                "the VM crashed: Kernel panic - not syncing: System is deadlocked on memory ("
            ),
            "{first}"
        );
        assert!(
            r.contains("trace 59") && r.contains("---[ end Kernel panic"),
            "{r}"
        );
        assert!(r.lines().count() <= CRASH_LINES + 1, "{r}");
    }

    #[test]
    fn the_previous_boots_log_is_kept_and_the_tail_reads_only_the_end() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("console.log");
        assert_eq!(previous(&log), d.path().join("console.log.1"));
        keep_previous(&log); // nothing there yet: fine
        std::fs::write(&log, "boot 1\n").unwrap();
        keep_previous(&log);
        std::fs::write(&log, "boot 2\n").unwrap();
        keep_previous(&log);
        assert!(!log.exists());
        assert_eq!(std::fs::read_to_string(previous(&log)).unwrap(), "boot 2\n");
        // a huge log: only its end is read
        let mut big = "x".repeat(10 * TAIL_BYTES as usize);
        big.push_str("\nsecond to last\nlast\n");
        std::fs::write(&log, big).unwrap();
        assert_eq!(tail(&log, 2), "second to last\nlast");
        assert_eq!(tail(&d.path().join("none"), 2), "");
    }

    #[test]
    fn missing_binary_is_reported() {
        let q = Qemu {
            binary: "/nonexistent/qemu".into(),
        };
        assert!(matches!(q.version(), Err(VmmError::BinaryMissing { .. })));
    }

    #[test]
    fn tsc_frequency_is_read() {
        if std::path::Path::new("/proc/cpuinfo").exists() {
            assert!(host_tsc_khz().unwrap_or(1) > 0);
        }
    }
}

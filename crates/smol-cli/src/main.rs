//! `smol`: run commands in microVMs and manage machines from a shell.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smolmachines::local::{programs, LocalBackend};
use smolmachines::{
    ConnectOptions, Error, ExecEvent, ExecOptions, Machine, MachineConfig, PortSpec, ResourceSpec,
    Target,
};

mod image;

/// Exit code for errors of smol itself (as docker and podman do), distinct from a command's.
const EXIT_SMOL_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "smol",
    version,
    about = "microVM sandboxes: run commands in fresh Linux VMs"
)]
struct Cli {
    /// Log on stderr: -v info, -vv debug, -vvv trace (SMOL_LOG or RUST_LOG, e.g.
    /// `smolmachines=debug`, take precedence).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Use the cloud target (a smolfleet server) for `run` and `machine`: the server is
    /// SMOL_CLOUD_URL (default https://api.smolmachines.com), the API key SMOL_CLOUD_TOKEN
    /// (which alone also selects the cloud, SPEC 2.2). Local otherwise.
    #[arg(long, global = true)]
    cloud: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ExecArgs {
    /// Environment variable for the command (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Run as this user of the image (NAME, UID[:GID] or NAME:GROUP; machines of an image).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a fresh machine, then delete it. Exits with the command's exit code.
    Run {
        /// Image to run the command in (pulled on first use); a bare machine when omitted.
        image: Option<String>,
        /// The image, as a flag (the same as the argument; the cloud target needs one).
        #[arg(long = "image", value_name = "IMAGE", conflicts_with = "image")]
        image_flag: Option<String>,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Give the machine a network (outbound; off by default, only `lo`). Host services
        /// bound to 0.0.0.0 are reachable through the host's own address: see the README.
        #[arg(long)]
        network: bool,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Manage long-lived machines.
    Machine {
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// Manage the local image cache: pull, list, remove, prune.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Show what this host can run: accelerator, kernel, QEMU, and why.
    Doctor,
    /// The fleet server: `smol fleet ARGS` runs `smolfleet ARGS`.
    ///
    /// `smolfleet` is the one beside this binary, else on PATH: `smol fleet serve --role all`,
    /// `smol fleet init`, `smol fleet node --control URL`, `smol fleet node
    /// drain|cordon|uncordon ID`; `smol fleet --help` for all of them.
    #[command(disable_help_flag = true)]
    Fleet {
        /// What `smolfleet` is given, as it is.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum MachineCommand {
    /// (internal) Serve a detached networked machine's egress filter until its VM ends:
    /// started in the background by `create --network`.
    #[command(hide = true)]
    HoldNetwork { name: String },
    /// Create a machine that keeps running after this command exits (detached, persistent).
    Create {
        /// Name (generated when omitted).
        #[arg(long)]
        name: Option<String>,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Writable disk size in GiB (sparse).
        #[arg(long)]
        storage: Option<u32>,
        /// Give the machine a network (outbound; off by default, only `lo`). Host services
        /// bound to 0.0.0.0 are reachable through the host's own address: see the README.
        #[arg(long)]
        network: bool,
        /// Publish a guest TCP port on host 127.0.0.1: HOST:GUEST, repeatable.
        #[arg(short = 'p', long = "port", value_name = "HOST:GUEST")]
        ports: Vec<String>,
        /// Label KEY=VALUE, repeatable.
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Boot into this OCI image; its workload (Entrypoint + Cmd, or the command after
        /// `--`) starts in the background, output in /var/log/smol/workload.log.
        #[arg(long)]
        image: Option<String>,
        /// Environment of the workload, KEY=VALUE, repeatable.
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory of the workload.
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        /// User of the workload (default: the image's).
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// The workload's argv (replaces the image's Entrypoint + Cmd).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command in a machine.
    Exec {
        /// Machine name.
        name: String,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// List machines (of every process).
    Ls {
        /// Only machines with this label (KEY=VALUE), repeatable.
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Start a stopped machine.
    Start {
        /// Machine name.
        name: String,
    },
    /// Stop a machine (clean power-off).
    Stop {
        /// Machine name.
        name: String,
    },
    /// Delete machines: stop them and remove everything they had.
    Rm {
        /// Machine names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn key_values(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for kv in items {
        let (k, v) = kv.split_once('=').ok_or_else(|| Error::InvalidConfig {
            message: format!("{flag} expects KEY=VALUE, got {kv:?}"),
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn port_specs(items: &[String]) -> Result<Vec<PortSpec>, Error> {
    items
        .iter()
        .map(|p| {
            let parsed = p
                .split_once(':')
                .and_then(|(h, g)| Some((h.parse().ok()?, g.parse().ok()?)));
            match parsed {
                Some((host, guest)) => Ok(PortSpec { host, guest }),
                None => Err(Error::InvalidConfig {
                    message: format!("--port expects HOST:GUEST, got {p:?}"),
                }),
            }
        })
        .collect()
}

fn exec_options(a: &ExecArgs) -> Result<ExecOptions, Error> {
    let env = key_values("--env", &a.env)?;
    // the core's conversion: a huge value is the longest wait, <= 0 / NaN an error
    let timeout = a
        .timeout
        .map(|t| smolmachines::config::seconds("--timeout", t))
        .transpose()?;
    Ok(ExecOptions {
        env,
        workdir: a.workdir.clone(),
        timeout,
        user: a.user.clone(),
        ..Default::default()
    })
}

/// Streams a command's output to our stdout/stderr; returns its exit code.
async fn stream(m: &Machine, a: &ExecArgs) -> Result<i32, Error> {
    let mut s = m.exec_stream(&a.argv, exec_options(a)?).await?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(ev) = s.next_event().await {
        match ev {
            ExecEvent::Stdout(d) => {
                if let Err(e) = out.write_all(&d).and_then(|()| out.flush()) {
                    // Our reader went away (`smol run ... | head`): the command ends with us, as
                    // a pipeline's writer does on SIGPIPE (exit status 128 + 13).
                    s.kill();
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        tracing::debug!("stdout closed; the command was killed");
                        return Ok(128 + libc_sigpipe());
                    }
                    return Err(Error::Io {
                        context: "writing the command's output to stdout".into(),
                        source: e,
                    });
                }
            }
            ExecEvent::Stderr(d) => {
                if let Err(e) = err.write_all(&d).and_then(|()| err.flush()) {
                    // nowhere left to report it but the log
                    tracing::warn!(error = %e, "writing the command's stderr failed");
                }
            }
            ExecEvent::Exit(code) => return Ok(code),
            ExecEvent::Error { code, message } => return Err(Error::coded(code, message)),
        }
    }
    Err(Error::Guest {
        message: "the command's stream ended without an exit status".into(),
    })
}

/// SIGPIPE's number (13 on Linux).
const fn libc_sigpipe() -> i32 {
    13
}

fn resources(cpus: Option<u32>, memory: Option<u32>, network: bool) -> ResourceSpec {
    ResourceSpec {
        cpus,
        memory_mb: memory,
        network: network.then_some(true),
        ..Default::default()
    }
}

/// The one `ConnectOptions` of this invocation: `--cloud` forces the cloud target; otherwise
/// the core's rule (SPEC 2.2: SMOL_CLOUD_TOKEN selects the cloud, else local). The key and
/// base URL come from SMOL_CLOUD_TOKEN / SMOL_CLOUD_URL in the core, never from argv (a key on
/// a command line is visible to every user of the host).
fn connect_options(cloud: bool) -> ConnectOptions {
    ConnectOptions {
        target: cloud.then_some(Target::Cloud),
        ..Default::default()
    }
}

/// `smol image` and `smol doctor` are about this host: refused with `--cloud` rather than
/// silently answering for the local engine.
fn local_only(cloud: bool, what: &str) -> Result<(), Error> {
    if cloud {
        return Err(Error::NotSupported {
            message: format!(
                "`smol {what}` with --cloud (it is about this host's engine; drop --cloud)"
            ),
        });
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<u8, Error> {
    let conn = connect_options(cli.cloud);
    let on_cloud = conn.resolve_target() == Target::Cloud;
    match cli.command {
        Command::Run {
            image,
            image_flag,
            cpus,
            memory,
            network,
            exec,
        } => {
            exec_options(&exec)?;
            let image = image.or(image_flag);
            if let Some(image) = image.as_ref().filter(|_| !on_cloud) {
                // pulled here first to show progress; the cloud pulls on its node
                image::prepare(image).await?;
            }
            let cfg = MachineConfig {
                image,
                resources: resources(cpus, memory, network),
                // argv replaces the image's command: its Entrypoint/Cmd is not launched
                command: Some(Vec::new()),
                ..Default::default()
            };
            let m = Machine::create(cfg, conn).await?;
            let result = stream(&m, &exec).await;
            let deleted = m.delete().await;
            let code = result?;
            deleted?;
            Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255))
        }
        Command::Machine { command } => match command {
            MachineCommand::Create {
                name,
                cpus,
                memory,
                storage,
                network,
                ports,
                labels,
                image,
                env,
                workdir,
                user,
                command,
            } => {
                if let Some(image) = image.as_ref().filter(|_| !on_cloud) {
                    image::prepare(image).await?;
                }
                let mut res = resources(cpus, memory, network);
                res.storage_gb = storage;
                let cfg = MachineConfig {
                    name,
                    resources: res,
                    ports: port_specs(&ports)?,
                    labels: key_values("--label", &labels)?,
                    detach: true,
                    persistent: true,
                    image,
                    env: key_values("--env", &env)?,
                    workdir,
                    user,
                    command: (!command.is_empty()).then_some(command),
                    ..Default::default()
                };
                let m = Machine::create(cfg, conn).await?;
                if network && !on_cloud {
                    // this process's egress filter ends with it: a process of its own
                    // serves the machine's link from now on (net::hold)
                    hold_network_in_background(m.name());
                }
                println!("{}", m.name());
                Ok(0)
            }
            MachineCommand::HoldNetwork { name } => {
                local_only(on_cloud, "machine hold-network")?;
                let engine = LocalBackend::open_env();
                // the creating process still holds the link until it exits: wait for it
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while engine.hold_network(&name).await? == Some(false) {
                    if std::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Ok(0)
            }
            MachineCommand::Exec { name, exec } => {
                exec_options(&exec)?;
                let m = Machine::connect(&name, conn).await?;
                let code = stream(&m, &exec).await?;
                Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255))
            }
            MachineCommand::Ls { labels } => {
                let list = Machine::list(conn, &key_values("--label", &labels)?).await?;
                println!(
                    "{:<24} {:<8} {:>4} {:>8} {:<4} {:>8}",
                    "NAME", "STATE", "CPUS", "MEMORY", "ACCEL", "PID"
                );
                for m in list {
                    println!(
                        "{:<24} {:<8} {:>4} {:>6}Mi {:<5} {:>8}",
                        m.name,
                        m.state.as_str(),
                        m.cpus,
                        m.memory_mb,
                        if m.accel.is_empty() { "-" } else { &m.accel },
                        m.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                    );
                }
                Ok(0)
            }
            MachineCommand::Start { name } => {
                Machine::open(&name, conn).await?.start().await?;
                if !on_cloud {
                    // a networked machine's link outlives this process (it exits at once
                    // for one without a network)
                    hold_network_in_background(&name);
                }
                Ok(0)
            }
            MachineCommand::Stop { name } => {
                Machine::open(&name, conn).await?.stop().await?;
                Ok(0)
            }
            MachineCommand::Rm { names } => {
                for name in names {
                    Machine::open(&name, conn.clone()).await?.delete().await?;
                    println!("{name}");
                }
                Ok(0)
            }
        },
        Command::Image { command } => {
            local_only(cli.cloud, "image")?;
            image::run(command).await
        }
        Command::Fleet { args } => Ok(fleet(&args)),
        Command::Doctor => {
            local_only(cli.cloud, "doctor")?;
            // the engine `machine` commands use (backend_for: this home, this run dir)
            let d = LocalBackend::open_env().doctor();
            match &d.accel {
                Ok(a) => println!("accelerator: {} ({})", a.accel.as_str(), a.reason),
                Err(e) => println!("accelerator: unusable: {e}"),
            }
            match &d.vmm {
                Ok(v) => println!("vmm:         {v}"),
                Err(e) => println!("vmm:         missing: {e}"),
            }
            match smolmachines::local::assets::origin() {
                Ok(o) => println!("assets:      {o}"),
                Err(e) => println!("assets:      unusable: {e}"),
            }
            match &d.assets {
                Ok(a) => {
                    println!("kernel:      {} ({:?})", a.kernel.display(), a.flavor);
                    println!("initramfs:   {}", a.initrd.display());
                }
                Err(e) => println!("assets:      missing: {e}"),
            }
            println!("run dir:     {}", d.run_dir.display());
            println!("confinement: {}", d.confinement);
            println!("programs (scripts/programs.txt):");
            for c in &d.programs {
                let p = c.program;
                match &c.status {
                    Ok(v) => println!("  ok       {:<24} {v}", p.program),
                    Err(e) => println!(
                        "  {:<8} {:<24} {e} (Debian package {}; needed {})",
                        if p.role == programs::Role::Engine {
                            "MISSING"
                        } else {
                            "missing"
                        },
                        p.program,
                        p.package,
                        p.role.needed_for()
                    ),
                }
            }
            let apt = programs::apt_line(&d.programs);
            if d.ok() {
                match &apt {
                    None => println!("ok: this host can run machines"),
                    Some(line) => println!(
                        "ok: this host can run machines, without the features above; for them: {line}"
                    ),
                }
                Ok(0)
            } else {
                if let Some(line) = apt {
                    println!("install what is missing: {line}");
                }
                println!(
                    "not ready: run `make setup` (installs QEMU, builds the kernel and initramfs)"
                );
                Ok(1)
            }
        }
    }
}

/// The CLI's log subscriber: stderr, filtered by `SMOL_LOG` / `RUST_LOG`, else by `-v`.
fn init_logs(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let from_env = smolmachines::log_filter_from_env();
    let default = match verbose {
        0 => "warn",
        1 => "warn,smolmachines=info,smol=info",
        2 => "info,smolmachines=debug,smol=debug",
        _ => "debug,smolmachines=trace,smol=trace",
    };
    let filter = match from_env.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("warning: SMOL_LOG/RUST_LOG is not a log filter ({e}); using {default:?}");
            EnvFilter::new(default)
        }
        None => EnvFilter::new(default),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.verbose);
    tracing::debug!(version = env!("CARGO_PKG_VERSION"), "smol starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            if let Error::BootFailed { log_tail, .. } = &e {
                if !log_tail.trim().is_empty() {
                    eprintln!("{log_tail}");
                }
            }
            if let Some(h) = e.hint() {
                eprintln!("hint: {h}");
            }
            ExitCode::from(EXIT_SMOL_ERROR)
        }
    }
}

/// Starts `smol machine hold-network NAME` in a process group of its own, its output in
/// the void: it outlives this one and serves the machine's egress filter.
fn hold_network_in_background(name: &str) {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "the machine's network ends with this process: no path to this program");
            return;
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["machine", "hold-network", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // a process group of its own: a ^C at the terminal does not reach it
    cmd.process_group(0);
    if let Err(e) = cmd.spawn() {
        tracing::error!(error = %e, "the machine's network ends with this process: its holder did not start");
    }
}

/// `smol fleet ARGS`: replaces this process with `smolfleet ARGS` (its exit status, signals and
/// terminal are then its own); 127 and what to do when there is no `smolfleet`.
fn fleet(args: &[String]) -> u8 {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("smolfleet")))
        .filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| "smolfleet".into());
    let e = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "error: `smol fleet` runs {}: {e}. Build it (`cargo build --release -p smol-fleet`, \
         beside target/release/smol) or install the release archive, which has both binaries, \
         or put smolfleet on PATH",
        program.display()
    );
    127
}

//! `smolfleet`: the fleet server (`serve`), the node agent (`node`) and the admin commands
//! (`init`, `keys`, `node join-token`, `node list`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smol_fleet::{Db, Fleet, RateLimit};

#[derive(Parser)]
#[command(
    name = "smolfleet",
    version,
    about = "The self-hostable smol fleet server (/v1 REST API)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves the /v1 API; the first start prints the bootstrap admin key once.
    Serve {
        /// Address to listen on (loopback by default).
        #[arg(long, default_value = "127.0.0.1:8700")]
        listen: SocketAddr,
        /// The fleet's home: fleet.db and the engine's machines.
        #[arg(long)]
        home: Option<PathBuf>,
        /// Requests a second each API key may make (a token bucket holding one second's
        /// worth); past it, 429 with Retry-After.
        #[arg(long, value_name = "N/s", default_value = "1000/s")]
        rate_limit: RateLimit,
        /// The domain of published ports' public URLs: a request for
        /// `{port}-{machineId}.DOMAIN` (with the API key) goes to that guest port. The
        /// default, localhost, works on this host (`*.localhost` is loopback).
        #[arg(long, value_name = "DOMAIN", default_value = "localhost")]
        apps_domain: String,
        /// The scheme of those URLs: http or https (default: https with --tls-cert, else
        /// http; say https behind a TLS proxy).
        #[arg(long, value_name = "SCHEME")]
        apps_scheme: Option<String>,
        /// The port of those URLs (default: the port the server listens on).
        #[arg(long, value_name = "PORT")]
        apps_port: Option<u16>,
        /// Serve HTTPS with this PEM certificate chain (leaf first); needs --tls-key.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Allow plain HTTP on a non-loopback --listen address (API keys then cross the
        /// network in clear).
        #[arg(long, conflicts_with = "tls_cert")]
        insecure_no_tls: bool,
        /// How often idle stops, TTLs and ephemeral machines are enforced (`15s`, `500ms`,
        /// `2m`; a bare number is seconds).
        #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_interval)]
        sweep_interval: std::time::Duration,
        /// The fleet's store: `postgres://USER@HOST:PORT/DATABASE` (PostgreSQL; a unix
        /// socket as `?host=/run/postgresql`), or a SQLite file (default: SMOLFLEET_DB, else
        /// <home>/fleet.db).
        #[arg(long, value_name = "URL")]
        db: Option<String>,
        /// What this process is: `all` (the API, its store and this host's engine as the
        /// node), or `control,edge` with --db (any number over one store; nodes join its
        /// --node-listen door). A node is `smolfleet node`.
        #[arg(long, value_name = "ROLES", default_value = "all")]
        role: String,
        /// The node door (mutual TLS) of a control replica: where `smolfleet node` joins and
        /// renews its lease. Needs the fleet CA (`smolfleet init`).
        #[arg(long, value_name = "ADDR")]
        node_listen: Option<SocketAddr>,
        /// A name (IP address or DNS name) nodes reach the door by, in its server
        /// certificate (repeat it; default: the --node-listen address and localhost).
        #[arg(long = "node-san", value_name = "NAME")]
        node_sans: Vec<String>,
        /// How long a node's heartbeat holds; past it the node is suspect (no new
        /// placements).
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_interval)]
        node_lease: std::time::Duration,
        /// How long past its lease a node is lost (its machines report ready=false).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_interval)]
        node_lost_after: std::time::Duration,
        /// How long the certificates the node door signs for nodes are valid; a node renews
        /// its own past two thirds of that (the one it renewed is refused from then on).
        #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_interval)]
        node_cert_validity: std::time::Duration,
    },
    /// Makes the fleet CA in the store (once; prints its fingerprint).
    Init {
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store, as `serve --db` takes it.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
    },
    /// Runs this host's node agent (`--control URL --token T` the first time), or an admin
    /// command on nodes.
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        cmd: Option<NodeCmd>,
        #[command(flatten)]
        run: NodeRun,
    },
    /// Prints the OpenAPI document (as checked in at crates/smol-fleet/openapi.json).
    Openapi,
    /// Manages API keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
        /// The fleet's home.
        #[arg(long, global = true)]
        home: Option<PathBuf>,
        /// The fleet's store, as `serve --db` takes it (default: SMOLFLEET_DB, else
        /// <home>/fleet.db).
        #[arg(long, global = true, value_name = "URL")]
        db: Option<String>,
    },
}

#[derive(clap::Args)]
struct NodeRun {
    /// The node door of a control replica: `https://HOST:PORT` (repeat it, or
    /// comma-separate, for several replicas: tried in turn). Needed to join; later given, it
    /// replaces the replicas the node knows.
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    control: Vec<String>,
    /// The one-time join token (`smolfleet node join-token`); needed the first time only.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The node's home: its key, certificates and membership (default:
    /// <fleet home>/node).
    #[arg(long)]
    home: Option<PathBuf>,
    /// What the node calls itself (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// The node's health door (loopback only).
    #[arg(long, default_value = "127.0.0.1:8702")]
    listen: SocketAddr,
    /// The node's API, where control replicas run machines on it (mutual TLS; none: the
    /// node runs no machines).
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<SocketAddr>,
    /// Where control replicas reach the node's API (default: https:// + --api-listen).
    #[arg(long, value_name = "URL")]
    api_url: Option<String>,
    /// The memory it offers (MiB; default: the host's).
    #[arg(long)]
    memory_mib: Option<i64>,
    /// The vCPUs it offers (default: the host's).
    #[arg(long)]
    cpus: Option<i64>,
    /// How long a machine the control plane places nowhere on this node may stay before the
    /// node deletes it as an orphan.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_interval)]
    orphan_grace: std::time::Duration,
    /// After this many creates or starts in a row fail to boot their VM, the node cordons
    /// itself (no new placements until `smolfleet node uncordon`; 0: never).
    #[arg(long, value_name = "N", default_value_t = 3)]
    cordon_after_failed_boots: u64,
    /// A label of the node, KEY=VALUE (repeat it): a machine with the label `node.KEY` of
    /// that value is placed on nodes labelled so only (`arch` is always the host's).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = smol_fleet::labels::parse)]
    labels: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Issues a one-time join token (printed once; stored hashed).
    JoinToken {
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
        /// How long it may be used.
        #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = parse_interval)]
        ttl: std::time::Duration,
    },
    /// Takes no new placements on a node (its machines keep running).
    Cordon {
        /// `node-…`.
        id: String,
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
    },
    /// Drains a node before its removal: no new placements (state `draining`) and what its
    /// machines still hold; they keep running until deleted (or their TTL), then `node
    /// remove`. Machines are not moved (not built yet).
    Drain {
        /// `node-…`.
        id: String,
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
    },
    /// Places on a cordoned (or draining) node again.
    Uncordon {
        /// `node-…`.
        id: String,
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
    },
    /// Removes a node from the fleet: its certificate is refused from then on (its agent
    /// stops). Refused while machines are placed on it.
    Remove {
        /// `node-…`.
        id: String,
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
    },
    /// Lists nodes with their state by the database's clock.
    List {
        /// The fleet's home.
        #[arg(long)]
        home: Option<PathBuf>,
        /// The fleet's store.
        #[arg(long, value_name = "URL")]
        db: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Creates a key (printed once) for a tenant, or for a new tenant.
    Create {
        /// The tenant (`ten-…`); without it a new tenant is made.
        #[arg(long)]
        tenant: Option<String>,
        /// The new tenant's name.
        #[arg(long, default_value = "tenant")]
        name: String,
        /// What the key is for.
        #[arg(long)]
        description: Option<String>,
        /// A scope the key holds (repeat it, or comma-separate): machine:create,
        /// machine:read, machine:exec, machine:delete, machine:files, volume:read,
        /// usage:read, admin (implies all). Default: every scope but admin.
        #[arg(long = "scope", value_delimiter = ',')]
        scopes: Vec<String>,
    },
    /// Lists keys (prefixes only).
    List,
    /// Revokes a key by id (`key-…`).
    Revoke {
        /// The key's id.
        id: String,
    },
}

fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SMOLFLEET_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("smolfleet")
}

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = match smolmachines::log_filter_from_env().map(|s| EnvFilter::try_new(&s)) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("smolfleet: SMOL_LOG/RUST_LOG is not a log filter ({e}); logging at info");
            EnvFilter::new("info")
        }
        None => EnvFilter::new("info"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_logs();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve {
            listen,
            home,
            rate_limit,
            apps_domain,
            apps_scheme,
            apps_port,
            tls_cert,
            tls_key,
            insecure_no_tls,
            sweep_interval,
            db,
            role,
            node_listen,
            node_sans,
            node_lease,
            node_lost_after,
            node_cert_validity,
        } => {
            let edge = Edge {
                tls: tls_cert.zip(tls_key),
                insecure_no_tls,
                sweep_interval,
                db: db.or_else(|| std::env::var("SMOLFLEET_DB").ok()),
                role,
                node_door: node_listen.map(|addr| NodeDoor {
                    addr,
                    names: node_sans,
                    lease: smol_fleet::nodes::Lease {
                        lease_ms: node_lease.as_millis() as i64,
                        lost_after_ms: node_lost_after.as_millis() as i64,
                    },
                    cert_validity: node_cert_validity,
                }),
            };
            let apps_scheme = apps_scheme
                .unwrap_or_else(|| if edge.tls.is_some() { "https" } else { "http" }.to_string());
            smol_fleet::ingress::Apps::new(&apps_domain, &apps_scheme, apps_port)
                .map_err(Into::into)
                .and_then(|apps| {
                    serve(
                        listen,
                        home.unwrap_or_else(default_home),
                        rate_limit,
                        apps,
                        edge,
                    )
                })
        }
        Cmd::Keys { cmd, home, db } => keys(
            cmd,
            home.unwrap_or_else(default_home),
            db.or_else(|| std::env::var("SMOLFLEET_DB").ok()),
        ),
        Cmd::Init { home, db } => init(
            home.unwrap_or_else(default_home),
            db.or_else(|| std::env::var("SMOLFLEET_DB").ok()),
        ),
        Cmd::Node { cmd: Some(cmd), .. } => node_admin(cmd),
        Cmd::Node { cmd: None, run } => node(run),
        Cmd::Openapi => {
            print!("{}", smol_fleet::openapi::document_json());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smolfleet: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult = Result<(), Box<dyn std::error::Error>>;

/// `15s`, `500ms`, `2m` or a bare number of seconds; at least 100 ms.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 15s, 500ms or 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m, h or d")),
    };
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is too short: at least 100ms"));
    }
    Ok(d)
}

/// TLS, its opt-out and the sweep interval of `smolfleet serve`.
struct Edge {
    /// `(certificate, key)` PEM files.
    tls: Option<(PathBuf, PathBuf)>,
    insecure_no_tls: bool,
    sweep_interval: std::time::Duration,
    /// `--db`.
    db: Option<String>,
    /// `--role`.
    role: String,
    /// `--node-listen` and its names and lease.
    node_door: Option<NodeDoor>,
}

/// The node door of a control replica.
struct NodeDoor {
    addr: SocketAddr,
    names: Vec<String>,
    lease: smol_fleet::nodes::Lease,
    cert_validity: std::time::Duration,
}

/// `--role`: `all`, or `control` and `edge` (together or alone) over a `--db` store; `node`
/// is `smolfleet node`.
fn check_role(role: &str, db: Option<&str>) -> Result<(), String> {
    let mut roles: Vec<&str> = role.split(',').map(str::trim).collect();
    roles.sort_unstable();
    roles.dedup();
    for r in &roles {
        if !matches!(*r, "all" | "control" | "edge" | "node") {
            return Err(format!(
                "--role {role}: {r:?} is not a role (all, control, edge, node)"
            ));
        }
    }
    if roles == ["all"] || roles == ["control", "edge", "node"] {
        return Ok(());
    }
    if roles.contains(&"node") {
        return Err(format!(
            "--role {role}: a node is its own process: `smolfleet node --control URL --token T`"
        ));
    }
    if roles != ["control", "edge"] {
        return Err(format!(
            "--role {role}: control and edge run together (--role control,edge); a control-only \
             or edge-only process is not built yet"
        ));
    }
    if db.is_none() {
        return Err(format!(
            "--role {role}: control replicas share a store: give --db postgres://… (or the \
             SQLite file of a one-host fleet)"
        ));
    }
    Ok(())
}

/// The store `--db` names, or `<home>/fleet.db`.
async fn open_store(
    home: &std::path::Path,
    db: Option<&str>,
) -> Result<Db, smol_fleet::FleetError> {
    match db {
        Some(url) => smol_fleet::store::open(url).await,
        None => {
            std::fs::create_dir_all(home).map_err(|source| smol_fleet::FleetError::Io {
                context: format!("create the fleet home {}", home.display()),
                source,
            })?;
            smol_fleet::store::open(&home.join("fleet.db").to_string_lossy()).await
        }
    }
}

fn serve(
    listen: SocketAddr,
    home: PathBuf,
    rate_limit: RateLimit,
    apps: smol_fleet::ingress::Apps,
    edge: Edge,
) -> AnyResult {
    check_role(&edge.role, edge.db.as_deref())?;
    if edge.tls.is_none() && !listen.ip().is_loopback() && !edge.insecure_no_tls {
        return Err(format!(
            "refusing to serve plain HTTP on {listen}, beyond loopback: API keys would cross the \
             network in clear. Give --tls-cert FILE --tls-key FILE, listen on 127.0.0.1 behind \
             a TLS proxy, or pass --insecure-no-tls to do it anyway"
        )
        .into());
    }
    // a bad certificate or key fails the start, naming the file
    let tls = match &edge.tls {
        Some((cert, key)) => Some(smol_fleet::tls::server_config(cert, key)?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (fleet, bootstrap) = match &edge.db {
            None => Fleet::open(&home)?,
            Some(url) => Fleet::open_on(&home, smol_fleet::store::open(url).await?).await?,
        };
        fleet.set_rate_limit(rate_limit);
        fleet.set_sweep_interval(edge.sweep_interval);
        fleet.set_apps(apps);
        if tls.is_none() && !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "--insecure-no-tls: listening beyond loopback over plain HTTP; API keys cross \
                 the network in clear"
            );
        }
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let _door = match edge.node_door {
            Some(door) => {
                // creates are placed on the nodes that join through the door (`remote.rs`)
                let ca = smol_fleet::nodedoor::load_ca(fleet.db()).await?;
                fleet.set_remote(smol_fleet::remote::Remote::new(ca.control_client_config()?));
                Some(start_node_door(fleet.db().clone(), door).await?)
            }
            None => None,
        };
        if let Some(key) = bootstrap {
            // the one time the key is shown: stdout, not the log
            println!("bootstrap admin key (shown once, store it now): {key}");
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("listening on {scheme}://{}", listener.local_addr()?);
        let shutdown = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot wait for ctrl-c");
                std::future::pending::<()>().await;
            }
            tracing::info!("ctrl-c: shutting down (machines keep running)");
        };
        match tls {
            Some(config) => fleet.serve_tls(listener, config, shutdown).await?,
            None => fleet.serve(listener, shutdown).await?,
        }
        Ok(())
    })
}

/// Binds the node door and serves it on a task of its own (aborted when the handle drops).
async fn start_node_door(
    db: smol_fleet::Db,
    door: NodeDoor,
) -> Result<AbortOnDrop, Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(door.addr).await?;
    let addr = listener.local_addr()?;
    let names = if door.names.is_empty() {
        vec![addr.ip().to_string(), "localhost".to_string()]
    } else {
        door.names
    };
    // the CA must be there before the door opens: a missing one fails the start
    smol_fleet::nodedoor::load_ca(&db).await?;
    println!("node door on https://{addr}");
    let task = tokio::spawn(async move {
        let serve = smol_fleet::nodedoor::serve(
            db,
            listener,
            &names,
            door.lease,
            door.cert_validity,
            std::future::pending(),
        );
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the node door failed");
        }
    });
    Ok(AbortOnDrop(task))
}

/// A task aborted when this drops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// `smolfleet init`: the fleet CA, made once per store.
fn init(home: PathBuf, db: Option<String>) -> AnyResult {
    current_thread()?.block_on(async move {
        let db = open_store(&home, db.as_deref()).await?;
        let (cert, key) = smol_fleet::fleetca::generate_ca()?;
        let made = db.put_ca(&cert, &key).await?;
        let ca = smol_fleet::nodedoor::load_ca(&db).await?;
        if made {
            println!("fleet CA made; fingerprint sha256:{}", ca.fingerprint());
        } else {
            println!(
                "fleet CA already made; fingerprint sha256:{}",
                ca.fingerprint()
            );
        }
        Ok(())
    })
}

/// `smolfleet node join-token|list`.
fn node_admin(cmd: NodeCmd) -> AnyResult {
    let env_db = || std::env::var("SMOLFLEET_DB").ok();
    // cordon: no new placements; uncordon: placeable again
    let state = match &cmd {
        NodeCmd::Cordon { .. } => "cordoned",
        NodeCmd::Drain { .. } => "draining",
        _ => "ready",
    };
    current_thread()?.block_on(async move {
        match cmd {
            NodeCmd::JoinToken { home, db, ttl } => {
                let home = home.unwrap_or_else(default_home);
                let db = open_store(&home, db.or_else(env_db).as_deref()).await?;
                let ca = smol_fleet::nodedoor::load_ca(&db).await?;
                let token = ca.new_token();
                let id = db
                    .create_join_token(&smol_fleet::keys::hash(&token), ttl.as_millis() as i64)
                    .await?;
                println!("join token {id} (one use, valid {ttl:?}; shown once):\n{token}");
            }
            NodeCmd::Cordon { id, home, db } | NodeCmd::Uncordon { id, home, db } => {
                let home = home.unwrap_or_else(default_home);
                let db = open_store(&home, db.or_else(env_db).as_deref()).await?;
                if !db.set_node_state(&id, state).await? {
                    return Err(format!("no node {id}").into());
                }
                println!("{id} {state}");
            }
            NodeCmd::Drain { id, home, db } => {
                let home = home.unwrap_or_else(default_home);
                let db = open_store(&home, db.or_else(env_db).as_deref()).await?;
                if !db.set_node_state(&id, state).await? {
                    return Err(format!("no node {id}").into());
                }
                let held = db
                    .node_status()
                    .await?
                    .into_iter()
                    .find(|s| s.node.id == id);
                let (mib, cpus) =
                    held.map_or((0, 0), |s| (s.node.reserved_mib, s.node.reserved_cpus));
                println!(
                    "{id} draining: no new placements; its machines hold {mib} MiB and {cpus} \
                     vCPUs: delete them, then `smolfleet node remove {id}`"
                );
            }
            NodeCmd::Remove { id, home, db } => {
                let home = home.unwrap_or_else(default_home);
                let db = open_store(&home, db.or_else(env_db).as_deref()).await?;
                match db.remove_node(&id).await? {
                    smol_fleet::nodes::Removed::Removed => println!("{id} removed"),
                    smol_fleet::nodes::Removed::NotFound => {
                        return Err(format!("no node {id}").into())
                    }
                    smol_fleet::nodes::Removed::HasMachines(n) => {
                        return Err(format!(
                            "{id} has {n} machine(s) placed on it: delete them first (cordon \
                             it meanwhile)"
                        )
                        .into())
                    }
                }
            }
            NodeCmd::List { home, db } => {
                let home = home.unwrap_or_else(default_home);
                let db = open_store(&home, db.or_else(env_db).as_deref()).await?;
                for s in db.node_status().await? {
                    println!(
                        "{}  {}  {}  {}/{} MiB  {}/{} vCPUs  [{}]",
                        s.node.id,
                        s.shown_state(),
                        s.name.as_deref().unwrap_or("(embedded)"),
                        s.node.reserved_mib,
                        s.node.memory_mib,
                        s.node.reserved_cpus,
                        s.node.cpus,
                        smol_fleet::labels::show(&s.labels)
                    );
                }
            }
        }
        Ok(())
    })
}

/// `smolfleet node`: this host's node agent.
fn node(run: NodeRun) -> AnyResult {
    let (mib, cpus) = smol_fleet::nodeagent::host_capacity();
    let name = run.name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "node".into())
    });
    let cfg = smol_fleet::nodeagent::NodeConfig {
        home: run.home.unwrap_or_else(|| default_home().join("node")),
        name,
        memory_mib: run.memory_mib.unwrap_or(mib),
        cpus: run.cpus.unwrap_or(cpus),
        api_url: run.api_url,
        orphan_grace: run.orphan_grace,
        cordon_after_failed_boots: run.cordon_after_failed_boots,
        labels: smol_fleet::labels::of_host(&run.labels)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot wait for ctrl-c");
                std::future::pending::<()>().await;
            }
        };
        smol_fleet::nodeagent::run(
            cfg,
            &run.control,
            run.token.as_deref(),
            run.listen,
            run.api_listen,
            shutdown,
        )
        .await?;
        Ok(())
    })
}

fn keys(cmd: KeysCmd, home: PathBuf, db: Option<String>) -> AnyResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let db = open_store(&home, db.as_deref()).await?;
        match cmd {
            KeysCmd::Create {
                tenant,
                name,
                description,
                scopes,
            } => {
                let scopes = smol_fleet::scopes::normalize(&scopes)?;
                let tenant = match tenant {
                    Some(t) if db.tenant_exists(&t).await? => t,
                    Some(t) => return Err(format!("no tenant {t}").into()),
                    None => db.create_tenant(&name).await?,
                };
                let (id, key) = db
                    .create_key(&tenant, &scopes, description.as_deref())
                    .await?;
                println!("tenant: {tenant}\nkey id: {id}\nscopes: {scopes}\nkey: {key}");
            }
            KeysCmd::List => {
                for k in db.list_keys().await? {
                    let revoked = k
                        .revoked_at
                        .map(|t| format!(" revoked {}", smol_fleet::rfc3339(t)))
                        .unwrap_or_default();
                    println!(
                        "{}  {}  {}…  created {}  [{}]{revoked}",
                        k.id,
                        k.tenant_id,
                        k.prefix,
                        smol_fleet::rfc3339(k.created_at),
                        k.scopes
                    );
                }
            }
            KeysCmd::Revoke { id } => {
                if db.revoke_key(&id).await? {
                    println!("revoked {id}");
                } else {
                    return Err(format!("no live key {id}").into());
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_interval;
    use std::time::Duration;

    #[test]
    fn sweep_intervals_parse_with_units_and_a_floor() {
        assert_eq!(parse_interval("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_interval("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_interval("30d"), Ok(Duration::from_secs(30 * 86400)));
        for bad in ["", "s", "10ms", "0", "1w", "-1s", "1.5s", "2d3h"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

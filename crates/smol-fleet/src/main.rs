//! `smolfleet`: the fleet server (`serve`) and its admin commands (`keys`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smol_fleet::{admin, Db, Fleet, RateLimit};

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
        } => serve(listen, home.unwrap_or_else(default_home), rate_limit),
        Cmd::Keys { cmd, home } => keys(cmd, home.unwrap_or_else(default_home)),
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

fn serve(listen: SocketAddr, home: PathBuf, rate_limit: RateLimit) -> AnyResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (fleet, bootstrap) = Fleet::open(&home)?;
        fleet.set_rate_limit(rate_limit);
        if !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "listening beyond loopback over plain HTTP: API keys cross the network in clear; \
                 put a TLS proxy in front"
            );
        }
        let listener = tokio::net::TcpListener::bind(listen).await?;
        if let Some(key) = bootstrap {
            // the one time the key is shown: stdout, not the log
            println!("bootstrap admin key (shown once, store it now): {key}");
        }
        println!("listening on http://{}", listener.local_addr()?);
        let shutdown = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot wait for ctrl-c");
                std::future::pending::<()>().await;
            }
            tracing::info!("ctrl-c: shutting down (machines keep running)");
        };
        fleet.serve(listener, shutdown).await?;
        Ok(())
    })
}

fn keys(cmd: KeysCmd, home: PathBuf) -> AnyResult {
    let db = Db::open(&home.join("fleet.db"))?;
    match cmd {
        KeysCmd::Create {
            tenant,
            name,
            description,
            scopes,
        } => {
            let scopes = smol_fleet::scopes::normalize(&scopes)?;
            let (tenant, id, key) = db.call_sync(|c| {
                let tenant = match tenant {
                    Some(t) if admin::tenant_exists(c, &t)? => t,
                    Some(t) => {
                        return Err(smol_fleet::FleetError::Io {
                            context: format!("tenant {t}"),
                            source: std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "no such tenant",
                            ),
                        })
                    }
                    None => admin::create_tenant(c, &name)?,
                };
                let (id, key) = admin::create_key(c, &tenant, &scopes, description.as_deref())?;
                Ok((tenant, id, key))
            })?;
            println!("tenant: {tenant}\nkey id: {id}\nscopes: {scopes}\nkey: {key}");
        }
        KeysCmd::List => {
            for k in db.call_sync(admin::list_keys)? {
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
            if db.call_sync(|c| admin::revoke_key(c, &id))? {
                println!("revoked {id}");
            } else {
                return Err(format!("no live key {id}").into());
            }
        }
    }
    Ok(())
}

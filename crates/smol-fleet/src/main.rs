//! `smolfleet`: the fleet server (`serve`) and its admin commands (`keys`).

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
        /// node). `control`, `edge` and `node` alone are not built yet (docs/FLEET.md).
        #[arg(long, value_name = "ROLES", default_value = "all")]
        role: String,
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
        } => {
            let edge = Edge {
                tls: tls_cert.zip(tls_key),
                insecure_no_tls,
                sweep_interval,
                db: db.or_else(|| std::env::var("SMOLFLEET_DB").ok()),
                role,
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
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
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
}

/// `--role`: `all` is the one built; the roles of a multi-host fleet are refused by name.
fn check_role(role: &str) -> Result<(), String> {
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
    Err(format!(
        "--role {role}: separate control, edge and node processes are not built yet; serve \
         --role all (the API, the store and this host's engine) works over --db postgres://…, \
         one server per store"
    ))
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
    check_role(&edge.role)?;
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
        for bad in ["", "s", "10ms", "0", "1h", "-1s", "1.5s"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

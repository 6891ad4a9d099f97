//! A PostgreSQL cluster of a test's own: [`PgCluster::start`] runs Debian's `initdb` and
//! `pg_ctl` (`/usr/lib/postgresql/<version>/bin`, package `postgresql`; `SMOL_PG_BIN` names
//! another directory) in a temporary directory, as the `postgres` user when the test runs as
//! root, listening on 127.0.0.1 on a port of its own and on a unix socket in that directory.
//!
//! The cluster is stopped and its directory removed when the [`PgCluster`] drops (also on a
//! panic), and by a watchdog process if the test process dies without dropping it (a
//! `kill -9`, a static never dropped: [`shared`]). Later multi-host tests reuse it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use crate::FleetError;

/// A running cluster; dropping it stops it (`pg_ctl stop -m immediate`) and removes its files.
#[derive(Debug)]
pub struct PgCluster {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    port: u16,
    /// `(uid, gid)` of `postgres` when running as root.
    user: Option<(u32, u32)>,
    watchdog: Option<Child>,
}

fn io(context: impl Into<String>, source: std::io::Error) -> FleetError {
    FleetError::Io {
        context: context.into(),
        source,
    }
}

fn failed(context: impl Into<String>, message: String) -> FleetError {
    io(context, std::io::Error::other(message))
}

/// The directory of `initdb` and `pg_ctl`: `SMOL_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has them.
pub fn bin_dir() -> Result<PathBuf, FleetError> {
    if let Some(d) = std::env::var_os("SMOL_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or_else(|| {
        failed(
            "find PostgreSQL's initdb and pg_ctl",
            "no /usr/lib/postgresql/<version>/bin/pg_ctl: apt-get install postgresql \
             (or set SMOL_PG_BIN)"
                .into(),
        )
    })
}

/// `(uid, gid)` of the `postgres` user, when this process is root (initdb refuses root).
fn postgres_user() -> Result<Option<(u32, u32)>, FleetError> {
    // SAFETY: geteuid(2) reads this process's credentials and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, FleetError> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| io("run id postgres", e))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                failed(
                    "find the postgres user",
                    "no postgres user: apt-get install postgresql (postgresql-common makes it)"
                        .into(),
                )
            })
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

/// A port free on 127.0.0.1 now.
fn free_port() -> Result<u16, FleetError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| io("find a free port", e))?;
    Ok(l.local_addr()
        .map_err(|e| io("find a free port", e))?
        .port())
}

impl PgCluster {
    /// Makes and starts a cluster (superuser `postgres`, trust authentication: it listens on
    /// loopback and the test's own socket directory only).
    pub fn start() -> Result<PgCluster, FleetError> {
        let bin = bin_dir()?;
        let user = postgres_user()?;
        let dir = tempfile::Builder::new()
            .prefix("smol-pg-")
            .tempdir()
            .map_err(|e| io("make the cluster's directory", e))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| io("give the cluster's directory to postgres", e))?;
        }
        let mut cluster = PgCluster {
            dir: Some(dir),
            bin,
            port: free_port()?,
            user,
            watchdog: None,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.start_again()?;
        Ok(cluster)
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The port it listens on (127.0.0.1 and the socket's name).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir()
    }

    /// The URL of database `db` over TCP (127.0.0.1).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of database `db` over the unix socket.
    pub fn socket_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/{db}?host={}",
            self.port,
            self.dir().display()
        )
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.current_dir(self.dir());
        c
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), FleetError> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io(format!("run {program}"), e))?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir().join("log")).unwrap_or_default();
        Err(failed(
            format!("{program} {}", self.data().display()),
            format!(
                "{}: {}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
            ),
        ))
    }

    /// Starts the server (again, after [`PgCluster::stop`]), waiting until it accepts
    /// connections.
    pub fn start_again(&self) -> Result<(), FleetError> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir().display()
        );
        let data = self.data();
        let log = self.dir().join("log");
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-o".as_ref(),
                opts.as_ref(),
                "start".as_ref(),
            ],
        )
    }

    /// Stops the server (`-m fast`: sessions are ended), keeping its files.
    pub fn stop(&self) -> Result<(), FleetError> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-w".as_ref(),
                "-m".as_ref(),
                "fast".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    /// Creates database `name` unless it exists; its URL (TCP).
    pub async fn database(&self, name: &str) -> Result<String, FleetError> {
        let what = "create a test database";
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|e| crate::store::pg::error(what, e))?;
        let task = tokio::spawn(conn);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .map_err(|e| crate::store::pg::error(what, e))?
            .is_some();
        if !exists {
            // a name of ours: [a-z0-9_]
            client
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
                .map_err(|e| crate::store::pg::error(what, e))?;
        }
        drop(client);
        let _ = task.await;
        Ok(self.url(name))
    }

    /// A process that stops the cluster and removes its directory once this process is gone
    /// (checked every second), in a process group of its own (a ctrl-c does not end it).
    fn spawn_watchdog(&self) -> Result<Child, FleetError> {
        use std::os::unix::process::CommandExt;
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             '{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir().display(),
        );
        let mut c = Command::new("sh");
        c.args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c.spawn().map_err(|e| io("start the cluster's watchdog", e))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args([
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "stop".as_ref(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        // the directory goes with the TempDir
        drop(self.dir.take());
    }
}

/// One cluster for the whole test process (started on first use; its watchdog stops it when
/// the process ends).
pub fn shared() -> Result<&'static PgCluster, FleetError> {
    static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| PgCluster::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| failed("start the shared PostgreSQL cluster", e.clone()))
}

/// The database of the shared cluster for fleet home `home` (the same home, the same
/// database: a restarted server finds its records), made on first use.
pub async fn database_for_home(home: &Path) -> Result<String, FleetError> {
    shared()?.database(&database_name(home)).await
}

/// The URL [`database_for_home`] returned for `home` (made by then), without making it.
pub fn url_for_home(home: &Path) -> Result<String, FleetError> {
    Ok(shared()?.url(&database_name(home)))
}

fn database_name(home: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("fleet_{name}")
}

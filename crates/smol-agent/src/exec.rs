//! `Op::Exec`: run a command, stream its output, enforce its timeout.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use smol_protocol::mux::{Stream, StreamSender};
use smol_protocol::{
    Chan, ErrorKind, ExecRequest, Frame, RemoteError, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// `PATH` given to every command unless the request sets its own.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Read size for command output.
const PIPE_CHUNK: usize = 64 * 1024;

/// After the command exits, output still arriving is collected until the pipes stay quiet this
/// long (a background process may hold them open forever).
const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// Kills a command's process group and cgroup when dropped, unless disarmed: a handler aborted
/// because the host went away leaves nothing running.
struct GroupGuard {
    pgid: i32,
    /// The command's cgroup (crate::cgroup): its kill also reaches what left the process group.
    cgroup: Option<crate::cgroup::Group>,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self) {
        if let Some(g) = &self.cgroup {
            g.kill();
        }
        // SAFETY: kill with a negative pid signals the process group we created; no memory involved.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Finds `program` in `path` (a `PATH` value) like execvp would. Resolving here, rather than
/// letting the child do it, lets std use posix_spawn (vfork) instead of forking the agent, which
/// under TCG is most of the cost of a short command.
fn resolve(program: &str, path: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(program.into());
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn check_workdir(workdir: &str) -> Result<(), RemoteError> {
    if !workdir.starts_with('/') {
        return Err(crate::serve::invalid(format!(
            "workdir must be an absolute path, got {workdir:?}"
        )));
    }
    match std::fs::metadata(workdir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(RemoteError::new(
            ErrorKind::NotADirectory,
            format!("workdir {workdir}: not a directory"),
        )),
        Err(e) => Err(RemoteError::from_io(&e, &format!("workdir {workdir}"))),
    }
}

/// A command that cannot run ends as it would in a shell: a line on stderr and 126 / 127.
async fn cannot_run(
    tx: &StreamSender,
    argv0: &str,
    code: i32,
    why: &str,
) -> Result<Frame, RemoteError> {
    let msg = format!("smol: {argv0}: {why}\n");
    tx.send_data(Chan::Stderr, msg.as_bytes())
        .await
        .map_err(|e| RemoteError::new(ErrorKind::Io, e.to_string()))?;
    Ok(Frame::Exit {
        id: tx.id(),
        code,
        timed_out: false,
    })
}

/// A command ready to spawn (program, argv, environment, workdir, container), or the exit code
/// and reason of one that cannot run.
type Prepared = Result<tokio::process::Command, (i32, &'static str)>;

/// Builds the command of `req`, in the container over `rootfs` when given, its first process
/// joining `cgroup` before anything else it does.
fn prepare(
    req: &ExecRequest,
    rootfs: Option<&str>,
    cgroup: Option<&crate::cgroup::Group>,
) -> Result<Prepared, RemoteError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(crate::serve::invalid("empty command"));
    }
    let workdir = req.workdir.clone().unwrap_or_else(|| "/".to_string());
    let path = search_path(req);
    let mut cmd = match rootfs {
        None => {
            check_workdir(&workdir)?;
            let Some(program) = resolve(&req.argv[0], path) else {
                return Ok(Err((EXIT_NOT_FOUND, "command not found")));
            };
            let mut cmd = tokio::process::Command::new(program);
            cmd.current_dir(&workdir);
            join(&mut cmd, cgroup)?;
            cmd
        }
        Some(rootfs) => {
            if !workdir.starts_with('/') {
                return Err(crate::serve::invalid(format!(
                    "workdir must be an absolute path, got {workdir:?}"
                )));
            }
            check_workdir(&crate::container::inside(rootfs, &workdir)).map_err(|mut e| {
                e.message = format!("in the image: {}", e.message);
                e
            })?;
            let setup = crate::container::Setup::new(rootfs, &workdir)
                .map_err(|e| crate::container::setup_error(&e))?;
            // No resolving here: the child looks argv[0] up in the container's PATH after it
            // entered the container (std runs execvp with the command's environment).
            let mut cmd = tokio::process::Command::new(&req.argv[0]);
            // Before `apply`: its fork puts the command in a child that must be in the cgroup.
            join(&mut cmd, cgroup)?;
            // SAFETY: `apply` makes only system calls on memory prepared before the fork.
            unsafe {
                cmd.pre_exec(move || setup.apply());
            }
            cmd
        }
    };
    let (home, name, ids) = identity(req, rootfs.is_some())?;
    if let Some((uid, gid)) = ids {
        // std sets the groups to just this gid, then gid, then uid, in the child.
        cmd.uid(uid).gid(gid);
    }
    cmd.arg0(&req.argv[0])
        .args(&req.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", home)
        .env("USER", &name)
        .env("LOGNAME", &name)
        .envs(req.env.iter().map(|(k, v)| (k, v)));
    Ok(Ok(cmd))
}

/// The `PATH` a command's program is looked up in: the request's, else [`DEFAULT_PATH`].
fn search_path(req: &ExecRequest) -> &str {
    req.env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH)
}

/// HOME, the user name and the (uid, gid) to switch to (none: stay root).
type Identity = (String, String, Option<(u32, u32)>);

/// The [`Identity`] of the request's user (root when none).
fn identity(req: &ExecRequest, container: bool) -> Result<Identity, RemoteError> {
    match &req.user {
        None => Ok(("/root".to_string(), "root".to_string(), None)),
        Some(spec) => {
            if container {
                return Err(crate::serve::invalid("a container run takes no user"));
            }
            let id = crate::user::resolve(spec, std::path::Path::new("/"))?;
            let name = id.name.unwrap_or_else(|| id.uid.to_string());
            Ok((id.home, name, Some((id.uid, id.gid))))
        }
    }
}

/// The command of `req` (no container) for [`crate::spawn`]: the same program lookup,
/// environment and checks as [`prepare`].
fn prepare_native(
    req: &ExecRequest,
    session: crate::spawn::Session,
) -> Result<Result<crate::spawn::Spec, (i32, &'static str)>, RemoteError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(crate::serve::invalid("empty command"));
    }
    let workdir = req.workdir.as_deref().unwrap_or("/");
    check_workdir(workdir)?;
    let Some(program) = resolve(&req.argv[0], search_path(req)) else {
        return Ok(Err((EXIT_NOT_FOUND, "command not found")));
    };
    let (home, name, ids) = identity(req, false)?;
    let env = [
        ("PATH", DEFAULT_PATH),
        ("HOME", home.as_str()),
        ("USER", name.as_str()),
        ("LOGNAME", name.as_str()),
    ]
    .into_iter()
    .chain(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut spec = crate::spawn::Spec::new(program.as_os_str(), &req.argv, env, workdir)
        .map_err(|e| crate::serve::invalid(format!("{}: {e}", req.argv[0])))?;
    spec.ids = ids;
    spec.session = session;
    Ok(Ok(spec))
}

/// A running command: spawned by [`crate::spawn`] (born in its cgroup) or, where clone3 is
/// refused or for a container, by std.
enum Proc {
    Native(crate::spawn::Child),
    Std(tokio::process::Child),
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

impl Proc {
    fn id(&self) -> Option<u32> {
        match self {
            Proc::Native(c) => Some(c.id()),
            Proc::Std(c) => c.id(),
        }
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Proc::Native(c) => c.wait().await,
            Proc::Std(c) => c.wait().await,
        }
    }

    /// stdin, stdout, stderr.
    fn take_pipes(&mut self) -> (Option<Writer>, Option<Reader>, Option<Reader>) {
        match self {
            Proc::Native(c) => (
                c.stdin.take().map(|p| Box::new(p) as Writer),
                c.stdout.take().map(|p| Box::new(p) as Reader),
                c.stderr.take().map(|p| Box::new(p) as Reader),
            ),
            Proc::Std(c) => (
                c.stdin.take().map(|p| Box::new(p) as Writer),
                c.stdout.take().map(|p| Box::new(p) as Reader),
                c.stderr.take().map(|p| Box::new(p) as Reader),
            ),
        }
    }
}

/// Makes the child join `cgroup` between fork and exec. The hook makes std fork rather than
/// posix_spawn (vfork), which doubled a short command's round trip under TCG: only the fallback
/// where clone3 is refused, and containers (whose setup forks anyway); crate::spawn starts the
/// others straight in their cgroup.
fn join(
    cmd: &mut tokio::process::Command,
    cgroup: Option<&crate::cgroup::Group>,
) -> Result<(), RemoteError> {
    if let Some(g) = cgroup {
        let join = g
            .join()
            .map_err(|e| RemoteError::from_io(&e, "the command's cgroup"))?;
        // SAFETY: `join` is one write(2) on a descriptor opened before the fork.
        unsafe {
            cmd.pre_exec(join);
        }
    }
    Ok(())
}

/// Runs the command of `req`, streaming its output on `stream`; returns the terminal frame.
///
/// With `rootfs` (`Op::ExecIn`) the command runs in a container over that mounted image
/// ([`crate::container::Setup`]): its workdir and `argv[0]` are looked up inside it.
pub async fn run(
    stream: Stream,
    req: ExecRequest,
    rootfs: Option<String>,
) -> Result<Frame, RemoteError> {
    let Stream { tx, mut rx } = stream;
    let id = tx.id();
    let cgroup = crate::cgroup::Group::new();
    let mut native = None;
    if rootfs.is_none() && crate::spawn::available() {
        use crate::spawn::Io;
        let spec = match prepare_native(&req, crate::spawn::Session::Group)? {
            Ok(spec) => spec,
            Err((code, why)) => return cannot_run(&tx, &req.argv[0], code, why).await,
        };
        let stdin = if req.stdin { Io::Piped } else { Io::Null };
        let into = cgroup.as_ref().map(|g| g.dir_fd());
        match crate::spawn::spawn(&spec, stdin, Io::Piped, Io::Piped, into) {
            Ok(c) => native = c.map(Proc::Native),
            Err(e) => {
                let (code, why) = spawn_failure(&e);
                return cannot_run(&tx, &req.argv[0], code, &why).await;
            }
        }
    }
    let mut child = match native {
        Some(c) => c,
        None => {
            let mut cmd = match prepare(&req, rootfs.as_deref(), cgroup.as_ref())? {
                Ok(cmd) => cmd,
                Err((code, why)) => return cannot_run(&tx, &req.argv[0], code, why).await,
            };
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
            match cmd.spawn() {
                Ok(c) => Proc::Std(c),
                Err(e) => {
                    let (code, why) = spawn_failure(&e);
                    return cannot_run(&tx, &req.argv[0], code, &why).await;
                }
            }
        }
    };
    let (stdin, stdout, stderr) = child.take_pipes();
    let mut guard = GroupGuard {
        pgid: child.id().map(|p| p as i32).unwrap_or(0),
        cgroup,
        armed: true,
    };
    let (exited_tx, exited_rx) = watch::channel(false);
    let out = tokio::spawn(pump(stdout, tx.clone(), Chan::Stdout, exited_rx.clone()));
    let err = tokio::spawn(pump(stderr, tx.clone(), Chan::Stderr, exited_rx));
    let mut stdin_tx = stdin.map(|mut stdin| {
        let (stx, mut srx) = mpsc::unbounded_channel::<bytes::Bytes>();
        tokio::spawn(async move {
            while let Some(buf) = srx.recv().await {
                if stdin.write_all(&buf).await.is_err() {
                    break; // the command closed its stdin; drop the rest
                }
            }
        });
        stx
    });
    let deadline = req
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                if deadline.is_some() && !timed_out => {
                guard.kill();
                timed_out = true;
            }
            f = rx.recv() => match f {
                Ok(Frame::Data { chan: Chan::Stdin, data, .. }) => {
                    // A failed send: the writer ended because the command closed its stdin;
                    // the rest is dropped, as the writer does.
                    if stdin_tx.as_ref().is_some_and(|s| s.send(data).is_err()) {
                        stdin_tx = None;
                    }
                }
                Ok(Frame::Eof { chan: Chan::Stdin, .. }) => stdin_tx = None,
                Ok(Frame::Cancel { .. }) => guard.kill(),
                Ok(_) => {}
                Err(e) => return Err(RemoteError::new(ErrorKind::Io, e.to_string())),
            }
        }
    };
    // send_replace: the pumps may be gone already (their pipe ended), which is no error.
    exited_tx.send_replace(true);
    for (pump, chan) in [(out, "stdout"), (err, "stderr")] {
        if let Err(e) = pump.await {
            // Only a panic (the agent's release build aborts instead) or a cancelled task.
            crate::quiet::warn(
                format_args!("exec {}: the {chan} pump failed", req.argv[0]),
                e,
            );
        }
    }
    // The command ended normally: whatever it left in the background may keep running.
    guard.armed = timed_out;
    let status = status.map_err(|e| RemoteError::from_io(&e, "wait"))?;
    let code = if timed_out {
        EXIT_TIMEOUT
    } else {
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
    };
    Ok(Frame::Exit {
        id,
        code,
        timed_out,
    })
}

/// Exit code and reason of a command whose spawn failed.
fn spawn_failure(e: &std::io::Error) -> (i32, String) {
    match e.kind() {
        std::io::ErrorKind::NotFound => (EXIT_NOT_FOUND, "command not found".to_string()),
        std::io::ErrorKind::PermissionDenied => {
            (EXIT_CANNOT_EXECUTE, "permission denied".to_string())
        }
        _ => (EXIT_CANNOT_EXECUTE, e.to_string()),
    }
}

/// `Op::Spawn`: starts the command of `req` in the background (a session of its own, stdin
/// from /dev/null, output appended to `log` or discarded) and answers at once with `pid=<n>` on
/// stdout and exit 0. The command outlives the request and the host's session.
pub async fn spawn(
    stream: Stream,
    req: ExecRequest,
    log: Option<String>,
) -> Result<Frame, RemoteError> {
    let tx = stream.tx;
    // Its own cgroup (its pids limit; kill_all reaches it), left behind once it started: the
    // next command's Group::new removes it when it has emptied.
    let cgroup = crate::cgroup::Group::new();
    let log_file = match &log {
        Some(path) => {
            let io_err = |e: std::io::Error| RemoteError::from_io(&e, path);
            if let Some(dir) = std::path::Path::new(path).parent() {
                std::fs::create_dir_all(dir).map_err(io_err)?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err)?;
            Some(f)
        }
        None => None,
    };
    if crate::spawn::available() {
        use crate::spawn::Io;
        let spec = match prepare_native(&req, crate::spawn::Session::Session)? {
            Ok(spec) => spec,
            Err((code, why)) => return cannot_run(&tx, &req.argv[0], code, why).await,
        };
        let (out, err) = match &log_file {
            Some(f) => {
                let io_err = |e: std::io::Error| RemoteError::from_io(&e, "the log");
                (
                    Io::Fd(f.try_clone().map_err(io_err)?.into()),
                    Io::Fd(f.try_clone().map_err(io_err)?.into()),
                )
            }
            None => (Io::Null, Io::Null),
        };
        let into = cgroup.as_ref().map(|g| g.dir_fd());
        match crate::spawn::spawn(&spec, Io::Null, out, err, into) {
            Ok(Some(child)) => {
                let pid = child.id();
                drop(cgroup);
                child.detach();
                return started(&tx, pid).await;
            }
            Ok(None) => {} // clone3 refused: std's spawn below
            Err(e) => {
                let (code, why) = spawn_failure(&e);
                return cannot_run(&tx, &req.argv[0], code, &why).await;
            }
        }
    }
    let mut cmd = match prepare(&req, None, cgroup.as_ref())? {
        Ok(cmd) => cmd,
        Err((code, why)) => return cannot_run(&tx, &req.argv[0], code, why).await,
    };
    let (out, err) = match log_file {
        Some(f) => {
            let io_err = |e: std::io::Error| RemoteError::from_io(&e, "the log");
            (Stdio::from(f.try_clone().map_err(io_err)?), Stdio::from(f))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid takes no arguments and is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let (code, why) = spawn_failure(&e);
            return cannot_run(&tx, &req.argv[0], code, &why).await;
        }
    };
    let pid = child.id().unwrap_or(0);
    // The descriptor closes; the cgroup stays while the command runs (rmdir fails when busy).
    drop(cgroup);
    // Not waited for here: tokio reaps the dropped child once it exits.
    drop(child);
    started(&tx, pid).await
}

/// The answer to a spawn: `pid=<n>` on stdout, exit 0.
async fn started(tx: &StreamSender, pid: u32) -> Result<Frame, RemoteError> {
    tx.send_data(Chan::Stdout, format!("pid={pid}\n").as_bytes())
        .await
        .map_err(|e| RemoteError::new(ErrorKind::Io, e.to_string()))?;
    Ok(Frame::Exit {
        id: tx.id(),
        code: 0,
        timed_out: false,
    })
}

/// Copies a pipe to the stream until EOF, or until it stays quiet for [`DRAIN_QUIET`] after the
/// command exited.
async fn pump(
    pipe: Option<Reader>,
    tx: StreamSender,
    chan: Chan,
    mut exited: watch::Receiver<bool>,
) {
    let Some(mut pipe) = pipe else { return };
    loop {
        // A pipe hands out at most 64 KiB per read; read_buf fills spare capacity without zeroing.
        let mut buf = Vec::with_capacity(PIPE_CHUNK);
        let n = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_QUIET, pipe.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = pipe.read_buf(&mut buf) => r,
                _ = exited.changed() => continue,
            }
        };
        match n {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if tx.send_owned(chan, buf).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn program_lookup_follows_path() {
        assert_eq!(
            resolve("sh", "/nonexistent:/bin").unwrap(),
            std::path::Path::new("/bin/sh")
        );
        assert_eq!(resolve("./x", "/bin").unwrap(), std::path::Path::new("./x"));
        assert!(resolve("no-such-program-here", "/bin:/usr/bin").is_none());
        // a directory of that name is not a program
        assert!(resolve("bin", "/").is_none());
    }
}

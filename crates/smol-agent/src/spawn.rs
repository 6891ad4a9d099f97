//! Starting a user command the cheap way: one `clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD |
//! CLONE_INTO_CGROUP)`, the child born in the command's cgroup (crate::cgroup) and sharing the
//! agent's memory until its `execve`, like `posix_spawn`'s vfork. Moving a forked child into its
//! cgroup between fork and exec (a `pre_exec` hook) made std fork the whole agent instead, and
//! doubled a short command's round trip under TCG.
//!
//! Everything the child needs (program, argv, envp, workdir, descriptors, ids) is prepared before
//! the clone; the child makes system calls only (no allocation, no lock, no panic) on that memory.
//! Where clone3 is refused (`ENOSYS`, `EINVAL`: an older kernel, a seccomp filter, another
//! architecture), [`available`] turns false, once, with a console line, and exec.rs falls back
//! to std's spawn with a cgroup join before exec.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::unix::pipe;

static REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether clone3 spawning is usable (it was not refused by the kernel yet).
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && !REFUSED.load(Ordering::Relaxed)
}

/// Whether clone3 failing with `e` is it being refused rather than the spawn failing.
fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL))
}

/// How the child detaches from the agent's terminal signals.
#[derive(Clone, Copy)]
pub enum Session {
    /// A process group of its own (`setpgid(0, 0)`): exec, killed as a group.
    Group,
    /// A session of its own (`setsid`): spawn, outliving the request.
    Session,
}

/// Where one of the child's standard descriptors comes from.
pub enum Io {
    /// A pipe to the agent.
    Piped,
    /// `/dev/null`.
    Null,
    /// This descriptor (a log file).
    Fd(OwnedFd),
}

/// A command ready to clone: all its memory is made here, before the clone.
pub struct Spec {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    workdir: CString,
    /// (uid, gid) to switch to, with the supplementary groups set to just gid.
    pub ids: Option<(u32, u32)>,
    pub session: Session,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

impl Spec {
    /// `program` is the resolved path; `env` is the whole environment, in order (a later key
    /// wins over an earlier one, as with std's `Command::env`).
    pub fn new<'a>(
        program: &OsStr,
        argv: &[String],
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        workdir: &str,
    ) -> io::Result<Spec> {
        let mut kv: Vec<(&str, &str)> = Vec::new();
        for (k, v) in env {
            match kv.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = v,
                None => kv.push((k, v)),
            }
        }
        let mut envp = Vec::with_capacity(kv.len());
        for (k, v) in kv {
            let mut s = Vec::with_capacity(k.len() + v.len() + 1);
            s.extend_from_slice(k.as_bytes());
            s.push(b'=');
            s.extend_from_slice(v.as_bytes());
            envp.push(cstr(&s)?);
        }
        Ok(Spec {
            program: cstr(program.as_bytes())?,
            argv: argv
                .iter()
                .map(|a| cstr(a.as_bytes()))
                .collect::<io::Result<_>>()?,
            envp,
            workdir: cstr(workdir.as_bytes())?,
            ids: None,
            session: Session::Group,
        })
    }
}

/// A command started by [`spawn`]; dropped before it was waited for, it is SIGKILLed and reaped.
pub struct Child {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let mut status = 0;
        // SAFETY: waitpid on our own, not yet reaped child, with a pointer to a local int.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        match r {
            0 => Ok(None),
            r if r < 0 => Err(io::Error::last_os_error()),
            _ => {
                self.reaped = true;
                Ok(Some(ExitStatus::from_raw(status)))
            }
        }
    }

    /// Waits for the command to exit (its pidfd turns readable) and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    /// Leaves the command running; a task reaps it once it exits.
    pub fn detach(mut self) {
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        tokio::spawn(async move {
            if let Err(e) = self.wait().await {
                eprintln!("smol-agent: waiting for a spawned command: {e}");
            }
        });
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: the pid is our unreaped child (it cannot have been reused).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let pid = self.pid;
        // SIGKILLed, it exits promptly; reaped off the runtime's threads.
        std::thread::spawn(move || {
            let mut status = 0;
            // SAFETY: waitpid on our own child, with a pointer to a local int.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        });
    }
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor we own.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn dev_null(write: bool) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")?;
    Ok(f.into())
}

/// What the child reads, by pointer, from the (suspended) parent's stack.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    workdir: *const libc::c_char,
    /// The descriptors that become 0, 1, 2.
    fds: [RawFd; 3],
    ids: Option<(u32, u32)>,
    session: Session,
    /// The signals the child sets back to their default ([`handled`]).
    reset: &'static [libc::c_int],
    /// The errno of the step that failed, written by the child before it exits.
    err: i32,
}

/// The signals the agent handles (looked up once, at the first spawn: std's SIGSEGV and SIGBUS,
/// tokio's SIGCHLD; the agent installs no other handler later), with SIGCHLD and SIGPIPE always.
/// execve resets handled signals itself; the child resets them first for the moment between
/// unblocking signals and its execve, when a handler of the agent would run in its memory. Once
/// instead of the 64 look-ups per command that cost a system call each under TCG.
fn handled() -> &'static [libc::c_int] {
    static HANDLED: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    HANDLED.get_or_init(|| {
        let mut v = vec![libc::SIGCHLD, libc::SIGPIPE];
        for sig in 1..=libc::SIGRTMAX() {
            // SAFETY: sigaction only reads the disposition into a zeroed local (libc's own
            // signals answer EINVAL and are skipped).
            let has = unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN
            };
            if has && !v.contains(&sig) {
                v.push(sig);
            }
        }
        v
    })
}

/// The child, between clone3 and execve. It shares the parent's memory (the parent is suspended
/// until the execve or the exit): system calls only, on memory prepared before the clone; errno
/// is the parent thread's (the child may overwrite it; the parent reads none after the clone).
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg points at the ChildArgs on the parent's stack, alive while the parent waits.
    let a = unsafe { &mut *(arg as *mut ChildArgs) };
    // SAFETY: each call is a plain system call on prepared values and pointers into prepared,
    // NUL-terminated memory.
    unsafe {
        let fail = |a: &mut ChildArgs| -> libc::c_int {
            a.err = *libc::__errno_location();
            libc::_exit(127)
        };
        let r = match a.session {
            Session::Group => libc::setpgid(0, 0),
            Session::Session => libc::setsid(),
        };
        if r < 0 {
            return fail(a);
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            let target = target as RawFd;
            let r = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if r < 0 {
                return fail(a);
            }
        }
        if libc::chdir(a.workdir) < 0 {
            return fail(a);
        }
        if let Some((uid, gid)) = a.ids {
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return fail(a);
            }
        }
        // The agent's signal handlers are not the command's: those that have one go back to the
        // default before signals are unblocked, and SIGPIPE too (Rust ignores it, and an ignored
        // signal stays ignored across execve), then the empty mask, as std's spawn does.
        for &sig in a.reset.iter() {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        fail(a)
    }
}

/// The kernel's `struct clone_args` (version 2, with `cgroup`).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// The child's stack: it runs child_main and a few libc wrappers.
const STACK: usize = 64 * 1024;

/// clone3 with `f(arg)` run on `stack` in the child, which exits with its result; returns the
/// child's pid in the parent, or `-errno`.
///
/// # Safety
/// `args` must carry CLONE_VM | CLONE_VFORK and `stack` (16-aligned top) must stay alive and
/// unused until clone3 returns; `f` must be async-signal-safe and never return into Rust code
/// of the parent.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3(
    args: &CloneArgs,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: (the caller's contract) in the child, rsp is the top of the fresh stack; it calls
    // f(arg) and exits with its result without returning here. The parent sees a plain syscall
    // (rax, rcx, r11 clobbered).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, 60",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3(
    _args: &CloneArgs,
    _f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    _arg: *mut libc::c_void,
) -> i64 {
    -(libc::ENOSYS as i64)
}

/// Starts `spec` with stdin/stdout/stderr as given, born in the cgroup `cgroup` (a directory
/// descriptor) when given. `Ok(None)`: clone3 was refused (the caller falls back; [`available`]
/// turns off); an error is the spawn's own (no such program, a full pids limit, ...).
pub fn spawn(
    spec: &Spec,
    stdin: Io,
    stdout: Io,
    stderr: Io,
    cgroup: Option<RawFd>,
) -> io::Result<Option<Child>> {
    // The ends the child gets (closed here once it exec'd) and the ends kept.
    let mut theirs: Vec<OwnedFd> = Vec::with_capacity(3);
    let mut ours: [Option<OwnedFd>; 3] = [None, None, None];
    for (i, io) in [stdin, stdout, stderr].into_iter().enumerate() {
        let fd = match io {
            Io::Null => dev_null(i != 0)?,
            Io::Fd(fd) => fd,
            Io::Piped => {
                let (r, w) = pipe_pair()?;
                let (mine, child) = if i == 0 { (w, r) } else { (r, w) };
                nonblocking(&mine)?;
                ours[i] = Some(mine);
                child
            }
        };
        theirs.push(fd);
    }
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut child_args = ChildArgs {
        program: spec.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        workdir: spec.workdir.as_ptr(),
        fds: [
            theirs[0].as_raw_fd(),
            theirs[1].as_raw_fd(),
            theirs[2].as_raw_fd(),
        ],
        ids: spec.ids,
        session: spec.session,
        reset: handled(),
        err: 0,
    };
    // Never read or written from Rust: left uninitialised (no 64 KiB memset per command).
    let mut stack: Vec<u8> = Vec::with_capacity(STACK);
    let base = stack.as_mut_ptr() as u64;
    let top = (base + STACK as u64) & !15;
    let mut pidfd: RawFd = -1;
    let mut flags = libc::CLONE_VM as u64 | libc::CLONE_VFORK as u64 | CLONE_PIDFD;
    if cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    let args = CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut RawFd as u64,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: base,
        stack_size: top - base,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup.map_or(0, |fd| fd as u64),
    };
    // Signals stay blocked across the clone: no handler of the agent runs in the child while it
    // shares the agent's memory (the child resets them before unblocking).
    // SAFETY: sigset_t is plain data, valid all zero.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointers are to the two locals.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: CLONE_VM | CLONE_VFORK with a fresh 16-aligned stack kept alive (and untouched)
    // until clone3 returns, which is after the child exec'd or exited; child_main makes system
    // calls only on child_args, argv, envp and spec, all alive on this frame.
    let ret = unsafe {
        clone3(
            &args,
            child_main,
            &mut child_args as *mut ChildArgs as *mut libc::c_void,
        )
    };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    drop(theirs);
    if ret < 0 {
        let e = io::Error::from_raw_os_error(-ret as i32);
        if !refused(&e) {
            return Err(e);
        }
        if !REFUSED.swap(true, Ordering::Relaxed) {
            eprintln!("smol-agent: clone3 into a cgroup refused ({e}); commands are forked");
        }
        return Ok(None);
    }
    let pid = ret as libc::pid_t;
    // SAFETY: clone3 with CLONE_PIDFD succeeded: pidfd is a new descriptor of ours.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // Read after the child exec'd or exited (CLONE_VFORK), through a volatile load: the child
    // wrote it behind the compiler's back.
    // SAFETY: a plain read of a live local.
    let err = unsafe { std::ptr::read_volatile(&child_args.err) };
    if err != 0 {
        let mut status = 0;
        // SAFETY: our child, already exiting; a pointer to a local int.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(err));
    }
    // SAFETY: an OwnedFd keeps the same open descriptor until it is dropped with the AsyncFd.
    let pidfd = match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            let mut status = 0;
            // SAFETY: our child, unreaped; a pointer to a local int.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(e.into());
        }
    };
    let [i, o, e] = ours;
    Ok(Some(Child {
        pid,
        pidfd,
        reaped: false,
        stdin: i.map(pipe::Sender::from_owned_fd_unchecked).transpose()?,
        stdout: o.map(pipe::Receiver::from_owned_fd_unchecked).transpose()?,
        stderr: e.map(pipe::Receiver::from_owned_fd_unchecked).transpose()?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn spec(argv: &[&str], env: &[(&str, &str)]) -> Spec {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        Spec::new(OsStr::new(&argv[0]), &argv, env.iter().copied(), "/").unwrap()
    }

    #[tokio::test]
    async fn a_command_runs_with_its_environment_and_pipes() {
        let s = spec(
            &[
                "/bin/sh",
                "-c",
                "read x; echo \"$x $A $PWD\"; echo err >&2; exit 3",
            ],
            &[("A", "first"), ("PATH", "/bin"), ("A", "second")],
        );
        let mut c = spawn(&s, Io::Piped, Io::Piped, Io::Piped, None)
            .unwrap()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(b"hello\n").await.unwrap();
        drop(stdin);
        let mut out = String::new();
        c.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        let mut err = String::new();
        c.stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        let st = c.wait().await.unwrap();
        assert_eq!(out, "hello second /\n");
        assert_eq!(err, "err\n");
        assert_eq!(st.code(), Some(3));
    }

    #[tokio::test]
    async fn a_missing_program_or_workdir_is_the_childs_errno() {
        let s = spec(&["/no/such/program"], &[]);
        let e = spawn(&s, Io::Null, Io::Null, Io::Null, None).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let mut s = spec(&["/bin/true"], &[]);
        s.workdir = CString::new("/no/such/dir").unwrap();
        let e = spawn(&s, Io::Null, Io::Null, Io::Null, None).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[tokio::test]
    async fn the_command_gets_its_own_process_group_and_default_signals() {
        let s = spec(
            &[
                "/bin/sh",
                "-c",
                "read -r _ _ _ _ g _ < /proc/$$/stat; echo $g; grep -E 'SigBlk|SigIgn' /proc/self/status",
            ],
            &[("PATH", "/bin:/usr/bin")],
        );
        let mut c = spawn(&s, Io::Null, Io::Piped, Io::Null, None)
            .unwrap()
            .unwrap();
        let mut out = String::new();
        c.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        c.wait().await.unwrap();
        let pgid: u32 = out.lines().next().unwrap().trim().parse().unwrap();
        assert_eq!(pgid, c.id());
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        // SIGPIPE, which Rust ignores, is back to its default
        let ign = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .unwrap();
        let ign = u64::from_str_radix(ign.trim(), 16).unwrap();
        assert_eq!(ign & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[tokio::test]
    async fn a_dropped_child_is_killed() {
        let s = spec(&["/bin/sleep", "1000"], &[]);
        let c = spawn(&s, Io::Null, Io::Null, Io::Null, None)
            .unwrap()
            .unwrap();
        let pid = c.id() as i32;
        drop(c);
        for _ in 0..200 {
            // SAFETY: signal 0 only checks whether the pid exists.
            if unsafe { libc::kill(pid, 0) } < 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("pid {pid} still exists");
    }
}

//! The host programs the engine runs, declared once in `scripts/programs.txt` (compiled in here)
//! with the Debian package that provides each. `smol doctor` checks them (present, runnable,
//! version); a create that needs a missing one fails with [`Error::ProgramMissing`] naming the
//! program and its package, instead of a storage or protocol error.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::Error;

/// The declaration file, as compiled in.
pub const DECLARED: &str = include_str!("../../../../scripts/programs.txt");

/// What a program is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Every create.
    Engine,
    /// Machines of an OCI image, `smol image`.
    Images,
    /// Host directory mounts (virtio-fs).
    Mounts,
    /// Guest networking.
    Network,
    /// The set-up (guest kernel, agent, initramfs).
    Build,
    /// `make test`.
    Test,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "engine" => Role::Engine,
            "images" => Role::Images,
            "mounts" => Role::Mounts,
            "network" => Role::Network,
            "build" => Role::Build,
            "test" => Role::Test,
            _ => return None,
        })
    }

    /// Whether the engine itself (not the set-up or the tests) runs programs of this role.
    pub fn is_runtime(self) -> bool {
        matches!(
            self,
            Role::Engine | Role::Images | Role::Mounts | Role::Network
        )
    }

    /// "to create a machine", "for mounts", ...
    pub fn needed_for(self) -> &'static str {
        match self {
            Role::Engine => "to create a machine",
            Role::Images => "for machines of an image",
            Role::Mounts => "for host directory mounts",
            Role::Network => "for guest networking",
            Role::Build => "by the set-up",
            Role::Test => "by the tests",
        }
    }

    /// The role's name as written in the declaration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Engine => "engine",
            Role::Images => "images",
            Role::Mounts => "mounts",
            Role::Network => "network",
            Role::Build => "build",
            Role::Test => "test",
        }
    }
}

/// One line of the declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// A name looked up on `PATH`, or an absolute path.
    pub program: &'static str,
    /// The Debian package to install for it (the first of its alternatives).
    pub package: &'static str,
    /// What it is needed for.
    pub role: Role,
    /// Arguments that make it print its version (empty: being there is the check).
    pub version_args: Vec<&'static str>,
}

/// A malformed line of the declaration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("scripts/programs.txt line {line}: {reason}")]
pub struct DeclarationError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses a declaration (the format of `scripts/programs.txt`).
pub fn parse(text: &'static str) -> Result<Vec<Program>, DeclarationError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| DeclarationError {
            line: i + 1,
            reason: reason.to_string(),
        };
        let mut cols = line.split_whitespace();
        let (Some(program), Some(package), Some(role)) = (cols.next(), cols.next(), cols.next())
        else {
            return Err(bad("expected: program package role version-args"));
        };
        let role = Role::parse(role).ok_or_else(|| bad("unknown role"))?;
        let version_args: Vec<&'static str> = cols.collect();
        if version_args.is_empty() {
            return Err(bad(
                "missing version argument (`-` when being there is the check)",
            ));
        }
        let version_args = if version_args == ["-"] {
            Vec::new()
        } else {
            version_args
        };
        out.push(Program {
            program,
            package: package.split('|').next().unwrap_or(package),
            role,
            version_args,
        });
    }
    Ok(out)
}

/// Every declared program (parsed once; the declaration is checked by a unit test).
pub fn declared() -> &'static [Program] {
    static ALL: OnceLock<Vec<Program>> = OnceLock::new();
    ALL.get_or_init(|| {
        parse(DECLARED).unwrap_or_else(|e| {
            tracing::error!("{e}");
            Vec::new()
        })
    })
}

/// The declaration of `program`, if any.
pub fn find(program: &str) -> Option<&'static Program> {
    declared().iter().find(|p| p.program == program)
}

/// The environment variable that points the engine at another binary for `program`.
pub fn override_var(program: &str) -> Option<&'static str> {
    Some(match program {
        "qemu-system-x86_64" => "SMOL_QEMU",
        "/usr/lib/qemu/virtiofsd" => "SMOL_VIRTIOFSD",
        "passt" => "SMOL_PASST",
        _ => return None,
    })
}

/// Where `program` is: its override (`SMOL_QEMU`, ...) when set, else an absolute path that
/// exists, or the first match on `PATH`.
pub fn locate(program: &str) -> Option<PathBuf> {
    if let Some(v) = override_var(program).and_then(std::env::var_os) {
        let v = PathBuf::from(v);
        return if v.is_absolute() {
            v.exists().then_some(v)
        } else {
            locate(&v.to_string_lossy())
        };
    }
    let p = Path::new(program);
    if p.is_absolute() {
        return p.exists().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|c| is_executable(c))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The typed error for a declared program that is missing (or an undeclared one: its package is
/// then unknown and the message says so).
pub fn missing(program: &str, problem: impl Into<String>) -> Error {
    let (package, needed_for) = match find(program) {
        Some(p) => (p.package.to_string(), p.role.needed_for().to_string()),
        None => (
            "(not declared in scripts/programs.txt)".into(),
            "by the engine".into(),
        ),
    };
    Error::ProgramMissing {
        program: program.to_string(),
        package,
        needed_for,
        problem: problem.into(),
    }
}

/// Maps the error of spawning `program` to a typed error: not found is
/// [`Error::ProgramMissing`]; anything else is `other(e)`.
pub fn spawn_error(
    program: &str,
    e: std::io::Error,
    other: impl FnOnce(std::io::Error) -> Error,
) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        missing(program, "it is not installed")
    } else {
        other(e)
    }
}

/// What `smol doctor` found for one program.
#[derive(Debug, Clone)]
pub struct Check {
    /// The declaration.
    pub program: &'static Program,
    /// Where it is.
    pub path: Option<PathBuf>,
    /// Its version line (or "present"), or what is wrong.
    pub status: Result<String, String>,
}

impl Check {
    /// Whether it is present and runs.
    pub fn ok(&self) -> bool {
        self.status.is_ok()
    }
}

/// Checks one program: present, and its version arguments run with status 0 within 10 s.
pub fn check(program: &'static Program) -> Check {
    let path = locate(program.program);
    let status = match &path {
        None => Err(if Path::new(program.program).is_absolute() {
            "missing".to_string()
        } else {
            "not on PATH".to_string()
        }),
        Some(_) if program.version_args.is_empty() => Ok("present".into()),
        Some(p) => run_version(p, &program.version_args),
    };
    Check {
        program,
        path,
        status,
    }
}

fn run_version(bin: &Path, args: &[&str]) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                if let Err(e) = child.kill() {
                    tracing::warn!("killing {}: {e}", bin.display());
                }
                return Err(format!(
                    "`{} {}` did not finish in 10 s",
                    bin.display(),
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("reading its output: {e}"))?;
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string()
    };
    let first = Some(text(&out.stdout))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| text(&out.stderr));
    if out.status.success() {
        Ok(if first.is_empty() {
            "present".into()
        } else {
            first
        })
    } else {
        Err(format!(
            "`{} {}` fails ({}): {first}",
            bin.display(),
            args.join(" "),
            out.status
        ))
    }
}

/// Checks every program the engine itself runs (roles engine, images, mounts, network).
pub fn check_runtime() -> Vec<Check> {
    declared()
        .iter()
        .filter(|p| p.role.is_runtime())
        .map(check)
        .collect()
}

/// The `apt-get install` line for the packages of the failed checks (`None` when none failed).
pub fn apt_line(checks: &[Check]) -> Option<String> {
    let mut pkgs: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.program.package)
        .collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    (!pkgs.is_empty()).then(|| format!("apt-get install {}", pkgs.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declaration_parses_and_names_what_the_engine_runs() {
        let all = parse(DECLARED).expect("scripts/programs.txt parses");
        for prog in [
            "qemu-system-x86_64",
            "qemu-img",
            "mkfs.ext4",
            "mkfs.erofs",
            "passt",
        ] {
            let p = all
                .iter()
                .find(|p| p.program == prog)
                .unwrap_or_else(|| panic!("{prog} is not declared in scripts/programs.txt"));
            assert!(p.role.is_runtime(), "{prog} is run by the engine");
        }
        let img = find("qemu-img").unwrap();
        assert_eq!(img.package, "qemu-utils");
        assert_eq!(img.version_args, ["--version"]);
        // an alternative: the first package is the one to install
        assert_eq!(find("npm").unwrap().package, "npm");
        assert!(find("/usr/lib/qemu/virtiofsd").is_some());
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let e = parse("# c\nqemu-img qemu-utils engine\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse("qemu-img qemu-utils daemon --version\n").unwrap_err();
        assert!(e.reason.contains("role"), "{e}");
        let ok = parse("x y engine -\n").unwrap();
        assert!(ok[0].version_args.is_empty());
    }

    #[test]
    fn a_missing_program_is_a_typed_error_naming_its_package() {
        let e = missing("qemu-img", "it is not installed");
        assert_eq!(e.code(), "RUNTIME_NOT_INSTALLED");
        let msg = e.to_string();
        assert!(
            msg.contains("qemu-img") && msg.contains("qemu-utils"),
            "{msg}"
        );
        assert!(e.hint().unwrap().contains("apt-get install qemu-utils"));
        let spawn = spawn_error(
            "qemu-img",
            std::io::Error::from(std::io::ErrorKind::NotFound),
            |e| Error::io("x", e),
        );
        assert!(matches!(spawn, Error::ProgramMissing { .. }));
    }

    #[test]
    fn checks_find_real_programs_and_report_missing_ones() {
        // `sh` is on every host; a declaration of a program that does not exist fails its check
        let sh: &'static Program = Box::leak(Box::new(Program {
            program: "sh",
            package: "dash",
            role: Role::Engine,
            version_args: vec!["-c", "echo sh-version-line"],
        }));
        let c = check(sh);
        assert_eq!(c.status.as_deref(), Ok("sh-version-line"));
        let nope: &'static Program = Box::leak(Box::new(Program {
            program: "smol-no-such-program",
            package: "smol-no-such-package",
            role: Role::Engine,
            version_args: vec!["--version"],
        }));
        let failing: &'static Program = Box::leak(Box::new(Program {
            program: "sh",
            package: "dash",
            role: Role::Engine,
            version_args: vec!["-c", "echo broken >&2; exit 3"],
        }));
        let checks = [check(nope), check(failing), c];
        assert_eq!(checks[0].status.as_ref().unwrap_err(), "not on PATH");
        let err = checks[1].status.as_ref().unwrap_err();
        assert!(err.contains("broken"), "{err}");
        assert_eq!(
            apt_line(&checks).unwrap(),
            "apt-get install dash smol-no-such-package"
        );
    }
}

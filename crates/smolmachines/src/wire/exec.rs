//! Commands: the body of `POST .../exec` and `.../exec/stream`, the exec response and the
//! Server-Sent Events of a stream (SPEC §10.4, §10.5.4; CLOUD-CLIENTS.md §3, §5).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::nullable;
use crate::config::{ExecEvent, ExecOptions, ExecOutput, ExecResult};
use crate::error::{Error, Result};

/// The most text bytes of stdout or stderr an exec response carries (the b64 fields are
/// complete).
pub const TEXT_CAP: usize = 1 << 20;

/// `command`: an argv, or a shell string (run with `sh -c`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// `["argv", ...]`
    Argv(Vec<String>),
    /// `"shell string"`
    Shell(String),
}

/// Integer seconds, read from an integer or a float (rounded up: Node sends the raw number,
/// SPEC §12.9).
fn ceil_seconds<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    let Some(s) = Option::<f64>::deserialize(d)? else {
        return Ok(None);
    };
    if !s.is_finite() || s < 0.0 {
        return Err(serde::de::Error::custom(format!(
            "timeoutSeconds must be a number of seconds >= 0, got {s}"
        )));
    }
    Ok(Some(s.ceil() as u64))
}

/// `MachineCommandRequest`. Serialized as the Python client sends it: `command`, `env`, `cwd`
/// and `timeoutSeconds` always (`{}` / `null`), `user`, `background` and `stdin` only when set.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandBody {
    /// What to run.
    pub command: CommandLine,
    /// Extra environment.
    #[serde(default, deserialize_with = "nullable")]
    pub env: BTreeMap<String, String>,
    /// Working directory (an absolute guest path).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^/"))]
    pub cwd: Option<String>,
    /// Whole seconds (the result is exit 124 past it).
    #[serde(default, deserialize_with = "ceil_seconds")]
    pub timeout_seconds: Option<u64>,
    /// Text for stdin (then closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Run as this user (the response echoes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub user: Option<String>,
    /// Start detached: stdout `pid=<n>`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub background: bool,
    /// In the schema; the SDKs use the stream route instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
}

impl CommandBody {
    /// The body for `argv` with `opts` (timeout rounded up to whole seconds). stdin must be
    /// UTF-8 (the wire carries text): `InvalidConfig` otherwise.
    pub fn new(argv: &[String], opts: &ExecOptions) -> Result<CommandBody> {
        let stdin = match &opts.stdin {
            None => None,
            Some(b) => Some(
                String::from_utf8(b.clone())
                    .map_err(|_| Error::invalid("stdin must be UTF-8 on this target"))?,
            ),
        };
        Ok(CommandBody {
            command: CommandLine::Argv(argv.to_vec()),
            env: opts.env.clone(),
            cwd: opts.workdir.clone(),
            timeout_seconds: opts.timeout_secs(),
            stdin,
            user: opts.user.clone(),
            background: opts.background,
            stream: None,
        })
    }

    /// The argv and options of this body, validated like any exec: a shell string becomes
    /// `["sh", "-c", s]`; `timeoutSeconds: 0` means none; `output` comes from the query.
    pub fn into_exec(self, output: Option<ExecOutput>) -> Result<(Vec<String>, ExecOptions)> {
        let argv = match self.command {
            CommandLine::Argv(a) => a,
            CommandLine::Shell(s) => vec!["sh".into(), "-c".into(), s],
        };
        crate::config::check_argv("command", &argv)?;
        let opts = ExecOptions {
            env: self.env,
            workdir: self.cwd,
            timeout: self
                .timeout_seconds
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
            user: self.user,
            stdin: self.stdin.map(String::into_bytes),
            background: self.background,
            output,
        };
        opts.validate()?;
        Ok((argv, opts))
    }
}

/// `MachineExecResponse`. Every field reads as its default when absent (an absent `exitCode`
/// is 0, as the clients read it).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecResponse {
    /// stdout text, at most [`TEXT_CAP`] bytes.
    #[serde(default, deserialize_with = "nullable")]
    pub stdout: String,
    /// stderr text, at most [`TEXT_CAP`] bytes.
    #[serde(default, deserialize_with = "nullable")]
    pub stderr: String,
    /// Exit code (124: timed out).
    #[serde(default, deserialize_with = "nullable")]
    pub exit_code: i32,
    /// How long it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// The text of stdout was capped.
    #[serde(default, deserialize_with = "nullable")]
    pub stdout_truncated: bool,
    /// The text of stderr was capped.
    #[serde(default, deserialize_with = "nullable")]
    pub stderr_truncated: bool,
    /// stdout, complete, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    /// stderr, complete, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    /// The user it ran as, echoed when the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `s` cut to at most `cap` bytes at a character boundary; whether it was cut.
fn cap_text(s: &str, cap: usize) -> (String, bool) {
    if s.len() <= cap {
        return (s.to_string(), false);
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_string(), true)
}

impl ExecResponse {
    /// The response a server sends for `r` with `?output=` (`None`: both): text capped at
    /// [`TEXT_CAP`] with the truncation flags, complete b64.
    pub fn from_result(r: &ExecResult, output: Option<ExecOutput>) -> ExecResponse {
        let output = output.unwrap_or(ExecOutput::Both);
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let text = output != ExecOutput::B64;
        let (stdout, stdout_truncated) = if text {
            cap_text(&r.stdout, TEXT_CAP)
        } else {
            (String::new(), false)
        };
        let (stderr, stderr_truncated) = if text {
            cap_text(&r.stderr, TEXT_CAP)
        } else {
            (String::new(), false)
        };
        let bytes = output != ExecOutput::Text;
        ExecResponse {
            stdout,
            stderr,
            exit_code: r.exit_code,
            stdout_truncated,
            stderr_truncated,
            stdout_b64: bytes.then(|| b64(&r.stdout_bytes)),
            stderr_b64: bytes.then(|| b64(&r.stderr_bytes)),
            ..Default::default()
        }
    }

    /// The result a client reads (SPEC §3.7): bytes from the b64 fields, else (missing,
    /// invalid, or empty while the text is not) the UTF-8 of the text; `pid` from `pid=<n>`
    /// on stdout for a `background` command. A cloud cannot say whether a timeout killed it:
    /// `timed_out` is false.
    pub fn into_result(self, background: bool) -> ExecResult {
        fn bytes(b64: Option<&str>, text: &str) -> Vec<u8> {
            match b64.map(|s| base64::engine::general_purpose::STANDARD.decode(s)) {
                Some(Ok(b)) if !b.is_empty() || text.is_empty() => b,
                _ => text.as_bytes().to_vec(),
            }
        }
        let pid = background
            .then(|| {
                self.stdout
                    .split(|c: char| c.is_whitespace())
                    .find_map(|w| w.strip_prefix("pid=")?.parse().ok())
            })
            .flatten();
        ExecResult {
            exit_code: self.exit_code,
            stdout_bytes: bytes(self.stdout_b64.as_deref(), &self.stdout),
            stderr_bytes: bytes(self.stderr_b64.as_deref(), &self.stderr),
            stdout: self.stdout,
            stderr: self.stderr,
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            timed_out: false,
            pid,
        }
    }
}

impl From<&ExecResult> for ExecResponse {
    fn from(r: &ExecResult) -> Self {
        ExecResponse::from_result(r, None)
    }
}

impl From<ExecResponse> for ExecResult {
    fn from(r: ExecResponse) -> Self {
        r.into_result(false)
    }
}

/// One event of `POST .../exec/stream` (SPEC §10.5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// `event: stdout`, a text chunk.
    Stdout(String),
    /// `event: stderr`, a text chunk.
    Stderr(String),
    /// `event: exit`, `{"exitCode": N}`; the last event.
    Exit(i32),
    /// `event: error`, a message.
    Error(String),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExitData {
    #[serde(default)]
    exit_code: i32,
}

impl StreamEvent {
    /// The event as SSE text: one `data:` line per line of the payload (so `"a\n"` is
    /// `data: a` + `data: `, which the clients join back into `"a\n"`), then a blank line.
    pub fn to_sse(&self) -> String {
        let (kind, data) = match self {
            StreamEvent::Stdout(d) => ("stdout", d.clone()),
            StreamEvent::Stderr(d) => ("stderr", d.clone()),
            StreamEvent::Error(m) => ("error", m.clone()),
            StreamEvent::Exit(code) => {
                ("exit", serde_json::json!({ "exitCode": code }).to_string())
            }
        };
        let mut out = format!("event: {kind}\n");
        for line in data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        out
    }

    fn parse(kind: &str, data: String) -> Option<StreamEvent> {
        match kind {
            "stdout" => Some(StreamEvent::Stdout(data)),
            "stderr" => Some(StreamEvent::Stderr(data)),
            "error" => Some(StreamEvent::Error(data)),
            "exit" => Some(StreamEvent::Exit(
                serde_json::from_str::<ExitData>(&data)
                    .map(|d| d.exit_code)
                    .unwrap_or(0),
            )),
            _ => None,
        }
    }
}

impl From<&ExecEvent> for StreamEvent {
    /// Output bytes become lossy UTF-8 text (SSE carries text only).
    fn from(e: &ExecEvent) -> Self {
        match e {
            ExecEvent::Stdout(b) => StreamEvent::Stdout(String::from_utf8_lossy(b).into_owned()),
            ExecEvent::Stderr(b) => StreamEvent::Stderr(String::from_utf8_lossy(b).into_owned()),
            ExecEvent::Exit(c) => StreamEvent::Exit(*c),
            ExecEvent::Error { message, .. } => StreamEvent::Error(message.clone()),
        }
    }
}

impl From<StreamEvent> for ExecEvent {
    fn from(e: StreamEvent) -> Self {
        match e {
            StreamEvent::Stdout(d) => ExecEvent::Stdout(d.into_bytes()),
            StreamEvent::Stderr(d) => ExecEvent::Stderr(d.into_bytes()),
            StreamEvent::Exit(c) => ExecEvent::Exit(c),
            // SSE's error payload is a message (SPEC §10.5.4): no code on the wire
            StreamEvent::Error(m) => ExecEvent::Error {
                code: crate::error::ErrorCode::SmolvmError,
                message: m,
            },
        }
    }
}

/// Reads SSE bytes as the clients do: lines end in `\n` (one `\r` before it is dropped);
/// `event:` names the kind, `data:` lines (one leading space stripped) join with `\n`, a blank
/// line ends the event; `:`, `id:`, `retry:` lines and unknown kinds are ignored.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    kind: Option<String>,
    data: Option<String>,
}

impl SseDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(e) = self.line_done(&line) {
                out.push(e);
            }
        }
        out
    }

    /// The end of the body: the last event even without its blank line.
    pub fn finish(mut self) -> Option<StreamEvent> {
        if !self.line.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
            if let Some(e) = self.line_done(line.trim_end_matches('\r')) {
                return Some(e);
            }
        }
        self.dispatch()
    }

    fn dispatch(&mut self) -> Option<StreamEvent> {
        let kind = self.kind.take();
        let data = self.data.take();
        StreamEvent::parse(kind.as_deref()?, data.unwrap_or_default())
    }

    fn line_done(&mut self, line: &str) -> Option<StreamEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if let Some(v) = line.strip_prefix("event:") {
            self.kind = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(v);
                }
                None => self.data = Some(v.to_string()),
            }
        }
        None
    }
}

#[cfg(test)]
#[path = "exec_tests.rs"]
mod tests;

//! Registry credentials from the Docker client configuration (`$DOCKER_CONFIG/config.json`,
//! default `~/.docker/config.json`): `auths.<registry>.auth` (base64 `user:password`), or a
//! credential helper (`credHelpers.<registry>` / `credsStore`, run as
//! `docker-credential-<name> get`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

/// A user name and password (or identity token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Where the Docker client configuration is.
pub(crate) fn docker_config_path() -> PathBuf {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return PathBuf::from(d).join("config.json");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".docker/config.json")
}

/// The key a registry host has in `auths`, with Docker Hub's historical names.
fn normalise_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// Credentials for `registry` (as in a reference: `docker.io`, `ghcr.io`, `host:port`), if the
/// configuration at `path` has some. Errors in the file are treated as "no credentials".
pub(crate) fn credentials_for(path: &Path, registry: &str) -> Option<Credentials> {
    let bytes = std::fs::read(path).ok()?;
    let cfg: DockerConfig = serde_json::from_slice(&bytes).ok()?;
    let want = normalise_key(registry);
    for (key, helper) in &cfg.cred_helpers {
        if normalise_key(key) == want {
            return from_helper(helper, key);
        }
    }
    for (key, entry) in &cfg.auths {
        if normalise_key(key) != want {
            continue;
        }
        if let Some(a) = &entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()?;
            let s = String::from_utf8(decoded).ok()?;
            let (u, p) = s.split_once(':')?;
            return Some(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            });
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            });
        }
    }
    let store = cfg.creds_store.as_ref()?;
    let server = if want == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    from_helper(store, &server)
}

fn from_helper(helper: &str, server: &str) -> Option<Credentials> {
    #[derive(Deserialize)]
    struct Out {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let o: Out = serde_json::from_slice(&out.stdout).ok()?;
    Some(Credentials {
        username: o.username,
        password: o.secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auths_with_docker_hub_aliases() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}},
                    "127.0.0.1:5000":{{"username":"bob","password":"pw"}}}}}}"#
            ),
        )
        .unwrap();
        let c = credentials_for(&p, "docker.io").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = credentials_for(&p, "127.0.0.1:5000").unwrap();
        assert_eq!(c.username, "bob");
        assert!(credentials_for(&p, "ghcr.io").is_none());
        assert!(credentials_for(&d.path().join("missing.json"), "docker.io").is_none());
    }
}

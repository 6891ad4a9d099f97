//! `ExecRequest.user`: a user name, `uid[:gid]` or `name:group`, resolved against the guest's
//! `/etc/passwd` and `/etc/group` (the image's, on a machine of an image).

use std::path::Path;

use smol_protocol::RemoteError;

/// Who a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Login name, when the user has a passwd entry.
    pub name: Option<String>,
    /// Home directory (`/` when unknown).
    pub home: String,
}

/// One `/etc/passwd` entry: name, uid, gid, home.
fn passwd(root: &Path) -> Vec<(String, u32, u32, String)> {
    std::fs::read_to_string(root.join("etc/passwd"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 6).then_some(())?;
            Some((
                f[0].to_string(),
                f[2].parse().ok()?,
                f[3].parse().ok()?,
                f[5].to_string(),
            ))
        })
        .collect()
}

fn group_id(root: &Path, group: &str) -> Option<u32> {
    if let Ok(id) = group.parse() {
        return Some(id);
    }
    std::fs::read_to_string(root.join("etc/group"))
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == group).then(|| f[2].parse().ok())?
        })
}

/// Resolves `spec` with the passwd and group files under `root`.
pub fn resolve(spec: &str, root: &Path) -> Result<Ident, RemoteError> {
    let invalid = |why: String| crate::serve::invalid(why);
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(invalid(format!(
            "user {spec:?}: expected NAME, UID or UID:GID"
        )));
    }
    let entries = passwd(root);
    let entry = match user.parse::<u32>() {
        Ok(uid) => entries.iter().find(|e| e.1 == uid).cloned(),
        Err(_) => Some(
            entries
                .iter()
                .find(|e| e.0 == user)
                .cloned()
                .ok_or_else(|| invalid(format!("unknown user {user:?} (not in /etc/passwd)")))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.1,
        None => user.parse().expect("numeric: checked above"),
    };
    let gid = match group {
        Some(g) => group_id(root, g)
            .ok_or_else(|| invalid(format!("unknown group {g:?} (not in /etc/group)")))?,
        None => entry.as_ref().map(|e| e.2).unwrap_or(0),
    };
    Ok(Ident {
        uid,
        gid,
        name: entry.as_ref().map(|e| e.0.clone()),
        home: entry
            .map(|e| e.3)
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
             app:x:1000:1001::/home/app:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:app\n").unwrap();
        d
    }

    #[test]
    fn names_ids_and_groups() {
        let r = root();
        let p = r.path();
        let id = |s: &str| resolve(s, p).map(|i| (i.uid, i.gid, i.home));
        assert_eq!(id("app").unwrap(), (1000, 1001, "/home/app".into()));
        assert_eq!(id("nobody").unwrap().0, 65534);
        assert_eq!(id("1000").unwrap(), (1000, 1001, "/home/app".into()));
        assert_eq!(id("4242").unwrap(), (4242, 0, "/".into()));
        assert_eq!(id("4242:7").unwrap(), (4242, 7, "/".into()));
        assert_eq!(id("app:staff").unwrap(), (1000, 50, "/home/app".into()));
        assert_eq!(resolve("app", p).unwrap().name.as_deref(), Some("app"));
        for bad in ["nosuch", "app:nogroup", "", ":1", "1:"] {
            assert!(resolve(bad, p).is_err(), "{bad}");
        }
    }
}

//! Node labels (issue 15: "node labels (arch, GPU, region) filter placement").
//!
//! A node carries labels: `arch` (the host's, always) and what its operator gives with
//! `smolfleet node --label KEY=VALUE` (repeatable: `region=eu`, `gpu=h200`, ...). Each heartbeat
//! tells them (`nodedoor.rs`; written only when they changed), and `smolfleet node list` shows
//! them.
//!
//! A machine asks for nodes by its own labels: each label whose key starts with `node.` is a
//! requirement, `"node.region": "eu"` placing it on a node labelled `region=eu` only. The
//! published clients send a machine's labels as they are, so they can ask too. A create whose
//! requirements no node of the fleet carries is refused (`400 invalid_config`, nothing
//! recorded); when nodes carry them but none of those is ready with room, it is `503
//! retryable`, as when no node has room. Branches stay on their source's node whatever their
//! labels (`remotebranch.rs`).

use std::collections::BTreeMap;

use smolmachines::Error;

use crate::nodes::NodeStatus;

/// Schema version 8: each node's labels (a JSON object of strings; none: no labels told).
pub(crate) const SCHEMA_V8: &str = "ALTER TABLE nodes ADD COLUMN labels TEXT;\n";

/// Records node `?1`'s labels `?2` when they changed.
pub(crate) const SET_NODE_LABELS: &str =
    "UPDATE nodes SET labels = ?2 WHERE id = ?1 AND (labels IS NULL OR labels <> ?2)";

/// The prefix of a machine label that asks for a node label.
pub const REQUIRE_PREFIX: &str = "node.";

/// The most labels a node may carry.
pub const MAX_LABELS: usize = 32;

/// A node's labels.
pub type Labels = BTreeMap<String, String>;

/// Whether `s` may be a label's key (1..=63 of `[a-z0-9._/-]`, starting with a letter or
/// digit).
fn is_key(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._/-".contains(c))
}

/// Whether `s` may be a label's value (0..=63 of `[A-Za-z0-9._/-]`).
fn is_value(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
}

/// `KEY=VALUE` as a label (`--label`), or why not.
pub fn parse(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: a label is KEY=VALUE"))?;
    if !is_key(k) {
        return Err(format!(
            "{s:?}: a label's key is 1 to 63 of a-z 0-9 . _ / - (starting with a letter or digit)"
        ));
    }
    if !is_value(v) {
        return Err(format!(
            "{s:?}: a label's value is at most 63 of A-Z a-z 0-9 . _ / -"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

/// This host's labels: `given` with `arch` set to the host's (a given `arch` is refused:
/// placement must be able to trust it).
pub fn of_host(given: &[(String, String)]) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for (k, v) in given {
        if k == "arch" {
            return Err(format!(
                "label arch={v}: `arch` is the host's own ({}), not given",
                std::env::consts::ARCH
            ));
        }
        labels.insert(k.clone(), v.clone());
    }
    labels.insert("arch".into(), std::env::consts::ARCH.into());
    if labels.len() > MAX_LABELS {
        return Err(format!("a node carries at most {MAX_LABELS} labels"));
    }
    Ok(labels)
}

/// Labels told by a heartbeat, kept only when every key and value is well formed (else
/// none: the node's are left as they were).
pub fn checked(told: &Labels) -> Option<&Labels> {
    (told.len() <= MAX_LABELS && told.iter().all(|(k, v)| is_key(k) && is_value(v))).then_some(told)
}

/// A node's labels as stored (`None`, or JSON that does not parse: no labels).
pub fn from_column(s: Option<&str>) -> Labels {
    s.and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// What a machine of labels `machine` asks of its node: its `node.KEY` labels as `KEY`.
pub fn required(machine: &BTreeMap<String, String>) -> Labels {
    machine
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(REQUIRE_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

/// Whether labels `has` meet `wants`.
pub fn meets(has: &Labels, wants: &Labels) -> bool {
    wants.iter().all(|(k, v)| has.get(k) == Some(v))
}

/// `k=v, k=v`.
pub fn show(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The live nodes of `nodes` that have not told their labels yet, by id: a node tells them
/// (`arch` at least) in each heartbeat, so these have joined and not yet sent their first.
pub fn untold(nodes: &[NodeStatus]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.labels.is_empty() && n.liveness == "live")
        .map(|n| n.node.id.clone())
        .collect()
}

/// The nodes of `nodes` that carry `wants`, by id; `InvalidConfig` when none does (no node
/// will ever take the machine until one with those labels joins).
pub fn candidates(nodes: &[NodeStatus], wants: &Labels) -> Result<Vec<String>, Error> {
    let ids: Vec<String> = nodes
        .iter()
        .filter(|n| meets(&n.labels, wants))
        .map(|n| n.node.id.clone())
        .collect();
    if ids.is_empty() {
        let known: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} [{}]", n.node.id, show(&n.labels)))
            .collect();
        return Err(Error::InvalidConfig {
            message: format!(
                "labels: no node of this fleet has {} (a `node.KEY` label asks for a node \
             labelled KEY; nodes: {}; an operator labels a node with `smolfleet node --label \
             KEY=VALUE`)",
                show(wants),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join("; ")
                }
            ),
        });
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_refuse() {
        assert_eq!(parse("region=eu").unwrap(), ("region".into(), "eu".into()));
        assert_eq!(parse("gpu=").unwrap(), ("gpu".into(), String::new()));
        for bad in [
            "region",
            "=eu",
            "Region=eu",
            "-x=1",
            "a b=1",
            "k=v=w",
            "k=é",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse(&format!("{}=1", "k".repeat(64))).is_err());
        let host = of_host(&[("region".into(), "eu".into())]).unwrap();
        assert_eq!(host["arch"], std::env::consts::ARCH);
        assert_eq!(host["region"], "eu");
        assert!(of_host(&[("arch".into(), "arm64".into())]).is_err());
        let mut told = Labels::new();
        told.insert("Bad Key".into(), "x".into());
        assert!(checked(&told).is_none());
    }

    #[test]
    fn requirements_are_the_node_prefixed_labels() {
        let machine: BTreeMap<String, String> = [
            ("team".to_string(), "a".to_string()),
            ("node.region".to_string(), "eu".to_string()),
        ]
        .into();
        let wants = required(&machine);
        assert_eq!(show(&wants), "region=eu");
        let mut has = of_host(&[("region".into(), "eu".into())]).unwrap();
        assert!(meets(&has, &wants));
        assert!(meets(&has, &Labels::new()));
        has.insert("region".into(), "us".into());
        assert!(!meets(&has, &wants));
        assert_eq!(from_column(Some("{\"a\":\"b\"}"))["a"], "b");
        assert!(from_column(Some("not json")).is_empty());
        assert!(from_column(None).is_empty());
    }
}

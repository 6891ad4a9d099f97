//! PostgreSQL's side of the replica's route cache (`cache.rs`): triggers that `NOTIFY smol_routes`
//! in the transaction of each change that makes a kept route wrong, and the task that
//! `LISTEN`s on a connection of its own and tells the cache.
//!
//! The triggers are made at a start that finds them missing or of another version
//! ([`TRIGGERS_VERSION`], kept as a comment on one of their functions), under the migration's
//! advisory lock: they are PostgreSQL's own (SQLite has no listener), so they live here and
//! not in `MIGRATIONS`. Only changes that matter notify: a heartbeat (a node's lease), a
//! machine's last activity or a new placement does not.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio_postgres::{AsyncMessage, NoTls};

use super::{error, PgStore};
use crate::cache::{Cache, CHANNEL, LISTENER_NAME};
use crate::error::FleetError;

/// The version of [`TRIGGERS`] (change it with them).
pub(super) const TRIGGERS_VERSION: &str = "smol triggers 1";

/// The triggers (PostgreSQL 11 or later), made again whole when their version differs.
pub(super) const TRIGGERS: &str = "
DROP TRIGGER IF EXISTS smol_machine_removed ON machines;
DROP TRIGGER IF EXISTS smol_machine_changed ON machines;
DROP TRIGGER IF EXISTS smol_placement_changed ON placements;
DROP TRIGGER IF EXISTS smol_tombstoned ON tombstones;
DROP TRIGGER IF EXISTS smol_node_removed ON nodes;
DROP TRIGGER IF EXISTS smol_node_moved ON nodes;
CREATE OR REPLACE FUNCTION smol_notify_machine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('smol_routes', 'm:' || OLD.id); RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION smol_notify_placement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('smol_routes', 'm:' || OLD.machine_id); RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION smol_notify_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('smol_routes', 'm:' || NEW.machine_id); RETURN NULL; END $$;
CREATE OR REPLACE FUNCTION smol_notify_node() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('smol_routes', 'n:' || OLD.id); RETURN NULL; END $$;
CREATE TRIGGER smol_machine_removed AFTER DELETE ON machines
    FOR EACH ROW EXECUTE FUNCTION smol_notify_machine();
CREATE TRIGGER smol_machine_changed AFTER UPDATE ON machines
    FOR EACH ROW WHEN ((OLD.tenant_id, OLD.name, OLD.engine_name, OLD.spec, OLD.ephemeral,
                        OLD.auto_stop_seconds, OLD.ttl_seconds, OLD.expires_at)
             IS DISTINCT FROM (NEW.tenant_id, NEW.name, NEW.engine_name, NEW.spec,
                               NEW.ephemeral, NEW.auto_stop_seconds, NEW.ttl_seconds,
                               NEW.expires_at))
    EXECUTE FUNCTION smol_notify_machine();
CREATE TRIGGER smol_placement_changed AFTER UPDATE OR DELETE ON placements
    FOR EACH ROW EXECUTE FUNCTION smol_notify_placement();
CREATE TRIGGER smol_tombstoned AFTER INSERT ON tombstones
    FOR EACH ROW EXECUTE FUNCTION smol_notify_tombstone();
CREATE TRIGGER smol_node_removed AFTER DELETE ON nodes
    FOR EACH ROW EXECUTE FUNCTION smol_notify_node();
CREATE TRIGGER smol_node_moved AFTER UPDATE ON nodes
    FOR EACH ROW WHEN (OLD.api_url IS DISTINCT FROM NEW.api_url)
    EXECUTE FUNCTION smol_notify_node();
";

/// Makes the triggers when they are missing or of another version (in `tx`, which holds the
/// migration's lock).
pub(super) async fn make_triggers(tx: &tokio_postgres::Transaction<'_>) -> Result<(), FleetError> {
    let what = "make the store's notifying triggers";
    let found: Option<String> = tx
        .query_one(
            "SELECT obj_description(to_regprocedure('smol_notify_machine()'), 'pg_proc')",
            &[],
        )
        .await
        .map_err(|e| error(what, e))?
        .get(0);
    if found.as_deref() == Some(TRIGGERS_VERSION) {
        return Ok(());
    }
    tx.batch_execute(&format!(
        "{TRIGGERS}\nCOMMENT ON FUNCTION smol_notify_machine() IS '{TRIGGERS_VERSION}';"
    ))
    .await
    .map_err(|e| error(what, e))?;
    tracing::info!(
        version = TRIGGERS_VERSION,
        "fleet store: the notifying triggers made"
    );
    Ok(())
}

/// How often the listening connection is asked whether it is still there (a connection cut
/// without a word would otherwise keep the cache live while notifications are lost).
const PING_EVERY: Duration = Duration::from_secs(2);
/// How long that question may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a failed connection the next one is tried.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl PgStore {
    /// Listens for the store's changes for `cache`, for as long as the runtime runs (a task):
    /// reconnects after a failure, the cache not live meanwhile.
    pub(super) fn listen(&self, cache: Arc<Cache>) {
        let mut config = self.config.clone();
        // its own name: an operator (and a test) tells it from the pool's connections
        config.application_name(LISTENER_NAME);
        let at = self.at.clone();
        tokio::spawn(async move {
            // said once for a run of failures (the store down: one try a second)
            let mut said = false;
            loop {
                let (heard, e) = listen_once(&config, &cache).await;
                if heard {
                    said = false;
                }
                if !said {
                    tracing::warn!(at = %at, error = %e, "fleet cache: cannot hear the store's changes (every read goes to the store); trying again each {RETRY_AFTER:?}");
                    said = true;
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        });
    }
}

/// One listening connection, until it fails: whether it was heard (the cache went live), and
/// why it ended.
async fn listen_once(config: &tokio_postgres::Config, cache: &Cache) -> (bool, FleetError) {
    let what = "listen for the store's changes";
    let (client, mut connection) = match config.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return (false, error(what, e)),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let conn = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(AsyncMessage::Notice(n)) => {
                    tracing::debug!(notice = %n, "fleet cache: a notice of the store");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "fleet cache: the listening connection failed");
                    break;
                }
            }
        }
    });
    let mut heard = false;
    let ended: FleetError = async {
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            return error(what, e);
        }
        cache.set_live(true);
        heard = true;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(p) => cache.changed(&p),
                    None => return FleetError::StoreUnavailable {
                        what,
                        message: "the listening connection ended".into(),
                    },
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, client.batch_execute("SELECT 1")).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return error(what, e),
                        Err(_) => return FleetError::StoreUnavailable {
                            what,
                            message: format!("no answer to a ping within {PING_TIMEOUT:?}"),
                        },
                    }
                }
            }
        }
    }
    .await;
    // not live before the connection goes: nothing kept past the last notification heard
    cache.set_live(false);
    conn.abort();
    (heard, ended)
}

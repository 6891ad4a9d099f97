//! The engine's state database: SQLite in the engine home, shared by every process that uses the
//! same home (WAL mode, busy timeout). Machine records, their labels, and name reservations (the
//! primary key: of two processes creating the same name, one wins).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::record::Record;
use crate::error::{Error, Result};

/// Schema migrations; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: machines and labels
    "CREATE TABLE machines (
         name TEXT PRIMARY KEY,
         record TEXT NOT NULL,
         updated_unix INTEGER NOT NULL
     );
     CREATE TABLE labels (
         name TEXT NOT NULL REFERENCES machines(name) ON DELETE CASCADE,
         key TEXT NOT NULL,
         value TEXT NOT NULL,
         PRIMARY KEY (name, key)
     );
     CREATE INDEX labels_kv ON labels(key, value);",
];

/// Runs the blocking `f` (SQLite, file-system work) on tokio's blocking pool, so the async
/// runtime's threads never wait on the disk. `path` names what it works on, for the error a
/// panic of `f` becomes.
pub(crate) async fn blocking<T, F>(path: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Storage {
            path: path.to_path_buf(),
            message: format!("the engine's storage task failed: {e}"),
        })?
}

/// The state database. Its methods block (SQLite); async callers go through
/// [`StateDb::call`].
#[derive(Debug)]
pub struct StateDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn db_error(path: &Path, e: rusqlite::Error) -> Error {
    let full = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull);
    let readonly = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ReadOnly || f.code == ErrorCode::CannotOpen);
    if full {
        Error::NoSpace {
            detail: format!("engine state {}: {e}", path.display()),
        }
    } else if readonly {
        Error::Storage {
            path: path.to_path_buf(),
            message: format!("cannot write the engine state: {e}"),
        }
    } else {
        Error::Storage {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

impl StateDb {
    /// Opens (creating and migrating as needed) `<home>/state.db`.
    pub fn open(home: &Path) -> Result<Self> {
        std::fs::create_dir_all(home).map_err(|e| Error::Storage {
            path: home.to_path_buf(),
            message: format!("cannot create the engine home: {e}"),
        })?;
        let path = home.join("state.db");
        // Switching a new database to WAL takes an exclusive lock that SQLite does not wait for:
        // two processes opening a fresh home at once can see "database is locked". Retry.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            match Self::try_open(&path) {
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == ErrorCode::DatabaseBusy || f.code == ErrorCode::DatabaseLocked =>
                {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::Storage {
                            path,
                            message: "the state database stayed locked for 15 s".into(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(db_error(&path, e)),
                Ok(conn) => {
                    let db = StateDb {
                        conn: Mutex::new(conn),
                        path,
                    };
                    db.migrate()?;
                    return Ok(db);
                }
            }
        }
    }

    /// Runs `f` with this database on the blocking pool (see [`blocking`]).
    pub(crate) async fn call<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        F: FnOnce(&StateDb) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        let path = self.path.clone();
        blocking(&path, move || f(&db)).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn try_open(path: &Path) -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(15))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;",
        )?;
        Ok(conn)
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn.lock().expect("db lock");
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| db_error(&self.path, e))?;
        let version: usize = tx
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .map_err(|e| db_error(&self.path, e))? as usize;
        if version > MIGRATIONS.len() {
            return Err(Error::Storage {
                path: self.path.clone(),
                message: format!(
                    "the state database has schema {version}, newer than this build ({}); upgrade smol",
                    MIGRATIONS.len()
                ),
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(m).map_err(|e| db_error(&self.path, e))?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                .map_err(|e| db_error(&self.path, e))?;
        }
        tx.commit().map_err(|e| db_error(&self.path, e))
    }

    /// Schema version in use.
    pub fn schema_version(&self) -> Result<u32> {
        let conn = self.conn.lock().expect("db lock");
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .map(|v| v as u32)
            .map_err(|e| db_error(&self.path, e))
    }

    fn write_labels(tx: &rusqlite::Transaction<'_>, rec: &Record) -> rusqlite::Result<()> {
        tx.execute("DELETE FROM labels WHERE name = ?1", params![rec.name])?;
        for (k, v) in &rec.labels {
            tx.execute(
                "INSERT INTO labels(name, key, value) VALUES (?1, ?2, ?3)",
                params![rec.name, k, v],
            )?;
        }
        Ok(())
    }

    /// Reserves the record's name and stores it. A taken name is `Error::Conflict`.
    pub fn insert(&self, rec: &Record) -> Result<()> {
        let body = serde_json::to_string(rec).expect("record serializes");
        let mut conn = self.conn.lock().expect("db lock");
        let tx = conn.transaction().map_err(|e| db_error(&self.path, e))?;
        match tx.execute(
            "INSERT INTO machines(name, record, updated_unix) VALUES (?1, ?2, ?3)",
            params![rec.name, body, super::record::now_unix() as i64],
        ) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == ErrorCode::ConstraintViolation =>
            {
                return Err(Error::Conflict {
                    name: rec.name.clone(),
                })
            }
            Err(e) => return Err(db_error(&self.path, e)),
        }
        Self::write_labels(&tx, rec).map_err(|e| db_error(&self.path, e))?;
        tx.commit().map_err(|e| db_error(&self.path, e))
    }

    /// Replaces a stored record (no-op when it was deleted meanwhile).
    pub fn update(&self, rec: &Record) -> Result<()> {
        let body = serde_json::to_string(rec).expect("record serializes");
        let mut conn = self.conn.lock().expect("db lock");
        let tx = conn.transaction().map_err(|e| db_error(&self.path, e))?;
        let n = tx
            .execute(
                "UPDATE machines SET record = ?2, updated_unix = ?3 WHERE name = ?1",
                params![rec.name, body, super::record::now_unix() as i64],
            )
            .map_err(|e| db_error(&self.path, e))?;
        if n > 0 {
            Self::write_labels(&tx, rec).map_err(|e| db_error(&self.path, e))?;
        }
        tx.commit().map_err(|e| db_error(&self.path, e))
    }

    /// The record of `name`.
    pub fn get(&self, name: &str) -> Result<Option<Record>> {
        let conn = self.conn.lock().expect("db lock");
        let body: Option<String> = conn
            .query_row(
                "SELECT record FROM machines WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_error(&self.path, e))?;
        body.map(|b| self.parse(&b)).transpose()
    }

    fn parse(&self, body: &str) -> Result<Record> {
        serde_json::from_str(body).map_err(|e| Error::Storage {
            path: self.path.clone(),
            message: format!("unreadable machine record: {e}"),
        })
    }

    /// Every record carrying all of `labels` (all records for an empty filter), by name.
    pub fn list(&self, labels: &BTreeMap<String, String>) -> Result<Vec<Record>> {
        let conn = self.conn.lock().expect("db lock");
        let mut sql = String::from("SELECT record FROM machines m WHERE 1=1");
        let mut args: Vec<String> = Vec::new();
        for (k, v) in labels {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM labels l WHERE l.name = m.name AND l.key = ?{} AND l.value = ?{})",
                args.len() + 1,
                args.len() + 2
            ));
            args.push(k.clone());
            args.push(v.clone());
        }
        sql.push_str(" ORDER BY name");
        let mut stmt = conn.prepare(&sql).map_err(|e| db_error(&self.path, e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                r.get::<_, String>(0)
            })
            .map_err(|e| db_error(&self.path, e))?;
        let mut out = Vec::new();
        for body in rows {
            out.push(self.parse(&body.map_err(|e| db_error(&self.path, e))?)?);
        }
        Ok(out)
    }

    /// Forgets a machine.
    pub fn delete(&self, name: &str) -> Result<()> {
        let conn = self.conn.lock().expect("db lock");
        conn.execute("DELETE FROM machines WHERE name = ?1", params![name])
            .map_err(|e| db_error(&self.path, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> Record {
        Record::for_test(name)
    }

    #[test]
    fn paused_is_stored_and_a_record_without_it_is_not_paused() {
        let home = tempfile::tempdir().unwrap();
        let db = StateDb::open(home.path()).unwrap();
        let mut rec = record("p");
        rec.paused = true;
        db.insert(&rec).unwrap();
        assert!(db.get("p").unwrap().unwrap().paused);
        rec.paused = false;
        db.update(&rec).unwrap();
        assert!(!db.get("p").unwrap().unwrap().paused);
        // a record stored before the field existed
        let mut old = serde_json::to_value(record("old")).unwrap();
        old.as_object_mut().unwrap().remove("paused");
        let old: Record = serde_json::from_value(old).unwrap();
        assert!(!old.paused);
    }

    #[test]
    fn reserve_update_list_delete() {
        let home = tempfile::tempdir().unwrap();
        let db = StateDb::open(home.path()).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let mut a = record("a");
        a.labels.insert("team".into(), "x".into());
        db.insert(&a).unwrap();
        assert!(matches!(db.insert(&a), Err(Error::Conflict { .. })));
        let mut b = record("b");
        b.labels.insert("team".into(), "y".into());
        db.insert(&b).unwrap();
        b.cpus = 2;
        db.update(&b).unwrap();
        assert_eq!(db.get("b").unwrap().unwrap().cpus, 2);
        let all = db.list(&BTreeMap::new()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let x = db
            .list(&BTreeMap::from([("team".to_string(), "x".to_string())]))
            .unwrap();
        assert_eq!(x.len(), 1);
        assert_eq!(x[0].name, "a");
        db.delete("a").unwrap();
        assert!(db.get("a").unwrap().is_none());
        // reopening keeps data and does not re-run migrations
        drop(db);
        let db = StateDb::open(home.path()).unwrap();
        assert_eq!(db.list(&BTreeMap::new()).unwrap().len(), 1);
    }

    #[test]
    fn two_processes_worth_of_connections_reserve_names_once() {
        let home = tempfile::tempdir().unwrap();
        let dbs: Vec<StateDb> = (0..4)
            .map(|_| StateDb::open(home.path()).unwrap())
            .collect();
        let won = std::thread::scope(|s| {
            let hs: Vec<_> = dbs
                .iter()
                .map(|db| s.spawn(move || db.insert(&record("same")).is_ok()))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .filter(|w| *w)
                .count()
        });
        assert_eq!(won, 1);
    }

    /// Many connections opening a fresh home at once (as processes do) all succeed.
    #[test]
    fn concurrent_first_open() {
        for _ in 0..5 {
            let home = tempfile::tempdir().unwrap();
            let ok = std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| StateDb::open(home.path()).is_ok()))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap())
                    .filter(|o| *o)
                    .count()
            });
            assert_eq!(ok, 6);
        }
    }

    /// The async path: many tasks at once, each on the blocking pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_run_off_the_runtime() {
        let home = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(home.path()).unwrap());
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(
                    async move { db.call(move |d| d.insert(&record(&format!("m{i}")))).await },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let n = db.call(|d| d.list(&BTreeMap::new())).await.unwrap().len();
        assert_eq!(n, 20);
        let e = db.call(|d| d.insert(&record("m3"))).await.unwrap_err();
        assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    }

    #[test]
    fn newer_schema_is_refused() {
        let home = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(home.path().join("state.db")).unwrap();
            c.execute_batch("PRAGMA user_version = 99").unwrap();
        }
        let e = StateDb::open(home.path()).unwrap_err();
        assert!(e.to_string().contains("newer than this build"), "{e}");
    }
}

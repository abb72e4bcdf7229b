//! The ledger's file: `usage.sqlite3` under `state_dir`, one row per key,
//! model and UTC hour, added to in one transaction per flush.
//!
//! SQLite because it is embedded (nothing to run beside the gateway), the
//! file survives crashes once a transaction committed (WAL), several
//! processes may write it at once (the two sides of a hand-over), and an
//! operator can read it with the `sqlite3` shell. Must not import anything
//! outside the ledger.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection};

use super::{Counts, Row};

pub const FILE_NAME: &str = "usage.sqlite3";

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn db_err(path: &Path, e: rusqlite::Error) -> String {
    format!("{}: {e}", path.display())
}

impl Store {
    /// Opens (or creates) the file in `dir`.
    pub fn open(dir: &Path) -> Result<Store, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("state_dir {}: cannot create: {e}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let conn = Connection::open(&path).map_err(|e| db_err(&path, e))?;
        Self::init(conn, path)
    }

    /// Opens an existing file only (for `llm-edge usage`).
    pub fn open_existing(dir: &Path) -> Result<Store, String> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Err(format!(
                "{}: no usage ledger here yet (the gateway creates it on start with this state_dir)",
                path.display()
            ));
        }
        let conn = Connection::open(&path).map_err(|e| db_err(&path, e))?;
        Self::init(conn, path)
    }

    fn init(conn: Connection, path: PathBuf) -> Result<Store, String> {
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| db_err(&path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS usage (
                 key TEXT NOT NULL,
                 model TEXT NOT NULL,
                 hour INTEGER NOT NULL,
                 requests INTEGER NOT NULL DEFAULT 0,
                 prompt_tokens INTEGER NOT NULL DEFAULT 0,
                 cached_tokens INTEGER NOT NULL DEFAULT 0,
                 completion_tokens INTEGER NOT NULL DEFAULT 0,
                 errors INTEGER NOT NULL DEFAULT 0,
                 cancelled INTEGER NOT NULL DEFAULT 0,
                 gpu_ms INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (key, model, hour)
             ) WITHOUT ROWID;",
        )
        .map_err(|e| db_err(&path, e))?;
        Ok(Store { conn, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `rows` to what the file holds, all or nothing.
    pub fn add(&mut self, rows: &[Row]) -> Result<(), String> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| db_err(&path, e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO usage (key, model, hour, requests, prompt_tokens, cached_tokens,
                         completion_tokens, errors, cancelled, gpu_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (key, model, hour) DO UPDATE SET
                         requests = requests + excluded.requests,
                         prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                         cached_tokens = cached_tokens + excluded.cached_tokens,
                         completion_tokens = completion_tokens + excluded.completion_tokens,
                         errors = errors + excluded.errors,
                         cancelled = cancelled + excluded.cancelled,
                         gpu_ms = gpu_ms + excluded.gpu_ms",
                )
                .map_err(|e| db_err(&path, e))?;
            for r in rows {
                let c = &r.counts;
                stmt.execute(params![
                    r.key,
                    r.model,
                    r.hour as i64,
                    c.requests as i64,
                    c.prompt_tokens as i64,
                    c.cached_tokens as i64,
                    c.completion_tokens as i64,
                    c.errors as i64,
                    c.cancelled as i64,
                    c.gpu_ms as i64,
                ])
                .map_err(|e| db_err(&path, e))?;
            }
        }
        tx.commit().map_err(|e| db_err(&path, e))
    }

    /// Prompt plus completion tokens per key from `since_hour` on.
    pub fn tokens_since(&self, since_hour: u64) -> Result<HashMap<String, u64>, String> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, SUM(prompt_tokens + completion_tokens) FROM usage
                 WHERE hour >= ?1 GROUP BY key",
            )
            .map_err(|e| db_err(&self.path, e))?;
        let rows = stmt
            .query_map([since_hour as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(|e| db_err(&self.path, e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (key, n) = row.map_err(|e| db_err(&self.path, e))?;
            out.insert(key, n.max(0) as u64);
        }
        Ok(out)
    }

    pub fn rows(&self, since_hour: u64) -> Result<Vec<Row>, String> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, model, hour, requests, prompt_tokens, cached_tokens,
                        completion_tokens, errors, cancelled, gpu_ms
                 FROM usage WHERE hour >= ?1 ORDER BY hour, key, model",
            )
            .map_err(|e| db_err(&self.path, e))?;
        let rows = stmt
            .query_map([since_hour as i64], |r| {
                let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(Row {
                    key: r.get(0)?,
                    model: r.get(1)?,
                    hour: n(2)?,
                    counts: Counts {
                        requests: n(3)?,
                        prompt_tokens: n(4)?,
                        cached_tokens: n(5)?,
                        completion_tokens: n(6)?,
                        errors: n(7)?,
                        cancelled: n(8)?,
                        gpu_ms: n(9)?,
                    },
                })
            })
            .map_err(|e| db_err(&self.path, e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_err(&self.path, e))
    }
}

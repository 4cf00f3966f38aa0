//! Versioned schema migrations, embedded in the binary.
//!
//! Each version is one SQL file per backend (`migrations/NNNN_name.*.sql`),
//! applied in its own transaction and recorded in `schema_migrations` with
//! the SHA-256 of its text. A recorded version whose text changed is a
//! start-up error (someone edited a migration that already ran: write a new
//! one instead). A database newer than this binary is refused too, so an old
//! host never writes to a schema it does not know. On PostgreSQL an advisory
//! lock makes hosts starting together take turns.
//!
//! A hand-written runner rather than `refinery` or `sqlx migrate`: it is a
//! page of code, and those tie us to a `rusqlite`/`libsqlite3-sys` version
//! (sqlx's SQLite driver cannot link beside rusqlite 0.37).

use sha2::{Digest, Sha256};

use super::db::{Db, DbError, Kind};

/// One migration: version, name and its SQL for each backend.
struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "init",
    sqlite: include_str!("migrations/0001_init.sqlite.sql"),
    postgres: include_str!("migrations/0001_init.postgres.sql"),
}];

/// The newest schema version this binary knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

const CREATE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at BIGINT NOT NULL)";

/// Brings `db` to the latest schema; returns the versions it applied.
pub async fn migrate(db: &Db) -> Result<Vec<i64>, DbError> {
    match db.kind() {
        Kind::Sqlite => {
            let db2 = db.clone();
            tokio::task::spawn_blocking(move || {
                db2.sqlite(|c| {
                    c.execute_batch(CREATE)?;
                    let mut applied = Vec::new();
                    for m in MIGRATIONS {
                        // IMMEDIATE takes the write lock first, so two
                        // processes opening one file cannot both apply.
                        let tx =
                            c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                        let done: Option<String> = tx
                            .query_row(
                                "SELECT checksum FROM schema_migrations WHERE version = ?1",
                                [m.version],
                                |r| r.get(0),
                            )
                            .map(Some)
                            .or_else(|e| match e {
                                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                                e => Err(e),
                            })?;
                        match done {
                            Some(sum) if sum == checksum(m.sqlite) => continue,
                            Some(_) => return Ok(Err(changed(m))),
                            None => {}
                        }
                        tx.execute_batch(m.sqlite)?;
                        tx.execute(
                            "INSERT INTO schema_migrations VALUES (?1, ?2, ?3, ?4)",
                            rusqlite::params![m.version, m.name, checksum(m.sqlite), super::now()],
                        )?;
                        tx.commit()?;
                        applied.push(m.version);
                    }
                    let newest: i64 = c.query_row(
                        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                        [],
                        |r| r.get(0),
                    )?;
                    Ok(too_new(newest).map_or(Ok(applied), Err))
                })
            })
            .await
            .map_err(|e| DbError::Other(e.to_string()))??
        }
        Kind::Postgres => {
            db.postgres(|client| {
                Box::pin(async move {
                    // Hosts starting together take turns: the session lock
                    // is taken before anything, even the bookkeeping table
                    // (`CREATE TABLE IF NOT EXISTS` is not safe to race).
                    client
                        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
                        .await?;
                    let outcome = postgres(client).await;
                    let unlocked = client
                        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
                        .await;
                    let outcome = outcome?;
                    unlocked?;
                    Ok(outcome)
                })
            })
            .await?
        }
    }
}

/// The advisory lock's key ("realm" in ASCII).
const LOCK: i64 = 1_919_246_957;

async fn postgres(
    client: &mut tokio_postgres::Client,
) -> Result<Result<Vec<i64>, DbError>, tokio_postgres::Error> {
    client.batch_execute(CREATE).await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let tx = client.transaction().await?;
        let done = tx
            .query_opt(
                "SELECT checksum FROM schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await?
            .map(|r| r.get::<_, String>(0));
        match done {
            Some(sum) if sum == checksum(m.postgres) => continue,
            Some(_) => return Ok(Err(changed(m))),
            None => {}
        }
        tx.batch_execute(m.postgres).await?;
        tx.execute(
            "INSERT INTO schema_migrations VALUES ($1, $2, $3, $4)",
            &[&m.version, &m.name, &checksum(m.postgres), &super::now()],
        )
        .await?;
        tx.commit().await?;
        applied.push(m.version);
    }
    let newest: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    Ok(too_new(newest).map_or(Ok(applied), Err))
}

fn changed(m: &Migration) -> DbError {
    DbError::Other(format!(
        "migration {:04} ({}) in the database differs from this binary's: a migration that ran must not change",
        m.version, m.name
    ))
}

fn too_new(newest: i64) -> Option<DbError> {
    (newest > latest()).then(|| {
        DbError::Other(format!(
            "the database has schema version {newest}, newer than this binary's {}: upgrade realm-host",
            latest()
        ))
    })
}

//! One database interface over the two backends: SQLite (embedded, the
//! default) and PostgreSQL (for fleets sharing one database).
//!
//! Statements are written once, with `$1..$n` placeholders and types both
//! databases share (`BIGINT` unix seconds for every time, `TEXT` for the
//! rest), so the stores above never ask which backend they talk to. Values
//! are only integers, text and NULL: no date or JSON type mapping to keep in
//! sync between the two.
//!
//! SQLite runs on the blocking pool behind one connection (its writes are
//! serialized anyway); PostgreSQL is one connection (TLS as the URL's
//! `sslmode` asks, verified against the system's authorities) that
//! reconnects after an error. The control plane's traffic is small (admin calls, a ledger
//! flush a second, a revision poll), and no request's authentication waits
//! on the database, so neither needs a pool.

use std::sync::{Arc, Mutex};

use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// A value bound to, or read from, a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer (`BIGINT`).
    Int(i64),
    /// Text.
    Text(String),
}

impl Value {
    /// The integer, or 0 for NULL and text.
    pub fn int(&self) -> i64 {
        match self {
            Value::Int(n) => *n,
            _ => 0,
        }
    }

    /// The integer, or `None` for NULL.
    pub fn opt_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// The text, or "" for NULL.
    pub fn text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Int(n) => n.to_string(),
            Value::Null => String::new(),
        }
    }

    /// The text, or `None` for NULL.
    pub fn opt_text(&self) -> Option<String> {
        match self {
            Value::Text(s) => Some(s.clone()),
            Value::Int(n) => Some(n.to_string()),
            Value::Null => None,
        }
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// One statement and its parameters.
pub type Statement = (&'static str, Vec<Value>);

/// A result row.
pub type Row = Vec<Value>;

/// Why a statement failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A unique or foreign-key constraint refused the change.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database could not be opened or reached.
    #[error("cannot reach the database: {0}")]
    Connect(String),
    /// Anything else the database reported.
    #[error("database error: {0}")]
    Other(String),
}

/// A database connection of either backend.
#[derive(Clone)]
pub struct Db {
    backend: Arc<Backend>,
}

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Postgres),
}

struct Postgres {
    url: String,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match &*self.backend {
            Backend::Sqlite(_) => "Db(sqlite)",
            Backend::Postgres(_) => "Db(postgres)",
        })
    }
}

/// Which backend a database is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Db {
    /// Opens `url`: `postgres://…` (or `postgresql://…`) connects to a
    /// server; `sqlite:PATH` or a plain path opens (creating) a file.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pg = Postgres {
                url: url.to_string(),
                client: tokio::sync::Mutex::new(None),
            };
            // Connect now, so a wrong URL fails at start.
            *pg.client.lock().await = Some(pg.connect().await?);
            return Ok(Db {
                backend: Arc::new(Backend::Postgres(pg)),
            });
        }
        let path = std::path::PathBuf::from(url.strip_prefix("sqlite:").unwrap_or(url));
        let connection = tokio::task::spawn_blocking(move || open_sqlite(&path))
            .await
            .map_err(|e| DbError::Connect(e.to_string()))??;
        Ok(Db {
            backend: Arc::new(Backend::Sqlite(Mutex::new(connection))),
        })
    }

    /// Which backend this is.
    pub fn kind(&self) -> Kind {
        match &*self.backend {
            Backend::Sqlite(_) => Kind::Sqlite,
            Backend::Postgres(_) => Kind::Postgres,
        }
    }

    /// Runs a query and returns its rows.
    pub async fn query(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, DbError> {
        match &*self.backend {
            Backend::Sqlite(_) => {
                let db = self.clone();
                blocking(move || db.sqlite(|c| sqlite_query(c, sql, &params))).await
            }
            Backend::Postgres(pg) => {
                let sql = sql.to_string();
                pg.with(move |client| {
                    Box::pin(async move {
                        let refs = pg_params(&params);
                        let rows = client.query(sql.as_str(), &refs).await?;
                        Ok(rows.iter().map(pg_row).collect())
                    })
                })
                .await
            }
        }
    }

    /// Runs `statements` in one transaction: all apply, or none. Returns the
    /// rows each changed.
    pub async fn batch(&self, statements: Vec<Statement>) -> Result<Vec<u64>, DbError> {
        self.run_batch(statements, false)
            .await
            .map(|r| r.unwrap_or_default())
    }

    /// Runs `guard` and then `rest` in one transaction, unless `guard`
    /// changes no row: then nothing applies and the answer is `false`. A
    /// check-then-write that cannot race (`UPDATE … WHERE source = 'api'`
    /// first, then the rows that depend on it).
    pub async fn batch_if(&self, guard: Statement, rest: Vec<Statement>) -> Result<bool, DbError> {
        let mut statements = vec![guard];
        statements.extend(rest);
        Ok(self.run_batch(statements, true).await?.is_some())
    }

    /// The batch; with `guarded`, `None` (rolled back) when the first
    /// statement changed nothing.
    async fn run_batch(
        &self,
        statements: Vec<Statement>,
        guarded: bool,
    ) -> Result<Option<Vec<u64>>, DbError> {
        match &*self.backend {
            Backend::Sqlite(_) => {
                let db = self.clone();
                blocking(move || {
                    db.sqlite(|c| {
                        let tx = c.transaction()?;
                        let mut changed = Vec::with_capacity(statements.len());
                        for (sql, params) in &statements {
                            let sql = sqlite_sql(sql);
                            let mut stmt = tx.prepare_cached(&sql)?;
                            let bound: Vec<&dyn rusqlite::ToSql> =
                                params.iter().map(|p| p as &dyn rusqlite::ToSql).collect();
                            changed.push(stmt.execute(bound.as_slice())? as u64);
                            if guarded && changed == [0] {
                                // Dropping the transaction rolls it back.
                                return Ok(None);
                            }
                        }
                        tx.commit()?;
                        Ok(Some(changed))
                    })
                })
                .await
            }
            Backend::Postgres(pg) => {
                pg.with(move |client| {
                    Box::pin(async move {
                        let tx = client.transaction().await?;
                        let mut changed = Vec::with_capacity(statements.len());
                        for (sql, params) in &statements {
                            let refs = pg_params(params);
                            changed.push(tx.execute(*sql, &refs).await?);
                            if guarded && changed == [0] {
                                tx.rollback().await?;
                                return Ok(None);
                            }
                        }
                        tx.commit().await?;
                        Ok(Some(changed))
                    })
                })
                .await
            }
        }
    }

    /// Runs `f` on the SQLite connection (blocking).
    pub(crate) fn sqlite<T>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        match &*self.backend {
            Backend::Sqlite(c) => {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                f(&mut c).map_err(sqlite_error)
            }
            Backend::Postgres(_) => Err(DbError::Other("not a SQLite database".into())),
        }
    }

    /// Runs `f` on the PostgreSQL client, reconnecting first if needed.
    pub(crate) async fn postgres<T: Send + 'static>(
        &self,
        f: impl for<'c> FnOnce(&'c mut tokio_postgres::Client) -> PgFuture<'c, T> + Send,
    ) -> Result<T, DbError> {
        match &*self.backend {
            Backend::Postgres(pg) => pg.with(f).await,
            Backend::Sqlite(_) => Err(DbError::Other("not a PostgreSQL database".into())),
        }
    }
}

/// A future borrowing the PostgreSQL client.
pub(crate) type PgFuture<'c, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DbError::Other(format!("database task failed: {e}")))?
}

fn open_sqlite(path: &std::path::Path) -> Result<rusqlite::Connection, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| DbError::Connect(format!("{}: {e}", dir.display())))?;
    }
    let c = rusqlite::Connection::open(path)
        .map_err(|e| DbError::Connect(format!("{}: {e}", path.display())))?;
    // WAL keeps readers off the writer's back; `synchronous=FULL` makes a
    // committed ledger flush survive a power cut, not just a crash.
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;",
    )
    .map_err(|e| DbError::Connect(format!("{}: {e}", path.display())))?;
    Ok(c)
}

/// `$N` placeholders as SQLite's `?N` (SQLite would read `$1` as a named
/// parameter, bound by order of first appearance rather than by number).
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite_query(
    c: &mut rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> rusqlite::Result<Vec<Row>> {
    let sql = sqlite_sql(sql);
    let mut stmt = c.prepare_cached(&sql)?;
    let columns = stmt.column_count();
    let bound: Vec<&dyn rusqlite::ToSql> =
        params.iter().map(|p| p as &dyn rusqlite::ToSql).collect();
    let mut rows = stmt.query(bound.as_slice())?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Value::Null,
                rusqlite::types::ValueRef::Integer(n) => Value::Int(n),
                rusqlite::types::ValueRef::Real(x) => Value::Int(x as i64),
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                    Value::Text(String::from_utf8_lossy(t).into_owned())
                }
            });
        }
        out.push(values);
    }
    Ok(out)
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(*n)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

fn sqlite_error(e: rusqlite::Error) -> DbError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => DbError::Conflict(e.to_string()),
        _ => DbError::Other(e.to_string()),
    }
}

impl Postgres {
    async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        let (client, connection) = tokio_postgres::connect(&self.url, tls()?)
            .await
            .map_err(|e| DbError::Connect(pg_message(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "the database connection ended");
            }
        });
        Ok(client)
    }

    async fn with<T>(
        &self,
        f: impl for<'c> FnOnce(&'c mut tokio_postgres::Client) -> PgFuture<'c, T>,
    ) -> Result<T, DbError> {
        let mut slot = self.client.lock().await;
        let client = match slot.take() {
            Some(client) if !client.is_closed() => slot.insert(client),
            _ => slot.insert(self.connect().await?),
        };
        let result = f(client).await;
        result.map_err(|e| {
            if e.is_closed() {
                *slot = None;
            }
            pg_error(&e)
        })
    }
}

/// TLS for PostgreSQL, verified against the system's certificate
/// authorities. The URL's `sslmode` decides: `prefer` (the default) uses
/// TLS when the server offers it, `require` refuses a server without it,
/// `disable` never uses it.
fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates leave the store empty: a `require`
    // connection then fails to verify, and says so.
    for cert in rustls_native_certs::load_native_certs().unwrap_or_default() {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DbError::Connect(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The server's message, or the error with its causes (a TLS handshake's
/// reason is in its source).
fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn pg_error(e: &tokio_postgres::Error) -> DbError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::FOREIGN_KEY_VIOLATION => {
            DbError::Conflict(pg_message(e))
        }
        _ if e.is_closed() => DbError::Connect(pg_message(e)),
        _ => DbError::Other(pg_message(e)),
    }
}

fn pg_params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn pg_row(row: &tokio_postgres::Row) -> Row {
    (0..row.len())
        .map(|i| match *row.columns()[i].type_() {
            Type::INT8 => row.get::<_, Option<i64>>(i).into(),
            Type::INT4 => row.get::<_, Option<i32>>(i).map(i64::from).into(),
            Type::INT2 => row.get::<_, Option<i16>>(i).map(i64::from).into(),
            Type::BOOL => row.get::<_, Option<bool>>(i).map(i64::from).into(),
            _ => row
                .try_get::<_, Option<String>>(i)
                .unwrap_or_default()
                .into(),
        })
        .collect()
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8 | Type::INT4 | Type::INT2 | Type::BOOL | Type::TEXT | Type::VARCHAR
        )
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_sqlite() {
        assert_eq!(
            sqlite_sql("SELECT $2, $1 WHERE x = '$'"),
            "SELECT ?2, ?1 WHERE x = '$'"
        );
    }

    #[tokio::test]
    async fn sqlite_batches_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("t.db").to_str().unwrap())
            .await
            .unwrap();
        db.batch(vec![(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, name TEXT)",
            vec![],
        )])
        .await
        .unwrap();
        let err = db
            .batch(vec![
                ("INSERT INTO t VALUES ($1, $2)", vec![1.into(), "a".into()]),
                ("INSERT INTO t VALUES ($1, $2)", vec![1.into(), "b".into()]),
            ])
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::Conflict(_)), "{err}");
        let rows = db.query("SELECT COUNT(*) FROM t", vec![]).await.unwrap();
        assert_eq!(
            rows,
            vec![vec![Value::Int(0)]],
            "nothing of a failed batch stays"
        );
    }
}

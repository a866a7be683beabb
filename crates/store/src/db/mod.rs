//! The store's seam to its databases: statements as values, rows, and a transaction trait
//! that each backend's driver implements — SQLite (`sqlite`: rusqlite, every write on the one
//! write thread) and PostgreSQL (`postgres`: tokio-postgres over a deadpool pool).
//!
//! Domain transactions are written once, as async functions over `&mut dyn Tx`, in the
//! store's domain modules; the SQL they send is portable (`$n` parameters, `RETURNING`,
//! `ON CONFLICT`, `CAST`, `CASE` instead of two-argument `MIN`/`MAX`), and the few places where
//! the dialects differ ask [`Tx::dialect`]. Only this module and the drivers below it touch a
//! database library.

pub(crate) mod pg_tools;
pub(crate) mod postgres;
pub(crate) mod sqlite;
pub(crate) mod sqlite_backup;
mod sqlite_wal_writes;
pub mod statement_profile;

use crate::{Result, StoreError};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Which SQL a transaction speaks, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// `LIMIT` by the parameter `param` (`"$3"`). Cast, not bare: SQLite (3.51) plans with a bare
/// parameter's value there, so each new binding made it parse and plan the statement again
/// (every hand-off's read of ready batch nodes, every claim).
pub(crate) fn limit_by(param: &str) -> String {
    format!("LIMIT CAST({param} AS BIGINT)")
}

/// One bound argument or column value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Text(String),
    Int(i64),
    Null,
    /// The values of one column of a [`RowSet`] (PostgreSQL only: an array parameter).
    List(Vec<Value>),
}

/// A value as JSON (a row set's rows travel to SQLite as JSON arrays).
impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Value::Text(t) => s.serialize_str(t),
            Value::Int(n) => s.serialize_i64(*n),
            Value::Null => s.serialize_unit(),
            Value::List(l) => s.collect_seq(l),
        }
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

impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.clone())
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::Int(i64::from(n))
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Int(i64::from(b))
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}

/// A statement with its arguments (`$1` is the first).
#[derive(Debug, Clone)]
pub(crate) struct Stmt {
    pub sql: Cow<'static, str>,
    pub args: Vec<Value>,
}

impl Stmt {
    pub fn new(sql: impl Into<Cow<'static, str>>, args: Vec<Value>) -> Self {
        Self {
            sql: sql.into(),
            args,
        }
    }
}

/// The conditions of a query whose filters are optional: each is in the SQL only when its
/// value is given (never `$n IS NULL OR …`). Each combination is then its own statement, and
/// PostgreSQL plans it with the index that fits: a cached generic plan of
/// `($2 IS NULL OR id > $2) ORDER BY id` reads the table from its start on every page.
#[derive(Default)]
pub(crate) struct Filter {
    conds: Vec<String>,
    args: Vec<Value>,
}

impl Filter {
    /// Binds `v`; its placeholder (`$n`).
    pub fn arg(&mut self, v: impl Into<Value>) -> String {
        self.args.push(v.into());
        format!("${}", self.args.len())
    }

    /// The condition `cond` (its arguments bound with [`Filter::arg`]).
    pub fn and(&mut self, cond: impl Into<String>) -> &mut Self {
        self.conds.push(cond.into());
        self
    }

    /// The condition `cond(p)`, `p` the placeholder of `v`, when `v` is given.
    pub fn given<T: Into<Value>>(
        &mut self,
        v: Option<T>,
        cond: impl FnOnce(&str) -> String,
    ) -> &mut Self {
        if let Some(v) = v {
            let p = self.arg(v);
            self.and(cond(&p));
        }
        self
    }

    /// ` WHERE a AND b …`, or nothing without conditions.
    pub fn clause(&self) -> String {
        if self.conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.conds.join(" AND "))
        }
    }

    /// The statement `sql` with the arguments bound so far.
    pub fn stmt(self, sql: String) -> Stmt {
        Stmt::new(sql, self.args)
    }

    /// One page: `select` with these conditions, in `order`, at most `limit` rows.
    pub fn page(mut self, select: &str, order: &str, limit: i64) -> Stmt {
        let limit = self.arg(limit);
        let sql = format!(
            "{select}{} ORDER BY {order} {}",
            self.clause(),
            limit_by(&limit)
        );
        self.stmt(sql)
    }
}

/// `Stmt::new(sql, vec![a.into(), b.into(), …])`.
macro_rules! stmt {
    ($sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::db::Stmt::new($sql, vec![$($crate::db::Value::from($arg)),*])
    };
}
pub(crate) use stmt;

/// A result row: its columns' names and values.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    names: Arc<[String]>,
    vals: Vec<Value>,
}

impl Row {
    pub fn new(names: Arc<[String]>, vals: Vec<Value>) -> Self {
        Self { names, vals }
    }

    fn at(&self, col: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == col)
            .ok_or_else(|| StoreError::Corrupt("row", format!("no column {col}")))
    }

    fn get(&self, col: &str) -> Result<&Value> {
        Ok(&self.vals[self.at(col)?])
    }

    /// Moves the text of `col` out (leaving NULL): a row read once needs no copy.
    pub fn take_opt_text(&mut self, col: &str) -> Result<Option<String>> {
        let i = self.at(col)?;
        text_of(col, std::mem::replace(&mut self.vals[i], Value::Null))
    }

    /// [`Row::take_opt_text`] of a column that is never NULL.
    pub fn take_text(&mut self, col: &str) -> Result<String> {
        not_null(col, self.take_opt_text(col)?)
    }

    /// The columns' names, in order.
    pub fn columns(&self) -> &[String] {
        &self.names
    }

    /// The values, in column order.
    pub fn values(&self) -> &[Value] {
        &self.vals
    }

    /// The first column as an integer (`COUNT(*)`, `MAX(…)`); `None` when NULL.
    pub fn first_int(&self) -> Result<Option<i64>> {
        match self.vals.first() {
            Some(Value::Int(n)) => Ok(Some(*n)),
            Some(Value::Null) => Ok(None),
            v => Err(StoreError::Corrupt("row", format!("not an integer: {v:?}"))),
        }
    }

    /// The first column as text.
    pub fn first_text(&self) -> Result<Option<String>> {
        match self.vals.first() {
            Some(Value::Text(s)) => Ok(Some(s.clone())),
            Some(Value::Null) => Ok(None),
            v => Err(StoreError::Corrupt("row", format!("not text: {v:?}"))),
        }
    }
}

/// Column access by name, shared by every row type the store reads.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
}

/// The text of column `col`, whose value is `v`; `None` when NULL.
fn text_of(col: &str, v: Value) -> Result<Option<String>> {
    match v {
        Value::Text(s) => Ok(Some(s)),
        Value::Null => Ok(None),
        v => Err(StoreError::Corrupt(
            "row",
            format!("{col} is {v:?}, not text"),
        )),
    }
}

/// The value of column `col`, which must not be NULL.
fn not_null<T>(col: &str, v: Option<T>) -> Result<T> {
    v.ok_or_else(|| StoreError::Corrupt("row", format!("{col} is NULL")))
}

impl Cols for Row {
    fn text(&self, col: &str) -> Result<String> {
        not_null(col, self.opt_text(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        text_of(col, self.get(col)?.clone())
    }
    fn int(&self, col: &str) -> Result<i64> {
        not_null(col, self.opt_int(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        match self.get(col)? {
            Value::Int(n) => Ok(Some(*n)),
            Value::Null => Ok(None),
            v => Err(StoreError::Corrupt(
                "row",
                format!("{col} is {v:?}, not an integer"),
            )),
        }
    }
}

/// A row the database gave as a JSON object (`json_agg` of a table's rows).
impl Cols for serde_json::Map<String, serde_json::Value> {
    fn text(&self, col: &str) -> Result<String> {
        not_null(col, self.opt_text(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        match self.get(col) {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Null) => Ok(None),
            v => Err(StoreError::Corrupt(
                "row",
                format!("{col} is {v:?}, not text"),
            )),
        }
    }
    fn int(&self, col: &str) -> Result<i64> {
        not_null(col, self.opt_int(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        match self.get(col) {
            Some(serde_json::Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
            Some(serde_json::Value::Null) => Ok(None),
            v => Err(StoreError::Corrupt(
                "row",
                format!("{col} is {v:?}, not an integer"),
            )),
        }
    }
}

/// A column of a [`RowSet`]: its name, and whether its values are integers.
pub(crate) type Col = (&'static str, bool);

/// Rows for one set-wise statement (an update joined to them, an insert selecting them), so
/// a statement takes any number of rows on either backend and PostgreSQL runs one statement,
/// not one per row. SQLite reads them from one JSON parameter with `json_each`; PostgreSQL
/// from one array parameter per column with `unnest` (whose row estimate is the array's, so
/// a join to them stays on the index).
pub(crate) struct RowSet {
    cols: &'static [Col],
    rows: Vec<Vec<Value>>,
}

impl RowSet {
    pub fn new(cols: &'static [Col]) -> Self {
        Self { cols, rows: vec![] }
    }

    /// Adds a row: one value per column, in order.
    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.cols.len());
        self.rows.push(row);
    }

    /// The columns, in order.
    pub fn cols(&self) -> &'static [Col] {
        self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The rows as a relation named `v` (`FROM {relation}`), reading this set's parameters
    /// from `$param` on: one on SQLite, one per column on PostgreSQL.
    pub fn relation(&self, dialect: Dialect, param: usize) -> String {
        match dialect {
            Dialect::Sqlite => {
                let sel = self
                    .cols
                    .iter()
                    .enumerate()
                    .map(|(i, (name, _))| format!("r.value ->> {i} AS {name}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("(SELECT {sel} FROM jsonb_each(${param}) AS r) AS v")
            }
            Dialect::Postgres => {
                let arrays = self
                    .cols
                    .iter()
                    .enumerate()
                    .map(|(i, (_, int))| {
                        let ty = if *int { "BIGINT[]" } else { "TEXT[]" };
                        format!("CAST(${} AS {ty})", param + i)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let names = self.cols.iter().map(|c| c.0).collect::<Vec<_>>().join(", ");
                format!("unnest({arrays}) AS v({names})")
            }
        }
    }

    /// The parameters [`RowSet::relation`] reads.
    pub fn args(self, dialect: Dialect) -> Vec<Value> {
        match dialect {
            Dialect::Sqlite => {
                let json =
                    serde_json::to_string(&self.rows).expect("rows of text and integers serialize");
                vec![Value::Text(json)]
            }
            Dialect::Postgres => {
                let mut cols: Vec<Vec<Value>> = self
                    .cols
                    .iter()
                    .map(|_| Vec::with_capacity(self.rows.len()))
                    .collect();
                for row in self.rows {
                    for (c, v) in cols.iter_mut().zip(row) {
                        c.push(v);
                    }
                }
                cols.into_iter().map(Value::List).collect()
            }
        }
    }
}

/// A boxed future borrowing a transaction.
pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One open transaction (or, for reads, one connection) of either backend.
#[async_trait::async_trait]
pub(crate) trait Tx: Send {
    fn dialect(&self) -> Dialect;
    /// The database's clock (ms) when this transaction began, if the backend read it then.
    fn began_at(&self) -> Option<i64> {
        None
    }
    /// The database's clock (ms) now as this pool last read it, advanced by this process's
    /// monotonic clock since (PostgreSQL): for statements sent before the `BEGIN`'s reading
    /// is answered, which check it against that reading.
    fn clock_guess(&self) -> Option<i64> {
        None
    }
    /// Begins the transaction now if the backend defers it to the first statements (then
    /// [`Tx::began_at`] knows the clock without a statement of its own).
    async fn begin_now(&mut self) -> Result<()> {
        Ok(())
    }
    /// Runs a statement; the number of rows it changed.
    async fn exec(&mut self, s: &Stmt) -> Result<u64>;
    /// Runs a query; every row.
    async fn query(&mut self, s: &Stmt) -> Result<Vec<Row>>;
    /// Runs several statements in order (PostgreSQL sends them in one round trip).
    async fn run(&mut self, stmts: &[Stmt]) -> Result<()> {
        for s in stmts {
            self.exec(s).await?;
        }
        Ok(())
    }
    /// Runs a script of statements without arguments (migrations).
    async fn script(&mut self, sql: &str) -> Result<()>;
    /// Runs several queries in order (PostgreSQL sends them in one round trip); each one's rows.
    async fn query_many(&mut self, stmts: &[Stmt]) -> Result<Vec<Vec<Row>>> {
        let mut out = Vec::with_capacity(stmts.len());
        for s in stmts {
            out.push(self.query(s).await?);
        }
        Ok(out)
    }
    /// Runs several statements in order (PostgreSQL sends them in one round trip); each one's
    /// count of changed rows.
    async fn exec_many(&mut self, stmts: &[Stmt]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(stmts.len());
        for s in stmts {
            out.push(self.exec(s).await?);
        }
        Ok(out)
    }

    /// The first row, if any.
    async fn query_opt(&mut self, s: &Stmt) -> Result<Option<Row>> {
        Ok(self.query(s).await?.into_iter().next())
    }
    /// The first row; `Corrupt` when there is none.
    async fn query_one(&mut self, s: &Stmt) -> Result<Row> {
        self.query_opt(s)
            .await?
            .ok_or_else(|| StoreError::Corrupt("query", format!("no row from {}", s.sql)))
    }
}

/// The open database of either backend.
#[derive(Clone)]
pub(crate) enum Db {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Db::Sqlite(_) => "Db::Sqlite",
            Db::Postgres(_) => "Db::Postgres",
        })
    }
}

/// How durable a committed write transaction must be before its commit returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// On disk (PostgreSQL: flushed; SQLite's WAL: written, synced at checkpoints).
    Flushed,
    /// A transition of the engine that is safe to lose with a database server crash: a claim,
    /// a lease renewal, a step's start or completion. Losing it puts the workflow back to
    /// before it, and the step runs again under its idempotency key (with the effects it
    /// committed, which are lost with it). PostgreSQL then commits without waiting for the
    /// flush (`synchronous_commit = off`: visible at once, flushed within milliseconds, and
    /// never reordered before a later flushed commit) — as SQLite's WAL does every commit.
    /// Admissions, approvals and everything a user is told was accepted stay `Flushed`.
    Replayable,
}

impl Db {
    /// Runs `f` in one write transaction: committed when it returns `Ok`, rolled back on `Err`.
    /// On SQLite it runs on the write thread (every write does); on PostgreSQL on a pooled
    /// connection.
    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, std::result::Result<T, E>> + Send + 'static,
    {
        self.write_with(Durability::Flushed, f).await
    }

    /// [`Db::write`] with the given [`Durability`].
    pub async fn write_with<T, E, F>(
        &self,
        durability: Durability,
        f: F,
    ) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, std::result::Result<T, E>> + Send + 'static,
    {
        match self {
            Db::Sqlite(d) => d.write(f).await,
            Db::Postgres(d) => d.write(durability, f).await,
        }
    }

    /// Runs `f` on a reading connection (one consistent snapshot on both backends).
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>> + Send + 'static,
    {
        match self {
            Db::Sqlite(d) => d.read(f).await,
            Db::Postgres(d) => d.read(f).await,
        }
    }

    /// The one number a read of one row answers (a count, a maximum): 0 where it is NULL.
    pub async fn read_int(&self, s: Stmt) -> Result<i64> {
        self.read(move |tx| {
            Box::pin(async move { Ok(tx.query_one(&s).await?.first_int()?.unwrap_or(0)) })
        })
        .await
    }
}

//! Statements as values: SQL text with `?N` parameters and their arguments, built once and
//! run by either of this backend's connections (the async pool's or the write thread's).
//!
//! Writes that both the engine's write thread and the async transactions make — queueing a
//! workflow, ending one, what a resource's hooks do when it ends — are written once as
//! statement lists here instead of once per connection library.

use crate::Result;
use std::borrow::Cow;

/// One bound argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
    Null,
}

impl From<&str> for Arg {
    fn from(s: &str) -> Self {
        Arg::Text(s.to_string())
    }
}

impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(s)
    }
}

impl From<&String> for Arg {
    fn from(s: &String) -> Self {
        Arg::Text(s.clone())
    }
}

impl From<i64> for Arg {
    fn from(n: i64) -> Self {
        Arg::Int(n)
    }
}

impl<T: Into<Arg>> From<Option<T>> for Arg {
    fn from(o: Option<T>) -> Self {
        o.map_or(Arg::Null, Into::into)
    }
}

/// A statement with its arguments (`?1` is the first).
#[derive(Debug, Clone)]
pub(crate) struct Stmt {
    pub sql: Cow<'static, str>,
    pub args: Vec<Arg>,
}

impl Stmt {
    pub fn new(sql: &'static str, args: Vec<Arg>) -> Self {
        Self {
            sql: Cow::Borrowed(sql),
            args,
        }
    }
}

/// `Stmt::new(sql, vec![a.into(), b.into(), …])`.
macro_rules! stmt {
    ($sql:expr $(, $arg:expr)* $(,)?) => {
        $crate::stmt::Stmt::new($sql, vec![$($crate::stmt::Arg::from($arg)),*])
    };
}
pub(crate) use stmt;

/// Runs `stmts` in order on an async (sqlx) connection, inside the caller's transaction.
pub(crate) async fn run_async(conn: &mut sqlx::SqliteConnection, stmts: &[Stmt]) -> Result<()> {
    for s in stmts {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(s.sql.to_string()));
        for a in &s.args {
            q = match a {
                Arg::Text(t) => q.bind(t.clone()),
                Arg::Int(n) => q.bind(*n),
                Arg::Null => q.bind(None::<String>),
            };
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Runs `stmts` in order on the write thread's connection, inside its transaction.
pub(crate) fn run_blocking(conn: &rusqlite::Connection, stmts: &[Stmt]) -> Result<()> {
    for s in stmts {
        let mut st = conn.prepare_cached(&s.sql)?;
        for (i, a) in s.args.iter().enumerate() {
            match a {
                Arg::Text(t) => st.raw_bind_parameter(i + 1, t)?,
                Arg::Int(n) => st.raw_bind_parameter(i + 1, n)?,
                Arg::Null => st.raw_bind_parameter(i + 1, rusqlite::types::Null)?,
            }
        }
        st.raw_execute()?;
    }
    Ok(())
}

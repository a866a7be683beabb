//! The SQLite driver: rusqlite connections. Every write transaction runs on the store's one
//! write thread (`commit`), which also group-commits step completions; reads run on a small
//! pool of reading connections off the async runtime. WAL mode lets both go on at once.

use super::{BoxFut, Dialect, Row, Stmt, Tx, Value};
use crate::commit::Job;
use crate::{Result, StoreError};
use rusqlite::Connection;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::oneshot;

/// Most idle reading connections kept.
const READERS: usize = 8;

/// Opens a connection of this store's kind (WAL, foreign keys, busy timeout, temporary data in
/// memory, no checkpoints: the checkpoint thread makes them).
pub(crate) fn open(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(30))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    // Statement journals (every multi-row write under foreign keys) and sorts stay in memory:
    // on disk each group commit created, wrote and deleted temporary files.
    c.pragma_update(None, "temp_store", "MEMORY")?;
    c.set_prepared_statement_cache_capacity(128);
    Ok(c)
}

/// A transaction (or read snapshot) on one rusqlite connection.
pub(crate) struct SqliteTx<'c> {
    pub conn: &'c mut Connection,
}

/// `$1` … `$32`, the parameter names bound by position.
const NAMES: [&str; 32] = [
    "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10", "$11", "$12", "$13", "$14", "$15",
    "$16", "$17", "$18", "$19", "$20", "$21", "$22", "$23", "$24", "$25", "$26", "$27", "$28",
    "$29", "$30", "$31", "$32",
];

fn bind(st: &mut rusqlite::CachedStatement<'_>, args: &[Value]) -> Result<()> {
    for (i, a) in args.iter().enumerate() {
        let name = NAMES.get(i).ok_or_else(|| {
            StoreError::Corrupt("statement", format!("{} arguments (most 32)", args.len()))
        })?;
        let Some(idx) = st.parameter_index(name)? else {
            continue;
        };
        match a {
            Value::Text(t) => st.raw_bind_parameter(idx, t)?,
            Value::Int(n) => st.raw_bind_parameter(idx, n)?,
            Value::Null => st.raw_bind_parameter(idx, rusqlite::types::Null)?,
            Value::List(_) => {
                return Err(StoreError::Corrupt(
                    "statement",
                    "a list parameter on SQLite (row sets travel as JSON there)".into(),
                ));
            }
        }
    }
    Ok(())
}

fn value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(n) => Value::Int(n),
        V::Real(f) => Value::Int(f as i64),
        V::Text(t) | V::Blob(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
    }
}

/// Runs one statement on `conn` (in its open transaction); the rows it changed.
pub(crate) fn exec_on(conn: &Connection, s: &Stmt) -> Result<u64> {
    let mut st = conn.prepare_cached(&s.sql)?;
    bind(&mut st, &s.args)?;
    if st.column_count() > 0 {
        // Run for its effect (a RETURNING the caller does not read): step through its rows.
        let mut rows = st.raw_query();
        while rows.next()?.is_some() {}
        return Ok(conn.changes());
    }
    Ok(st.raw_execute()? as u64)
}

/// Runs a query on `conn`; every row.
pub(crate) fn query_on(conn: &Connection, s: &Stmt) -> Result<Vec<Row>> {
    {
        let mut st = conn.prepare_cached(&s.sql)?;
        bind(&mut st, &s.args)?;
        let names: Arc<[String]> = st.column_names().iter().map(|n| n.to_string()).collect();
        let n = names.len();
        let mut rows = st.raw_query();
        let mut out = vec![];
        while let Some(r) = rows.next()? {
            let mut vals = Vec::with_capacity(n);
            for i in 0..n {
                vals.push(value(r.get_ref(i)?));
            }
            out.push(Row::new(names.clone(), vals));
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Tx for SqliteTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    async fn exec(&mut self, s: &Stmt) -> Result<u64> {
        exec_on(self.conn, s)
    }
    async fn query(&mut self, s: &Stmt) -> Result<Vec<Row>> {
        query_on(self.conn, s)
    }
    async fn script(&mut self, sql: &str) -> Result<()> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

/// Runs a future whose every await is on a [`SqliteTx`] (they never wait): it is ready at the
/// first poll. A domain transaction that awaited anything else would be a bug here.
pub(crate) fn run_ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => {
            panic!("a store transaction on SQLite awaited something other than its connection")
        }
    }
}

/// Idle reading connections.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn take(&self) -> Result<Connection> {
        match self.idle.lock().expect("readers lock").pop() {
            Some(c) => Ok(c),
            None => open(&self.path),
        }
    }

    fn put(&self, c: Connection) {
        let mut idle = self.idle.lock().expect("readers lock");
        if idle.len() < READERS {
            idle.push(c);
        }
    }
}

/// The SQLite backend: the write thread's queue and the reading connections.
#[derive(Clone)]
pub(crate) struct Sqlite {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Readers>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// Transactions the write thread ran.
    pub commits: Arc<std::sync::atomic::AtomicU64>,
}

impl Sqlite {
    pub fn new(
        path: &Path,
        jobs: mpsc::Sender<Job>,
        commits: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            jobs,
            commits,
            closed: Default::default(),
            readers: Arc::new(Readers {
                path: path.to_path_buf(),
                idle: Mutex::new(vec![]),
            }),
        }
    }

    /// Queues a job on the write thread.
    pub fn send(&self, job: Job) -> Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        self.jobs.send(job).map_err(|_| StoreError::Closed)
    }

    /// Ends the write thread after the jobs queued before; every later call is `Closed`.
    pub fn close(&self) {
        if !self.closed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let _ = self.jobs.send(Job::Stop);
            self.readers.idle.lock().expect("readers lock").clear();
        }
    }

    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, std::result::Result<T, E>> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(move |conn: &mut Connection| {
            let _ = reply.send(transaction(conn, f));
        });
        self.send(Job::Tx(job)).map_err(E::from)?;
        rx.await.map_err(|_| E::from(StoreError::Closed))?
    }

    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>> + Send + 'static,
    {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = readers.take()?;
            // One snapshot for every statement of the read.
            c.execute_batch("BEGIN")?;
            let out = run_ready(f(&mut SqliteTx { conn: &mut c }));
            if c.execute_batch("COMMIT").is_ok() {
                readers.put(c);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Corrupt("store", format!("a read stopped: {e}")))?
    }
}

/// Runs `f` in one `BEGIN IMMEDIATE` transaction on `conn`: committed on `Ok`, rolled back on
/// `Err`.
fn transaction<T, E, F>(conn: &mut Connection, f: F) -> std::result::Result<T, E>
where
    E: From<StoreError>,
    F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, std::result::Result<T, E>>,
{
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| E::from(e.into()))?;
    let out = run_ready(f(&mut SqliteTx { conn: &mut *conn }));
    match out {
        Ok(v) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(E::from(e.into()))
            }
        },
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

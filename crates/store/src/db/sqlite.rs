//! The SQLite driver: rusqlite connections. Every write transaction runs on the store's one
//! write thread (`commit`), which also group-commits step completions; reads run on a small
//! pool of reading connections off the async runtime. WAL mode lets both go on at once. The
//! write thread keeps [`WAL_RESERVE`] bytes of WAL file written ahead ([`reserve_wal`]).

use super::{BoxFut, Dialect, Row, Stmt, Tx, Value, statement_profile};
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
    settle(Connection::open(path)?)
}

/// Opens the write thread's connection: as [`open`], its WAL appends gathered into one write
/// per commit ([`super::sqlite_wal_writes`]), or as [`open`] if that VFS cannot be registered.
pub(crate) fn open_writer(path: &Path) -> Result<Connection> {
    match super::sqlite_wal_writes::register() {
        Ok(()) => settle(Connection::open_with_flags_and_vfs(
            path,
            rusqlite::OpenFlags::default(),
            super::sqlite_wal_writes::NAME,
        )?),
        Err(e) => {
            tracing::warn!(error = %e, "writing WAL frames one by one");
            open(path)
        }
    }
}

fn settle(c: Connection) -> Result<Connection> {
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

/// Bytes of WAL file kept written ahead of the commits: 64 MiB, about 8,000 step completions
/// (PostgreSQL keeps 80 MB of WAL segments by default, zero-filled ahead, for the same reason).
pub(crate) const WAL_RESERVE: u64 = 64 << 20;

/// Extends the WAL file of the database at `path` with zeros up to `bytes`.
///
/// A commit appends frames of a page plus 24 bytes; past the file's end each one makes the
/// kernel allocate a block and a page-cache page and zero what the frame does not cover, on
/// the write thread (12% of its time in the step benchmark). Over an existing file a frame is
/// only copied. Zeros are no frame (a frame's salt and checksum must match the header's), so
/// recovery ends the log at the first of them as it does at a stale frame; SQLite restarts
/// the log at the file's start and never shrinks it while open (`journal_size_limit` unset).
/// The file is extended under the write lock (no connection appends meanwhile), only if it
/// exists and is a regular file, never through a symbolic link.
pub(crate) fn reserve_wal(
    conn: &Connection,
    path: &Path,
    bytes: u64,
) -> std::result::Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| format!("taking the write lock: {e}"))?;
    let wal = crate::with_suffix(path, "-wal");
    let extend = || -> std::io::Result<()> {
        let f = match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&wal)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let m = f.metadata()?;
        if !m.file_type().is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut at = m.len();
        while at < bytes {
            let n = (bytes - at).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    };
    let r = extend();
    let _ = conn.execute_batch("ROLLBACK");
    r.map_err(|e| format!("{}: {e}", wal.display()))
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
    let _timed = statement_profile::time(&s.sql);
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
    let _timed = statement_profile::time(&s.sql);
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
    let _timed = statement_profile::time("COMMIT");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Actor, AuditFilter, Store};

    fn wal_of(db: &Path) -> PathBuf {
        crate::with_suffix(db, "-wal")
    }

    async fn audited(store: &Store) -> usize {
        let f = AuditFilter {
            actor: Some("crash".into()),
            limit: Some(1000),
            ..AuditFilter::default()
        };
        store.audit_list(&f).await.unwrap().len()
    }

    /// A fresh store's WAL is written ahead; an image of its files taken while it runs (as a
    /// crash leaves them: frames, then the zeros ahead) opens with every commit, read from the
    /// log (a reader's snapshot keeps them out of the database file).
    #[tokio::test]
    async fn the_wal_is_written_ahead_and_a_crash_image_keeps_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).await.unwrap();
        assert!(std::fs::metadata(wal_of(&path)).unwrap().len() >= WAL_RESERVE);
        let reader = open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM audit;")
            .unwrap();
        let actor = Actor::new("crash", "test");
        for i in 0..300 {
            store
                .audit(&actor, "x", &i.to_string(), "ok", None)
                .await
                .unwrap();
        }
        let (image, db_only) = (dir.path().join("image"), dir.path().join("db-only"));
        for d in [&image, &db_only] {
            std::fs::create_dir(d).unwrap();
            std::fs::copy(&path, d.join("db.sqlite")).unwrap();
        }
        let wal = std::fs::read(wal_of(&path)).unwrap();
        assert!(
            wal.len() as u64 >= WAL_RESERVE,
            "the log outgrew its reserve"
        );
        assert_ne!(&wal[..4], &[0, 0, 0, 0], "no frame was logged");
        assert!(wal[wal.len() - 4096..].iter().all(|b| *b == 0));
        std::fs::write(wal_of(&image.join("db.sqlite")), &wal).unwrap();
        let copy = Store::open(&image.join("db.sqlite")).await.unwrap();
        assert_eq!(audited(&copy).await, 300);
        copy.close().await;
        let without_log = Store::open(&db_only.join("db.sqlite")).await.unwrap();
        assert_eq!(
            audited(&without_log).await,
            0,
            "the commits were not in the log"
        );
        without_log.close().await;
        drop(reader);
        store.close().await;
    }

    /// A symbolic link or a FIFO put where the WAL goes (after SQLite opened its own) is
    /// refused, untouched: never a write through the link, nor a wait on the FIFO.
    #[tokio::test]
    async fn the_wal_is_never_written_ahead_through_a_link_or_into_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let c = open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x)").unwrap();
        std::fs::remove_file(wal_of(&path)).unwrap();
        std::os::unix::fs::symlink(&victim, wal_of(&path)).unwrap();
        let e = reserve_wal(&c, &path, 1 << 20).unwrap_err();
        assert!(e.contains("db.sqlite-wal"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let c = open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x)").unwrap();
        let wal = wal_of(&path);
        let _ = std::fs::remove_file(&wal);
        let made = std::process::Command::new("mkfifo")
            .arg(&wal)
            .status()
            .unwrap();
        assert!(made.success());
        let e = reserve_wal(&c, &path, 1 << 20).unwrap_err();
        assert!(e.contains("db.sqlite-wal"), "{e}");
    }

    /// Runs `s` on `conn` three times, each with the parameters `args(k)`; how many times
    /// SQLite parsed and planned it again.
    fn reprepared(conn: &Connection, s: &Stmt, args: impl Fn(i64) -> Vec<Value>) -> i32 {
        let mut st = conn.prepare_cached(&s.sql).unwrap();
        for k in 0..3 {
            bind(&mut st, &args(k)).unwrap();
            let mut rows = st.raw_query();
            while rows.next().unwrap().is_some() {}
        }
        st.get_status(rusqlite::StatementStatus::RePrepare)
    }

    /// The reads that take a count as their `LIMIT` (a hand-off's ready batch nodes; pages)
    /// are planned once, not at every new binding, as SQLite does with a bare `LIMIT $n`.
    #[tokio::test]
    async fn a_limit_by_parameter_is_planned_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).await.unwrap();
        let mut conn = open(&path).unwrap();
        let ready = crate::workflows::ready_nodes(&SqliteTx { conn: &mut conn }, "b", 5, 0);
        let args = |k: i64| vec![format!("b{k}").into(), (1000 + k).into(), (k + 1).into()];
        assert_eq!(reprepared(&conn, &ready, args), 0, "{}", ready.sql);
        let bare = Stmt::new(
            ready.sql.replace(&super::super::limit_by("$3"), "LIMIT $3"),
            vec![],
        );
        assert_ne!(bare.sql, ready.sql);
        assert!(
            reprepared(&conn, &bare, args) > 0,
            "this SQLite plans a bare LIMIT parameter once: `limit_by` may go"
        );
        let mut f = super::super::Filter::default();
        let owner = f.arg("pia");
        f.and(format!("owner = {owner}"));
        let page = f.page("SELECT id FROM vms", "name", 10);
        let args = |k: i64| vec![format!("u{k}").into(), (k + 1).into()];
        assert_eq!(reprepared(&conn, &page, args), 0, "{}", page.sql);
        store.close().await;
    }

    /// A slot fill reads a batch's first parked nodes in queue order from its index: no sort
    /// of every parked node (a 1,000-node batch sorted ~990 rows at each fill).
    #[tokio::test]
    async fn a_slot_fill_reads_the_queue_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).await.unwrap();
        let conn = open(&path).unwrap();
        for s in crate::workflows::fill_stmts(super::super::Dialect::Sqlite, "b") {
            let mut st = conn
                .prepare_cached(&format!("EXPLAIN QUERY PLAN {}", s.sql))
                .unwrap();
            bind(&mut st, &s.args).unwrap();
            let mut rows = st.raw_query();
            let mut plan = vec![];
            while let Some(r) = rows.next().unwrap() {
                plan.push(r.get::<_, String>(3).unwrap());
            }
            assert!(
                plan.iter().any(|l| l.contains("workflows_batch_nodes")),
                "{plan:?}"
            );
            assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{plan:?}");
        }
        store.close().await;
    }

    /// The bench's statement profile counts each statement's runs while started, and nothing
    /// before or after.
    #[test]
    fn the_statement_profile_counts_runs_only_while_started() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(&dir.path().join("db.sqlite")).unwrap();
        exec_on(&c, &Stmt::new("CREATE TABLE t (x)", vec![])).unwrap();
        let insert = Stmt::new("INSERT INTO t (x) VALUES ($1)", vec![Value::Int(1)]);
        exec_on(&c, &insert).unwrap();
        statement_profile::start();
        for _ in 0..3 {
            exec_on(&c, &insert).unwrap();
        }
        query_on(&c, &Stmt::new("SELECT   x\n FROM t", vec![])).unwrap();
        let times = statement_profile::stop();
        exec_on(&c, &insert).unwrap();
        let calls = |sql: &str| times.iter().find(|t| t.sql == sql).map(|t| t.calls);
        assert_eq!(calls("INSERT INTO t (x) VALUES ($1)"), Some(3), "{times:?}");
        assert_eq!(calls("SELECT x FROM t"), Some(1), "{times:?}");
        assert_eq!(times.len(), 2, "{times:?}");
        assert!(statement_profile::stop().is_empty());
    }
}

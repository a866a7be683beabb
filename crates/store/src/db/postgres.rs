//! The PostgreSQL driver: tokio-postgres over a deadpool pool. Statements are prepared once
//! per connection; several statements of one transaction go out in one round trip
//! ([`Tx::run`]), which is how a connection keeps up with the engine's step completions.

use super::{BoxFut, Dialect, Durability, Row, Stmt, Tx, Value};
use crate::{Change, Result, StoreError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;
use tokio_postgres::NoTls;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// Connections per pool (per replica).
const POOL_SIZE: usize = 16;

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => n.to_string().to_sql(ty, out),
                _ => Err(format!("cannot bind the integer {n} as {ty}").into()),
            },
            Value::Text(s) => match *ty {
                Type::INT8 => s.parse::<i64>()?.to_sql(ty, out),
                _ => s.as_str().to_sql(ty, out),
            },
            Value::List(items) => match *ty {
                Type::INT8_ARRAY => items
                    .iter()
                    .map(|v| match v {
                        Value::Int(n) => Ok(Some(*n)),
                        Value::Null => Ok(None),
                        Value::Text(s) => s.parse::<i64>().map(Some).map_err(|e| e.to_string()),
                        Value::List(_) => Err("a list inside a list".to_string()),
                    })
                    .collect::<std::result::Result<Vec<Option<i64>>, _>>()?
                    .to_sql(ty, out),
                Type::TEXT_ARRAY | Type::VARCHAR_ARRAY => items
                    .iter()
                    .map(|v| match v {
                        Value::Text(s) => Ok(Some(s.clone())),
                        Value::Int(n) => Ok(Some(n.to_string())),
                        Value::Null => Ok(None),
                        Value::List(_) => Err("a list inside a list".to_string()),
                    })
                    .collect::<std::result::Result<Vec<Option<String>>, _>>()?
                    .to_sql(ty, out),
                _ => Err(format!("cannot bind a list as {ty}").into()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn value(r: &tokio_postgres::Row, i: usize) -> Result<Value> {
    let ty = r.columns()[i].type_();
    let v = match *ty {
        Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => r
            .try_get::<_, Option<i32>>(i)?
            .map(|n| Value::Int(n.into())),
        Type::INT2 => r
            .try_get::<_, Option<i16>>(i)?
            .map(|n| Value::Int(n.into())),
        Type::BOOL => r
            .try_get::<_, Option<bool>>(i)?
            .map(|b| Value::Int(b.into())),
        Type::FLOAT8 => r
            .try_get::<_, Option<f64>>(i)?
            .map(|f| Value::Int(f as i64)),
        Type::VOID => None,
        _ => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
    };
    Ok(v.unwrap_or(Value::Null))
}

fn rows(rs: Vec<tokio_postgres::Row>) -> Result<Vec<Row>> {
    let Some(first) = rs.first() else {
        return Ok(vec![]);
    };
    let names: Arc<[String]> = first
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut out = Vec::with_capacity(rs.len());
    for r in &rs {
        let mut vals = Vec::with_capacity(names.len());
        for i in 0..names.len() {
            vals.push(value(r, i)?);
        }
        out.push(Row::new(names.clone(), vals));
    }
    Ok(out)
}

fn params(s: &Stmt) -> Vec<&(dyn ToSql + Sync)> {
    s.args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

/// A transaction on one pooled connection. Its `BEGIN` goes with the transaction's first
/// statements, in their round trip, unless the transaction asks for the clock first
/// ([`Tx::begin_now`]).
pub(crate) struct PgTx<'c> {
    tx: &'c deadpool_postgres::ClientWrapper,
    /// What it appended to the event log (then its commit tells the other replicas).
    events: Appended,
    /// The `BEGIN` and the clock reading not sent yet.
    begin: Option<Begin>,
    /// The database's clock (ms) when the transaction began, read with its `BEGIN`.
    now: Option<i64>,
    /// The pool's last reading of the database's clock (this transaction's too, once read).
    clock: Arc<Clock>,
}

/// The database's clock as a pool last read it, and when (this process's monotonic clock).
#[derive(Default)]
pub(crate) struct Clock(std::sync::Mutex<Option<(i64, std::time::Instant)>>);

impl Clock {
    fn note(&self, ms: i64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((ms, std::time::Instant::now()));
    }

    /// The database's clock now as the last reading and the time since tell (none before the
    /// first reading).
    fn guess(&self) -> Option<i64> {
        let r = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        r.map(|(ms, at)| ms + at.elapsed().as_millis() as i64)
    }
}

/// A pooled connection with a transaction open on it. Dropped before [`Open::end`] (its future
/// was cancelled mid-transaction), the connection is closed rather than pooled: the server
/// then rolls the transaction back.
struct Open(Option<deadpool_postgres::Object>);

impl Open {
    fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.0
            .as_ref()
            .expect("a connection until the transaction ends")
    }

    /// Pools the connection of a transaction that never began.
    fn release(mut self) {
        drop(self.0.take());
    }

    /// Runs `end` (ending the transaction; `ROLLBACK` after a failed one), then pools the
    /// connection.
    async fn end(mut self, end: &str) -> Result<()> {
        let r = self.client().batch_execute(end).await;
        if r.is_err() {
            let _ = self.client().batch_execute("ROLLBACK").await;
        }
        drop(self.0.take());
        Ok(r?)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

macro_rules! tx_clock {
    () => {
        "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"
    };
}

/// The database's clock in ms when the transaction began (the same value all through it), as
/// the last statement of a `BEGIN`.
pub(crate) const READ_CLOCK: &str = concat!("SELECT ", tx_clock!());

/// The database's clock in ms when the transaction began, as an expression: what
/// [`READ_CLOCK`] reads, for statements sent before its answer came.
pub(crate) const TX_CLOCK: &str = tx_clock!();

/// How the engine's transitions run: their commits are not waited for
/// ([`Durability::Replayable`]), and they are planned once. Each of their statements is a lookup
/// by key (a workflow, its steps, its resource, a batch's queue) run thousands of times a
/// second, and PostgreSQL would plan it anew at every run: with an array parameter
/// (`id = ANY($1)`) the generic plan is costed for ten elements, so a custom plan for the two or
/// three of a group always looks cheaper, and planning took a quarter of the server's time in a
/// batch. So they use the generic plan, made once per pooled connection — and a plan made while
/// a fresh table is still small must not be a sequential scan kept for the connection's life,
/// so those are off (a statement with no index to use still gets one). Columns beside the
/// `BEGIN`'s clock reading (`set_config(…, true)` is `SET LOCAL`): one statement, not four.
const ENGINE_SETTINGS: &str = "set_config('synchronous_commit', 'off', true), \
     set_config('plan_cache_mode', 'force_generic_plan', true), \
     set_config('enable_seqscan', 'off', true)";

/// How a transaction begins: `start` (`BEGIN` and its mode), then `clock`, a `SELECT` whose
/// first column is the database's clock ([`READ_CLOCK`], and the settings beside it). The
/// clock reading is a prepared statement (once per connection): sent as text with the `BEGIN`
/// it was parsed and planned anew each time: 84 µs of the server's time per transaction, now 45.
struct Begin {
    start: &'static str,
    clock: String,
}

/// Runs `work` on `tx`, preceded in the same round trip by `begin` if it was not sent yet
/// (the client sends requests in the order they are first polled); the clock `begin` read.
async fn begun<T>(
    tx: &deadpool_postgres::ClientWrapper,
    begin: Option<Begin>,
    work: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<(T, Option<i64>)> {
    match begin {
        None => Ok((work.await?, None)),
        Some(b) => {
            let clock = tx.prepare_cached(&b.clock).await?;
            let ((), rows, v) = futures_util::future::try_join3(
                tx.batch_execute(b.start),
                tx.query(&clock, &[]),
                work,
            )
            .await?;
            let ms = rows
                .first()
                .and_then(|r| r.try_get::<_, i64>(0).ok())
                .ok_or_else(|| StoreError::Corrupt("clock", "no time from the database".into()))?;
            Ok((v, Some(ms)))
        }
    }
}

/// What a transaction appended to the event log.
#[derive(Default)]
struct Appended {
    any: bool,
    /// An append that did not say its numbers (`RETURNING seq`) happened.
    unknown: bool,
    /// Lowest and highest `seq` taken.
    range: Option<(i64, i64)>,
}

impl Appended {
    fn note(&mut self, s: &Stmt) {
        if appends(s) {
            self.any = true;
            self.unknown |= !s.sql.contains("RETURNING seq");
        }
    }

    fn take(&mut self, rows: &[tokio_postgres::Row]) {
        for r in rows {
            let Some(i) = r.columns().iter().position(|c| c.name() == "seq") else {
                continue;
            };
            if let Ok(seq) = r.try_get::<_, i64>(i) {
                let (lo, hi) = self.range.unwrap_or((seq, seq));
                self.range = Some((lo.min(seq), hi.max(seq)));
            }
        }
    }

    /// The notification's payload: the origin, then the range when it is known.
    fn payload(&self, origin: &str) -> String {
        match (self.range, self.unknown) {
            (Some((lo, hi)), false) => format!("{origin} {lo} {hi}"),
            _ => origin.to_string(),
        }
    }
}

fn appends(s: &Stmt) -> bool {
    s.sql.contains("INTO workflow_events")
}

impl PgTx<'_> {
    /// Runs `work` with the `BEGIN` if it was not sent yet.
    async fn first<T>(
        &mut self,
        work: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let (v, now) = begun(self.tx, self.begin.take(), work).await?;
        if let Some(ms) = now {
            self.now = now;
            self.clock.note(ms);
        }
        Ok(v)
    }

    /// Whether the transaction began (a statement was sent in it).
    fn began(&self) -> bool {
        self.begin.is_none()
    }

    /// Times the round trip of `stmts` while the statement profile records: labelled by its
    /// first statement and how many went with it (and the `BEGIN`, if it goes too).
    fn round_trip(&self, stmts: &[Stmt]) -> Option<crate::statement_profile::Timed<'static>> {
        crate::statement_profile::time_with(|| {
            let first = stmts
                .first()
                .map(|s| s.sql.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            let first: String = first.chars().take(70).collect();
            let begin = if self.began() { "" } else { "BEGIN + " };
            match stmts.len() {
                0 | 1 => format!("round trip: {begin}{first}"),
                n => format!("round trip: {begin}{first} (+{} more)", n - 1),
            }
        })
    }

    /// Each statement prepared (once per connection, then from the cache), noted.
    async fn prepare_all(&mut self, stmts: &[Stmt]) -> Result<Vec<tokio_postgres::Statement>> {
        for s in stmts {
            self.events.note(s);
        }
        // Those not in the cache yet are prepared in one round trip.
        let tx = self.tx;
        Ok(
            futures_util::future::try_join_all(stmts.iter().map(|s| tx.prepare_cached(&s.sql)))
                .await?,
        )
    }
}

/// The channel replicas are told on that events (and so work) were committed.
pub(crate) const CHANNEL: &str = "basphere";

#[async_trait::async_trait]
impl Tx for PgTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn began_at(&self) -> Option<i64> {
        self.now
    }

    fn clock_guess(&self) -> Option<i64> {
        self.clock.guess()
    }

    async fn begin_now(&mut self) -> Result<()> {
        self.first(async { Ok(()) }).await
    }

    async fn exec(&mut self, s: &Stmt) -> Result<u64> {
        Ok(self.exec_many(std::slice::from_ref(s)).await?[0])
    }

    async fn query(&mut self, s: &Stmt) -> Result<Vec<Row>> {
        self.events.note(s);
        let _timed = self.round_trip(std::slice::from_ref(s));
        let st = self.tx.prepare_cached(&s.sql).await?;
        let tx = self.tx;
        let rs = self.first(tx.query(&st, &params(s))).await?;
        if appends(s) {
            self.events.take(&rs);
        }
        rows(rs)
    }

    async fn run(&mut self, stmts: &[Stmt]) -> Result<()> {
        self.exec_many(stmts).await.map(drop)
    }

    async fn query_many(&mut self, stmts: &[Stmt]) -> Result<Vec<Vec<Row>>> {
        let _timed = self.round_trip(stmts);
        let prepared = self.prepare_all(stmts).await?;
        let tx = self.tx;
        let params: Vec<_> = stmts.iter().map(params).collect();
        // Issued together, the statements are pipelined on the connection, in order.
        let res = self
            .first(futures_util::future::try_join_all(
                prepared.iter().zip(&params).map(|(st, p)| tx.query(st, p)),
            ))
            .await?;
        for (s, rs) in stmts.iter().zip(&res) {
            if appends(s) {
                self.events.take(rs);
            }
        }
        res.into_iter().map(rows).collect()
    }

    async fn exec_many(&mut self, stmts: &[Stmt]) -> Result<Vec<u64>> {
        let _timed = self.round_trip(stmts);
        let prepared = self.prepare_all(stmts).await?;
        let tx = self.tx;
        let params: Vec<_> = stmts.iter().map(params).collect();
        // Appends to the event log are read for the numbers they took.
        let res = self
            .first(futures_util::future::try_join_all(
                prepared
                    .iter()
                    .zip(&params)
                    .zip(stmts)
                    .map(|((st, p), s)| async move {
                        if appends(s) {
                            let rs = tx.query(st, p).await?;
                            Ok::<_, tokio_postgres::Error>((rs.len() as u64, rs))
                        } else {
                            Ok((tx.execute(st, p).await?, vec![]))
                        }
                    }),
            ))
            .await?;
        let mut out = Vec::with_capacity(res.len());
        for (n, rs) in res {
            self.events.take(&rs);
            out.push(n);
        }
        Ok(out)
    }

    async fn script(&mut self, sql: &str) -> Result<()> {
        let tx = self.tx;
        self.first(tx.batch_execute(sql)).await
    }
}

/// The PostgreSQL backend: a pool of connections to one database.
#[derive(Clone)]
pub(crate) struct Postgres {
    pool: Pool,
    url: String,
    /// Names this pool's commits in notifications (its own are not news to it).
    origin: Arc<str>,
    /// Transactions committed through this pool.
    pub commits: Arc<std::sync::atomic::AtomicU64>,
    /// The database's clock as this pool last read it.
    clock: Arc<Clock>,
}

impl Postgres {
    /// A pool for `url` (`postgres://user@host:port/db`); connects lazily.
    pub fn new(url: &str) -> Result<Self> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("the database url is not valid: {e}")))?;
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("building the pool: {e}")))?;
        Ok(Self {
            pool,
            url: url.to_string(),
            origin: uuid::Uuid::new_v4().simple().to_string().into(),
            commits: Default::default(),
            clock: Default::default(),
        })
    }

    /// Listens on [`CHANNEL`] on a connection of its own (reconnecting after a loss) and
    /// passes each notification on: a replica learns that another committed events or work.
    /// Closes the pool; every later call is `Closed`.
    pub fn close(&self) {
        self.pool.close();
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        if self.pool.is_closed() {
            return Err(StoreError::Closed);
        }
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot reach PostgreSQL: {e}")))
    }

    pub async fn write<T, E, F>(&self, durability: Durability, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, std::result::Result<T, E>> + Send + 'static,
    {
        let begin = Begin {
            start: "BEGIN",
            clock: match durability {
                Durability::Replayable => format!("{READ_CLOCK}, {ENGINE_SETTINGS}"),
                Durability::Flushed => READ_CLOCK.to_string(),
            },
        };
        let open = Open(Some(self.client().await?));
        let mut t = PgTx {
            tx: open.client(),
            events: Appended::default(),
            begin: Some(begin),
            now: None,
            clock: self.clock.clone(),
        };
        let out = f(&mut t).await;
        let events = std::mem::take(&mut t.events);
        if !t.began() {
            // Nothing was sent: there is nothing to end.
            open.release();
            return out;
        }
        let Ok(v) = out else {
            let _ = open.end("ROLLBACK").await;
            return out;
        };
        let end = if events.any {
            // Delivered at commit, once per transaction (never per step), with the numbers
            // its appends took: other replicas read exactly those. Sent with the COMMIT.
            let payload = events.payload(&self.origin).replace('\'', "''");
            format!("SELECT pg_notify('{CHANNEL}', '{payload}'); COMMIT")
        } else {
            "COMMIT".to_string()
        };
        {
            let _timed = crate::statement_profile::time_with(|| {
                let notify = if events.any { " (+ NOTIFY)" } else { "" };
                format!("round trip: COMMIT{notify}")
            });
            open.end(&end).await?;
        }
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(v)
    }

    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>> + Send + 'static,
    {
        // One snapshot for every statement of the read.
        let begin = Begin {
            start: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            clock: READ_CLOCK.to_string(),
        };
        let open = Open(Some(self.client().await?));
        let mut t = PgTx {
            tx: open.client(),
            events: Appended::default(),
            begin: Some(begin),
            now: None,
            clock: self.clock.clone(),
        };
        let out = f(&mut t).await;
        if t.began() {
            // The answer does not wait for the end of a read-only transaction; the
            // connection is pooled after it.
            tokio::spawn(async move {
                let _ = open.end("COMMIT").await;
            });
        } else {
            open.release();
        }
        out
    }

    pub fn listen(
        &self,
    ) -> (
        tokio::sync::broadcast::Sender<Change>,
        tokio::task::AbortHandle,
    ) {
        let (out, _) = tokio::sync::broadcast::channel(1024);
        let (url, tx, origin) = (self.url.clone(), out.clone(), self.origin.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = listen_once(&url, &origin, &tx).await {
                    tracing::warn!(error = %e, "listening for other replicas' commits failed; retrying");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        (out, task.abort_handle())
    }
}

/// A notification's payload as a change, unless it is one of this pool's own commits.
fn change_of(payload: &str, origin: &str) -> Option<Change> {
    let mut parts = payload.split(' ');
    if parts.next() == Some(origin) {
        return None;
    }
    let lo = parts.next().and_then(|p| p.parse().ok());
    let hi = parts.next().and_then(|p| p.parse().ok());
    Some(Change { events: lo.zip(hi) })
}

/// One listening connection, until it is lost.
async fn listen_once(
    url: &str,
    origin: &str,
    out: &tokio::sync::broadcast::Sender<Change>,
) -> Result<()> {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Change>();
    let origin = origin.to_string();
    let pump = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if let Some(c) = change_of(n.payload(), &origin)
                        && seen_tx.send(c).is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // A lost connection may have dropped notifications: everyone reads again once.
    let _ = out.send(Change { events: None });
    while let Some(c) = seen.recv().await {
        let _ = out.send(c);
    }
    pump.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_commits_are_not_news_and_ranges_round_trip() {
        assert!(change_of("me 1 5", "me").is_none());
        assert_eq!(change_of("them 3 9", "me").unwrap().events, Some((3, 9)));
        assert_eq!(change_of("them", "me").unwrap().events, None);
        let a = Appended {
            any: true,
            unknown: false,
            range: Some((4, 7)),
        };
        assert_eq!(a.payload("me"), "me 4 7");
        let b = Appended { unknown: true, ..a };
        assert_eq!(b.payload("me"), "me");
    }

    /// The engine's transactions run with their settings, other writes with the server's, and
    /// the settings end with the transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replayable_writes_run_with_the_engine_settings_and_only_they() {
        use super::super::stmt;
        let pg = basphere_testkit::postgres::Postgres::start();
        let db = Postgres::new(&pg.create_database("settings")).unwrap();
        let read = |d| {
            db.write(d, |tx| {
                Box::pin(async move {
                    let r = tx
                        .query_one(&stmt!(
                            "SELECT current_setting('synchronous_commit') || ' ' || \
                             current_setting('plan_cache_mode') || ' ' || \
                             current_setting('enable_seqscan') AS s"
                        ))
                        .await?;
                    Ok::<_, StoreError>(r.first_text()?.unwrap_or_default())
                })
            })
        };
        let server = "on auto on";
        assert_eq!(read(Durability::Flushed).await.unwrap(), server);
        assert_eq!(
            read(Durability::Replayable).await.unwrap(),
            "off force_generic_plan off"
        );
        for _ in 0..POOL_SIZE + 1 {
            assert_eq!(read(Durability::Flushed).await.unwrap(), server);
        }
    }

    /// A write whose future is dropped mid-transaction (a client went away, a timeout) leaves
    /// nothing behind: its change is not committed, its row lock is gone, and the pool still
    /// serves writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_transaction_is_rolled_back_and_releases_its_locks() {
        use super::super::stmt;
        use std::time::Duration;
        let pg = basphere_testkit::postgres::Postgres::start();
        let db = Postgres::new(&pg.create_database("dropped")).unwrap();
        db.write(Durability::Flushed, |tx| {
            Box::pin(async move {
                tx.script("CREATE TABLE t (id INT PRIMARY KEY, v INT); INSERT INTO t VALUES (1, 0)")
                    .await
            })
        })
        .await
        .unwrap();
        let dropped = tokio::time::timeout(
            Duration::from_millis(300),
            db.write(Durability::Replayable, |tx| {
                Box::pin(async move {
                    tx.exec(&stmt!("UPDATE t SET v = 1 WHERE id = 1")).await?;
                    std::future::pending::<()>().await;
                    Ok::<_, StoreError>(())
                })
            }),
        )
        .await;
        assert!(dropped.is_err(), "the write should still be waiting");
        for _ in 0..POOL_SIZE + 1 {
            let v = tokio::time::timeout(
                Duration::from_secs(10),
                db.write(Durability::Flushed, |tx| {
                    Box::pin(async move {
                        tx.exec(&stmt!("UPDATE t SET v = v + 10 WHERE id = 1"))
                            .await?;
                        tx.query_one(&stmt!("SELECT v FROM t WHERE id = 1"))
                            .await?
                            .first_int()
                    })
                }),
            )
            .await
            .expect("the dropped transaction's row lock is gone")
            .unwrap()
            .unwrap();
            assert_eq!(v % 10, 0, "the dropped transaction's change was committed");
        }
    }
}

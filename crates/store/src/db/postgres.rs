//! The PostgreSQL driver: tokio-postgres over a deadpool pool. Statements are prepared once
//! per connection; several statements of one transaction go out in one round trip
//! ([`Tx::run`]), which is how a connection keeps up with the engine's step completions.

use super::{BoxFut, Dialect, Row, Stmt, Tx, Value};
use crate::{Result, StoreError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{IsolationLevel, NoTls};

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
    rs.iter()
        .map(|r| {
            let vals = (0..names.len())
                .map(|i| value(r, i))
                .collect::<Result<Vec<_>>>()?;
            Ok(Row::new(names.clone(), vals))
        })
        .collect()
}

fn params(s: &Stmt) -> Vec<&(dyn ToSql + Sync)> {
    s.args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

/// A transaction on one pooled connection.
pub(crate) struct PgTx<'c> {
    tx: deadpool_postgres::Transaction<'c>,
    /// Whether it appended to the event log (then its commit notifies the other replicas).
    wrote_events: bool,
}

impl PgTx<'_> {
    fn note(&mut self, s: &Stmt) {
        self.wrote_events |= s.sql.contains("INTO workflow_events");
    }

    /// Each statement prepared (once per connection, then from the cache), noted.
    async fn prepare_all(&mut self, stmts: &[Stmt]) -> Result<Vec<tokio_postgres::Statement>> {
        let mut out = Vec::with_capacity(stmts.len());
        for s in stmts {
            self.note(s);
            out.push(self.tx.prepare_cached(&s.sql).await?);
        }
        Ok(out)
    }
}

/// The channel replicas are told on that events (and so work) were committed.
pub(crate) const CHANNEL: &str = "basphere";

#[async_trait::async_trait]
impl Tx for PgTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn exec(&mut self, s: &Stmt) -> Result<u64> {
        self.note(s);
        let st = self.tx.prepare_cached(&s.sql).await?;
        Ok(self.tx.execute(&st, &params(s)).await?)
    }

    async fn query(&mut self, s: &Stmt) -> Result<Vec<Row>> {
        self.note(s);
        let st = self.tx.prepare_cached(&s.sql).await?;
        rows(self.tx.query(&st, &params(s)).await?)
    }

    async fn run(&mut self, stmts: &[Stmt]) -> Result<()> {
        self.exec_many(stmts).await.map(drop)
    }

    async fn query_many(&mut self, stmts: &[Stmt]) -> Result<Vec<Vec<Row>>> {
        let prepared = self.prepare_all(stmts).await?;
        let tx = &self.tx;
        let params: Vec<_> = stmts.iter().map(params).collect();
        // Issued together, the statements are pipelined on the connection, in order.
        let res = futures_util::future::try_join_all(
            prepared.iter().zip(&params).map(|(st, p)| tx.query(st, p)),
        )
        .await?;
        res.into_iter().map(rows).collect()
    }

    async fn exec_many(&mut self, stmts: &[Stmt]) -> Result<Vec<u64>> {
        let prepared = self.prepare_all(stmts).await?;
        let tx = &self.tx;
        let params: Vec<_> = stmts.iter().map(params).collect();
        Ok(futures_util::future::try_join_all(
            prepared
                .iter()
                .zip(&params)
                .map(|(st, p)| tx.execute(st, p)),
        )
        .await?)
    }

    async fn script(&mut self, sql: &str) -> Result<()> {
        Ok(self.tx.batch_execute(sql).await?)
    }
}

/// The PostgreSQL backend: a pool of connections to one database.
#[derive(Clone)]
pub(crate) struct Postgres {
    pool: Pool,
    url: String,
    /// Transactions committed through this pool.
    pub commits: Arc<std::sync::atomic::AtomicU64>,
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
            commits: Default::default(),
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

    pub async fn write<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, std::result::Result<T, E>> + Send + 'static,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| E::from(e.into()))?;
        let mut t = PgTx {
            tx,
            wrote_events: false,
        };
        match f(&mut t).await {
            Ok(v) => {
                if t.wrote_events {
                    // Delivered at commit, once per transaction (never per step).
                    let notify = format!("NOTIFY {CHANNEL}");
                    t.tx.batch_execute(&notify)
                        .await
                        .map_err(|e| E::from(e.into()))?;
                }
                t.tx.commit().await.map_err(|e| E::from(e.into()))?;
                self.commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                let _ = t.tx.rollback().await;
                Err(e)
            }
        }
    }

    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>> + Send + 'static,
    {
        let mut client = self.client().await?;
        // One snapshot for every statement of the read.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let mut t = PgTx {
            tx,
            wrote_events: false,
        };
        let out = f(&mut t).await;
        let _ = t.tx.commit().await;
        out
    }

    pub fn listen(&self) -> (tokio::sync::broadcast::Sender<()>, tokio::task::AbortHandle) {
        let (out, _) = tokio::sync::broadcast::channel(64);
        let (url, tx) = (self.url.clone(), out.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = listen_once(&url, &tx).await {
                    tracing::warn!(error = %e, "listening for other replicas' commits failed; retrying");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        (out, task.abort_handle())
    }
}

/// One listening connection, until it is lost.
async fn listen_once(url: &str, out: &tokio::sync::broadcast::Sender<()>) -> Result<()> {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pump = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    if seen_tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // A lost connection may have dropped notifications: wake everyone once.
    let _ = out.send(());
    while seen.recv().await.is_some() {
        let _ = out.send(());
    }
    pump.abort();
    Ok(())
}

//! `--part pg-probe`: how many step completions per second one PostgreSQL connection reaches,
//! to inform the PostgreSQL backend's design. A completion is the engine's hot transition: an
//! UPDATE of the step's row plus an INSERT into the events table. Measured (a) one transaction
//! per completion, each statement awaited in turn, and (b) group commit: N completions per
//! transaction, all statements of a transaction pipelined on the one connection.
//!
//! The server is the test kit's PostgreSQL 15, started by the probe, durable (fsync on) and, for
//! comparison, with the tests' fsync=off.

use basphere_testkit::postgres::{Options, Postgres, connect};
use futures_util::future::try_join_all;
use std::time::Instant;
use tokio_postgres::Client;

/// Group sizes measured.
const GROUPS: [usize; 4] = [1, 16, 64, 256];

const SCHEMA: &str = "
    CREATE TABLE steps (
        id text PRIMARY KEY,
        workflow text NOT NULL,
        status text NOT NULL,
        attempt int NOT NULL,
        updated_at bigint NOT NULL
    ) WITH (fillfactor = 70);
    CREATE TABLE events (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        workflow text NOT NULL,
        step text NOT NULL,
        kind text NOT NULL,
        at bigint NOT NULL
    );";

/// One way of committing completions.
#[derive(Clone, Copy)]
enum Mode {
    /// BEGIN, UPDATE, INSERT, COMMIT, each awaited before the next.
    Sequential,
    /// BEGIN, n × (UPDATE, INSERT), COMMIT sent at once; the next group after the COMMIT.
    Pipelined(usize),
}

impl Mode {
    fn per_commit(self) -> usize {
        match self {
            Mode::Sequential => 1,
            Mode::Pipelined(n) => n,
        }
    }

    fn label(self) -> String {
        match self {
            Mode::Sequential => "one transaction per completion, sequential".into(),
            Mode::Pipelined(n) => format!("group commit N={n}, pipelined"),
        }
    }
}

/// What one run measured.
struct Figures {
    steps_per_s: f64,
    commits_per_1k: f64,
    wal_syncs_per_1k: f64,
}

/// Prints the probe's figures for `steps` completions per mode.
pub async fn run(steps: usize) -> anyhow::Result<()> {
    anyhow::ensure!(steps > 0, "--probe-steps must be at least 1");
    for durable in [true, false] {
        let pg = Postgres::start_with(&Options {
            durable,
            ..Options::default()
        })?;
        let c = connect(&pg.url()).await?;
        c.batch_execute(SCHEMA).await?;
        let setting = if durable {
            "durable (fsync on)"
        } else {
            "fsync=off (the tests' setting)"
        };
        println!(
            "PostgreSQL 15 probe, one connection, {steps} step completions (UPDATE + INSERT event) per mode, {setting}:"
        );
        let modes = std::iter::once(Mode::Sequential).chain(GROUPS.map(Mode::Pipelined));
        for mode in modes {
            let f = measure(&c, mode, steps).await?;
            println!(
                "  {:<48} {:>8.0} steps/s   {:>7.1} commits per 1,000 steps   {:>7.1} WAL fsyncs per 1,000 steps",
                mode.label(),
                f.steps_per_s,
                f.commits_per_1k,
                f.wal_syncs_per_1k
            );
        }
    }
    Ok(())
}

/// (transactions committed in this database, WAL syncs) so far, as the statistics show them.
async fn counters(c: &Client) -> anyhow::Result<(i64, i64)> {
    c.batch_execute("SELECT pg_stat_force_next_flush()").await?;
    let r = c
        .query_one(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
                    (SELECT wal_sync FROM pg_stat_wal)",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Fills `steps` running steps, completes each once under `mode`, and checks every one did.
async fn measure(c: &Client, mode: Mode, steps: usize) -> anyhow::Result<Figures> {
    c.batch_execute(&format!(
        "TRUNCATE steps, events;
         INSERT INTO steps
           SELECT 's' || i, 'w' || (i / 50), 'running', 1, 0 FROM generate_series(1, {steps}) i;"
    ))
    .await?;
    c.batch_execute("VACUUM ANALYZE steps").await?;
    let update = c
        .prepare(
            "UPDATE steps SET status = 'succeeded', attempt = attempt + 1, updated_at = $2
             WHERE id = $1 AND status = 'running'",
        )
        .await?;
    let insert = c
        .prepare("INSERT INTO events (workflow, step, kind, at) VALUES ($1, $2, 'succeeded', $3)")
        .await?;
    // Prepared, so each is sent at its first poll (a string would first be prepared, a round
    // trip during which the statements behind it would already run).
    let begin = c.prepare("BEGIN").await?;
    let commit = c.prepare("COMMIT").await?;
    let ids: Vec<(String, String)> = (1..=steps)
        .map(|i| (format!("s{i}"), format!("w{}", i / 50)))
        .collect();
    let (commits0, syncs0) = counters(c).await?;
    let t0 = Instant::now();
    let mut updated = 0u64;
    for group in ids.chunks(mode.per_commit()) {
        let now = t0.elapsed().as_micros() as i64;
        match mode {
            Mode::Sequential => {
                let (id, wf) = &group[0];
                c.execute(&begin, &[]).await?;
                updated += c.execute(&update, &[id, &now]).await?;
                c.execute(&insert, &[wf, id, &now]).await?;
                c.execute(&commit, &[]).await?;
            }
            Mode::Pipelined(_) => {
                let (update, insert) = (&update, &insert);
                let updates = group
                    .iter()
                    .map(|(id, _)| async move { c.execute(update, &[id, &now]).await });
                let inserts = group
                    .iter()
                    .map(|(id, wf)| async move { c.execute(insert, &[wf, id, &now]).await });
                // Polled in order on the first poll, so sent in this order: BEGIN, the group's
                // statements, COMMIT; the replies come back in one stream.
                let (_, n, _, _) = tokio::try_join!(
                    c.execute(&begin, &[]),
                    try_join_all(updates),
                    try_join_all(inserts),
                    c.execute(&commit, &[]),
                )?;
                updated += n.iter().sum::<u64>();
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let (commits1, syncs1) = counters(c).await?;
    anyhow::ensure!(
        updated == steps as u64,
        "{} of {steps} steps were completed",
        updated
    );
    let per_1k = |d: i64| d as f64 * 1000.0 / steps as f64;
    Ok(Figures {
        steps_per_s: steps as f64 / secs,
        // Two of the delta are the counters' own: the first reading, the second's flush.
        commits_per_1k: per_1k(commits1 - commits0 - 2),
        wal_syncs_per_1k: per_1k(syncs1 - syncs0),
    })
}

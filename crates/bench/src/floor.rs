//! PostgreSQL's floor for a batch: the rows a batch of 1,000 VM creates writes in the store's
//! own schema (the admission's; each node's lease with its first step started; its steps done,
//! its events, its ending, its VM running and its audit record), written set-wise by prepared
//! statements on one connection, with no engine, no reads and no checks. What the engine's
//! batch costs PostgreSQL can only approach this, and at a given batch parallelism a commit
//! holds at most that many nodes' endings: the figure per group size says what that bound
//! costs on this machine. Last, at 10 a commit with the workflow rows' lease and ending made
//! HOT (the indexes on what they set dropped, in this database only): what a schema that keeps
//! the batch queue off the workflow rows could save.

use crate::cpu::{Usage, postmaster_pid};
use crate::{Bench, approved_user};
use basphere_core::Quota;
use basphere_store::now_ms;
use std::path::Path;
use std::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

/// Group sizes measured: every node in one commit; every slot of parallelism 10 in each; about
/// the engine's groups at parallelism 10 (2–3 endings a commit).
const GROUPS: [usize; 3] = [1000, 10, 3];
const NODES: usize = 1000;

const ADMIT: [&str; 5] = [
    "INSERT INTO vms (id, owner, name, os, login_user, spec, vcpus, memory_mib, disk_gib, ip,
         status, provider, created_at, updated_at)
     SELECT $1 || 'v' || g, $2, $1 || 'n' || g, 'debian-12', 'debian', 'small', 1, 512, 10,
         $1 || 'ip' || g, 'creating', 'null', $3, $3
     FROM generate_series(1, $4) g",
    "INSERT INTO workflows (id, definition, resource_kind, resource_id, owner, priority, input,
         next_run_at, provider, batch_id, node, created_at, updated_at, status, step, attempt,
         parked)
     SELECT $1 || 'w' || g, 'create_vm', 'vm', $1 || 'v' || g, $2, 0, '{}', $3, 'null',
         $1 || 'b', 'n' || g, $3 + g, $3, 'pending', 0, 0, 1
     FROM generate_series(1, $4) g",
    "INSERT INTO workflow_steps (workflow_id, idx, name, idem_key, timeout_ms, status)
     SELECT $1 || 'w' || g, i, (ARRAY['prepare', 'start', 'wait_ready'])[i + 1],
         $1 || 'k' || g || '.' || i, 600000, 'pending'
     FROM generate_series(1, $4) g, generate_series(0, 2) i",
    "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
     SELECT $1 || 'w' || g, $3, NULL, 'queued', 'create_vm queued'
     FROM generate_series(1, $4) g",
    "INSERT INTO audit (at, actor, source, action, target, result, detail)
     SELECT $3, $2, 'api', 'vm.create', $1 || 'n' || g, 'accepted', NULL
     FROM generate_series(1, $4) g",
];

/// Leases the nodes `$1` and starts their first step.
const LEASE: &str = "
    WITH l AS (
        UPDATE workflows SET parked = 0, status = 'running', lease_owner = 'floor',
            lease_until = $2 + 15000, updated_at = $2
        WHERE id = ANY($1) RETURNING id, step),
    s AS (
        UPDATE workflow_steps st SET status = 'running', attempts = st.attempts + 1,
            started_at = $2, deadline_at = $2 + 600000
        FROM l WHERE st.workflow_id = l.id AND st.idx = l.step
        RETURNING st.workflow_id, st.name)
    INSERT INTO workflow_events (workflow_id, at, step, kind, message)
    SELECT workflow_id, $2, name, 'step_started', name || ' started' FROM s";

/// Ends the nodes `$1`: their three steps done, six events, the workflow succeeded, the VM
/// running, an audit record.
const END: &str = "
    WITH st AS (
        UPDATE workflow_steps SET status = 'done', finished_at = $2
        WHERE workflow_id = ANY($1) RETURNING workflow_id),
    ev AS (
        INSERT INTO workflow_events (workflow_id, at, step, kind, message)
        SELECT id, $2, e.step, e.kind, e.message FROM unnest($1) id,
            (VALUES ('prepare', 'step_done', 'prepare done'),
                    ('start', 'step_started', 'start started'),
                    ('start', 'step_done', 'start done'),
                    ('wait_ready', 'step_started', 'wait_ready started'),
                    ('wait_ready', 'step_done', 'wait_ready done'),
                    (NULL, 'succeeded', 'create_vm succeeded')) e(step, kind, message)),
    w AS (
        UPDATE workflows SET status = 'succeeded', step = 3, finished_at = $2, updated_at = $2,
            lease_owner = NULL, lease_until = NULL
        WHERE id = ANY($1) RETURNING resource_id),
    v AS (
        UPDATE vms SET status = 'running', updated_at = $2
        WHERE id IN (SELECT resource_id FROM w) RETURNING owner, name)
    INSERT INTO audit (at, actor, source, action, target, result, detail)
    SELECT $2, owner, 'engine', 'vm.create', name, 'created', NULL FROM v";

/// Prints the floor on the bench's PostgreSQL (a fresh database with the store's schema).
pub async fn run(bench: &Bench, dir: &Path) -> anyhow::Result<()> {
    let cfg = bench.config(dir, &[])?;
    let url = cfg.database.url.clone().ok_or_else(|| {
        anyhow::anyhow!("the floor is PostgreSQL's: run it with --backend postgres")
    })?;
    let store = basphere_store::Store::open_postgres(&url).await?;
    let q = Quota {
        max_vms: 100_000,
        max_ips: 100_000,
        ..Quota::default()
    };
    let owner = approved_user(&store, &cfg, "floor", &q).await?.to_string();
    store.close().await;
    let (mut c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let pm = postmaster_pid(&url).await;
    println!(
        "PostgreSQL's floor: the rows {NODES} VM creates write (admission; each node leased, \
         its 3 steps done, 8 events, ended, its VM running, 2 audit records), set-wise, \
         prepared, one connection, commits as the engine's (synchronous_commit off):"
    );
    for g in GROUPS {
        floor_at(
            &mut c,
            pm,
            &owner,
            g,
            &format!("floor{g}."),
            &format!("{g:>4} nodes a commit"),
        )
        .await?;
    }
    // What a schema whose workflow rows leave no index to update at a lease or an ending would
    // save: the indexes on what those set (status, parked) dropped from this database only.
    let hot0 = hot_updates(&c).await?;
    c.batch_execute(HOT_ONLY).await?;
    floor_at(
        &mut c,
        pm,
        &owner,
        10,
        "floorhot.",
        "  10 nodes a commit, HOT (no index on status, parked)",
    )
    .await?;
    let hot = hot_updates(&c).await?;
    let (n, h) = (hot.0 - hot0.0, hot.1 - hot0.1);
    println!(
        "    (of its {n} workflow updates {h} HOT: {:.0}%)",
        100.0 * h as f64 / n.max(1) as f64
    );
    Ok(())
}

/// The workflows' indexes whose columns a lease or an ending sets: without them both updates
/// are HOT (a new row version on the same page, no index entries).
const HOT_ONLY: &str = "DROP INDEX workflows_ready; DROP INDEX workflows_cancelling;
    DROP INDEX workflows_batch_nodes";

/// The workflows' updates so far, and how many of them were HOT (this session's own counts
/// flushed first).
async fn hot_updates(c: &Client) -> anyhow::Result<(i64, i64)> {
    c.execute("SELECT pg_stat_force_next_flush()", &[]).await?;
    c.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let r = c
        .query_one(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'workflows'",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Admits the floor's nodes under `prefix`, runs them `g` a commit and prints both as `label`.
async fn floor_at(
    c: &mut Client,
    pm: Option<u32>,
    owner: &str,
    g: usize,
    prefix: &str,
    label: &str,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let u0 = Usage::now(pm);
    admit(c, prefix, owner).await?;
    let admitted = (t0.elapsed(), Usage::now(pm).since(&u0));
    let t1 = Instant::now();
    let u1 = Usage::now(pm);
    run_nodes(c, prefix, g).await?;
    let (took, used) = (t1.elapsed(), Usage::now(pm).since(&u1));
    let count: i64 = c
        .query_one(
            "SELECT count(*) FROM workflows WHERE batch_id = $1 AND status = 'succeeded'",
            &[&format!("{prefix}b")],
        )
        .await?
        .get(0);
    anyhow::ensure!(count == NODES as i64, "only {count} of {NODES} nodes ended");
    let pg = |u: &Usage| u.postgres_s.map_or("?".into(), |s| format!("{s:.2}"));
    println!(
        "  {label}: admission {:.0} ms (PostgreSQL CPU {} s), the nodes {:.0} ms \
         (PostgreSQL CPU {} s, this process {:.2} s)",
        admitted.0.as_secs_f64() * 1000.0,
        pg(&admitted.1),
        took.as_secs_f64() * 1000.0,
        pg(&used),
        used.process_s,
    );
    Ok(())
}

async fn admit(c: &mut Client, prefix: &str, owner: &str) -> anyhow::Result<()> {
    let tx = c.transaction().await?;
    let n = NODES as i64;
    let now = now_ms();
    for sql in ADMIT {
        // Typed: not every statement uses every parameter.
        let st = tx
            .prepare_typed(sql, &[Type::TEXT, Type::TEXT, Type::INT8, Type::INT8])
            .await?;
        tx.execute(&st, &[&prefix, &owner, &now, &n]).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Leases the first group, then commits each group's ending with the next group's lease (as
/// a batch hands its slots on), the last group's ending alone.
async fn run_nodes(c: &mut Client, prefix: &str, g: usize) -> anyhow::Result<()> {
    let types = [Type::TEXT_ARRAY, Type::INT8];
    let lease = c.prepare_typed(LEASE, &types).await?;
    let end = c.prepare_typed(END, &types).await?;
    let ids: Vec<String> = (1..=NODES).map(|i| format!("{prefix}w{i}")).collect();
    let groups: Vec<Vec<String>> = ids.chunks(g).map(<[String]>::to_vec).collect();
    c.batch_execute("SET synchronous_commit TO off").await?;
    let tx = c.transaction().await?;
    tx.execute(&lease, &[&groups[0], &now_ms()]).await?;
    tx.commit().await?;
    for (i, group) in groups.iter().enumerate() {
        let now = now_ms();
        let tx = c.transaction().await?;
        match groups.get(i + 1) {
            Some(next) => {
                let (a, b): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 2]) =
                    ([group, &now], [next, &now]);
                tokio::try_join!(tx.execute(&end, &a), tx.execute(&lease, &b))?;
            }
            None => {
                tx.execute(&end, &[group, &now]).await?;
            }
        }
        tx.commit().await?;
    }
    c.batch_execute("RESET synchronous_commit").await?;
    Ok(())
}

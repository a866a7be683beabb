-- Basphere schema v2: the general step model, batches as DAGs, cancel/retry, limits.
-- Times are Unix milliseconds, as in v1.

-- A workflow may belong to a batch (a DAG applied from a manifest) as the node `node`; it is
-- runnable only once `waiting_on` (its unfinished dependencies) is 0. `provider` and `host` are
-- the keys of the per-provider and per-host concurrency limits (NULL: not limited by that key).
-- `definition` names the engine code that runs the steps (NULL: the kind's own).
ALTER TABLE workflows ADD COLUMN definition TEXT;
ALTER TABLE workflows ADD COLUMN batch_id TEXT;
ALTER TABLE workflows ADD COLUMN node TEXT;
ALTER TABLE workflows ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workflows ADD COLUMN provider TEXT;
ALTER TABLE workflows ADD COLUMN host TEXT;
CREATE INDEX workflows_claim ON workflows (status, waiting_on, next_run_at);
CREATE INDEX workflows_batch ON workflows (batch_id, lease_until);
CREATE INDEX workflows_owner_lease ON workflows (owner, lease_until);
CREATE INDEX workflows_provider_lease ON workflows (provider, lease_until);
CREATE INDEX workflows_host_lease ON workflows (host, lease_until);

-- Each step carries its idempotency key (what a provider names its work after, stable across
-- retries and restarts), the deadline of its current attempt, and what it reported.
ALTER TABLE workflow_steps ADD COLUMN idem_key TEXT;
ALTER TABLE workflow_steps ADD COLUMN deadline_at INTEGER;
ALTER TABLE workflow_steps ADD COLUMN output TEXT;

-- Edges of a batch's DAG: `workflow_id` runs after `depends_on` ends. A hard edge (requires)
-- skips the dependent when its dependency fails; a soft one (optional) only orders.
CREATE TABLE workflow_deps (
    workflow_id     TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    depends_on      TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    hard            INTEGER NOT NULL,
    PRIMARY KEY (workflow_id, depends_on)
);
CREATE INDEX workflow_deps_on ON workflow_deps (depends_on);

CREATE TABLE batches (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    parallelism     INTEGER NOT NULL,
    nodes           INTEGER NOT NULL,
    created_at      INTEGER NOT NULL
);

-- Effects a step commits in the same transaction as its completion (the transactional outbox):
-- a crash either loses both (the step runs again) or keeps both (it never runs again).
CREATE TABLE step_effects (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id     TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,
    key             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    at              INTEGER NOT NULL
);
CREATE INDEX step_effects_key ON step_effects (key);
CREATE INDEX step_effects_wf ON step_effects (workflow_id, idx);

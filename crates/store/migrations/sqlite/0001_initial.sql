-- Basphere schema v1. Portable SQL where possible: PostgreSQL gets its own folder with the same
-- tables (BIGINT/BIGSERIAL instead of INTEGER/AUTOINCREMENT). Times are Unix milliseconds.

CREATE TABLE users (
    username        TEXT PRIMARY KEY,
    email           TEXT NOT NULL,
    team            TEXT NOT NULL,
    public_key      TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'active', 'rejected', 'disabled')),
    max_vms         INTEGER NOT NULL,
    max_clusters    INTEGER NOT NULL,
    max_ips         INTEGER NOT NULL,
    max_vcpus       INTEGER,
    max_memory_mib  INTEGER,
    ip_block        INTEGER UNIQUE,
    unix_account    INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE registrations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    username        TEXT NOT NULL,
    email           TEXT NOT NULL,
    team            TEXT NOT NULL,
    public_key      TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    created_at      INTEGER NOT NULL,
    processed_by    TEXT,
    processed_at    INTEGER,
    reject_reason   TEXT
);
CREATE INDEX registrations_user ON registrations (username);

CREATE TABLE key_changes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    username        TEXT NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    public_key      TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    created_at      INTEGER NOT NULL,
    processed_by    TEXT,
    processed_at    INTEGER,
    reject_reason   TEXT
);

CREATE TABLE tokens (
    id              TEXT PRIMARY KEY,
    username        TEXT NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    hash            TEXT NOT NULL UNIQUE,
    created_at      INTEGER NOT NULL,
    last_used_at    INTEGER,
    expires_at      INTEGER
);

CREATE TABLE enrollment_codes (
    hash            TEXT PRIMARY KEY,
    username        TEXT NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER
);

CREATE TABLE vms (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL REFERENCES users (username),
    name            TEXT NOT NULL,
    os              TEXT NOT NULL,
    login_user      TEXT NOT NULL,
    spec            TEXT NOT NULL,
    vcpus           INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    disk_gib        INTEGER NOT NULL,
    ip              TEXT UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('creating', 'running', 'deleting', 'failed')),
    error           TEXT,
    provider        TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (owner, name)
);

CREATE TABLE workflows (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    vm_id           TEXT,
    owner           TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'running', 'undoing', 'succeeded', 'failed', 'cancelled')),
    step            INTEGER NOT NULL DEFAULT 0,
    attempt         INTEGER NOT NULL DEFAULT 0,
    priority        INTEGER NOT NULL DEFAULT 0,
    input           TEXT NOT NULL,
    error           TEXT,
    lease_owner     TEXT,
    lease_until     INTEGER,
    next_run_at     INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX workflows_runnable ON workflows (status, next_run_at);
CREATE INDEX workflows_vm ON workflows (vm_id);

CREATE TABLE workflow_steps (
    workflow_id     TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,
    name            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'undone', 'skipped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    started_at      INTEGER,
    finished_at     INTEGER,
    PRIMARY KEY (workflow_id, idx)
);

CREATE TABLE workflow_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id     TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    at              INTEGER NOT NULL,
    step            TEXT,
    kind            TEXT NOT NULL,
    message         TEXT NOT NULL
);
CREATE INDEX workflow_events_wf ON workflow_events (workflow_id, seq);

CREATE TABLE audit (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              INTEGER NOT NULL,
    actor           TEXT NOT NULL,
    source          TEXT NOT NULL,
    action          TEXT NOT NULL,
    target          TEXT NOT NULL,
    result          TEXT NOT NULL,
    detail          TEXT
);
CREATE INDEX audit_at ON audit (at);

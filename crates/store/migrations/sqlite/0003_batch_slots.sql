-- Basphere schema v3: batch parallelism as slots handed out at admission and at each node's end,
-- so that claiming never counts a batch's nodes; and an index that lets the claim walk ready
-- workflows in priority order and stop at the first one it may take.

-- A parked batch node waits for one of its batch's `parallelism` slots.
ALTER TABLE workflows ADD COLUMN parked INTEGER NOT NULL DEFAULT 0;
CREATE INDEX workflows_ready ON workflows (priority DESC, created_at)
    WHERE status IN ('pending', 'running', 'undoing') AND waiting_on = 0 AND parked = 0;
CREATE INDEX workflows_cancelling ON workflows (cancel_requested)
    WHERE cancel_requested = 1 AND status IN ('pending', 'running', 'undoing');
CREATE INDEX workflows_batch_slots ON workflows (batch_id, parked, waiting_on, status);
CREATE INDEX workflows_lease ON workflows (lease_until);

-- Basphere schema v4: fewer indexes on `workflows`. Every step transition updates a workflow
-- row, and SQLite rewrites every index that names a column the UPDATE sets; twelve indexes made
-- each transition write a dozen b-tree pages. What remains covers every query:
--   workflows_ready (v3)      claims, next due time, the concurrency limits' live leases
--   workflows_cancelling (v3) claims of cancel requests
--   workflows_vm (v1)         a VM's operations
--   workflows_batch_nodes     a batch's nodes, its free slots and its ready parked nodes
DROP INDEX IF EXISTS workflows_runnable;
DROP INDEX IF EXISTS workflows_claim;
DROP INDEX IF EXISTS workflows_batch;
DROP INDEX IF EXISTS workflows_owner_lease;
DROP INDEX IF EXISTS workflows_provider_lease;
DROP INDEX IF EXISTS workflows_host_lease;
DROP INDEX IF EXISTS workflows_lease;
DROP INDEX IF EXISTS workflows_batch_slots;
-- `status` before `waiting_on`: counting a batch's running nodes reads only those, not the
-- finished ones.
CREATE INDEX workflows_batch_nodes ON workflows (batch_id, parked, status, waiting_on);

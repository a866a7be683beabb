-- A batch's ready parked nodes in queue order (created_at, id) straight from the index, as on
-- PostgreSQL (its migration 13): a slot fill reads the first few instead of sorting every
-- parked node of the batch.
DROP INDEX workflows_batch_nodes;
CREATE INDEX workflows_batch_nodes ON workflows (batch_id, parked, status, waiting_on, created_at, id);

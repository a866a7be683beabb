-- How long one attempt of a step may take, fixed when its workflow is queued: whichever node
-- starts the step reads its deadline here. NULL (steps queued before): the store's default.
ALTER TABLE workflow_steps ADD COLUMN timeout_ms BIGINT;

-- A workflow's steps and its batch edges are written only by the store, with the workflow, in
-- the same transaction, as the event log is (0003). Their foreign keys checked every row of a
-- batch's admission against its workflow (3,000 step rows and up to 2,000 edges for 1,000
-- nodes: ~15 ms of an 85 ms admission) and locked those rows (FOR KEY SHARE). Deleting
-- workflows deletes their steps and edges explicitly (users/accounts.rs).
ALTER TABLE workflow_steps DROP CONSTRAINT workflow_steps_workflow_id_fkey;
ALTER TABLE workflow_deps DROP CONSTRAINT workflow_deps_workflow_id_fkey;
ALTER TABLE workflow_deps DROP CONSTRAINT workflow_deps_depends_on_fkey;

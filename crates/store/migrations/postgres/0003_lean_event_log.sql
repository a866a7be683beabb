-- The event log is appended only by the store, always for a workflow written in the same
-- transaction; its foreign key made every append lock the workflow's row (FOR KEY SHARE), two
-- row locks per step completion on the hottest row there is. Deleting workflows deletes their
-- events explicitly (users/accounts.rs).
ALTER TABLE workflow_events DROP CONSTRAINT workflow_events_workflow_id_fkey;

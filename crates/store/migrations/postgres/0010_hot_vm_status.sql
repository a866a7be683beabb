-- A VM's status changes after its row is written (creating → running at the create's end,
-- deleting, failed): room on each page (fillfactor, as workflows and workflow_steps have since
-- 0001) keeps that update HOT — no new entries in the four indexes of vms, whose columns it
-- does not change. Pages written before keep their layout until rewritten.
ALTER TABLE vms SET (fillfactor = 80);

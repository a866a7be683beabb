-- The ledger knows no resource kind: a workflow names its definition and, optionally, the
-- resource it acts on (kind + id). A workflow may be the child of another (a step spawned it);
-- the parent waits for its children through `waiting_on`, like a batch node for its edges.
ALTER TABLE workflows ADD COLUMN resource_kind TEXT;
ALTER TABLE workflows ADD COLUMN resource_id TEXT;
ALTER TABLE workflows ADD COLUMN parent_id TEXT;
UPDATE workflows SET definition = COALESCE(definition, kind),
    resource_kind = CASE WHEN vm_id IS NOT NULL THEN 'vm' END,
    resource_id = vm_id;
DROP INDEX IF EXISTS workflows_vm;
ALTER TABLE workflows DROP COLUMN vm_id;
ALTER TABLE workflows DROP COLUMN kind;
CREATE INDEX workflows_resource ON workflows (resource_id) WHERE resource_id IS NOT NULL;
CREATE INDEX workflows_parent ON workflows (parent_id) WHERE parent_id IS NOT NULL;

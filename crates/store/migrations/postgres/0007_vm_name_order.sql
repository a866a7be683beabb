-- VMs listed by owner, then name, in byte order (`COLLATE "C"`, whatever the database's
-- collation, as SQLite sorts): each page is an index range, not a sort of the whole table.
CREATE INDEX vms_owner_name_bytes ON vms (owner COLLATE "C", name COLLATE "C");

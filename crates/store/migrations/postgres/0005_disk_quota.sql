-- A per-user limit on disk space (boot and extra disks over all their VMs); NULL: no limit.
ALTER TABLE users ADD COLUMN max_disk_gib BIGINT;

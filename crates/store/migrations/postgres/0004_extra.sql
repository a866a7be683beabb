-- Extra disks and extra networks of a VM (issue 11): what it was admitted with, as JSON lists
-- the store alone writes, and the disk space they add (counted toward the owner's max_disk_gib).
ALTER TABLE vms ADD COLUMN extra_disks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE vms ADD COLUMN extra_nics TEXT NOT NULL DEFAULT '[]';
ALTER TABLE vms ADD COLUMN extra_disk_gib BIGINT NOT NULL DEFAULT 0;
-- A static address on an extra network is leased here: the primary key is the lease, as the
-- `vms.ip` column is on the VM network. It lives as long as the VM record.
CREATE TABLE vm_nic_leases (
    network TEXT NOT NULL,
    ip TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    PRIMARY KEY (network, ip)
);
CREATE INDEX vm_nic_leases_vm ON vm_nic_leases (vm_id);

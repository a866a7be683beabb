//! What a VM holds beside its boot disk and its own network: extra disks and extra networks.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

crate::text_enum! {
    /// What the guest does with an extra disk.
    pub enum DiskMode {
        /// Formatted ext4 and mounted at `/data`, `/data2`, … on first boot.
        Auto = "auto",
        /// Left unformatted for the user.
        Raw = "raw",
    }
}

/// A disk added to a VM beside its boot disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraDisk {
    pub size_gib: u32,
    pub mode: DiskMode,
}

/// A VM's interface on an extra (catalog) network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraNic {
    /// The catalog network's name (`[networks.NAME]`).
    pub network: String,
    /// The static address leased from the network's own pool; `None` on a DHCP network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
}

/// The mount point of the `n`-th (from 0) automatic disk: `/data`, `/data2`, `/data3`, …
pub fn mount_point(n: usize) -> String {
    match n {
        0 => "/data".to_string(),
        n => format!("/data{}", n + 1),
    }
}

/// A stable disk serial for the `index`-th (from 0) extra disk of instance `instance`: at most
/// 20 characters (virtio-blk's limit), seen in the guest as `/dev/disk/by-id/virtio-<serial>`.
pub fn disk_serial(instance: &str, index: usize) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in instance.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("bsp{:012x}d{}", h >> 16, index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_short_stable_and_distinct() {
        let a = disk_serial("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33", 0);
        assert!(a.len() <= 20, "{a}");
        assert_eq!(a, disk_serial("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33", 0));
        assert_ne!(a, disk_serial("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33", 1));
        assert_ne!(a, disk_serial("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a34", 0));
        assert!(disk_serial("x", 98).len() <= 20);
    }

    #[test]
    fn mount_points_follow_the_prototype() {
        assert_eq!(mount_point(0), "/data");
        assert_eq!(mount_point(1), "/data2");
        assert_eq!(mount_point(2), "/data3");
    }
}

use crate::Spec;
use serde::{Deserialize, Serialize};

/// Limits on what one user may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub max_vms: u32,
    pub max_clusters: u32,
    pub max_ips: u32,
    /// Sum of vCPUs over the user's VMs; `None` means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Sum of memory in MiB over the user's VMs; `None` means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// GiB of disk (boot and extra disks) over the user's VMs; `None` means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk_gib: Option<u64>,
}

impl Default for Quota {
    /// The prototype's defaults: 10 VMs, 3 clusters, 32 IPs.
    fn default() -> Self {
        Self {
            max_vms: 10,
            max_clusters: 3,
            max_ips: 32,
            max_vcpus: None,
            max_memory_mib: None,
            max_disk_gib: None,
        }
    }
}

/// What a user holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub vms: u32,
    pub clusters: u32,
    pub ips: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// GiB of disk, boot and extra disks together.
    #[serde(default)]
    pub disk_gib: u64,
}

/// Which limit a request would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuotaLimit {
    Vms,
    Ips,
    Vcpus,
    MemoryMib,
    Clusters,
    /// GiB of disk, boot and extra disks together.
    DiskGib,
}

impl QuotaLimit {
    /// What the limit counts, as one and as many: `("VM", "VMs")`.
    pub fn nouns(self) -> (&'static str, &'static str) {
        match self {
            QuotaLimit::Vms => ("VM", "VMs"),
            QuotaLimit::Ips => ("IP address", "IP addresses"),
            QuotaLimit::Vcpus => ("vCPU", "vCPUs"),
            QuotaLimit::MemoryMib => ("MiB of memory", "MiB of memory"),
            QuotaLimit::Clusters => ("cluster", "clusters"),
            QuotaLimit::DiskGib => ("GiB of disk", "GiB of disk"),
        }
    }
}

/// A request refused because it would exceed a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaExceeded {
    pub limit: QuotaLimit,
    pub used: u64,
    pub requested: u64,
    pub requested_total: u64,
    pub max: u64,
}

impl std::fmt::Display for QuotaExceeded {
    /// `quota exceeded: you use 10 VMs and asked for 1 more, but your limit is 10 VMs; …`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (one, many) = self.limit.nouns();
        let noun = |n: u64| if n == 1 { one } else { many };
        write!(
            f,
            "quota exceeded: you use {} {} and asked for {} more, but your limit is {} {}; \
             delete some or ask an admin to raise the limit",
            self.used,
            noun(self.used),
            self.requested,
            self.max,
            noun(self.max)
        )
    }
}

impl std::error::Error for QuotaExceeded {}

impl Quota {
    /// Checks that adding `count` VMs, each of size `each` (its `disk_gib` counting boot and
    /// extra disks), to `usage` stays within limits.
    pub fn admit(&self, usage: &Usage, count: u32, each: &Spec) -> Result<(), QuotaExceeded> {
        let check = |limit, used: u64, requested: u64, max: Option<u64>| match max {
            Some(max) if used + requested > max => Err(QuotaExceeded {
                limit,
                used,
                requested,
                requested_total: used + requested,
                max,
            }),
            _ => Ok(()),
        };
        let n = u64::from(count);
        check(
            QuotaLimit::Vms,
            usage.vms.into(),
            n,
            Some(self.max_vms.into()),
        )?;
        check(
            QuotaLimit::Ips,
            usage.ips.into(),
            n,
            Some(self.max_ips.into()),
        )?;
        check(
            QuotaLimit::Vcpus,
            usage.vcpus.into(),
            n * u64::from(each.vcpus),
            self.max_vcpus.map(u64::from),
        )?;
        check(
            QuotaLimit::MemoryMib,
            usage.memory_mib,
            n * each.memory_mib,
            self.max_memory_mib,
        )?;
        check(
            QuotaLimit::DiskGib,
            usage.disk_gib,
            n * each.disk_gib,
            self.max_disk_gib,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: Spec = Spec {
        vcpus: 2,
        memory_mib: 4096,
        disk_gib: 50,
    };

    #[test]
    fn refusals_read_naturally() {
        let q = Quota::default();
        let u = Usage {
            vms: 10,
            ..Usage::default()
        };
        let e = q.admit(&u, 1, &SIZE).unwrap_err();
        assert_eq!(
            e.to_string(),
            "quota exceeded: you use 10 VMs and asked for 1 more, but your limit is 10 VMs; \
             delete some or ask an admin to raise the limit"
        );
        let one = QuotaExceeded {
            limit: QuotaLimit::Ips,
            used: 1,
            requested: 2,
            requested_total: 3,
            max: 1,
        };
        assert!(
            one.to_string().contains(
                "you use 1 IP address and asked for 2 more, but your limit is 1 IP address;"
            ),
            "{one}"
        );
    }

    #[test]
    fn admits_up_to_the_limit() {
        let q = Quota::default();
        let mut u = Usage::default();
        assert!(q.admit(&u, 10, &SIZE).is_ok());
        u.vms = 9;
        u.ips = 9;
        assert!(q.admit(&u, 1, &SIZE).is_ok());
        let e = q.admit(&u, 2, &SIZE).unwrap_err();
        assert_eq!(e.limit, QuotaLimit::Vms);
        assert_eq!((e.used, e.requested, e.max), (9, 2, 10));
    }

    #[test]
    fn optional_limits() {
        let q = Quota {
            max_vcpus: Some(4),
            ..Quota::default()
        };
        assert_eq!(
            q.admit(&Usage::default(), 3, &SIZE).unwrap_err().limit,
            QuotaLimit::Vcpus
        );
    }

    #[test]
    fn disk_counts_boot_and_extra_disks_of_every_vm() {
        let q = Quota {
            max_disk_gib: Some(200),
            ..Quota::default()
        };
        let u = Usage {
            disk_gib: 60,
            ..Usage::default()
        };
        let each = Spec {
            disk_gib: 70,
            ..SIZE
        };
        assert!(q.admit(&u, 2, &each).is_ok(), "60 + 2 × 70 = 200");
        let e = q.admit(&u, 3, &each).unwrap_err();
        assert_eq!(e.limit, QuotaLimit::DiskGib);
        assert_eq!((e.used, e.requested, e.max), (60, 210, 200));
        assert!(e.to_string().contains("limit is 200 GiB of disk"), "{e}");
    }
}

use serde::{Deserialize, Serialize};

/// Limits on what one user may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
        }
    }
}

/// What a user holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub vms: u32,
    pub clusters: u32,
    pub ips: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Which limit a request would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaLimit {
    Vms,
    Ips,
    Vcpus,
    MemoryMib,
    Clusters,
}

/// A request refused because it would exceed a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "quota exceeded: {limit:?} would be {requested_total} but the limit is {max} ({used} in use, {requested} requested)"
)]
pub struct QuotaExceeded {
    pub limit: QuotaLimit,
    pub used: u64,
    pub requested: u64,
    pub requested_total: u64,
    pub max: u64,
}

impl Quota {
    /// Checks that adding `count` VMs of `vcpus`/`memory_mib` each to `usage` stays within limits.
    pub fn admit(
        &self,
        usage: &Usage,
        count: u32,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(), QuotaExceeded> {
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
        check(
            QuotaLimit::Vms,
            usage.vms.into(),
            count.into(),
            Some(self.max_vms.into()),
        )?;
        check(
            QuotaLimit::Ips,
            usage.ips.into(),
            count.into(),
            Some(self.max_ips.into()),
        )?;
        check(
            QuotaLimit::Vcpus,
            usage.vcpus.into(),
            u64::from(count) * u64::from(vcpus),
            self.max_vcpus.map(u64::from),
        )?;
        check(
            QuotaLimit::MemoryMib,
            usage.memory_mib,
            u64::from(count) * memory_mib,
            self.max_memory_mib,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit() {
        let q = Quota::default();
        let mut u = Usage::default();
        assert!(q.admit(&u, 10, 2, 4096).is_ok());
        u.vms = 9;
        u.ips = 9;
        assert!(q.admit(&u, 1, 2, 4096).is_ok());
        let e = q.admit(&u, 2, 2, 4096).unwrap_err();
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
            q.admit(&Usage::default(), 3, 2, 1).unwrap_err().limit,
            QuotaLimit::Vcpus
        );
    }
}

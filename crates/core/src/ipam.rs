use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// The address pool VMs draw from, carved into equal per-user blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPool {
    /// The whole VM network, e.g. `10.254.0.0/21`. VMs get this prefix length.
    pub cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Addresses per user block; a power of two from 4 to the pool's size.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Addresses never handed to a VM (besides the gateway and the pool's network/broadcast).
    #[serde(default)]
    pub reserved: Vec<Ipv4Addr>,
}

fn default_mtu() -> u32 {
    1500
}
fn default_block_size() -> u32 {
    32
}

/// Why a network pool is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkPoolError {
    #[error("block_size {0} must be a power of two between 4 and the pool size {1}")]
    BlockSize(u32, u64),
    #[error("gateway {0} is not inside {1}")]
    Gateway(Ipv4Addr, Ipv4Net),
    #[error("cidr {0} is not a network address (did you mean {1}?)")]
    NotNetwork(Ipv4Net, Ipv4Net),
    #[error("mtu {0} must be between 576 and 9000")]
    Mtu(u32),
}

/// One user's block: block number `index` of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpBlock {
    pub index: u32,
    pub net: Ipv4Net,
}

impl NetworkPool {
    /// Checks the pool's internal consistency.
    pub fn validate(&self) -> Result<(), NetworkPoolError> {
        let size = 1u64 << (32 - self.cidr.prefix_len());
        if !self.block_size.is_power_of_two()
            || self.block_size < 4
            || u64::from(self.block_size) > size
        {
            return Err(NetworkPoolError::BlockSize(self.block_size, size));
        }
        if self.cidr.network() != self.cidr.addr() {
            return Err(NetworkPoolError::NotNetwork(self.cidr, self.cidr.trunc()));
        }
        if !self.cidr.contains(&self.gateway) {
            return Err(NetworkPoolError::Gateway(self.gateway, self.cidr));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(NetworkPoolError::Mtu(self.mtu));
        }
        Ok(())
    }

    /// How many user blocks the pool holds.
    pub fn block_count(&self) -> u32 {
        let size = 1u64 << (32 - self.cidr.prefix_len());
        (size / u64::from(self.block_size)) as u32
    }

    /// Block number `index`, if the pool has it.
    pub fn block(&self, index: u32) -> Option<IpBlock> {
        if index >= self.block_count() {
            return None;
        }
        let prefix = 32 - self.block_size.trailing_zeros() as u8;
        let start = u32::from(self.cidr.network()) + index * self.block_size;
        Some(IpBlock {
            index,
            net: Ipv4Net::new(Ipv4Addr::from(start), prefix).expect("prefix <= 32"),
        })
    }

    /// Whether `addr` may be given to a VM at all.
    pub fn assignable(&self, addr: Ipv4Addr) -> bool {
        self.cidr.contains(&addr)
            && addr != self.cidr.network()
            && addr != self.cidr.broadcast()
            && addr != self.gateway
            && !self.reserved.contains(&addr)
    }

    /// The addresses of `block` a VM may get, lowest first.
    pub fn assignable_in(&self, block: &IpBlock) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let start = u32::from(block.net.network());
        (start..start + self.block_size)
            .map(Ipv4Addr::from)
            .filter(|a| self.assignable(*a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> NetworkPool {
        NetworkPool {
            cidr: "10.254.0.0/21".parse().unwrap(),
            gateway: "10.254.0.1".parse().unwrap(),
            dns: vec![],
            mtu: 1500,
            block_size: 32,
            reserved: vec!["10.254.0.2".parse().unwrap()],
        }
    }

    #[test]
    fn blocks() {
        let p = pool();
        p.validate().unwrap();
        assert_eq!(p.block_count(), 64);
        assert_eq!(p.block(1).unwrap().net.to_string(), "10.254.0.32/27");
        assert!(p.block(64).is_none());
        let first: Vec<_> = p.assignable_in(&p.block(0).unwrap()).collect();
        assert_eq!(first.len(), 29); // minus network, gateway, reserved
        assert_eq!(first[0].to_string(), "10.254.0.3");
        let last: Vec<_> = p.assignable_in(&p.block(63).unwrap()).collect();
        assert_eq!(last.len(), 31); // minus the pool's broadcast
    }

    #[test]
    fn invalid_pools() {
        let mut p = pool();
        p.block_size = 30;
        assert!(p.validate().is_err());
        let mut p = pool();
        p.gateway = "10.0.0.1".parse().unwrap();
        assert!(p.validate().is_err());
        let mut p = pool();
        p.cidr = "10.254.0.5/21".parse().unwrap();
        assert!(p.validate().is_err());
    }
}

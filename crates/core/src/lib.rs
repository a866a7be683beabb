//! Domain types and rules of Basphere.
//!
//! Architecture invariant: this crate does no IO and knows nothing of HTTP, SQL or processes.
//! Every value that crosses into the rest of the system from outside is parsed into one of these
//! types first, so a `VmName` or `SshPublicKey` held anywhere is already valid.

mod error;
mod extra;
mod ipam;
mod names;
mod quota;
mod spec;
mod ssh;
mod state;
mod text_enum;

pub use error::{FieldError, FieldErrors};
pub use extra::{DiskMode, ExtraDisk, ExtraNic, disk_serial, mount_point};
pub use ipam::{IpBlock, NetworkPool, NetworkPoolError};
pub use names::{Email, ImageName, NameError, Team, Username, VmName};
pub use quota::{Quota, QuotaExceeded, QuotaLimit, Usage};
pub use spec::{Spec, SpecName};
pub use ssh::{SshKeyError, SshPublicKey};
pub use state::{
    RegistrationStatus, ResourceRef, Role, StepStatus, UserStatus, VmOperation, VmStatus,
    WorkflowStatus,
};
pub use text_enum::UnknownVariant;

#[doc(hidden)]
pub mod __private {
    pub use serde;
    pub use utoipa;
}

/// Smallest and largest number of VMs one create request may ask for.
pub const VM_COUNT_RANGE: std::ops::RangeInclusive<u32> = 1..=10;

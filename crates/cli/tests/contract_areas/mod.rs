//! The contract's areas, one file each (helpers in `contract.rs`).

mod key_change;
mod registration;
mod vms;

//! Test harness: the kit's real `basphere serve` process (`basphere_testkit::server`), bound to
//! this crate's binary.
#![allow(dead_code, unused_imports)]

pub use basphere_testkit::keys::{TEST_KEY as KEY, keygen};
pub use basphere_testkit::server::{
    Server, default_config, get_data, quota_usage, registration, registration_with_key, wait_op,
    wait_vm,
};
pub use basphere_testkit::{AccountGuard, is_root, run_ok, skip_unless_root};

pub const BIN: &str = env!("CARGO_BIN_EXE_basphere");

/// Starts a server of this crate's binary with `extra` BASPHERE_* settings.
pub fn server(extra: &[(&str, &str)]) -> Server {
    Server::start(BIN, extra)
}

//! SSH keys for tests: one fixed valid public key, fresh pairs from ssh-keygen, and the client
//! options of a non-interactive login.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A valid ed25519 public key line whose private half nobody needs (registrations, seeds).
pub const TEST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@basphere";

/// `ssh` options for a login that never prompts and trusts any host key (throwaway hosts).
pub const SSH_BATCH_OPTS: [&str; 6] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
];

/// A fresh ed25519 pair `dir/name` (+ `.pub`, comment `name`) from ssh-keygen; returns the
/// private key's path and the public key line.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(st.success(), "ssh-keygen -f {} failed", key.display());
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, pubkey.trim().to_string())
}

//! Unix accounts on the bastion for approved users (when `bastion.manage_accounts` is on).
//! Every function is idempotent: it brings the account to the wanted state whatever it was.

use basphere_core::{SshPublicKey, Username};
use std::path::PathBuf;
use std::process::Command;

/// Manages `basphere-users` accounts on this host.
#[derive(Debug, Clone)]
pub struct UnixAccounts {
    pub group: String,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn exists(name: &str) -> bool {
    nix::unistd::User::from_name(name).ok().flatten().is_some()
}

impl UnixAccounts {
    /// Creates the account (and the group) if missing and installs `key` as its only key.
    pub fn ensure(&self, user: &Username, key: &SshPublicKey) -> Result<(), String> {
        if nix::unistd::Group::from_name(&self.group)
            .ok()
            .flatten()
            .is_none()
        {
            run(Command::new("groupadd").arg("--system").arg(&self.group))?;
        }
        if !exists(user.as_str()) {
            run(Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/bash", "--gid"])
                .arg(&self.group)
                .arg(user.as_str()))?;
        }
        self.set_key(user, key)
    }

    /// Replaces the account's authorized key.
    pub fn set_key(&self, user: &Username, key: &SshPublicKey) -> Result<(), String> {
        let pw = nix::unistd::User::from_name(user.as_str())
            .ok()
            .flatten()
            .ok_or_else(|| format!("Unix account {user} does not exist"))?;
        let ssh: PathBuf = pw.dir.join(".ssh");
        std::fs::create_dir_all(&ssh).map_err(|e| format!("{}: {e}", ssh.display()))?;
        let file = ssh.join("authorized_keys");
        let tmp = ssh.join("authorized_keys.tmp");
        std::fs::write(&tmp, format!("{key}\n")).map_err(|e| format!("{}: {e}", tmp.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| e.to_string())?;
        for p in [&ssh, &tmp] {
            nix::unistd::chown(p.as_path(), Some(pw.uid), Some(pw.gid))
                .map_err(|e| e.to_string())?;
        }
        std::fs::rename(&tmp, &file).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Removes the account and its home directory; succeeds if it is already gone.
    pub fn remove(&self, user: &Username) -> Result<(), String> {
        if !exists(user.as_str()) {
            return Ok(());
        }
        run(Command::new("userdel").arg("--remove").arg(user.as_str()))
    }
}

//! File modes of the server's data: only root may read VM disks, consoles, the database and
//! tokens.
//!
//! The server runs with umask 077, so everything it creates is 0600/0700. Installs made before
//! that (0755 directories, 0644 files) are repaired at start by [`repair`].

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Makes every file this process creates from now on private to its owner.
pub fn private_umask() {
    // SAFETY: umask only changes this process's file creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// What [`repair`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// Paths whose group/other bits were removed, with their old mode.
    pub tightened: Vec<(std::path::PathBuf, u32)>,
}

/// Removes the group and other permission bits of `root` and of every directory and file below
/// it. Symbolic links are neither followed nor changed; other file systems are not entered.
/// Each directory is tightened before it is read, so once it is done no other account can
/// reach, swap or add entries beneath it while the walk goes on. A missing `root` is fine.
pub fn repair(root: &Path) -> io::Result<Repaired> {
    let mut out = Repaired::default();
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(out);
    }
    walk(root, meta, &mut out)?;
    Ok(out)
}

fn walk(path: &Path, meta: std::fs::Metadata, out: &mut Repaired) -> io::Result<()> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o077))
            .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", path.display())))?;
        out.tightened.push((path.to_path_buf(), mode));
    }
    if meta.is_dir() {
        let device = meta.dev();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let child = entry.path();
            let m = match std::fs::symlink_metadata(&child) {
                Ok(m) => m,
                // Removed meanwhile (a VM deleted, a console rotated).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if m.file_type().is_symlink() || m.dev() != device {
                continue;
            }
            match walk(&child, m, out) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// Repairs the data dir and, with the qemu provider, its state and images dirs (they may lie
/// elsewhere), reporting what was readable by others before.
pub fn repair_install(cfg: &basphere_config::Config) -> anyhow::Result<()> {
    let mut dirs = vec![cfg.data_dir.clone()];
    if cfg.provider.kind == basphere_config::ProviderKind::Qemu {
        let q = crate::providers::qemu_config(cfg)?;
        dirs.extend([q.state_dir, q.images_dir]);
    }
    for dir in &dirs {
        let r = repair(dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot make {} private to root: {e} (fix its owner/modes, then restart)",
                dir.display()
            )
        })?;
        for (path, mode) in &r.tightened {
            tracing::warn!(path = %path.display(), old_mode = format!("{mode:o}"),
                "removed group/other access");
        }
        if !r.tightened.is_empty() {
            eprintln!(
                "basphere: made {} paths under {} private to root (they were readable by others)",
                r.tightened.len(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Creates the Unix socket's directory, if missing, as 0755: every bastion user connects to
/// the socket (the kernel tells the server who they are), so it must stay reachable under the
/// server's umask 077.
pub fn socket_dir(socket: &Path) -> anyhow::Result<()> {
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| anyhow::anyhow!("creating the socket directory {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_modes_are_tightened_and_symlinks_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("data");
        std::fs::create_dir_all(root.join("vms/a")).unwrap();
        std::fs::write(root.join("vms/a/disk.qcow2"), b"x").unwrap();
        std::fs::write(root.join("basphere.db"), b"x").unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        set(&outside, 0o644);
        for d in [&root, &root.join("vms"), &root.join("vms/a")] {
            set(d, 0o755);
        }
        set(&root.join("vms/a/disk.qcow2"), 0o644);
        set(&root.join("basphere.db"), 0o664);
        let r = repair(&root).unwrap();
        assert_eq!(r.tightened.len(), 5, "{r:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("vms/a")), 0o700);
        assert_eq!(mode(&root.join("vms/a/disk.qcow2")), 0o600);
        assert_eq!(mode(&root.join("basphere.db")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a symlink's target is not ours");
        assert!(repair(&root).unwrap().tightened.is_empty());
        assert!(
            repair(&t.path().join("missing"))
                .unwrap()
                .tightened
                .is_empty()
        );
    }
}

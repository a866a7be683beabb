//! Unix accounts on the bastion for approved users (when `bastion.manage_accounts` is on).
//!
//! Basphere manages only accounts it created: an ordinary uid (`UID_MIN..=UID_MAX` of
//! `/etc/login.defs`) whose primary group is the managed group and whose uid Basphere recorded
//! when it ran `useradd`. Files in a user's home are touched only through directory fds opened
//! with `O_NOFOLLOW`, after checking the user owns them, so a symlink, FIFO or foreign directory
//! the user planted is refused rather than followed as root.
//!
//! Architecture invariant: this crate changes the host and nothing else; it knows no HTTP and no
//! store (the caller decides, records and reports), and it takes only validated `basphere_core`
//! names and keys.

use basphere_core::{SshPublicKey, Username};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, User, fchown, unlinkat};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The live key file.
const KEYS: &str = "authorized_keys";
/// Where the key file waits while the user is disabled.
const KEYS_DISABLED: &str = "authorized_keys.basphere-disabled";
/// The temporary file a new key is written to before it replaces [`KEYS`].
const KEYS_TMP: &str = "authorized_keys.tmp";
/// GECOS field of accounts Basphere creates.
const MARKER: &str = "basphere managed account";

/// Why an account operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The host's state forbids it (an account Basphere did not create, an unsafe file in a
    /// home); nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// A command or system call failed.
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, AccountError>;

/// Manages `basphere-users` accounts on this host.
#[derive(Debug, Clone)]
pub struct UnixAccounts {
    pub group: String,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| AccountError::Failed(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AccountError::Failed(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn lookup(name: &str) -> Result<Option<User>> {
    User::from_name(name)
        .map_err(|e| AccountError::Failed(format!("looking up Unix account {name}: {e}")))
}

/// The ordinary-user uid range of this host (`UID_MIN`/`UID_MAX` of `/etc/login.defs`, default
/// 1000..=60000).
pub fn ordinary_uids() -> std::ops::RangeInclusive<u32> {
    uid_range(&std::fs::read_to_string("/etc/login.defs").unwrap_or_default())
}

fn uid_range(login_defs: &str) -> std::ops::RangeInclusive<u32> {
    let get = |key: &str, default: u32| {
        login_defs
            .lines()
            .rev()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(key)).then(|| w.next()?.parse().ok())?
            })
            .unwrap_or(default)
    };
    get("UID_MIN", 1000)..=get("UID_MAX", 60000)
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

fn kind(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFSOCK => "a socket",
        _ => "a device",
    }
}

fn unsafe_path(p: &Path, what: impl std::fmt::Display) -> AccountError {
    AccountError::Refused(format!(
        "refusing to touch {}: it is {what}; the user must remove it, then ask again",
        p.display()
    ))
}

fn io_err(p: &Path, e: impl std::fmt::Display) -> AccountError {
    AccountError::Failed(format!("{}: {e}", p.display()))
}

/// Opens directory `name` under `dir` (or the absolute path `name` when `dir` is `None`) without
/// following a symlink, and checks `uid` owns it.
fn open_owned_dir(dir: Option<&OwnedFd>, name: &Path, full: &Path, uid: Uid) -> Result<OwnedFd> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_DIRECTORY
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        | OFlag::O_NOCTTY
        | OFlag::O_NONBLOCK;
    let fd = match dir {
        Some(d) => openat(d, name, flags, Mode::empty()),
        None => openat(AT_FDCWD, name, flags, Mode::empty()),
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => return Err(unsafe_path(full, "a symbolic link")),
        Err(Errno::ENOTDIR) => return Err(unsafe_path(full, "not a directory")),
        Err(e) => return Err(io_err(full, e)),
    };
    let st = fstat(&fd).map_err(|e| io_err(full, e))?;
    if !is_dir(&st) {
        return Err(unsafe_path(full, kind(&st)));
    }
    if st.st_uid != uid.as_raw() {
        return Err(unsafe_path(
            full,
            format_args!("owned by uid {}, not by the account (uid {uid})", st.st_uid),
        ));
    }
    Ok(fd)
}

/// The account's `~/.ssh`, opened safely (created 0700 if missing), with its path.
fn open_ssh_dir(pw: &User, create: bool) -> Result<Option<(OwnedFd, PathBuf)>> {
    let home = open_owned_dir(None, &pw.dir, &pw.dir, pw.uid)?;
    let path = pw.dir.join(".ssh");
    let name = Path::new(".ssh");
    match fstatat(&home, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => {}
        Err(Errno::ENOENT) if create => {
            mkdirat(&home, name, Mode::from_bits_truncate(0o700)).map_err(|e| io_err(&path, e))?;
            let fd = openat(
                &home,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err(&path, e))?;
            fchown(&fd, Some(pw.uid), Some(pw.gid)).map_err(|e| io_err(&path, e))?;
        }
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(io_err(&path, e)),
    }
    let fd = open_owned_dir(Some(&home), name, &path, pw.uid)?;
    fchmod(&fd, Mode::from_bits_truncate(0o700)).map_err(|e| io_err(&path, e))?;
    Ok(Some((fd, path)))
}

/// What sits at `name` in `dir`, without following it; `None` if nothing.
fn entry(dir: &OwnedFd, name: &str, full: &Path) -> Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(io_err(full, e)),
    }
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// Refuses anything at `name` but a regular file (a symlink, FIFO, device or directory).
fn regular_or_absent(dir: &OwnedFd, name: &str, full: &Path) -> Result<Option<FileStat>> {
    match entry(dir, name, full)? {
        Some(st) if !is_regular(&st) => Err(unsafe_path(full, kind(&st))),
        other => Ok(other),
    }
}

/// Writes `key` into `~/.ssh/<file>` of `pw` through a fresh temporary file and a rename, all
/// relative to the verified `~/.ssh` fd.
fn write_key(pw: &User, key: &SshPublicKey, file: &str) -> Result<()> {
    let (ssh, ssh_path) = open_ssh_dir(pw, true)?.expect("created");
    let target = ssh_path.join(file);
    let tmp_path = ssh_path.join(KEYS_TMP);
    regular_or_absent(&ssh, file, &target)?;
    // A stale temp file of ours is a regular file; anything else was planted.
    if regular_or_absent(&ssh, KEYS_TMP, &tmp_path)?.is_some() {
        unlinkat(&ssh, KEYS_TMP, UnlinkatFlags::NoRemoveDir).map_err(|e| io_err(&tmp_path, e))?;
    }
    let fd = match openat(
        &ssh,
        KEYS_TMP,
        OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_EXCL
            | OFlag::O_NOFOLLOW
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => fd,
        Err(Errno::EEXIST) => {
            return Err(unsafe_path(&tmp_path, "something that appeared meanwhile"));
        }
        Err(e) => return Err(io_err(&tmp_path, e)),
    };
    let result = (|| {
        fchown(&fd, Some(pw.uid), Some(pw.gid)).map_err(|e| io_err(&tmp_path, e))?;
        fchmod(&fd, Mode::from_bits_truncate(0o600)).map_err(|e| io_err(&tmp_path, e))?;
        let mut f = std::fs::File::from(fd);
        f.write_all(format!("{key}\n").as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err(&tmp_path, e))?;
        renameat(&ssh, KEYS_TMP, &ssh, file).map_err(|e| io_err(&target, e))
    })();
    if result.is_err() {
        let _ = unlinkat(&ssh, KEYS_TMP, UnlinkatFlags::NoRemoveDir);
    }
    result
}

/// Renames `from` to `to` inside the account's `~/.ssh`, if `from` is there.
fn move_keys(pw: &User, from: &str, to: &str) -> Result<()> {
    let Some((ssh, path)) = open_ssh_dir(pw, false)? else {
        return Ok(());
    };
    if regular_or_absent(&ssh, from, &path.join(from))?.is_none() {
        return Ok(());
    }
    regular_or_absent(&ssh, to, &path.join(to))?;
    renameat(&ssh, from, &ssh, to).map_err(|e| io_err(&path.join(to), e))
}

impl UnixAccounts {
    fn group_gid(&self) -> Result<Option<Gid>> {
        nix::unistd::Group::from_name(&self.group)
            .map(|g| g.map(|g| g.gid))
            .map_err(|e| AccountError::Failed(format!("looking up group {}: {e}", self.group)))
    }

    /// Refuses a name that is already a Unix account on this host (which Basphere would take
    /// over): a system account, or an ordinary one Basphere did not create.
    pub fn check_name_free(&self, user: &Username) -> Result<()> {
        let Some(pw) = lookup(user.as_str())? else {
            return Ok(());
        };
        if !ordinary_uids().contains(&pw.uid.as_raw()) {
            return Err(AccountError::Refused(format!(
                "{user} is a system account on this host (uid {}); choose another username",
                pw.uid
            )));
        }
        Err(AccountError::Refused(format!(
            "{user} is already a Unix account on this host (uid {}) that Basphere did not create; \
             Basphere manages only accounts it creates, so choose another username",
            pw.uid
        )))
    }

    /// Creates the account (and the group if missing) and installs `key` as its only key;
    /// returns the new uid, which the caller records. Refuses an existing account. If the key
    /// cannot be installed, the account just made is removed again.
    pub fn create(&self, user: &Username, key: &SshPublicKey) -> Result<u32> {
        if self.group_gid()?.is_none() {
            run(Command::new("groupadd").arg("--system").arg(&self.group))?;
        }
        self.check_name_free(user)?;
        run(Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/bash", "--comment", MARKER])
            .arg("--gid")
            .arg(&self.group)
            .arg(user.as_str()))?;
        let made = lookup(user.as_str())?.ok_or_else(|| {
            AccountError::Failed(format!(
                "useradd {user} succeeded but the account is missing"
            ))
        });
        let result = made.and_then(|pw| {
            if !ordinary_uids().contains(&pw.uid.as_raw()) {
                return Err(AccountError::Failed(format!(
                    "useradd gave {user} uid {}, outside UID_MIN..UID_MAX",
                    pw.uid
                )));
            }
            write_key(&pw, key, KEYS)?;
            Ok(pw.uid.as_raw())
        });
        if result.is_err()
            && let Ok(Some(pw)) = lookup(user.as_str())
        {
            let _ = self.userdel(&pw);
        }
        result
    }

    /// The account of `user` if Basphere created it: ordinary uid, the managed group as primary
    /// group, and `recorded_uid` (when known) matching.
    pub fn managed(&self, user: &Username, recorded_uid: Option<u32>) -> Result<User> {
        let pw = lookup(user.as_str())?.ok_or_else(|| {
            AccountError::Failed(format!("Unix account {user} does not exist on this host"))
        })?;
        let ours = ordinary_uids().contains(&pw.uid.as_raw())
            && self.group_gid()? == Some(pw.gid)
            && recorded_uid.is_none_or(|u| u == pw.uid.as_raw());
        if !ours {
            return Err(AccountError::Refused(format!(
                "Unix account {user} (uid {}) was not created by Basphere; Basphere leaves it alone",
                pw.uid
            )));
        }
        Ok(pw)
    }

    /// Replaces the account's authorized key (kept aside while `disabled`).
    pub fn set_key(&self, pw: &User, key: &SshPublicKey, disabled: bool) -> Result<()> {
        write_key(pw, key, if disabled { KEYS_DISABLED } else { KEYS })
    }

    /// Locks the account (password locked, account expired) and moves its key aside, so sshd
    /// refuses it. All or nothing.
    pub fn lock(&self, pw: &User) -> Result<()> {
        move_keys(pw, KEYS, KEYS_DISABLED)?;
        let r = run(Command::new("usermod")
            .args(["--lock", "--expiredate", "1"])
            .arg(&pw.name));
        if r.is_err() {
            let _ = move_keys(pw, KEYS_DISABLED, KEYS);
        }
        r
    }

    /// Undoes [`Self::lock`]. All or nothing.
    pub fn unlock(&self, pw: &User) -> Result<()> {
        run(Command::new("usermod")
            .args(["--unlock", "--expiredate", ""])
            .arg(&pw.name))?;
        let r = move_keys(pw, KEYS_DISABLED, KEYS);
        if r.is_err() {
            let _ = run(Command::new("usermod")
                .args(["--lock", "--expiredate", "1"])
                .arg(&pw.name));
        }
        r
    }

    /// Removes the account if Basphere created it (and its home, when the home is a real
    /// directory the account owns); succeeds if it is already gone.
    pub fn remove(&self, user: &Username, recorded_uid: Option<u32>) -> Result<()> {
        if lookup(user.as_str())?.is_none() {
            return Ok(());
        }
        let pw = self.managed(user, recorded_uid)?;
        self.userdel(&pw)
    }

    fn userdel(&self, pw: &User) -> Result<()> {
        let home_owned = std::fs::symlink_metadata(&pw.dir).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && m.uid() == pw.uid.as_raw()
        });
        let mut cmd = Command::new("userdel");
        if home_owned {
            cmd.arg("--remove");
        }
        run(cmd.arg(&pw.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_range_reads_login_defs() {
        assert_eq!(uid_range(""), 1000..=60000);
        let defs = "# UID_MIN 1\nUID_MIN\t\t 500\n#SYS_UID_MIN 100\nUID_MAX 29999\nUID_MIN x\n";
        assert_eq!(uid_range(defs), 500..=29999);
    }
}

//! Small host helpers: running commands, looking at processes, probing KVM.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `name` is found in `PATH` (or `name` itself when it contains a `/` and exists).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `cmd` to completion; on failure the error names the command and quotes its stderr.
pub async fn run(cmd: &mut tokio::process::Command) -> Result<String, String> {
    let shown = format!("{:?}", cmd.as_std()).replace('"', "");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            err.trim().lines().last().unwrap_or("no error output")
        ))
    }
}

/// Runs `ip` with `args`.
pub async fn ip(args: &[&str]) -> Result<String, String> {
    run(tokio::process::Command::new("ip").args(args)).await
}

/// Whether `pid` is a live (not zombie) process whose command line contains `marker`.
/// This is how a pidfile is trusted: a recycled PID will not carry our VM's directory.
pub fn pid_is_ours(pid: i32, marker: &str) -> bool {
    if pid <= 1 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may contain spaces and parens).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(marker),
        Err(_) => false,
    }
}

/// Reads a pidfile written by QEMU.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Number of CPUs this process may use.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Total memory of the host in MiB (from /proc/meminfo), if readable.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// What the KVM probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmProbe {
    /// `/dev/kvm` opened, reported API version 12 and created a VM within the time limit.
    pub usable: bool,
    /// `/sys/module/kvm_pvm` exists: KVM is the software-only PVM, under which stock guest
    /// kernels hang or crawl.
    pub pvm: bool,
}

/// Probes `/dev/kvm` (open, `KVM_GET_API_VERSION`, `KVM_CREATE_VM`) on a separate thread so a
/// wedged driver cannot hang the caller for longer than `timeout`.
pub fn probe_kvm(timeout: Duration) -> KvmProbe {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(kvm_works());
    });
    let usable = rx.recv_timeout(timeout).unwrap_or(false);
    KvmProbe { usable, pvm }
}

fn kvm_works() -> bool {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return false;
    };
    // SAFETY: plain ioctls without pointer arguments on a file descriptor we own.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) != 12 {
            return false;
        }
        let vm = libc::ioctl(f.as_raw_fd(), KVM_CREATE_VM as _, 0);
        if vm < 0 {
            return false;
        }
        libc::close(vm);
    }
    true
}

/// The last `n` lines of a text file (from its last 64 KiB), or an empty string.
pub fn tail(path: &Path, n: usize) -> String {
    let bytes = crate::console::read_tail(path, 64 * 1024);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_recognised_by_marker_only() {
        let me = std::process::id() as i32;
        let exe = std::env::args().next().unwrap();
        assert!(pid_is_ours(me, &exe));
        assert!(!pid_is_ours(me, "/no/such/vm/dir/"));
        assert!(!pid_is_ours(0, ""));
        assert!(!pid_is_ours(1, ""));
    }

    #[test]
    fn tail_skips_blank_lines() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "a\n\nb\r\nc\n").unwrap();
        assert_eq!(tail(f.path(), 2), "b | c");
        assert_eq!(tail(Path::new("/nonexistent"), 2), "");
    }
}

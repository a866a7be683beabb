//! The guest's serial console, kept on disk with a hard size bound.
//!
//! QEMU writes the console into a pipe (`-serial file:/proc/self/fd/3`); a small ring writer
//! process reads the other end and writes `serial.log`. When the next chunk would take the file
//! past its cap, the newest half (from a line start) is copied into a fresh file that atomically
//! replaces the old one. So the file never exceeds the cap, however fast the guest writes, and
//! always holds the latest output. The writer is a process of its own (not a task of the
//! server), so it lives exactly as long as QEMU: it ends at end of file, when QEMU exits.
//! While nobody reads the pipe (the writer was killed), QEMU drops console output.
//!
//! The ring writer is the binary that embeds this crate, started with [`HELPER_ARG`] as its first
//! argument; such a binary calls [`helper_main`] first thing in `main` (see `basphere`'s).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// First argument that makes a binary act as the console ring writer:
/// `EXE __basphere-console-ring <log path> <cap bytes>`, console on stdin.
pub const HELPER_ARG: &str = "__basphere-console-ring";

/// Smallest cap accepted (bytes): room for a boot log and whole chunks on both halves.
pub const MIN_CAP: u64 = 64 * 1024;

/// Largest piece read from the pipe at once.
const CHUNK: usize = 16 * 1024;

/// A file that keeps at most `cap` bytes of a stream: the newest ones.
#[derive(Debug)]
pub struct RingLog {
    path: PathBuf,
    file: File,
    len: u64,
    cap: u64,
}

impl RingLog {
    /// Starts an empty log at `path` (mode 0600, replacing any file there).
    pub fn create(path: &Path, cap: u64) -> io::Result<Self> {
        let cap = cap.max(MIN_CAP);
        let file = fresh(path, &[])?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: 0,
            cap,
        })
    }

    /// Appends `data`; rotates first when the file would pass its cap.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        let half = (self.cap / 2) as usize;
        if data.len() > half {
            data = &data[data.len() - half..];
        }
        if self.len + data.len() as u64 > self.cap {
            self.rotate(self.cap / 2 - data.len() as u64)?;
        }
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Replaces the file by one holding at most its newest `keep` bytes, starting at a line
    /// start when there is one.
    fn rotate(&mut self, keep: u64) -> io::Result<()> {
        let keep = keep.min(self.len);
        let mut tail = vec![0u8; keep as usize];
        self.file.seek(SeekFrom::Start(self.len - keep))?;
        self.file.read_exact(&mut tail)?;
        let start = match tail.iter().position(|&b| b == b'\n') {
            Some(i) if i + 1 < tail.len() => i + 1,
            _ => 0,
        };
        self.file = fresh(&self.path, &tail[start..])?;
        self.len = (tail.len() - start) as u64;
        Ok(())
    }
}

/// Writes `content` to a temporary file (0600) next to `path` and renames it over `path`.
/// Returns the new file, open for reading and appending.
fn fresh(path: &Path, content: &[u8]) -> io::Result<File> {
    let tmp = path.with_extension("log.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(content)?;
    std::fs::rename(&tmp, path)?;
    Ok(f)
}

/// Copies `input` into a [`RingLog`] at `path` until end of file.
pub fn pump(mut input: impl Read, path: &Path, cap: u64) -> io::Result<()> {
    let mut log = RingLog::create(path, cap)?;
    let mut buf = vec![0u8; CHUNK.min((log.cap / 2) as usize)];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => log.write(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The ring writer's `main`: returns `None` unless the process was started as the ring writer
/// (first argument [`HELPER_ARG`]); otherwise runs it on stdin and returns its exit code.
pub fn helper_main() -> Option<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != HELPER_ARG) {
        return None;
    }
    let (Some(path), Some(cap)) = (
        args.get(2),
        args.get(3)
            .and_then(|c| c.to_str())
            .and_then(|c| c.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: {HELPER_ARG} LOG_PATH CAP_BYTES (console on stdin)");
        return Some(ExitCode::from(2));
    };
    // SAFETY: a single-threaded process changing its own umask.
    unsafe {
        libc::umask(0o077);
    }
    match pump(io::stdin().lock(), Path::new(path), cap) {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("console ring writer for {}: {e}", Path::new(path).display());
            Some(ExitCode::from(1))
        }
    }
}

/// A VM's console pipe: its ring writer runs on the read end; QEMU gets the write end.
#[derive(Debug)]
pub struct ConsolePipe(OwnedFd);

/// The descriptor a process attached with [`ConsolePipe::attach`] finds the console on.
pub const CONSOLE_FD: RawFd = 3;

impl ConsolePipe {
    /// Starts the ring writer `helper` for `log` (at most `cap` bytes) in a session of its own,
    /// reading a new pipe; its errors go to `stderr`. The writer is not waited for: tokio reaps
    /// it once it exits, at end of file, when every process holding the write end is gone.
    pub fn start(helper: &Path, log: &Path, cap: u64, stderr: File) -> io::Result<Self> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // Run in the log's directory and name it relatively: the VM directory is then in no
        // command line but QEMU's, which is how a VM's QEMU is recognised (`pid_is_ours`).
        let dir = log
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = log.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("console log {} has no file name", log.display()),
            )
        })?;
        let mut cmd = tokio::process::Command::new(helper);
        cmd.arg(HELPER_ARG)
            .arg(name)
            .arg(cap.max(MIN_CAP).to_string())
            .current_dir(dir)
            .stdin(std::process::Stdio::from(read))
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start the console writer {}: {e}", helper.display()),
            )
        })?;
        Ok(Self(write))
    }

    /// Makes `cmd` start in a session of its own with the console's write end as descriptor
    /// [`CONSOLE_FD`] (`-serial file:/proc/self/fd/3`). Keep `self` until `cmd` is spawned.
    pub fn attach(&self, cmd: &mut tokio::process::Command) {
        let fd = self.0.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl, setsid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let r = if fd == CONSOLE_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, CONSOLE_FD)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::setsid();
                Ok(())
            });
        }
    }
}

/// At most the last `max` bytes of `path` (empty if unreadable), read without loading the rest.
pub fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity((len - start) as usize);
    let _ = f.take(max).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stays_under_its_cap_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let cap = MIN_CAP;
        let mut log = RingLog::create(&path, cap).unwrap();
        let mut last = String::new();
        for i in 0..20_000 {
            last = format!("line {i:06}\n");
            log.write(last.as_bytes()).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= cap);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(&last));
        assert!(text.starts_with("line "), "rotation cuts at a line start");
        assert!(text.len() as u64 >= cap / 2 - 12);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Pieces larger than half the cap keep their own end.
        log.write(&vec![b'x'; cap as usize]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= cap);
    }

    #[test]
    fn tail_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_tail(&path, 4), b"6789");
        assert_eq!(read_tail(&path, 100), b"0123456789");
        assert!(read_tail(&dir.path().join("none"), 4).is_empty());
    }
}

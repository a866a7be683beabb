//! systemd socket activation of the local API socket: a `basphere.socket` unit binds it and
//! passes it as fd 3 (`LISTEN_PID` = this process, `LISTEN_FDS` = 1), so clients can connect
//! while the server (re)starts and the socket file belongs to systemd.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// How many fds the environment says were passed to the process `pid`: none unless
/// `LISTEN_PID` names it (the variables may be left over from a parent).
pub fn passed_fds(pid: u32, listen_pid: Option<&str>, listen_fds: Option<&str>) -> usize {
    let for_us = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(pid);
    match listen_fds.and_then(|n| n.trim().parse::<usize>().ok()) {
        Some(n) if for_us => n,
        _ => 0,
    }
}

/// The listening Unix socket systemd passed to this process, if it passed one. More than one
/// fd, or an fd that is not a listening Unix stream socket, is an error saying so.
pub fn inherited_unix_listener() -> io::Result<Option<UnixListener>> {
    let var = |k: &str| std::env::var(k).ok();
    let n = passed_fds(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
    );
    match n {
        0 => Ok(None),
        1 => take_listener(FIRST_FD).map(Some),
        n => Err(io::Error::other(format!(
            "systemd passed {n} sockets; basphere.socket must pass one \
             (one ListenStream=, the API's Unix socket)"
        ))),
    }
}

fn sockopt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writing an int option of `fd`; a bad fd is EBADF.
    let r = unsafe { libc::getsockopt(fd, level, name, (&raw mut v).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Takes `fd` as a listener after checking it is a listening Unix stream socket; it is made
/// close-on-exec (QEMU and useradd never inherit it) and non-blocking.
pub fn take_listener(fd: RawFd) -> io::Result<UnixListener> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the socket systemd passed (fd {fd}) is {what}; basphere.socket must have ListenStream=/run/basphere/basphere.sock"
            ),
        )
    };
    let kind = sockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| bad(&format!("not a socket ({e})")))?;
    if kind != libc::SOCK_STREAM {
        return Err(bad("not a stream socket"));
    }
    if sockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1 {
        return Err(bad("not listening"));
    }
    if sockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err(bad("not a Unix socket"));
    }
    // SAFETY: fcntl on an fd checked above to be an open socket.
    unsafe {
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: the fd is an open listening Unix socket that nothing else in this process owns:
    // systemd passed it for this process alone.
    let l = unsafe { UnixListener::from_raw_fd(fd) };
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn only_fds_passed_to_this_process_count() {
        assert_eq!(passed_fds(42, Some("42"), Some("1")), 1);
        assert_eq!(passed_fds(42, Some("41"), Some("1")), 0, "a parent's");
        assert_eq!(passed_fds(42, None, Some("1")), 0);
        assert_eq!(passed_fds(42, Some("42"), None), 0);
        assert_eq!(passed_fds(42, Some("42"), Some("x")), 0);
    }

    #[test]
    fn a_listening_unix_socket_is_taken_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let l = take_listener(fd).unwrap();
        // SAFETY: reading the flags of the fd the listener owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut tries = 0;
        loop {
            match l.accept() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let file = tempfile::tempfile().unwrap();
        let e = take_listener(file.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = take_listener(tcp.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not a Unix socket"), "{e}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = take_listener(a.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not listening"), "{e}");
    }
}

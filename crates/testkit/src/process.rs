//! Commands and processes: run-and-check, polling, and signals that only reach the process meant.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::future::Future;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Runs `cmd` to its end and returns its output; panics with its stderr (and stdout) unless it
/// succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Calls `f` every `interval` until it returns `Ok`, for at most `timeout` (at least once);
/// on timeout returns `f`'s last `Err`, which callers put in their failure message.
pub async fn poll_until<T, E, F, Fut>(
    timeout: Duration,
    interval: Duration,
    mut f: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let t0 = Instant::now();
    loop {
        let last = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if t0.elapsed() >= timeout {
            return Err(last);
        }
        tokio::time::sleep(interval).await;
    }
}

/// [`poll_until`] for code without a runtime: sleeps the thread between tries.
pub fn poll_until_blocking<T, E>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let t0 = Instant::now();
    loop {
        let last = match f() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if t0.elapsed() >= timeout {
            return Err(last);
        }
        std::thread::sleep(interval);
    }
}

/// The state letter and parent PID `/proc/PID/stat` gives, if the process exists.
fn stat(pid: i32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((state, rest.next()?.parse().ok()?))
}

/// Whether `pid` is still a child of this process (not reaped, its PID not reused by another).
pub fn is_our_child(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(stat)
        .is_some_and(|(_, ppid)| ppid == std::process::id())
}

/// Sends `sig` to `child` only while `/proc` shows it is still our child; whether it was sent.
pub fn signal_child(child: &Child, sig: Signal) -> bool {
    is_our_child(child.id()) && kill(Pid::from_raw(child.id() as i32), sig).is_ok()
}

/// SIGKILLs `child` (PID-safe) and reaps it.
pub fn kill_child(child: &mut Child) {
    signal_child(child, Signal::SIGKILL);
    let _ = child.wait();
}

/// SIGTERMs `child` (PID-safe), waits up to `grace` for it to exit, then SIGKILLs and reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    stop_child_with(child, Signal::SIGTERM, grace);
}

/// [`stop_child`] with `sig` as the polite signal (e.g. SIGINT, PostgreSQL's fast shutdown).
pub fn stop_child_with(child: &mut Child, sig: Signal, grace: Duration) {
    signal_child(child, sig);
    let exited = poll_until_blocking(grace, Duration::from_millis(20), || {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => Ok(()),
            Ok(None) => Err(()),
        }
    });
    if exited.is_err() {
        kill_child(child);
    }
}

/// A child process that is stopped ([`stop_child`] with `grace`) when the guard is dropped:
/// also when the code that holds it returns early or panics (a bench whose output pipe
/// closed panics on its next line).
pub struct ChildGuard {
    child: Child,
    grace: Duration,
}

impl ChildGuard {
    pub fn new(child: Child, grace: Duration) -> Self {
        Self { child, grace }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        stop_child(&mut self.child, self.grace);
    }
}

/// PIDs of the live processes whose parent is `pid` (read from `/proc`).
pub fn children_of(pid: u32) -> Vec<i32> {
    pids_where(|p, _| stat(p).is_some_and(|(state, ppid)| ppid == pid && state != 'Z'))
}

/// Whether `pid` is a live (not zombie) process whose command line contains `marker`.
pub fn alive(pid: i32, marker: &str) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z') && cmdline(pid).contains(marker)
}

/// `pid`'s command line, arguments joined by NULs; empty when gone.
fn cmdline(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .into_owned()
}

/// PIDs of the processes for which `pred(pid, command line)` holds.
pub fn pids_where(pred: impl Fn(i32, &str) -> bool) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pred(pid, &cmdline(pid)))
        .collect()
}

/// PIDs of the processes whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<i32> {
    pids_where(|_, c| c.contains(needle))
}

/// SIGKILLs `pid` only if it is still a live process whose command line contains `marker` (a
/// process this test started elsewhere, found by its marker); whether it was sent.
pub fn kill_marked(pid: i32, marker: &str) -> bool {
    alive(pid, marker) && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
}

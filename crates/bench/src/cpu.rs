//! CPU time spent by this process and by a PostgreSQL server on this machine, so a figure can
//! say where its time went: on a machine whose cores are all busy, the wall time of a piece of
//! work is at least the CPU time of everything it needs divided by the cores.

use std::path::Path;

/// CPU seconds (user and system) so far: this process's, and the PostgreSQL server's if it
/// runs on this machine and its processes can be read.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub process_s: f64,
    pub postgres_s: Option<f64>,
}

impl Usage {
    /// The usage now; `postmaster` is the PostgreSQL server's PID (see [`postmaster_pid`]).
    pub fn now(postmaster: Option<u32>) -> Usage {
        Usage {
            process_s: ticks("/proc/self/stat", false).unwrap_or(0) as f64 / hz(),
            postgres_s: postmaster.and_then(server_ticks).map(|t| t as f64 / hz()),
        }
    }

    /// The CPU seconds spent from `earlier` to `self`.
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            process_s: self.process_s - earlier.process_s,
            postgres_s: match (self.postgres_s, earlier.postgres_s) {
                (Some(a), Some(b)) => Some(a - b),
                _ => None,
            },
        }
    }
}

/// The cores this machine has.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The PID of the PostgreSQL server at `url`, if it runs on this machine and its data
/// directory can be read (the first line of its `postmaster.pid`).
pub async fn postmaster_pid(url: &str) -> Option<u32> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    let dir: String = c.query_one("SHOW data_directory", &[]).await.ok()?.get(0);
    let text = std::fs::read_to_string(Path::new(&dir).join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The clock ticks of the postmaster, of its children that ended (it waited for them), and of
/// those alive now (a backend of a pool lives through the whole measurement).
fn server_ticks(pm: u32) -> Option<u64> {
    let own = ticks(&format!("/proc/{pm}/stat"), true)?;
    let children = basphere_testkit::process::children_of(pm)
        .into_iter()
        .filter_map(|pid| ticks(&format!("/proc/{pid}/stat"), false))
        .sum::<u64>();
    Some(own + children)
}

/// The fields of a `/proc/PID/stat` after the command name (which may hold spaces).
fn fields(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    // The state (a letter) first; every later field is a number.
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse::<i64>().map_or(0, |n| n.max(0) as u64))
            .collect(),
    )
}

/// utime + stime (and cutime + cstime with `children`): fields 14–17 of `proc(5)`, here
/// 11–14 counted from the parent PID.
fn ticks(path: &str, children: bool) -> Option<u64> {
    let f = fields(path)?;
    let own = f.get(10)? + f.get(11)?;
    Some(if children {
        own + f.get(12)? + f.get(13)?
    } else {
        own
    })
}

fn hz() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cpu_grows_with_work() {
        let a = Usage::now(None);
        let mut x = 0u64;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(150) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let d = Usage::now(None).since(&a);
        assert!(d.process_s >= 0.05, "{d:?}");
        assert!(d.postgres_s.is_none());
    }

    #[test]
    fn ticks_are_read_past_a_name_with_spaces() {
        let dir = std::env::temp_dir().join(format!("cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("stat");
        std::fs::write(&p, "42 (a b) c) S 7 1 1 0 -1 0 0 0 0 0 30 12 5 3 20 0\n").unwrap();
        let path = p.to_str().unwrap();
        assert_eq!(ticks(path, false), Some(42));
        assert_eq!(ticks(path, true), Some(50));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

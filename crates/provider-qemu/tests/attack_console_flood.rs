//! M9: a guest that floods its serial console cannot fill the host's disk.
//!
//! The stand-in guest is a process attached to the console exactly as QEMU is (the pipe's write
//! end as descriptor 3, opened again through `/proc/self/fd/3` as `-serial file:` does), writing
//! about 40 MB of numbered lines into a log capped at 128 KiB.
//!
//!     cargo nextest run -p basphere-qemu --test attack_console_flood

use basphere_qemu::ConsolePipe;
use basphere_testkit::poll_until;
use basphere_testkit::process::pids_where;
use std::path::Path;
use std::time::{Duration, Instant};

const HELPER: &str = env!("CARGO_BIN_EXE_basphere-console-ring");
const LINES: u64 = 5_000_000;

/// PIDs of ring writers working in `dir`.
fn writers_in(dir: &Path) -> Vec<i32> {
    pids_where(|pid, cmdline| {
        cmdline.contains(basphere_qemu::CONSOLE_HELPER_ARG)
            && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d == dir)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_keeps_the_log_within_its_cap_and_keeps_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let cap: u64 = 128 * 1024;
    let errors = std::fs::File::create(dir.path().join("writer.err")).unwrap();
    let console = ConsolePipe::start(Path::new(HELPER), &log, cap, errors).unwrap();

    let mut guest = tokio::process::Command::new("sh");
    guest
        .arg("-c")
        .arg(format!("seq 1 {LINES} > /proc/self/fd/3"))
        .kill_on_drop(true);
    console.attach(&mut guest);
    let mut guest = guest.spawn().unwrap();
    drop(console);
    assert_eq!(writers_in(dir.path()).len(), 1, "one ring writer runs");

    let t0 = Instant::now();
    let mut samples = 0;
    let mut largest = 0;
    while guest.try_wait().unwrap().is_none() {
        let len = std::fs::metadata(&log).map_or(0, |m| m.len());
        largest = largest.max(len);
        assert!(len <= cap, "serial.log grew to {len} bytes, cap {cap}");
        samples += 1;
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the flood did not end"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(guest.wait().await.unwrap().success());

    // The writer drains the pipe, then ends: the console's last line arrives.
    let last = format!("{LINES}\n");
    poll_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.ends_with(&last) && writers_in(dir.path()).is_empty() {
                Ok(())
            } else {
                Err(())
            }
        },
    )
    .await
    .unwrap_or_else(|()| {
        panic!(
            "the ring writer did not finish: {:?}",
            std::fs::read_to_string(dir.path().join("writer.err"))
        )
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let len = text.len() as u64;
    assert!(len <= cap, "{len} > {cap}");
    assert!(len >= cap / 4, "the tail was not kept: {len} bytes");
    // Whole, consecutive lines up to the very last one.
    let numbers: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(*numbers.last().unwrap(), LINES);
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
    eprintln!(
        "wrote {} bytes of console in {:.1?}; serial.log peaked at {largest} bytes over {samples} \
         samples and ends at {len} bytes (cap {cap})",
        (1..=LINES)
            .map(|n| n.to_string().len() as u64 + 1)
            .sum::<u64>(),
        t0.elapsed()
    );
}

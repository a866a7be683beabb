//! The systemd units in `contrib/`: they pass `systemd-analyze verify`, the service's exposure
//! stays at or under the level it was hardened to, and the server takes the local API socket
//! from socket activation (`systemd-socket-activate` stands in for systemd): answers on it with
//! the caller's kernel identity and leaves the socket file, which is systemd's, at shutdown. A
//! socket of the wrong kind stops the start with the reason.
mod common;
use basphere_testkit::process::{poll_until_blocking, stop_child};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The highest exposure `systemd-analyze security` may give basphere.service (it gave 4.2 when
/// hardened; 5.1 before).
const MAX_EXPOSURE: f64 = 4.2;

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib")
}

/// The units, with ExecStart= pointing at the binary under test, in a temporary directory.
fn units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(contrib().join("basphere.service")).unwrap();
    assert!(
        service.contains("/usr/local/bin/basphere serve"),
        "{service}"
    );
    std::fs::write(
        dir.path().join("basphere.service"),
        service.replace("/usr/local/bin/basphere", BIN),
    )
    .unwrap();
    std::fs::copy(
        contrib().join("basphere.socket"),
        dir.path().join("basphere.socket"),
    )
    .unwrap();
    dir
}

#[test]
fn the_units_verify() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("basphere.service"))
        .arg(dir.path().join("basphere.socket"))
        .output()
        .expect("systemd-analyze (Debian: systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn the_service_stays_hardened() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("basphere.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall level: {text}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(level <= MAX_EXPOSURE, "{line}");
}

/// The socket the socket unit declares is the default config's `[server] socket`.
#[test]
fn the_socket_unit_listens_where_the_server_is_configured_to() {
    let unit = std::fs::read_to_string(contrib().join("basphere.socket")).unwrap();
    let listen = unit
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .expect("ListenStream=");
    let cfg: toml::Value = toml::from_str(basphere_config::DEFAULT_TOML).unwrap();
    assert_eq!(Some(listen), cfg["server"]["socket"].as_str());
}

/// `systemd-socket-activate` listening on `s`'s socket (with `kind`, e.g. `--datagram`) and
/// passing the server its environment (it passes none of its own).
fn activator(s: &Server, kind: &[&str]) -> Vec<String> {
    let mut argv = vec!["systemd-socket-activate".to_string()];
    argv.extend(kind.iter().map(|k| k.to_string()));
    argv.extend(["-l".to_string(), s.socket.display().to_string()]);
    for (k, v) in &s.env {
        argv.push(format!("--setenv={k}={v}"));
    }
    argv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_takes_the_socket_systemd_passes() {
    let mut s = Server::new(BIN, &[]);
    let argv = activator(&s, &[]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    s.spawn_via(&argv).unwrap();
    let me = s.root().get("/api/v1/me").await.unwrap();
    assert_eq!(me.status, 200, "{:?}", me.body);
    assert_eq!(
        me.body.data["user"]["username"], "admin",
        "root by SO_PEERCRED"
    );
    let log = s.log();
    assert!(
        log.contains("Execing"),
        "started by socket activation: {log}"
    );
    stop_child(s.child.as_mut().unwrap(), Duration::from_secs(10));
    s.child = None;
    assert!(
        s.socket.exists(),
        "the socket file is systemd's: the server leaves it"
    );

    // A socket the server bound itself is removed at shutdown (once it has answered, its
    // signal handler is in place).
    let mut own = server(&[]);
    assert_eq!(own.root().get("/api/v1/me").await.unwrap().status, 200);
    stop_child(own.child.as_mut().unwrap(), Duration::from_secs(30));
    own.child = None;
    assert!(!own.socket.exists(), "{}", own.log());
}

#[test]
fn a_socket_of_the_wrong_kind_stops_the_start() {
    let s = Server::new(BIN, &[]);
    let argv = activator(&s, &["--datagram"]);
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .arg(BIN)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.log_path()).unwrap())
        .spawn()
        .unwrap();
    // The first datagram starts the server.
    let sent = poll_until_blocking(Duration::from_secs(10), Duration::from_millis(25), || {
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        d.send_to(b"x", &s.socket).map(drop).map_err(drop)
    });
    assert!(sent.is_ok(), "the activator listens");
    let status = poll_until_blocking(Duration::from_secs(20), Duration::from_millis(50), || {
        child.try_wait().unwrap().ok_or(())
    });
    let log = s.log();
    let status = status.unwrap_or_else(|()| {
        stop_child(&mut child, Duration::from_secs(5));
        panic!("the server ran on a datagram socket: {log}")
    });
    assert!(!status.success(), "{log}");
    assert!(log.contains("not a stream socket"), "{log}");
}

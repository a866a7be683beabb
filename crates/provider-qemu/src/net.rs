//! Guest networking: the lab namespace with its bridge, per-VM taps, and reaching guests.
//!
//! Invariant: in lab mode everything this module creates lives inside the namespace; nothing is
//! bridged or routed to the host, and no host interface is touched.

use crate::host::ip;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// Path of a named network namespace (as `ip netns` manages them).
pub fn netns_path(namespace: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(namespace)
}

/// `ip` arguments addressing `namespace` (empty for the host's namespace).
fn ns_args(namespace: Option<&str>) -> Vec<&str> {
    match namespace {
        Some(ns) => vec!["-n", ns],
        None => vec![],
    }
}

async fn link_exists(namespace: Option<&str>, dev: &str) -> bool {
    let mut args = ns_args(namespace);
    args.extend(["link", "show", "dev", dev]);
    ip(&args).await.is_ok()
}

/// Makes the lab namespace, its loopback and `bridge` holding `gateway/prefix`. Idempotent.
pub async fn ensure_lab(
    namespace: &str,
    bridge: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<(), String> {
    if !netns_path(namespace).exists()
        && let Err(e) = ip(&["netns", "add", namespace]).await
        // Another process may have made it meanwhile.
        && !netns_path(namespace).exists()
    {
        return Err(format!("cannot create network namespace {namespace}: {e}"));
    }
    ip(&["-n", namespace, "link", "set", "lo", "up"]).await?;
    if !link_exists(Some(namespace), bridge).await {
        ip(&["-n", namespace, "link", "add", bridge, "type", "bridge"])
            .await
            .or_else(|e| {
                if e.contains("File exists") {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            })?;
    }
    let addrs = ip(&["-n", namespace, "-o", "-4", "addr", "show", "dev", bridge]).await?;
    let cidr = format!("{gateway}/{prefix}");
    if !addrs.split_whitespace().any(|w| w == cidr) {
        ip(&["-n", namespace, "addr", "add", &cidr, "dev", bridge])
            .await
            .or_else(|e| {
                if e.contains("File exists") {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            })?;
    }
    ip(&["-n", namespace, "link", "set", bridge, "up"]).await?;
    Ok(())
}

/// Makes the persistent tap `tap` (in `namespace`, or the host's when `None`), attaches it to
/// `bridge` and sets it up. Idempotent.
pub async fn ensure_tap(
    namespace: Option<&str>,
    bridge: &str,
    tap: &str,
    mtu: u32,
) -> Result<(), String> {
    let ns = ns_args(namespace);
    let with =
        |rest: &[&str]| -> Vec<String> { ns.iter().chain(rest).map(|s| s.to_string()).collect() };
    let run = |v: Vec<String>| async move {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        ip(&refs).await
    };
    if !link_exists(namespace, bridge).await {
        return Err(format!(
            "bridge {bridge} does not exist{}",
            namespace.map_or(String::new(), |n| format!(" in namespace {n}"))
        ));
    }
    if !link_exists(namespace, tap).await {
        run(with(&["tuntap", "add", "dev", tap, "mode", "tap"]))
            .await
            .map_err(|e| format!("cannot create tap {tap}: {e}"))?;
    }
    run(with(&["link", "set", tap, "master", bridge])).await?;
    if mtu > 0 {
        run(with(&["link", "set", tap, "mtu", &mtu.to_string()])).await?;
    }
    run(with(&["link", "set", tap, "up"])).await?;
    Ok(())
}

/// Creates and attaches `pin`'s tap (see [`ensure_tap`]) and pins it to its VM's MAC and IP
/// ([`crate::antispoof::install_alongside_running`], which also pins VMs running from
/// `state_dir` if the rules are missing). Idempotent; the pin is re-derived at every start.
pub async fn attach_pinned_tap(
    namespace: Option<&str>,
    bridge: &str,
    pin: &crate::antispoof::PortPin,
    mtu: u32,
    isolate: bool,
    state_dir: &std::path::Path,
) -> Result<(), String> {
    if namespace.is_none() && host_bridge_filters_vlans(bridge) {
        return Err(format!(
            "bridge {bridge} has vlan_filtering on; Basphere pins guest MACs with VLAN-less \
             forwarding entries (learning off), which such a bridge would not use, leaving \
             guests unreachable: use a bridge without VLAN filtering for guests"
        ));
    }
    ensure_tap(namespace, bridge, pin.port(), mtu).await?;
    crate::antispoof::install_alongside_running(namespace, pin, isolate, state_dir).await
}

fn host_bridge_filters_vlans(bridge: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{bridge}/bridge/vlan_filtering"))
        .is_ok_and(|v| v.trim() == "1")
}

/// Deletes the tap and then its anti-spoofing rules. Succeeds when both are gone already.
pub async fn release_tap(namespace: Option<&str>, tap: &str) -> Result<(), String> {
    delete_tap(namespace, tap).await?;
    crate::antispoof::remove(namespace, tap).await
}

/// Deletes the tap; succeeds if it (or the namespace) is gone already.
pub async fn delete_tap(namespace: Option<&str>, tap: &str) -> Result<(), String> {
    if let Some(ns) = namespace
        && !netns_path(ns).exists()
    {
        return Ok(());
    }
    if !link_exists(namespace, tap).await {
        return Ok(());
    }
    let mut args = ns_args(namespace);
    args.extend(["link", "del", "dev", tap]);
    match ip(&args).await {
        Ok(_) => Ok(()),
        Err(_) if !link_exists(namespace, tap).await => Ok(()),
        Err(e) => Err(format!("cannot delete tap {tap}: {e}")),
    }
}

/// Whether the tap exists.
pub async fn tap_exists(namespace: Option<&str>, tap: &str) -> bool {
    if let Some(ns) = namespace
        && !netns_path(ns).exists()
    {
        return false;
    }
    link_exists(namespace, tap).await
}

/// Deletes the namespace when no process is left in it. Returns whether it is gone.
pub async fn teardown_lab(namespace: &str) -> Result<bool, String> {
    if !netns_path(namespace).exists() {
        return Ok(true);
    }
    let pids = ip(&["netns", "pids", namespace]).await?;
    if !pids.trim().is_empty() {
        return Ok(false);
    }
    ip(&["netns", "del", namespace])
        .await
        .map_err(|e| format!("cannot delete network namespace {namespace}: {e}"))?;
    Ok(true)
}

/// Outcome of one attempt to read an SSH banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The peer sent `SSH-…`.
    Banner(String),
    /// The guest's IP stack answered with a reset: nothing listens on the port.
    Refused,
    /// No answer (no route, ARP unanswered, or timed out).
    NoAnswer(String),
    /// Connected but no SSH banner arrived in time.
    NoBanner,
}

/// Connects to `addr` from inside `namespace` (or from here when `None`) and reads the banner.
/// Runs on its own OS thread, because `setns` changes the namespace of the calling thread and
/// must not leak into a shared runtime thread; the socket keeps the namespace it was made in.
pub async fn probe_ssh(namespace: Option<String>, addr: SocketAddr, timeout: Duration) -> Probe {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("bsp-ssh-probe".into())
        .spawn(move || {
            let _ = tx.send(probe_blocking(namespace.as_deref(), addr, timeout));
        });
    if let Err(e) = spawned {
        return Probe::NoAnswer(format!("cannot start probe thread: {e}"));
    }
    rx.await
        .unwrap_or_else(|_| Probe::NoAnswer("probe thread died".into()))
}

fn probe_blocking(namespace: Option<&str>, addr: SocketAddr, timeout: Duration) -> Probe {
    if let Some(ns) = namespace {
        let f = match std::fs::File::open(netns_path(ns)) {
            Ok(f) => f,
            Err(e) => return Probe::NoAnswer(format!("network namespace {ns}: {e}")),
        };
        if let Err(e) = nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET) {
            return Probe::NoAnswer(format!("cannot enter network namespace {ns}: {e}"));
        }
    }
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Probe::Refused,
        Err(e) => return Probe::NoAnswer(e.to_string()),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while got.len() < 4 || !got.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.len() >= 255 {
            break;
        }
    }
    if got.starts_with(b"SSH-") {
        let line = String::from_utf8_lossy(&got);
        Probe::Banner(line.lines().next().unwrap_or("").trim().to_string())
    } else {
        Probe::NoBanner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The provider's tap path (`start` → attach, `stop`/`remove` → release) on a real tap in a
    /// private namespace: the tap is pinned when attached; after release tap and rules are gone.
    #[tokio::test]
    async fn attached_taps_are_pinned_and_released_taps_leave_no_rules() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root (network namespaces, taps)");
            return;
        }
        struct Ns(String);
        impl Drop for Ns {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let ns = Ns(format!("qnet-u{}", std::process::id()));
        let ns = ns.0.as_str();
        let instance = format!("net-unit-{ns}");
        let tap = crate::machine::tap_name(&instance);
        let mac = basphere_provider::mac_for(&instance);
        let pin = crate::antispoof::PortPin::new(&tap, &mac, Ipv4Addr::new(10, 9, 0, 5)).unwrap();
        ensure_lab(ns, "br0", Ipv4Addr::new(10, 9, 0, 1), 24)
            .await
            .unwrap();
        let nft = || async {
            crate::host::run(tokio::process::Command::new("ip").args([
                "netns", "exec", ns, "nft", "list", "table", "bridge", "basphere",
            ]))
            .await
            .unwrap()
        };
        for _ in 0..2 {
            attach_pinned_tap(
                Some(ns),
                "br0",
                &pin,
                1500,
                true,
                std::path::Path::new("/nonexistent"),
            )
            .await
            .unwrap();
        }
        let rules = nft().await;
        assert!(
            rules.contains(&format!("\"{tap}\" : jump port-{tap}")),
            "{rules}"
        );
        assert!(rules.contains(&format!("ether saddr != {mac}")), "{rules}");
        let port = ip(&["-n", ns, "-d", "link", "show", "dev", &tap])
            .await
            .unwrap();
        for setting in [
            "learning off",
            "isolated on",
            "guard on",
            "flood off",
            "group_fwd_mask 0xfff8",
        ] {
            assert!(port.contains(setting), "{setting} missing: {port}");
        }
        let fdb = crate::host::run(
            tokio::process::Command::new("bridge").args(["-n", ns, "fdb", "show", "dev", &tap]),
        )
        .await
        .unwrap();
        assert!(
            fdb.lines()
                .any(|l| l.starts_with(&mac) && l.contains("sticky") && l.contains("static")),
            "{fdb}"
        );
        for _ in 0..2 {
            release_tap(Some(ns), &tap).await.unwrap();
        }
        assert!(!tap_exists(Some(ns), &tap).await);
        let rules = nft().await;
        assert!(!rules.contains(&tap), "{rules}");
    }

    #[tokio::test]
    async fn probe_reads_a_banner_and_sees_refusal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            std::io::Write::write_all(&mut s, b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n").unwrap();
        });
        let p = probe_ssh(None, addr, Duration::from_secs(2)).await;
        assert_eq!(p, Probe::Banner("SSH-2.0-OpenSSH_9.2p1 Debian".into()));
        server.join().unwrap();
        // Nothing listens there any more.
        let p = probe_ssh(None, addr, Duration::from_secs(2)).await;
        assert_eq!(p, Probe::Refused);
    }
}

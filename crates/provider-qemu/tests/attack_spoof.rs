//! M8: a guest with root tries to take another guest's traffic on the shared bridge.
//!
//! Each test builds its own lab namespace `qnet-<random>` with the provider's own code
//! ([`basphere_qemu::ensure_lab`]), attaches two "guests" as veth pairs whose bridge-side ends carry
//! the tap names the provider gives (`tap_name(instance)`), each guest end in its own namespace
//! (`qnet-<random>-a`, `-b`), and pins both ports with exactly what the provider runs at VM start
//! ([`basphere_qemu::antispoof::install`]). Guest B then attacks guest A and the gateway: spoofed
//! ARP, A's IPv4 source, A's MAC, link-local frames that would teach the bridge A's MAC, IPv6 to A,
//! a rogue DHCP server. Each attack must leave the victims' neighbour tables and the bridge's
//! forwarding database unchanged and show up on the counter of the rule that dropped it, while
//! ordinary traffic between A, B and the gateway keeps flowing.
//!
//! `BASPHERE_TEST_UNPINNED=1` runs the same attacks against unprotected ports: the first one
//! then poisons the gateway's neighbour table and the test fails.
//!
//! Needs root and `nftables arping iputils-ping` (crates/provider-qemu/install-deps.sh); skips only
//! when not root. All traffic stays inside the namespaces the test creates; Drop deletes them.
//!
//!     cargo nextest run -p basphere-qemu --test attack_spoof

use basphere_provider::mac_for;
use basphere_qemu::antispoof::{self, PortPin, reason};
use basphere_qemu::{ensure_lab, tap_name};
use basphere_testkit::{delete_netns, run_ok, skip_unless_root};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

const GW: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const BRIDGE: &str = "br0";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (install it: crates/provider-qemu/install-deps.sh)")
        })
}

fn ok(program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(Command::new(program).args(args)).stdout).into_owned()
}

fn in_ns(ns: &str, args: &[&str]) -> Output {
    let mut all = vec!["netns", "exec", ns];
    all.extend(args);
    run("ip", &all)
}

fn root_or_skip(test: &str) -> bool {
    !skip_unless_root(&format!(
        "{test} needs root (network namespaces, nftables); run as root"
    ))
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// Listens on UDP `addr` inside `ns` for a second and a half; yields the senders of what arrived.
fn udp_receiver(ns: &str, addr: SocketAddr) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    let ns = ns.to_string();
    let (bound, is_bound) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        enter(&ns);
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        bound.send(()).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        let mut from = Vec::new();
        let mut buf = [0u8; 64];
        while std::time::Instant::now() < until {
            if let Ok((_, peer)) = s.recv_from(&mut buf) {
                from.push(peer);
            }
        }
        from
    });
    is_bound.recv().unwrap();
    handle
}

/// One stand-in guest: a namespace whose `eth0` is a veth peer of a bridge port named like a tap.
struct Guest {
    ns: String,
    instance: String,
    tap: String,
    mac: String,
    ip: Ipv4Addr,
}

impl Guest {
    /// The pin the provider derives for this guest's VM: tap and MAC from the instance id.
    fn pin(&self) -> PortPin {
        PortPin::new(&tap_name(&self.instance), &mac_for(&self.instance), self.ip).unwrap()
    }

    /// Whether two pings from this guest to `dst` get an answer.
    fn pings(&self, dst: &str) -> bool {
        let v6 = dst.contains(':');
        let mut args = vec!["ping", "-c", "2", "-i", "0.2", "-W", "1", "-q"];
        if v6 {
            args.insert(1, "-6");
        }
        args.push(dst);
        in_ns(&self.ns, &args).status.success()
    }

    /// Reachability as a user means it: within a few seconds. A neighbour entry left FAILED by
    /// an earlier refused ping, or a loaded machine, can lose one round of pings.
    fn reaches(&self, dst: &str) -> bool {
        (0..4).any(|attempt| {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            self.pings(dst)
        })
    }

    fn ip_cmd(&self, args: &[&str]) {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend(args);
        ok("ip", &all);
    }

    /// A permanent neighbour entry `ip` → `mac` on eth0 (no ARP needed to reach it).
    fn pin_neighbour(&self, ip: &str, mac: &str) {
        self.ip_cmd(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }

    /// Runs arping on `eth0` of this guest; its exit status only says whether replies came.
    fn arping(&self, args: &[&str]) {
        let mut all = vec!["arping", "-i", "eth0", "-c", "3", "-W", "0.1", "-q"];
        all.extend(args);
        let out = in_ns(&self.ns, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("exec of") && !err.contains("usage"),
            "arping {args:?} did not run: {err} (apt-get install -y arping)"
        );
    }

    /// The guest's IPv6 link-local address on eth0.
    fn link_local(&self) -> String {
        let out = ok(
            "ip",
            &[
                "-n", &self.ns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
            ],
        );
        let addr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .unwrap_or_else(|| panic!("no link-local address on {}: {out}", self.ns));
        format!("{}%eth0", addr.split('/').next().unwrap())
    }

    /// Sends three UDP datagrams from `src` (an address of this guest) to `dst`.
    fn send_udp(&self, src: SocketAddr, dst: SocketAddr) {
        let ns = self.ns.clone();
        std::thread::spawn(move || {
            enter(&ns);
            let s = UdpSocket::bind(src).unwrap();
            s.set_broadcast(true).unwrap();
            for _ in 0..3 {
                s.send_to(b"rogue DHCP offer", dst).unwrap();
            }
        })
        .join()
        .unwrap();
    }
}

/// The lab namespace, its bridge and two pinned guests; every namespace is deleted on drop.
struct Lab {
    ns: String,
    a: Guest,
    b: Guest,
}

impl Lab {
    async fn new(isolate: bool) -> Lab {
        let unpinned = std::env::var_os("BASPHERE_TEST_UNPINNED").is_some();
        Lab::build(!unpinned, isolate).await
    }

    /// The lab with both guests attached; `pinned`: with the provider's pins installed.
    async fn build(pinned: bool, isolate: bool) -> Lab {
        let ns = format!("qnet-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let guest = |suffix: &str, host: u8| {
            let instance = uuid::Uuid::new_v4().to_string();
            Guest {
                ns: format!("{ns}-{suffix}"),
                tap: tap_name(&instance),
                mac: mac_for(&instance),
                ip: Ipv4Addr::new(10, 213, 0, host),
                instance,
            }
        };
        let lab = Lab {
            a: guest("a", 10),
            b: guest("b", 11),
            ns,
        };
        ensure_lab(&lab.ns, BRIDGE, GW, 24).await.unwrap();
        for g in [&lab.a, &lab.b] {
            ok("ip", &["netns", "add", &g.ns]);
            // No duplicate address detection: the link-local address is usable at once.
            let out = in_ns(
                &g.ns,
                &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"],
            );
            assert!(out.status.success(), "{out:?}");
            ok(
                "ip",
                &[
                    "-n", &lab.ns, "link", "add", &g.tap, "type", "veth", "peer", "name", "eth0",
                    "netns", &g.ns,
                ],
            );
            ok(
                "ip",
                &["-n", &lab.ns, "link", "set", &g.tap, "master", BRIDGE, "up"],
            );
            g.ip_cmd(&["link", "set", "lo", "up"]);
            g.ip_cmd(&["link", "set", "eth0", "address", &g.mac]);
            g.ip_cmd(&["addr", "add", &format!("{}/24", g.ip), "dev", "eth0"]);
            g.ip_cmd(&["link", "set", "eth0", "up"]);
            g.ip_cmd(&["route", "add", "default", "via", &GW.to_string()]);
            // BASPHERE_TEST_UNPINNED=1 leaves the ports unprotected: the attacks then succeed
            // and the test fails at the first poisoned table (proof that the test can fail).
            if pinned {
                antispoof::install(Some(&lab.ns), &g.pin(), isolate)
                    .await
                    .unwrap();
            }
        }
        lab
    }

    /// Packets counted by the drop rule `why` of `g`'s port chain (0 while there is no chain, so
    /// that a missing pin shows up as the attack succeeding).
    fn dropped(&self, g: &Guest, why: &str) -> u64 {
        let chain = antispoof::port_chain(&g.tap);
        let out = in_ns(
            &self.ns,
            &["nft", "list", "chain", "bridge", antispoof::TABLE, &chain],
        );
        if !out.status.success() {
            return 0;
        }
        let out = String::from_utf8_lossy(&out.stdout);
        let line = out
            .lines()
            .find(|l| l.contains(&format!("comment \"{why}\"")))
            .unwrap_or_else(|| panic!("no rule {why:?} in {chain}:\n{out}"));
        let mut words = line.split_whitespace().skip_while(|w| *w != "packets");
        words.nth(1).unwrap().parse().unwrap()
    }

    /// Packets of unpinned Basphere ports dropped on the prerouting hook.
    fn dropped_unpinned(&self) -> u64 {
        let out = ok(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns,
                "nft",
                "list",
                "chain",
                "bridge",
                antispoof::TABLE,
                "prerouting",
            ],
        );
        let line = out
            .lines()
            .find(|l| l.contains(reason::UNPINNED))
            .unwrap_or_else(|| panic!("no fail-closed rule:\n{out}"));
        let mut words = line.split_whitespace().skip_while(|w| *w != "packets");
        words.nth(1).unwrap().parse().unwrap()
    }

    /// The MAC `ns` has in its neighbour table for `ip`, if any.
    fn neighbour(ns: &str, ip: Ipv4Addr) -> Option<String> {
        let out = ok("ip", &["-n", ns, "neigh", "show", &ip.to_string()]);
        out.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_string)
    }

    /// The bridge port the forwarding database sends `mac` to.
    fn fdb_port(&self, mac: &str) -> Option<String> {
        let out = ok("bridge", &["-n", &self.ns, "fdb", "show", "br", BRIDGE]);
        out.lines()
            .find(|l| l.starts_with(&format!("{mac} ")))
            .and_then(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "dev")
                    .nth(1)
                    .map(str::to_string)
            })
    }

    fn gateway_mac(&self) -> String {
        let out = ok("ip", &["-n", &self.ns, "-o", "link", "show", BRIDGE]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap()
            .to_string()
    }

    /// Ordinary traffic: both guests reach the gateway and each other, the gateway reaches both.
    fn assert_ordinary_traffic_flows(&self) {
        let (a, b) = (&self.a, &self.b);
        assert!(a.reaches(&GW.to_string()), "A cannot reach the gateway");
        assert!(b.reaches(&GW.to_string()), "B cannot reach the gateway");
        assert!(a.reaches(&b.ip.to_string()), "A cannot reach B");
        assert!(b.reaches(&a.ip.to_string()), "B cannot reach A");
        for g in [a, b] {
            let reached = (0..4).any(|attempt| {
                if attempt > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                let ping = ["ping", "-c", "1", "-W", "1", "-q", &g.ip.to_string()];
                in_ns(&self.ns, &ping).status.success()
            });
            assert!(reached, "the gateway cannot reach {}", g.ip);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a.ns, &self.b.ns, &self.ns] {
            delete_netns(ns);
        }
    }
}

#[tokio::test]
async fn a_guest_cannot_spoof_another_guests_arp_ip_or_mac() {
    if !root_or_skip("a_guest_cannot_spoof_another_guests_arp_ip_or_mac") {
        return;
    }
    let lab = Lab::new(false).await;
    let (a, b) = (&lab.a, &lab.b);
    let gw = GW.to_string();
    let gw_mac = lab.gateway_mac();
    lab.assert_ordinary_traffic_flows();
    assert_eq!(
        Lab::neighbour(&lab.ns, a.ip).as_deref(),
        Some(a.mac.as_str())
    );
    assert_eq!(Lab::neighbour(&a.ns, GW).as_deref(), Some(gw_mac.as_str()));
    assert_eq!(lab.fdb_port(&a.mac).as_deref(), Some(a.tap.as_str()));

    // 1. ARP: B claims A's address towards the gateway (gratuitous request and reply), and the
    //    gateway's address towards A. Unfiltered, the gateway's entry for A becomes B's MAC.
    let before = lab.dropped(b, reason::ARP);
    b.arping(&["-U", "-S", &a.ip.to_string(), &gw]);
    b.arping(&["-A", "-S", &a.ip.to_string(), &gw]);
    b.arping(&["-A", "-S", &gw, &a.ip.to_string()]);
    assert_eq!(
        Lab::neighbour(&lab.ns, a.ip).as_deref(),
        Some(a.mac.as_str()),
        "the gateway's neighbour entry for A was poisoned"
    );
    assert_eq!(
        Lab::neighbour(&a.ns, GW).as_deref(),
        Some(gw_mac.as_str()),
        "A's neighbour entry for the gateway was poisoned"
    );
    assert!(
        lab.dropped(b, reason::ARP) > before,
        "spoofed ARP was not dropped by the ARP rule"
    );

    // 2. IPv4 with A's source address (B configures A's address; its gateway entry is pinned so
    //    no ARP is needed).
    let a_ip = a.ip.to_string();
    b.pin_neighbour(&gw, &gw_mac);
    b.ip_cmd(&["addr", "add", &format!("{a_ip}/32"), "dev", "eth0"]);
    let before = lab.dropped(b, reason::IPV4_SOURCE);
    // The gateway's stack receives nothing sent as A, while B's own datagrams arrive.
    let service = SocketAddr::from((GW, 5555));
    let got = udp_receiver(&lab.ns, service);
    b.send_udp(SocketAddr::from((a.ip, 5556)), service);
    let got = got.join().unwrap();
    assert!(
        got.is_empty(),
        "the gateway received B's datagrams as A: {got:?}"
    );
    let got = udp_receiver(&lab.ns, service);
    b.send_udp(SocketAddr::from((b.ip, 5556)), service);
    assert_eq!(got.join().unwrap().len(), 3, "B's own datagrams were lost");
    assert!(lab.dropped(b, reason::IPV4_SOURCE) > before);
    b.ip_cmd(&["addr", "del", &format!("{a_ip}/32"), "dev", "eth0"]);

    // 3. A's MAC: with B's address, then with A's address too (full impersonation: unfiltered,
    //    the bridge moves A's MAC to B's port and the gateway's replies to A reach B).
    b.ip_cmd(&["link", "set", "eth0", "address", &a.mac]);
    // Changing the MAC flushed B's neighbours: pin the gateway again so IPv4 frames go out.
    b.pin_neighbour(&gw, &gw_mac);
    let before = lab.dropped(b, reason::SOURCE_MAC);
    assert!(!b.pings(&gw), "the gateway answered B sending with A's MAC");
    b.ip_cmd(&["addr", "add", &format!("{a_ip}/32"), "dev", "eth0"]);
    let out = in_ns(
        &b.ns,
        &[
            "ping", "-c", "2", "-i", "0.2", "-W", "1", "-q", "-I", &a_ip, &gw,
        ],
    );
    assert!(!out.status.success(), "B impersonating A was answered");
    b.ip_cmd(&["addr", "del", &format!("{a_ip}/32"), "dev", "eth0"]);
    assert_eq!(
        lab.fdb_port(&a.mac).as_deref(),
        Some(a.tap.as_str()),
        "the bridge learned A's MAC on B's port"
    );
    assert!(lab.dropped(b, reason::SOURCE_MAC) > before);
    b.ip_cmd(&["link", "set", "eth0", "address", &b.mac]);

    // 4. Link-local group destination (LLDP) with A's MAC: the kernel bridge learns source MACs
    //    of such frames before any netfilter hook. Unprotected, A's MAC moves to B's port.
    let before = lab.dropped(b, reason::LINK_LOCAL);
    b.arping(&[
        "-p",
        "-s",
        &a.mac,
        "-t",
        "01:80:c2:00:00:0e",
        "-S",
        &b.ip.to_string(),
        &gw,
    ]);
    assert_eq!(
        lab.fdb_port(&a.mac).as_deref(),
        Some(a.tap.as_str()),
        "a link-local frame taught the bridge A's MAC on B's port"
    );
    assert!(lab.dropped(b, reason::LINK_LOCAL) > before);

    // 5. IPv6: Basphere networks are IPv4-only, so nothing of it crosses a guest port.
    let before = lab.dropped(b, reason::IPV6);
    assert!(
        !b.pings(&a.link_local()),
        "B reached A over IPv6 link-local"
    );
    assert!(lab.dropped(b, reason::IPV6) > before);

    // 6. A rogue DHCP server on B (from B's own address, broadcast and to A).
    let before = lab.dropped(b, reason::DHCP_SERVER);
    let got = udp_receiver(&a.ns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)));
    b.send_udp(
        SocketAddr::from((b.ip, 67)),
        SocketAddr::from((Ipv4Addr::BROADCAST, 68)),
    );
    b.send_udp(SocketAddr::from((b.ip, 67)), SocketAddr::from((a.ip, 68)));
    let got = got.join().unwrap();
    assert!(
        got.is_empty(),
        "A received DHCP server traffic from B: {got:?}"
    );
    assert!(lab.dropped(b, reason::DHCP_SERVER) > before);

    // Nothing above changed who is who, and ordinary traffic still flows.
    b.ip_cmd(&["neigh", "flush", "dev", "eth0", "nud", "all"]);
    lab.assert_ordinary_traffic_flows();
    assert_eq!(
        Lab::neighbour(&lab.ns, a.ip).as_deref(),
        Some(a.mac.as_str())
    );
    assert_eq!(
        Lab::neighbour(&lab.ns, b.ip).as_deref(),
        Some(b.mac.as_str())
    );
    assert_eq!(lab.fdb_port(&a.mac).as_deref(), Some(a.tap.as_str()));
    assert_eq!(lab.fdb_port(&b.mac).as_deref(), Some(b.tap.as_str()));
    // A never sent anything that was dropped.
    for why in [
        reason::ARP,
        reason::SOURCE_MAC,
        reason::IPV4_SOURCE,
        reason::LINK_LOCAL,
        reason::DHCP_SERVER,
        reason::OTHER,
    ] {
        assert_eq!(lab.dropped(a, why), 0, "A's {why} rule dropped its traffic");
    }
}

#[tokio::test]
async fn port_isolation_separates_guests_but_not_the_gateway() {
    if !root_or_skip("port_isolation_separates_guests_but_not_the_gateway") {
        return;
    }
    let lab = Lab::new(true).await;
    let (a, b) = (&lab.a, &lab.b);
    let gw = GW.to_string();
    assert!(
        a.reaches(&gw) && b.reaches(&gw),
        "isolated guests lost the gateway"
    );
    assert!(!a.pings(&b.ip.to_string()), "isolated A reached B");
    assert!(!b.pings(&a.ip.to_string()), "isolated B reached A");
    // Turning the option off (a restart with isolate_ports = false) reconnects them.
    for g in [a, b] {
        antispoof::install(Some(&lab.ns), &g.pin(), false)
            .await
            .unwrap();
    }
    lab.assert_ordinary_traffic_flows();
}

#[tokio::test]
async fn rules_are_idempotent_fail_closed_and_leave_other_tables_alone() {
    if !root_or_skip("rules_are_idempotent_fail_closed_and_leave_other_tables_alone") {
        return;
    }
    let lab = Lab::new(false).await;
    let (a, b) = (&lab.a, &lab.b);
    let gw = GW.to_string();
    let nft = |args: &[&str]| {
        let mut all = vec!["netns", "exec", lab.ns.as_str(), "nft"];
        all.extend(args);
        ok("ip", &all)
    };
    // Someone else's table in the same family.
    nft(&["add", "table", "bridge", "qnet_other"]);
    nft(&["add chain bridge qnet_other c { type filter hook forward priority 0; policy accept; }"]);
    nft(&["add rule bridge qnet_other c meta mark 0x1234 accept comment \"theirs\""]);
    let theirs = || nft(&["list", "table", "bridge", "qnet_other"]);
    let before_theirs = theirs();

    // Installing again (a restarted provider re-deriving the pin) changes nothing.
    let rules = || {
        nft(&["-n", "list", "table", "bridge", antispoof::TABLE])
            .lines()
            .map(|l| match l.find("counter packets") {
                Some(i) => l[..i].to_string(),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
    };
    let first = rules();
    antispoof::install(Some(&lab.ns), &a.pin(), false)
        .await
        .unwrap();
    antispoof::install(Some(&lab.ns), &a.pin(), false)
        .await
        .unwrap();
    assert_eq!(rules(), first);
    lab.assert_ordinary_traffic_flows();

    // Removing A's rules twice succeeds; A's port (still attached) is then dropped entirely.
    antispoof::remove(Some(&lab.ns), &a.tap).await.unwrap();
    antispoof::remove(Some(&lab.ns), &a.tap).await.unwrap();
    assert!(!rules().iter().any(|l| l.contains(&a.tap)), "{:?}", rules());
    let before = lab.dropped_unpinned();
    assert!(!a.pings(&gw), "an unpinned Basphere port still forwards");
    assert!(lab.dropped_unpinned() > before);
    assert!(b.reaches(&gw), "removing A's rules cut B off");

    // Re-derived from the VM's instance id and address, the pin restores A.
    antispoof::install(Some(&lab.ns), &a.pin(), false)
        .await
        .unwrap();
    lab.assert_ordinary_traffic_flows();

    // The other table was never touched; a gone namespace is not an error.
    assert_eq!(theirs(), before_theirs);
    antispoof::remove(Some("qnet-no-such-namespace"), &a.tap)
        .await
        .unwrap();
}

/// A VM started before taps were pinned keeps running while its tap has no rules. The first pinned
/// start must pin it too (re-derived from its QEMU command line and seed), not cut it off.
#[tokio::test]
async fn the_first_pinned_start_pins_vms_already_running() {
    if !root_or_skip("the_first_pinned_start_pins_vms_already_running") {
        return;
    }
    let lab = Lab::build(false, false).await;
    let (a, b) = (&lab.a, &lab.b);
    // A is "running": a process whose command line names A's VM directory and MAC, as QEMU's
    // does, its pidfile, and its seed holding A's address.
    let state = tempfile::Builder::new().prefix("qnet-").tempdir().unwrap();
    let dir = state.path().join(&a.instance);
    std::fs::create_dir_all(&dir).unwrap();
    let mut qemu = Command::new("sh")
        .args(["-c", "sleep 60", "qemu-stand-in"])
        .process_group(0)
        .arg(format!("file={}/disk.qcow2", dir.display()))
        .arg(format!("virtio-net-pci,netdev=n0,mac={}", a.mac))
        .spawn()
        .unwrap();
    std::fs::write(dir.join("qemu.pid"), qemu.id().to_string()).unwrap();
    let mut seed = vec![0u8; 2048];
    seed.extend_from_slice(format!("    addresses: [\"{}/24\"]\n", a.ip).as_bytes());
    std::fs::write(dir.join("seed.iso"), seed).unwrap();

    // B starts: the provider's tap path for B, with A running from the same state dir.
    let started =
        antispoof::install_alongside_running(Some(&lab.ns), &b.pin(), false, state.path()).await;
    let group = nix::unistd::Pid::from_raw(qemu.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = qemu.wait();
    started.unwrap();
    lab.assert_ordinary_traffic_flows();
    // A is pinned, not merely let through: its spoofed ARP is dropped.
    let before = lab.dropped(a, reason::ARP);
    a.arping(&["-U", "-S", &b.ip.to_string(), &GW.to_string()]);
    assert_eq!(
        Lab::neighbour(&lab.ns, b.ip).as_deref(),
        Some(b.mac.as_str())
    );
    assert!(lab.dropped(a, reason::ARP) > before);
}

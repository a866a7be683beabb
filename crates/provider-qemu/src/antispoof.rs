//! Anti-spoofing on guest ports: each tap may only send as its own VM (MAC and IPv4 address).
//!
//! Every guest of every user shares one bridge, and every guest has root. Without this, a guest
//! answers ARP for another guest's address, configures that address or MAC, or teaches the bridge
//! that another guest's MAC lives behind its own port, and takes that guest's traffic.
//!
//! Two layers, both per port and both derived only from the VM's tap name, MAC and IP (so a
//! restarted provider re-derives them, and installing twice is the same as once):
//!
//! - **Stateless nftables rules** in the bridge-family table `basphere` ([`TABLE`]), on the
//!   `prerouting` and `input` hooks (the latter sees frames for the bridge's own stack that do not
//!   pass prerouting). Base chains dispatch on the input port through the map `ports`; a Basphere
//!   tap (`bsp*`) without an entry there is dropped entirely (fail closed). A port's chain accepts
//!   only: ARP requests/replies whose Ethernet source, sender MAC and sender IP are the VM's; IPv4
//!   from the VM's MAC and IP, except DHCP server replies (UDP source port 67). Everything else is
//!   dropped with a counter: another source MAC, IEEE link-local group destinations
//!   (01:80:c2:00:00:0X: STP, LLDP, 802.1X — a guest has no business there), other ARP, other IPv4
//!   sources (0.0.0.0 included: guests are configured statically by cloud-init, so no DHCP
//!   client traffic is legitimate), **all IPv6** (Basphere networks are IPv4-only; dropping IPv6
//!   also rules out neighbour-discovery spoofing between guests' link-local addresses), and every
//!   other EtherType (VLAN tags included).
//! - **Bridge port settings**: learning off plus a static, sticky FDB entry for the VM's MAC on its
//!   port, so the forwarding database cannot be poisoned by any path (the kernel learns from
//!   link-local frames before any netfilter hook); link-local group frames are sent down the
//!   filtered forwarding path (`group_fwd_mask`) instead of that unhooked local path; BPDU guard
//!   on; no unknown-unicast flooding to the port (its own MAC is always known, so a flood there
//!   is never for its guest and would only let it see others' traffic); and, when configured,
//!   port isolation (guests then reach only non-isolated ports: the gateway, an uplink).
//!
//! The rules are generated as text by pure functions ([`install_script`], [`remove_script`],
//! [`port_settings`]) and applied only by [`install`] and [`remove`] (the provider calls them
//! through `net::attach_pinned_tap` at VM start and `net::release_tap` at stop/remove). Only the
//! `basphere` table is ever created, flushed or changed; other tables are never touched.
//!
//! Upgrades: the fail-closed rule would cut off VMs started before taps were pinned, so when the
//! table is missing, [`install_alongside_running`] first pins the VMs already running, re-derived
//! from QEMU's command line (MAC) and the VM's seed (address).

use std::fmt;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::str::FromStr;
use tokio::io::AsyncWriteExt;

/// The bridge-family nftables table Basphere owns.
pub const TABLE: &str = "basphere";

/// Prefix of every Basphere tap ([`crate::tap_name`]); ports with it are dropped unless pinned.
pub const TAP_PREFIX: &str = "bsp";

/// Link-local group addresses 01:80:c2:00:00:03-0f go down the bridge's filtered forwarding path
/// (00-02 cannot be redirected; with STP off 00 takes that path anyway, 01 is always dropped).
const GROUP_FWD_MASK: &str = "0xfff8";

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac([u8; 6]);

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address (six hex octets separated by ':')");
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut octets {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if octets[0] & 1 == 1 || octets == [0; 6] {
            return Err(format!(
                "{s:?} is not a unicast MAC address: a guest port can only be pinned to one"
            ));
        }
        Ok(Mac(octets))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

/// Checks that `port` is a Basphere tap name: `bsp` and ASCII letters/digits, at most 15 bytes.
pub fn check_port(port: &str) -> Result<(), String> {
    let ok = port.len() <= 15
        && port.len() > TAP_PREFIX.len()
        && port.starts_with(TAP_PREFIX)
        && port.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{port:?} is not a Basphere tap name ({TAP_PREFIX} followed by letters or digits, \
             at most 15 characters)"
        ))
    }
}

/// What one guest port may send as: its VM's MAC and IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPin {
    port: String,
    mac: Mac,
    ip: Ipv4Addr,
}

impl PortPin {
    /// Pins `port` (a Basphere tap name) to `mac` and `ip`.
    pub fn new(port: &str, mac: &str, ip: Ipv4Addr) -> Result<Self, String> {
        check_port(port)?;
        let mac: Mac = mac.parse()?;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(format!(
                "{ip} cannot be a guest's address: a port is pinned to one unicast address"
            ));
        }
        Ok(Self {
            port: port.to_string(),
            mac,
            ip,
        })
    }

    /// The pin of a VM's tap, from its instance id, MAC and address.
    pub fn for_vm(vm: &basphere_provider::VmRequest) -> Result<Self, String> {
        Self::new(
            &crate::machine::tap_name(&vm.instance),
            &vm.network.mac,
            vm.network.ip,
        )
    }

    pub fn port(&self) -> &str {
        &self.port
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// Name of the per-port chain.
pub fn port_chain(port: &str) -> String {
    format!("port-{port}")
}

/// Comments on the drop rules of a port's chain, in order. Each rule has its own counter.
pub mod reason {
    pub const LINK_LOCAL: &str = "IEEE link-local destination";
    pub const SOURCE_MAC: &str = "source MAC";
    pub const ARP: &str = "ARP sender";
    pub const DHCP_SERVER: &str = "DHCP server";
    pub const IPV4_SOURCE: &str = "IPv4 source";
    pub const IPV6: &str = "IPv6";
    pub const OTHER: &str = "other EtherType";
    /// On the base chains: a Basphere tap without a pin.
    pub const UNPINNED: &str = "unpinned Basphere port";
}

/// Creates the table, map and base chains if missing and (re)writes their rules. Idempotent.
fn base_script() -> String {
    let t = format!("bridge {TABLE}");
    let mut s = format!("add table {t}\nadd map {t} ports {{ type ifname : verdict; }}\n");
    for hook in ["prerouting", "input"] {
        s.push_str(&format!(
            "add chain {t} {hook} {{ type filter hook {hook} priority -200; policy accept; }}\n\
             flush chain {t} {hook}\n\
             add rule {t} {hook} iifname vmap @ports\n\
             add rule {t} {hook} iifname \"{TAP_PREFIX}*\" counter drop comment \"{}\"\n",
            reason::UNPINNED
        ));
    }
    s
}

/// The nft script (one atomic transaction) that pins `pin`'s port. Applying it again replaces the
/// port's rules with the same rules; no other port's rules change.
pub fn install_script(pin: &PortPin) -> String {
    let t = format!("bridge {TABLE}");
    let chain = port_chain(&pin.port);
    let (mac, ip) = (pin.mac, pin.ip);
    let rules = [
        format!(
            "ether daddr & ff:ff:ff:ff:ff:f0 == 01:80:c2:00:00:00 counter drop comment \"{}\"",
            reason::LINK_LOCAL
        ),
        format!(
            "ether saddr != {mac} counter drop comment \"{}\"",
            reason::SOURCE_MAC
        ),
        format!(
            "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
             arp operation {{ request, reply }} arp saddr ether {mac} arp saddr ip {ip} accept"
        ),
        format!("ether type arp counter drop comment \"{}\"", reason::ARP),
        format!(
            "ether type ip udp sport 67 counter drop comment \"{}\"",
            reason::DHCP_SERVER
        ),
        format!("ether type ip ip saddr {ip} accept"),
        format!(
            "ether type ip counter drop comment \"{}\"",
            reason::IPV4_SOURCE
        ),
        format!("ether type ip6 counter drop comment \"{}\"", reason::IPV6),
        format!("counter drop comment \"{}\"", reason::OTHER),
    ];
    let mut s = base_script();
    s.push_str(&format!("add chain {t} {chain}\nflush chain {t} {chain}\n"));
    for r in rules {
        s.push_str(&format!("add rule {t} {chain} {r}\n"));
    }
    s.push_str(&format!(
        "add element {t} ports {{ \"{}\" : jump {chain} }}\n",
        pin.port
    ));
    s
}

/// The nft script that removes `port`'s map entry and chain; succeeds whether or not they exist
/// (it adds them first, in the same transaction). Expects the table to exist.
pub fn remove_script(port: &str) -> Result<String, String> {
    check_port(port)?;
    let t = format!("bridge {TABLE}");
    let chain = port_chain(port);
    Ok(format!(
        "add map {t} ports {{ type ifname : verdict; }}\n\
         add chain {t} {chain}\n\
         add element {t} ports {{ \"{port}\" : jump {chain} }}\n\
         delete element {t} ports {{ \"{port}\" }}\n\
         flush chain {t} {chain}\n\
         delete chain {t} {chain}\n"
    ))
}

/// Commands (program and arguments, without the namespace option) that configure the bridge port:
/// learning off, link-local frames down the filtered path, BPDU guard, no unknown-unicast
/// flooding, isolation as configured,
/// and the VM's MAC as a static, sticky FDB entry on the port. Each is idempotent.
pub fn port_settings(pin: &PortPin, isolate: bool) -> Vec<(&'static str, Vec<String>)> {
    let port = pin.port.clone();
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        (
            "ip",
            args(&[
                "link",
                "set",
                "dev",
                &port,
                "type",
                "bridge_slave",
                "learning",
                "off",
                "group_fwd_mask",
                GROUP_FWD_MASK,
                "guard",
                "on",
                "flood",
                "off",
                "isolated",
                if isolate { "on" } else { "off" },
            ]),
        ),
        (
            "bridge",
            args(&[
                "fdb",
                "replace",
                &pin.mac.to_string(),
                "dev",
                &port,
                "master",
                "static",
                "sticky",
            ]),
        ),
    ]
}

/// `program` with `args`, run in `namespace` (or the host's when `None`).
fn command(namespace: Option<&str>, program: &str, args: &[String]) -> tokio::process::Command {
    let mut c = match namespace {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => tokio::process::Command::new(program),
    };
    c.args(args);
    c
}

/// Runs `nft -f -` with `script` on stdin in `namespace`.
async fn nft(namespace: Option<&str>, script: &str) -> Result<(), String> {
    let mut cmd = command(namespace, "nft", &["-f".into(), "-".into()]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run nft (apt-get install -y nftables): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| format!("cannot pass the ruleset to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("nft did not finish: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Pins `pin`'s port in `namespace` (the host's when `None`): the nftables rules first, then the
/// bridge port settings. The port must already be attached to the bridge. Idempotent.
pub async fn install(namespace: Option<&str>, pin: &PortPin, isolate: bool) -> Result<(), String> {
    nft(namespace, &install_script(pin))
        .await
        .map_err(|e| format!("cannot pin tap {} to {}/{}: {e}", pin.port, pin.mac, pin.ip))?;
    for (program, args) in port_settings(pin, isolate) {
        crate::host::run(&mut command(namespace, program, &args))
            .await
            .map_err(|e| format!("cannot configure bridge port {}: {e}", pin.port))?;
    }
    Ok(())
}

/// Removes `port`'s rules from `namespace` (the host's when `None`). Succeeds when they, the table
/// or the namespace are gone already. Port settings and FDB entries go with the port itself.
pub async fn remove(namespace: Option<&str>, port: &str) -> Result<(), String> {
    let script = remove_script(port)?;
    if let Some(ns) = namespace
        && !crate::net::netns_path(ns).exists()
    {
        return Ok(());
    }
    if !table_exists(namespace).await? {
        return Ok(());
    }
    nft(namespace, &script)
        .await
        .map_err(|e| format!("cannot remove the rules of tap {port}: {e}"))
}

/// Whether the `basphere` table exists in `namespace` (the host's when `None`).
async fn table_exists(namespace: Option<&str>) -> Result<bool, String> {
    let out = command(
        namespace,
        "nft",
        &["list".into(), "table".into(), "bridge".into(), TABLE.into()],
    )
    .stdin(Stdio::null())
    .kill_on_drop(true)
    .output()
    .await
    .map_err(|e| format!("cannot run nft (apt-get install -y nftables): {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    match out.status.success() {
        true => Ok(true),
        false if err.contains("No such file or directory") => Ok(false),
        false => Err(format!(
            "cannot read the {TABLE} nftables table ({}): {}",
            out.status,
            err.trim()
        )),
    }
}

/// Pins `pin`'s port like [`install`]; when the table does not exist yet (first start after an
/// upgrade to pinned taps, or after someone flushed the ruleset) it first pins the taps of the VMs
/// already running from `state_dir`, which the table's fail-closed rule would otherwise cut off.
pub async fn install_alongside_running(
    namespace: Option<&str>,
    pin: &PortPin,
    isolate: bool,
    state_dir: &std::path::Path,
) -> Result<(), String> {
    if !table_exists(namespace).await? {
        for running in running_pins(state_dir) {
            if running.port != pin.port && crate::net::tap_exists(namespace, &running.port).await {
                install(namespace, &running, isolate).await?;
                tracing::info!(tap = running.port, mac = %running.mac, ip = %running.ip,
                    "pinned the tap of a VM that was running before its tap was pinned");
            }
        }
    }
    install(namespace, pin, isolate).await
}

/// Pins of the VMs whose QEMU runs from `state_dir`, re-derived from what is on disk: the MACs
/// from QEMU's command line, the addresses from the VM's seed (`network-config`).
fn running_pins(state_dir: &std::path::Path) -> Vec<PortPin> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let instance = e.file_name().into_string().ok()?;
            crate::machine::check_instance(&instance).ok()?;
            let paths = crate::machine::VmPaths::new(state_dir, &instance);
            let pid = crate::host::read_pidfile(&paths.pidfile)?;
            if !crate::host::pid_is_ours(pid, &paths.marker()) {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let seed = std::fs::read(&paths.seed).ok()?;
            Some(pins_of(
                &instance,
                &String::from_utf8_lossy(&cmdline),
                &seed,
            ))
        })
        .flatten()
        .collect()
}

/// The pins of one VM: its taps (named after the instance: its own, then
/// [`crate::machine::extra_tap_name`]) with the MACs (`,mac=`) in the order of QEMU's command
/// line and the seed's addresses in the same order (the VM's own NIC first).
fn pins_of(instance: &str, cmdline: &str, seed: &[u8]) -> Vec<PortPin> {
    let macs = cmdline.split(",mac=").skip(1).filter_map(|r| r.get(..17));
    macs.zip(seed_ips(seed))
        .enumerate()
        .filter_map(|(i, (mac, ip))| {
            let tap = match i {
                0 => crate::machine::tap_name(instance),
                n => crate::machine::extra_tap_name(instance, n - 1),
            };
            PortPin::new(&tap, mac, ip).ok()
        })
        .collect()
}

/// The guest address in a seed ISO: `addresses: ["IP/prefix"]` of its `network-config`, which
/// ISO 9660 stores as plain bytes.
#[cfg(test)]
fn seed_ip(iso: &[u8]) -> Option<Ipv4Addr> {
    seed_ips(iso).first().copied()
}

/// Every `addresses: ["IP/prefix"]` of a seed's `network-config`, in order (the VM's own NIC
/// first).
fn seed_ips(iso: &[u8]) -> Vec<Ipv4Addr> {
    const KEY: &[u8] = b"addresses: [\"";
    let mut out = vec![];
    let mut from = 0;
    while let Some(at) = iso[from..].windows(KEY.len()).position(|w| w == KEY) {
        let start = from + at + KEY.len();
        let rest = &iso[start..iso.len().min(start + 16)];
        if let Some(ip) = rest
            .iter()
            .position(|&b| b == b'/')
            .and_then(|end| std::str::from_utf8(&rest[..end]).ok()?.parse().ok())
        {
            out.push(ip);
        }
        from = start;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin() -> PortPin {
        PortPin::new(
            "bsp0123456789ab",
            "52:54:0A:bc:de:f0",
            Ipv4Addr::new(10, 1, 2, 3),
        )
        .unwrap()
    }

    #[test]
    fn macs_parse_and_print_lowercase() {
        let m: Mac = "52:54:0A:bc:de:f0".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:0a:bc:de:f0");
        for bad in [
            "",
            "52:54:00:00:00",
            "52:54:00:00:00:00:00",
            "52:54:00:00:00:0g",
            "52:54:00:00:00:000",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "52:54:00:00:00:01\" accept",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pins_refuse_foreign_ports_and_non_unicast_addresses() {
        let mac = "52:54:00:00:00:01";
        assert!(PortPin::new("eth0", mac, Ipv4Addr::new(10, 0, 0, 2)).is_err());
        assert!(PortPin::new("bsp", mac, Ipv4Addr::new(10, 0, 0, 2)).is_err());
        assert!(PortPin::new("bsp\" accept", mac, Ipv4Addr::new(10, 0, 0, 2)).is_err());
        assert!(PortPin::new("bsp0123456789abc", mac, Ipv4Addr::new(10, 0, 0, 2)).is_err());
        for ip in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            assert!(PortPin::new("bsp01", mac, ip).is_err(), "{ip}");
        }
        let e = PortPin::new("eth0", mac, Ipv4Addr::new(10, 0, 0, 2)).unwrap_err();
        assert!(e.contains("not a Basphere tap name"), "{e}");
    }

    #[test]
    fn the_provider_pins_the_tap_it_creates_to_the_vm_mac_and_ip() {
        let instance = "6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33";
        let tap = crate::machine::tap_name(instance);
        assert!(check_port(&tap).is_ok(), "{tap}");
        let mac = basphere_provider::mac_for(instance);
        let p = PortPin::new(&tap, &mac, Ipv4Addr::new(10, 0, 0, 9)).unwrap();
        assert_eq!(p.port(), tap);
        assert_eq!(p.mac().to_string(), mac);
    }

    #[test]
    fn install_script_pins_mac_and_ip_and_drops_the_rest() {
        let s = install_script(&pin());
        let chain: Vec<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix("add rule bridge basphere port-bsp0123456789ab "))
            .collect();
        assert_eq!(
            chain,
            [
                "ether daddr & ff:ff:ff:ff:ff:f0 == 01:80:c2:00:00:00 counter drop comment \"IEEE link-local destination\"",
                "ether saddr != 52:54:0a:bc:de:f0 counter drop comment \"source MAC\"",
                "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation { request, reply } arp saddr ether 52:54:0a:bc:de:f0 arp saddr ip 10.1.2.3 accept",
                "ether type arp counter drop comment \"ARP sender\"",
                "ether type ip udp sport 67 counter drop comment \"DHCP server\"",
                "ether type ip ip saddr 10.1.2.3 accept",
                "ether type ip counter drop comment \"IPv4 source\"",
                "ether type ip6 counter drop comment \"IPv6\"",
                "counter drop comment \"other EtherType\"",
            ]
        );
        // Re-applying rewrites the port's chain instead of appending to it.
        let flush = s
            .find("flush chain bridge basphere port-bsp0123456789ab\n")
            .unwrap();
        assert!(flush < s.find("add rule bridge basphere port-").unwrap());
        assert!(s.ends_with(
            "add element bridge basphere ports { \"bsp0123456789ab\" : jump port-bsp0123456789ab }\n"
        ));
        // Unpinned Basphere taps are dropped on both hooks.
        for hook in ["prerouting", "input"] {
            assert!(s.contains(&format!(
                "add rule bridge basphere {hook} iifname \"bsp*\" counter drop"
            )));
            assert!(s.contains(&format!("flush chain bridge basphere {hook}\n")));
        }
        // Only Basphere's own table is ever named.
        for line in s.lines() {
            assert!(
                line == "add table bridge basphere" || line.contains(" bridge basphere "),
                "{line}"
            );
            assert!(!line.starts_with("flush ruleset"), "{line}");
        }
    }

    #[test]
    fn the_seed_gives_back_the_guest_address() {
        // As `seed::render` writes it, inside an ISO image.
        let mut iso = vec![0u8; 4096];
        iso.extend_from_slice(b"ethernets:\n  nic0:\n    addresses: [\"10.77.3.201/24\"]\n");
        assert_eq!(seed_ip(&iso), Some(Ipv4Addr::new(10, 77, 3, 201)));
        assert_eq!(seed_ip(b"nothing here"), None);
    }

    #[test]
    fn a_running_vm_with_an_extra_nic_gets_both_pins_back() {
        let instance = "6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33";
        let cmdline = "qemu\0-netdev\0tap,id=n0,script=no\0-device\0\
             virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01\0-drive\0file=/x,serial=bspd1\0\
             -netdev\0tap,id=n1,script=no\0-device\0\
             virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02\0";
        let mut iso = vec![0u8; 4096];
        iso.extend_from_slice(
            b"ethernets:\n  nic0:\n    addresses: [\"10.254.0.10/24\"]\n    gateway4: \"10.254.0.1\"\n  \
              nic1:\n    addresses: [\"10.77.0.2/24\"]\n",
        );
        let got: Vec<_> = pins_of(instance, cmdline, &iso)
            .iter()
            .map(|p| {
                (
                    p.port().to_string(),
                    p.mac().to_string(),
                    p.ip().to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    crate::machine::tap_name(instance),
                    "52:54:00:00:00:01".into(),
                    "10.254.0.10".into()
                ),
                (
                    crate::machine::extra_tap_name(instance, 0),
                    "52:54:00:00:00:02".into(),
                    "10.77.0.2".into()
                ),
            ]
        );
        // A seed from before the extra NIC: only the VM's own tap is pinned.
        let mut one = vec![0u8; 16];
        one.extend_from_slice(b"addresses: [\"10.254.0.10/24\"]");
        assert_eq!(pins_of(instance, cmdline, &one).len(), 1);
    }

    #[test]
    fn remove_script_is_idempotent_by_construction() {
        let s = remove_script("bsp0123456789ab").unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[2].starts_with("add element"));
        assert!(lines[3].starts_with("delete element"));
        assert_eq!(
            lines[5],
            "delete chain bridge basphere port-bsp0123456789ab"
        );
        assert!(remove_script("eth0").is_err());
    }

    #[test]
    fn port_settings_follow_the_isolation_option() {
        let on = port_settings(&pin(), true);
        let line = |v: &(&str, Vec<String>)| format!("{} {}", v.0, v.1.join(" "));
        assert_eq!(
            line(&on[0]),
            "ip link set dev bsp0123456789ab type bridge_slave learning off group_fwd_mask 0xfff8 \
             guard on flood off isolated on"
        );
        assert_eq!(
            line(&on[1]),
            "bridge fdb replace 52:54:0a:bc:de:f0 dev bsp0123456789ab master static sticky"
        );
        let off = port_settings(&pin(), false);
        assert!(line(&off[0]).ends_with("isolated off"));
    }
}

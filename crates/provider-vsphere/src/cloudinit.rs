//! cloud-init data for the VMware datasource (`guestinfo.metadata`, `guestinfo.userdata`).
//!
//! Both documents are written as JSON (which is YAML, as cloud-init reads them) so no YAML
//! library is needed; user data starts with the `#cloud-config` line cloud-init requires.

use basphere_provider::VmRequest;
use serde_json::json;

/// Instance metadata: id, hostname and the static network config (netplan v2) on `nic`.
pub fn metadata(vm: &VmRequest, nic: &str) -> String {
    let net = &vm.network;
    let mut eth = json!({
        "addresses": [format!("{}/{}", net.ip, net.prefix_len)],
        "routes": [{"to": "0.0.0.0/0", "via": net.gateway.to_string()}],
        "mtu": net.mtu,
    });
    if !net.dns.is_empty() {
        let dns: Vec<String> = net.dns.iter().map(|d| d.to_string()).collect();
        eth["nameservers"] = json!({ "addresses": dns });
    }
    let mut ethernets = serde_json::Map::new();
    ethernets.insert(nic.to_string(), eth);
    for (i, x) in vm.extra_nics.iter().enumerate() {
        let mut e = json!({
            "match": {"macaddress": vmware_mac(&x.mac)},
            "set-name": basphere_provider::extra_nic_name(i),
        });
        match x.address {
            Some(a) => e["addresses"] = json!([format!("{}/{}", a.ip, a.prefix_len)]),
            None => e["dhcp4"] = json!(true),
        }
        ethernets.insert(format!("extra{}", i + 1), e);
    }
    json!({
        "instance-id": vm.instance,
        "local-hostname": vm.name.as_str(),
        "network": {
            "version": 2,
            "ethernets": ethernets,
        },
    })
    .to_string()
}

/// The MAC an extra NIC gets in vSphere: VMware's range for manual addresses
/// (`00:50:56:00:00:00`-`00:50:56:3f:ff:ff`) with the last three bytes of Basphere's own MAC.
pub fn vmware_mac(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    let tail = |i: usize| b.get(i).copied().unwrap_or(0);
    format!(
        "00:50:56:{:02x}:{:02x}:{:02x}",
        tail(3) & 0x3f,
        tail(4),
        tail(5)
    )
}

/// User data: hostname, the login user with the owner's SSH keys and sudo, no password logins.
pub fn userdata(vm: &VmRequest) -> String {
    let keys: Vec<&str> = vm.ssh_keys.iter().map(|k| k.as_str()).collect();
    let mut doc = json!({
        "hostname": vm.name.as_str(),
        "preserve_hostname": false,
        "users": [{
            "name": vm.login_user,
            "gecos": format!("Basphere user {}", vm.owner),
            "shell": "/bin/bash",
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "lock_passwd": true,
            "ssh_authorized_keys": keys,
        }],
        "ssh_pwauth": false,
        "disable_root": true,
    });
    // Extra disks sit on the boot disk's SCSI controller at the units after it (1, 2, …; 7 is
    // the controller's own), in order: an `auto` disk is found by that position.
    let runcmd: Vec<serde_json::Value> = vm
        .extra_disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let mount = d.mount.as_deref()?;
            let dev = format!("/dev/disk/by-path/*-scsi-0:0:{}:0", extra_disk_unit(i));
            let label = format!("data{}", i + 1);
            Some(json!([
                "sh",
                "-c",
                basphere_provider::mount_script(&dev, &label, mount)
            ]))
        })
        .collect();
    if !runcmd.is_empty() {
        doc["runcmd"] = json!(runcmd);
    }
    format!("#cloud-config\n{doc}\n")
}

/// The SCSI unit of the `index`-th (from 0) extra disk: 1, 2, … skipping 7 (the controller's).
pub fn extra_disk_unit(index: usize) -> u32 {
    let u = index as u32 + 1;
    if u >= 7 { u + 1 } else { u }
}

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
    json!({
        "instance-id": vm.instance,
        "local-hostname": vm.name.as_str(),
        "network": {
            "version": 2,
            "ethernets": { nic: eth },
        },
    })
    .to_string()
}

/// User data: hostname, the login user with the owner's SSH keys and sudo, no password logins.
pub fn userdata(vm: &VmRequest) -> String {
    let keys: Vec<&str> = vm.ssh_keys.iter().map(|k| k.as_str()).collect();
    let doc = json!({
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
    format!("#cloud-config\n{doc}\n")
}

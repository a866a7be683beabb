//! The cloud-init NoCloud seed: `meta-data`, `user-data` and `network-config` on an ISO 9660
//! volume labelled `cidata`.
//!
//! The YAML is written by hand; every string that comes from a request is emitted as a JSON string,
//! which YAML reads verbatim, so no value can break out of its field.

use basphere_provider::VmRequest;
use std::path::Path;

/// The three files of a NoCloud seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

/// Renders the seed for `vm`.
pub fn render(vm: &VmRequest) -> SeedFiles {
    let meta_data = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&vm.instance),
        q(vm.name.as_str())
    );

    let mut user_data = String::from("#cloud-config\n");
    user_data.push_str(&format!("hostname: {}\n", q(vm.name.as_str())));
    user_data.push_str("ssh_pwauth: false\ndisable_root: true\nusers:\n");
    user_data.push_str(&format!("  - name: {}\n", q(&vm.login_user)));
    user_data.push_str("    groups: [sudo]\n");
    user_data.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    user_data.push_str("    shell: /bin/bash\n");
    user_data.push_str("    lock_passwd: true\n");
    user_data.push_str("    ssh_authorized_keys:\n");
    for key in &vm.ssh_keys {
        user_data.push_str(&format!("      - {}\n", q(key.as_str())));
    }
    let mounts: Vec<String> = vm
        .extra_disks
        .iter()
        .filter_map(|d| d.mount.as_deref().map(|m| mount_script(&d.serial, m)))
        .collect();
    if !mounts.is_empty() {
        user_data.push_str("runcmd:\n");
        for m in mounts {
            user_data.push_str(&format!("  - [\"sh\", \"-c\", {}]\n", q(&m)));
        }
    }

    let n = &vm.network;
    let mut network_config = String::from("version: 2\nethernets:\n  nic0:\n");
    network_config.push_str(&format!(
        "    match:\n      macaddress: {}\n",
        q(&n.mac.to_ascii_lowercase())
    ));
    network_config.push_str("    set-name: eth0\n");
    network_config.push_str(&format!(
        "    addresses: [{}]\n",
        q(&format!("{}/{}", n.ip, n.prefix_len))
    ));
    network_config.push_str(&format!("    gateway4: {}\n", q(&n.gateway.to_string())));
    if n.mtu > 0 {
        network_config.push_str(&format!("    mtu: {}\n", n.mtu));
    }
    if !n.dns.is_empty() {
        let dns: Vec<String> = n.dns.iter().map(|a| q(&a.to_string())).collect();
        network_config.push_str(&format!(
            "    nameservers:\n      addresses: [{}]\n",
            dns.join(", ")
        ));
    }

    for (i, nic) in vm.extra_nics.iter().enumerate() {
        network_config.push_str(&format!("  nic{}:\n", i + 1));
        network_config.push_str(&format!(
            "    match:\n      macaddress: {}\n",
            q(&nic.mac.to_ascii_lowercase())
        ));
        network_config.push_str(&format!(
            "    set-name: {}\n",
            q(&basphere_provider::extra_nic_name(i))
        ));
        match nic.address {
            Some(a) => network_config.push_str(&format!(
                "    addresses: [{}]\n",
                q(&format!("{}/{}", a.ip, a.prefix_len))
            )),
            None => network_config.push_str("    dhcp4: true\n"),
        }
    }

    SeedFiles {
        meta_data,
        user_data,
        network_config,
    }
}

/// The first-boot command for the extra disk with virtio serial `serial`, found by that
/// stable id (see [`basphere_provider::mount_script`]).
pub fn mount_script(serial: &str, mount: &str) -> String {
    let dev = format!("/dev/disk/by-id/virtio-{serial}");
    basphere_provider::mount_script(&dev, &serial[serial.len().saturating_sub(16)..], mount)
}

/// Which ISO writer is installed: `genisoimage` (preferred) or `xorriso`.
pub fn iso_tool() -> Option<&'static str> {
    ["genisoimage", "xorriso"]
        .into_iter()
        .find(|t| crate::host::find_in_path(t).is_some())
}

/// Writes `files` into a new ISO at `iso` (label `cidata`), via a scratch dir under `work`.
pub async fn write_iso(files: &SeedFiles, work: &Path, iso: &Path) -> Result<(), String> {
    let dir = work.join("seed.d");
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&dir)
        .await
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, text) in [
        ("meta-data", &files.meta_data),
        ("user-data", &files.user_data),
        ("network-config", &files.network_config),
    ] {
        tokio::fs::write(dir.join(name), text)
            .await
            .map_err(|e| format!("cannot write {name}: {e}"))?;
    }
    let tool = iso_tool().ok_or_else(|| {
        "neither genisoimage nor xorriso is installed: apt-get install -y genisoimage".to_string()
    })?;
    let mut cmd = tokio::process::Command::new(tool);
    if tool == "xorriso" {
        cmd.args(["-as", "mkisofs"]);
    }
    cmd.args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(iso)
        .arg(dir.join("meta-data"))
        .arg(dir.join("user-data"))
        .arg(dir.join("network-config"));
    let out = crate::host::run(&mut cmd).await?;
    drop(out);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use basphere_provider::GuestNetwork;

    pub(crate) fn request() -> VmRequest {
        VmRequest {
            instance: "6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33".into(),
            name: "web-1".parse().unwrap(),
            owner: "alice".parse().unwrap(),
            image: "debian-12".parse().unwrap(),
            image_ref: "debian-12".into(),
            login_user: "alice".into(),
            spec: basphere_core::Spec {
                vcpus: 2,
                memory_mib: 4096,
                disk_gib: 50,
            },
            network: GuestNetwork {
                ip: "10.254.0.34".parse().unwrap(),
                prefix_len: 21,
                gateway: "10.254.0.1".parse().unwrap(),
                dns: vec!["10.254.0.2".parse().unwrap(), "10.254.0.3".parse().unwrap()],
                mtu: 1450,
                mac: "52:54:AB:cd:00:01".into(),
            },
            ssh_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0gGbq5cYp8x3hT4UdfWmZpV6oJ3kq3wK0a1b2c3d4e alice@laptop"
                    .parse()
                    .unwrap(),
            ],
            extra_disks: vec![],
            extra_nics: vec![],
        }
    }

    #[test]
    fn extra_disks_are_mounted_by_serial_and_extra_nics_get_their_address() {
        use basphere_core::DiskMode;
        use basphere_provider::{DiskRequest, NicAddress, NicRequest};
        let mut vm = request();
        vm.extra_disks = vec![
            DiskRequest {
                serial: "bspabc123d1".into(),
                size_gib: 10,
                mode: DiskMode::Auto,
                mount: Some("/data".into()),
            },
            DiskRequest {
                serial: "bspabc123d2".into(),
                size_gib: 10,
                mode: DiskMode::Raw,
                mount: None,
            },
        ];
        vm.extra_nics = vec![NicRequest {
            network: "storage".into(),
            mac: "52:54:00:AA:00:02".into(),
            address: Some(NicAddress {
                ip: "10.77.0.2".parse().unwrap(),
                prefix_len: 24,
            }),
            gateway: Some("10.77.0.1".parse().unwrap()),
            bridge: Some("bspstor0".into()),
            port_group: None,
        }];
        let s = render(&vm);
        assert!(s.user_data.contains(
            "runcmd:\n  - [\"sh\", \"-c\", \"d=$(ls -d /dev/disk/by-id/virtio-bspabc123d1 "
        ));
        assert!(s.user_data.contains("mkfs.ext4 -q -L bspabc123d1"));
        assert!(
            !s.user_data.contains("bspabc123d2"),
            "a raw disk is left alone"
        );
        assert!(s.network_config.contains(
            "  nic1:\n    match:\n      macaddress: \"52:54:00:aa:00:02\"\n    set-name: \"eth1\"\n    addresses: [\"10.77.0.2/24\"]\n"
        ));
        // No second default route: the extra network's gateway is not the guest's.
        assert_eq!(s.network_config.matches("gateway4").count(), 1);
        // The first NIC's address stays the first in the file (the anti-spoofing re-pin reads it).
        let first = s.network_config.find("addresses: [").unwrap();
        assert!(s.network_config[first..].starts_with("addresses: [\"10.254.0.34/21\"]"));
    }

    #[test]
    fn meta_data_names_the_instance_and_host() {
        let s = render(&request());
        assert_eq!(
            s.meta_data,
            "instance-id: \"6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33\"\nlocal-hostname: \"web-1\"\n"
        );
    }

    #[test]
    fn user_data_creates_the_login_user_with_key() {
        let s = render(&request());
        assert!(s.user_data.starts_with("#cloud-config\n"));
        assert!(s.user_data.contains("hostname: \"web-1\"\n"));
        assert!(s.user_data.contains("  - name: \"alice\"\n"));
        assert!(
            s.user_data
                .contains("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n")
        );
        assert!(s.user_data.contains("    lock_passwd: true\n"));
        assert!(s.user_data.contains(
            "    ssh_authorized_keys:\n      - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0gGbq5cYp8x3hT4UdfWmZpV6oJ3kq3wK0a1b2c3d4e alice@laptop\"\n"
        ));
    }

    #[test]
    fn network_config_is_static_and_matches_the_mac() {
        let s = render(&request());
        assert_eq!(
            s.network_config,
            "version: 2\n\
             ethernets:\n  nic0:\n    match:\n      macaddress: \"52:54:ab:cd:00:01\"\n\
             \x20   set-name: eth0\n\
             \x20   addresses: [\"10.254.0.34/21\"]\n\
             \x20   gateway4: \"10.254.0.1\"\n\
             \x20   mtu: 1450\n\
             \x20   nameservers:\n      addresses: [\"10.254.0.2\", \"10.254.0.3\"]\n"
        );
    }

    #[test]
    fn hostile_values_stay_inside_their_strings() {
        let mut r = request();
        r.login_user = "bob\"\n  - name: root".into();
        let s = render(&r);
        assert!(s.user_data.contains(r#"  - name: "bob\"\n  - name: root""#));
        assert_eq!(s.user_data.matches("\n  - name:").count(), 1);
    }
}

//! Test harness: one vcsim per test on 127.0.0.1 (`basphere_testkit::vcsim`), killed by PID when
//! it drops, and the provider configuration and requests for it.
#![allow(dead_code)]

use basphere_provider::{GuestNetwork, VmRequest};
use basphere_vsphere::{Client, Credentials, Secret, TemplateConfig, TlsConfig, VsphereConfig};
use std::path::PathBuf;
use std::time::Duration;

pub const TEMPLATE: &str = "DC0_C0_RP0_VM1";
pub const IMAGE: &str = "debian-12";
pub use basphere_testkit::TEST_KEY as KEY;

/// A running vcsim (the kit's process harness) with this crate's configuration helpers.
pub struct Vcsim(basphere_testkit::vcsim::Vcsim);

impl std::ops::Deref for Vcsim {
    type Target = basphere_testkit::vcsim::Vcsim;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Vcsim {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Vcsim {
    pub fn start(args: &[&str]) -> Vcsim {
        Vcsim(basphere_testkit::vcsim::Vcsim::start(args))
    }

    /// Writes a credentials file with the given mode and returns its path.
    pub fn credentials_file(&self, user: &str, password: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join("credentials.toml");
        std::fs::write(
            &p,
            format!("username = \"{user}\"\npassword = \"{password}\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// A provider config for this simulator.
    pub fn config(&self, credentials_file: PathBuf) -> VsphereConfig {
        VsphereConfig {
            server: self.url.clone(),
            datacenter: "DC0".into(),
            cluster: "DC0_C0".into(),
            resource_pool: None,
            datastore: "LocalDS_0".into(),
            network: "VM Network".into(),
            folder: "basphere/vms".into(),
            templates: [(
                IMAGE.to_string(),
                TemplateConfig {
                    template: TEMPLATE.into(),
                    login_user: "debian".into(),
                    nic: "ens192".into(),
                },
            )]
            .into(),
            default_nic: "ens192".into(),
            tls: TlsConfig {
                ca_file: None,
                insecure: true,
            },
            credentials_file,
            serialize_clones: true,
            task_deadline_secs: 10.0,
            simulator_guest_ip: true,
            allow_insecure_http: self.url.starts_with("http://"),
        }
    }

    /// A logged-in SOAP client of our own.
    pub async fn client(&self, user: &str, password: &str) -> Client {
        let creds = Credentials {
            username: user.into(),
            password: Secret::new(password),
        };
        Client::connect(
            &self.url,
            &TlsConfig {
                ca_file: None,
                insecure: true,
            },
            creds,
        )
        .await
        .expect("connect to vcsim")
    }

    /// vcsim has no template: power off DC0_C0_RP0_VM1 and mark it as one.
    pub async fn make_template(&self, user: &str, password: &str) {
        let c = self.client(user, password).await;
        let vm = c
            .find_by_inventory_path(&format!("DC0/vm/{TEMPLATE}"))
            .await
            .unwrap()
            .expect("vcsim has DC0_C0_RP0_VM1");
        c.power_off(&vm, Duration::from_secs(10)).await.unwrap();
        c.mark_as_template(&vm).await.unwrap();
        c.logout().await.unwrap();
    }
}

/// A create request like the engine sends; `n` varies the address.
pub fn request(name: &str, n: u8) -> VmRequest {
    request_as(name, "alice", &uuid::Uuid::new_v4().to_string(), n)
}

/// A create request of `owner` with the given instance id; `n` varies the address.
pub fn request_as(name: &str, owner: &str, instance: &str, n: u8) -> VmRequest {
    let instance = instance.to_string();
    VmRequest {
        name: name.parse().unwrap(),
        owner: owner.parse().unwrap(),
        image: IMAGE.parse().unwrap(),
        image_ref: TEMPLATE.into(),
        login_user: "debian".into(),
        spec: basphere_core::Spec {
            vcpus: 2,
            memory_mib: 8192,
            disk_gib: 50,
        },
        network: GuestNetwork {
            ip: std::net::Ipv4Addr::new(10, 254, 0, 10 + n),
            prefix_len: 21,
            gateway: std::net::Ipv4Addr::new(10, 254, 0, 1),
            dns: vec![std::net::Ipv4Addr::new(10, 254, 0, 2)],
            mtu: 1500,
            mac: basphere_provider::mac_for(&instance),
        },
        ssh_keys: vec![KEY.parse().unwrap()],
        extra_disks: vec![],
        extra_nics: vec![],
        instance,
    }
}

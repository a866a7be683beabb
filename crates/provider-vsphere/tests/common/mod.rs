//! Test harness: one vcsim per test on 127.0.0.1, killed by PID when the guard drops.
#![allow(dead_code)]

use basphere_provider::{GuestNetwork, VmRequest};
use basphere_vsphere::{Client, Credentials, Secret, TemplateConfig, TlsConfig, VsphereConfig};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const TEMPLATE: &str = "DC0_C0_RP0_VM1";
pub const IMAGE: &str = "debian-12";
pub const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop";

/// Path of the vcsim binary, built by `vcsim.sh` on first use when missing.
pub fn vcsim_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vcsim.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run vcsim.sh");
        assert!(
            out.status.success(),
            "{} failed: it needs root (apt-get) and the Debian package archive",
            script.display()
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(
            path.exists(),
            "vcsim.sh printed {path:?}, which does not exist"
        );
        path
    })
    .clone()
}

/// A running vcsim; killed when dropped.
pub struct Vcsim {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// SOAP endpoint, `https://127.0.0.1:PORT/sdk`.
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Vcsim {
    pub fn start(args: &[&str]) -> Vcsim {
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("vcsim.err")).unwrap();
        let mut child = Command::new(vcsim_binary())
            .args(["-l", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start vcsim");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let started = Instant::now();
        let mut line = String::new();
        let url = loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0
                || started.elapsed() > Duration::from_secs(20)
            {
                let _ = child.kill();
                panic!("vcsim exited before printing GOVC_URL");
            }
            if let Some(rest) = line.split("GOVC_URL=").nth(1) {
                let url = rest.split_whitespace().next().unwrap();
                // https://user:pass@127.0.0.1:PORT/sdk -> https://127.0.0.1:PORT/sdk
                let (scheme, rest) = url.split_once("://").unwrap();
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                break format!("{scheme}://{host}");
            }
        };
        assert!(url.contains("://127.0.0.1:"), "vcsim listens on {url}");
        Vcsim {
            child,
            _stdout: stdout,
            url,
            dir,
        }
    }

    /// Whether the simulator is still running (it crashes on some races).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// vcsim's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vcsim.err")).unwrap_or_default()
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

impl Drop for Vcsim {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.alive() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- vcsim log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        instance,
    }
}

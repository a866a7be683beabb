//! The `qemu` provider: VMs as plain QEMU processes on this host.
//!
//! Per VM, under `state_dir/<instance>/`: a qcow2 linked clone of a base image, a cloud-init
//! NoCloud seed ISO, the guest kernel and tiny initrd (direct kernel boot), QEMU's pidfile, QMP
//! socket, serial console log (bounded, see `console.rs`) and stderr log; directories 0700, files
//! 0600, all root's. QEMU runs detached in a session of its own under its seccomp sandbox, opens
//! those files as root and then switches to the unprivileged `run_as` account. The pidfile is
//! trusted only when `/proc/PID/cmdline` names that VM's directory, so a recycled PID is never
//! signalled.
//!
//! Networking ([`NetworkMode`]): by default a network namespace owned by Basphere ("lab") holds a
//! bridge carrying the guests' gateway address and one tap per VM; QEMU runs inside it, and guests
//! are reachable only from inside it ([`QemuProvider::network_command`]). It is never bridged or
//! routed to the host. In production, taps join an existing host bridge instead.
//!
//! Acceleration: KVM only when `/dev/kvm` works and is not the software-only `kvm_pvm`; else TCG.
//! Measured under TCG on a 2-core host (`cargo test -p basphere-qemu --test boot -- --nocapture`):
//! prepare ~40 ms, start ~150 ms, power-on to first console byte ~3 s, first console byte to SSH
//! banner 41-49 s (cloud-init under emulation), stop via QMP ~130 ms.
//!
//! Host setup: `crates/provider-qemu/install-deps.sh` (QEMU from bookworm-backports, image build
//! tools, genisoimage). Images: [`build_image`].
//!
//! Architecture invariant: this crate knows nothing of users, quotas or the store; everything
//! arrives in a [`VmRequest`]. Base images are only read, never modified, by VM operations.

pub mod antispoof;
mod config;
mod console;
mod diagnose;
mod host;
mod image;
mod machine;
mod net;
mod qmp;
mod ready;
mod seed;

pub use config::{Accel, DEFAULT_RUN_AS, NetworkMode, QemuConfig};
pub use console::{
    CONSOLE_FD, ConsolePipe, HELPER_ARG as CONSOLE_HELPER_ARG, RingLog,
    helper_main as console_helper_main, read_tail as console_tail,
};
pub use diagnose::{Diagnosis, diagnose};
pub use image::{BUILDABLE, BuildError, Mirrors, build_image, mirrors_from_sources, prune_images};
pub use machine::{
    AccelChoice, DropPrivileges, Resources, TCG_DEFAULT_MAX_MEMORY_MIB, TCG_DEFAULT_MAX_VCPUS,
    tap_name,
};
pub use net::Probe as SshProbe;
pub use net::ensure_lab;
pub use ready::host_checks;
pub use seed::{SeedFiles, render as render_seed};

use basphere_core::ImageName;
use basphere_provider::{MachineState, Machines, Provider, ProviderError, Result, VmRequest};
use machine::VmPaths;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How much of the console's end `wait_ready` reads to explain a guest that is not ready.
const DIAGNOSE_BYTES: u64 = 256 * 1024;

/// The apt command that installs QEMU on a Debian 12 host of this kind.
pub const QEMU_INSTALL_HINT: &str = "apt-get install -y -t bookworm-backports qemu-system-x86 \
     (or run crates/provider-qemu/install-deps.sh, which also adds bookworm-backports)";

/// Why the provider could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{tool} not found: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("invalid qemu configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Accel(String),
}

/// The qemu provider. Cheap to share; all state lives on disk and in QEMU processes.
#[derive(Debug)]
pub struct QemuProvider {
    config: QemuConfig,
    qemu: PathBuf,
    accel: AccelChoice,
    host_cpus: u32,
    host_memory_mib: Option<u64>,
    /// How QEMU gives up root once it has opened its files.
    drop_privileges: DropPrivileges,
    /// The program run as the console ring writer (see [`console_helper_main`]).
    console_helper: PathBuf,
    /// Serialises setup of the shared lab namespace and bridge within this process.
    net_lock: tokio::sync::Mutex<()>,
}

impl QemuProvider {
    /// Checks the host (QEMU, qemu-img, ip, firmware, ISO writer, KVM) and the configuration.
    pub fn new(config: QemuConfig) -> std::result::Result<Self, QemuError> {
        let qemu =
            host::find_in_path(&config.qemu_binary).ok_or_else(|| QemuError::MissingTool {
                tool: config.qemu_binary.clone(),
                hint: QEMU_INSTALL_HINT.to_string(),
            })?;
        let need = |tool: &str, hint: &str| {
            host::find_in_path(tool)
                .map(|_| ())
                .ok_or_else(|| QemuError::MissingTool {
                    tool: tool.to_string(),
                    hint: hint.to_string(),
                })
        };
        need(
            "qemu-img",
            "apt-get install -y -t bookworm-backports qemu-utils",
        )?;
        need("ip", "apt-get install -y iproute2")?;
        need("nft", "apt-get install -y nftables")?;
        if seed::iso_tool().is_none() {
            return Err(QemuError::MissingTool {
                tool: "genisoimage".into(),
                hint: "apt-get install -y genisoimage".into(),
            });
        }
        if !Path::new("/usr/share/qemu/qboot.rom").is_file() {
            return Err(QemuError::MissingTool {
                tool: "/usr/share/qemu/qboot.rom".into(),
                hint: QEMU_INSTALL_HINT.to_string(),
            });
        }
        match &config.network {
            NetworkMode::Lab { namespace, bridge } => {
                check_ifname("network.bridge", bridge)?;
                let ok = !namespace.is_empty()
                    && namespace.len() <= 64
                    && !namespace.starts_with('.')
                    && namespace
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
                if !ok {
                    return Err(QemuError::Config(format!(
                        "network.namespace {namespace:?} must be 1-64 of [A-Za-z0-9._-]"
                    )));
                }
            }
            NetworkMode::Bridge { name } => check_ifname("network.name", name)?,
        }
        if config.max_vcpus == Some(0) || config.max_memory_mib == Some(0) {
            return Err(QemuError::Config(
                "max_vcpus and max_memory_mib must be at least 1 when set".into(),
            ));
        }
        // Longest socket path must fit sockaddr_un (108 bytes) with a 36-character UUID.
        let qmp_len = config.state_dir.as_os_str().len() + 1 + 36 + "/qmp.sock".len();
        if qmp_len >= 108 {
            return Err(QemuError::Config(format!(
                "state_dir {} is too long for QMP socket paths (keep it under 60 characters)",
                config.state_dir.display()
            )));
        }
        let drop_privileges = drop_privileges(&config, &qemu)?;
        // This very program, even after an upgrade replaced the file it was started from.
        let console_helper = PathBuf::from("/proc/self/exe");
        let probe = host::probe_kvm(Duration::from_secs(2));
        let accel = machine::decide_accel(config.accel, probe).map_err(QemuError::Accel)?;
        tracing::info!(
            accel = accel.as_str(),
            kvm_usable = probe.usable,
            kvm_pvm = probe.pvm,
            "qemu provider ready"
        );
        Ok(Self {
            config,
            qemu,
            accel,
            host_cpus: host::host_cpus(),
            host_memory_mib: host::host_memory_mib(),
            drop_privileges,
            console_helper,
            net_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// Runs `program` as the console ring writer instead of this executable. The program must
    /// call [`console_helper_main`] first thing (for tests, whose executable is a test harness).
    pub fn with_console_helper(mut self, program: impl Into<PathBuf>) -> Self {
        self.console_helper = program.into();
        self
    }

    /// How QEMU drops root (`-run-with user=` or `-runas`), if it does.
    pub fn drop_privileges(&self) -> &DropPrivileges {
        &self.drop_privileges
    }

    /// The accelerator VMs get.
    pub fn accel(&self) -> AccelChoice {
        self.accel
    }

    /// How long callers should give `wait_ready` by default (`ssh_ready_timeout_secs`).
    pub fn ssh_ready_timeout(&self) -> Duration {
        Duration::from_secs(self.config.ssh_ready_timeout_secs)
    }

    /// The lab network namespace guests live in, or `None` with a host bridge.
    pub fn netns_name(&self) -> Option<&str> {
        match &self.config.network {
            NetworkMode::Lab { namespace, .. } => Some(namespace),
            NetworkMode::Bridge { .. } => None,
        }
    }

    /// A command that runs `program` where guests are reachable: `ip netns exec NS program` in lab
    /// mode, `program` itself with a host bridge. Add the arguments and run or exec it, e.g. for
    /// `basphere ssh NAME`: `network_command("ssh").arg(format!("{user}@{ip}"))`.
    pub fn network_command(&self, program: impl AsRef<OsStr>) -> std::process::Command {
        match self.netns_name() {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => std::process::Command::new(program),
        }
    }

    /// Deletes the lab namespace (and with it the bridge) if no process runs in it any more.
    /// Returns whether it is gone. For tests and `basphere` maintenance; a no-op with a host bridge.
    pub async fn teardown_lab_network(&self) -> Result<bool> {
        match self.netns_name() {
            Some(ns) => net::teardown_lab(ns)
                .await
                .map_err(ProviderError::retryable),
            None => Ok(true),
        }
    }

    /// Builds `name` into this provider's `images_dir` (see [`build_image`]).
    pub async fn build_image(
        &self,
        name: &ImageName,
        force: bool,
        progress: impl FnMut(&str),
    ) -> std::result::Result<PathBuf, BuildError> {
        image::build_image(name, &self.config.images_dir, force, progress).await
    }

    /// Deletes superseded image builds no VM disk of this provider uses (see [`prune_images`]).
    pub fn prune_images(&self) -> std::io::Result<Vec<PathBuf>> {
        image::prune_images(&self.config.images_dir, &self.config.state_dir)
    }

    /// The directory holding everything of one VM.
    pub fn vm_dir(&self, instance: &str) -> PathBuf {
        self.config.state_dir.join(instance)
    }

    /// PID of the VM's QEMU, if it runs (verified against `/proc/PID/cmdline`).
    pub fn running_pid(&self, vm: &VmRequest) -> Option<i32> {
        let paths = self.paths(vm).ok()?;
        Self::verified_pid(&paths)
    }

    /// Whether the VM's tap device exists (in the lab namespace or on the host).
    pub async fn tap_present(&self, vm: &VmRequest) -> bool {
        let (namespace, _) = self.network_for_tap();
        net::tap_exists(namespace, &machine::tap_name(&vm.instance)).await
    }

    /// What CPUs and memory `vm` gets on this host.
    pub fn resources_for(&self, vm: &VmRequest) -> Resources {
        machine::resources(
            &vm.spec,
            self.accel,
            &self.config,
            self.host_cpus,
            self.host_memory_mib,
        )
    }

    fn paths(&self, vm: &VmRequest) -> Result<VmPaths> {
        machine::check_instance(&vm.instance).map_err(ProviderError::permanent)?;
        Ok(VmPaths::new(&self.config.state_dir, &vm.instance))
    }

    fn verified_pid(paths: &VmPaths) -> Option<i32> {
        let pid = host::read_pidfile(&paths.pidfile)?;
        host::pid_is_ours(pid, &paths.marker()).then_some(pid)
    }

    /// The image directory for `vm`, with symlinks resolved so clones point at a fixed build.
    fn image_dir(&self, vm: &VmRequest) -> Result<PathBuf> {
        let reference = if vm.image_ref.is_empty() {
            vm.image.as_str()
        } else {
            vm.image_ref.as_str()
        };
        let dir = if Path::new(reference).is_absolute() {
            PathBuf::from(reference)
        } else {
            if reference.contains('/') || reference.starts_with('.') {
                return Err(ProviderError::permanent(format!(
                    "image reference {reference:?} must be an image name or an absolute path"
                )));
            }
            self.config.images_dir.join(reference)
        };
        if !image::is_complete(&dir) {
            return Err(ProviderError::permanent(format!(
                "image {reference} is not built: {} lacks base.qcow2/vmlinuz/initrd-tiny.img \
                 (build it with `basphere image build {}`)",
                dir.display(),
                vm.image
            )));
        }
        std::fs::canonicalize(&dir)
            .map_err(|e| ProviderError::permanent(format!("image {}: {e}", dir.display())))
    }

    fn network_for_tap(&self) -> (Option<&str>, &str) {
        match &self.config.network {
            NetworkMode::Lab { namespace, bridge } => (Some(namespace.as_str()), bridge.as_str()),
            NetworkMode::Bridge { name } => (None, name.as_str()),
        }
    }

    async fn ensure_network(&self, vm: &VmRequest, tap: &str) -> Result<()> {
        let _guard = self.net_lock.lock().await;
        let (namespace, bridge) = self.network_for_tap();
        if let Some(ns) = namespace {
            net::ensure_lab(ns, bridge, vm.network.gateway, vm.network.prefix_len)
                .await
                .map_err(ProviderError::retryable)?;
        }
        let pin = antispoof::PortPin::new(tap, &vm.network.mac, vm.network.ip)
            .map_err(ProviderError::permanent)?;
        net::attach_pinned_tap(
            namespace,
            bridge,
            &pin,
            vm.network.mtu,
            self.config.isolate_ports,
            &self.config.state_dir,
        )
        .await
        .map_err(ProviderError::retryable)
    }

    /// Makes and pins the tap of each extra NIC on its network's bridge (lab mode: a bridge in
    /// the lab namespace holding the network's gateway, made here); returns (tap, MAC) of each.
    /// Each tap is pinned to its NIC's MAC and static address like the first one, so a NIC on
    /// a DHCP network (no address to pin) is refused.
    async fn ensure_extra_networks(&self, vm: &VmRequest) -> Result<Vec<(String, String)>> {
        let mut out = vec![];
        if vm.extra_nics.is_empty() {
            return Ok(out);
        }
        let _guard = self.net_lock.lock().await;
        let (namespace, main_bridge) = self.network_for_tap();
        for (i, nic) in vm.extra_nics.iter().enumerate() {
            let bridge = nic.bridge.as_deref().ok_or_else(|| {
                ProviderError::permanent(format!(
                    "network {} has no bridge for the qemu provider: set [networks.{}] bridge",
                    nic.network, nic.network
                ))
            })?;
            let addr = nic.address.ok_or_else(|| {
                ProviderError::permanent(format!(
                    "network {} uses DHCP, which the qemu provider cannot pin a tap to (each \
                     tap may send only its VM's address): give it a static pool (dhcp = false)",
                    nic.network
                ))
            })?;
            if bridge == main_bridge {
                return Err(ProviderError::permanent(format!(
                    "network {} names the VM network's own bridge {bridge}",
                    nic.network
                )));
            }
            if let Some(ns) = namespace {
                let gateway = nic.gateway.ok_or_else(|| {
                    ProviderError::permanent(format!(
                        "network {} needs a gateway in lab mode (the lab bridge holds it): \
                         set [networks.{}] gateway",
                        nic.network, nic.network
                    ))
                })?;
                net::ensure_lab(ns, bridge, gateway, addr.prefix_len)
                    .await
                    .map_err(ProviderError::retryable)?;
            }
            let tap = machine::extra_tap_name(&vm.instance, i);
            let pin = antispoof::PortPin::new(&tap, &nic.mac, addr.ip)
                .map_err(ProviderError::permanent)?;
            net::attach_pinned_tap(
                namespace,
                bridge,
                &pin,
                vm.network.mtu,
                self.config.isolate_ports,
                &self.config.state_dir,
            )
            .await
            .map_err(ProviderError::retryable)?;
            out.push((tap, nic.mac.clone()));
        }
        Ok(out)
    }

    /// Last lines of the console and of QEMU's own log, for error messages.
    fn logs_tail(paths: &VmPaths) -> String {
        let serial = host::tail(&paths.serial, 5);
        let qemu = host::tail(&paths.qemu_log, 5);
        match (serial.is_empty(), qemu.is_empty()) {
            (true, true) => "no console output and no QEMU messages".to_string(),
            (false, true) => format!("console: {serial}"),
            (true, false) => format!("qemu: {qemu}"),
            (false, false) => format!("console: {serial}; qemu: {qemu}"),
        }
    }
}

/// How QEMU gives up root for `config.run_as`: the option this QEMU understands, after making
/// sure the account exists (created as a system account when running as root).
fn drop_privileges(
    config: &QemuConfig,
    qemu: &Path,
) -> std::result::Result<DropPrivileges, QemuError> {
    let user = config.run_as.as_str();
    if user.is_empty() {
        return Ok(DropPrivileges::None);
    }
    let valid = user.len() <= 32
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        return Err(QemuError::Config(format!(
            "run_as {user:?} is not a valid account name (1-32 of [a-z0-9_-], starting with a \
             letter or '_'); use \"\" to keep QEMU root"
        )));
    }
    if nix::unistd::Uid::effective().is_root()
        && nix::unistd::User::from_name(user).ok().flatten().is_none()
    {
        let out = std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
            .arg(user)
            .output();
        let created = nix::unistd::User::from_name(user).ok().flatten().is_some();
        if !created {
            let why = match out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            return Err(QemuError::Config(format!(
                "cannot create the system account {user:?} QEMU runs as (useradd: {why}): \
                 create it yourself, or set [qemu] run_as = \"\" to keep QEMU root"
            )));
        }
        tracing::info!(user, "created the system account QEMU runs as");
    }
    let help = std::process::Command::new(qemu)
        .arg("-help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if help.contains("-run-with") && help.contains("user=") {
        Ok(DropPrivileges::RunWith(user.to_string()))
    } else if help.contains("-runas") {
        Ok(DropPrivileges::RunAs(user.to_string()))
    } else {
        Err(QemuError::Config(format!(
            "{} offers neither -run-with user= nor -runas: install a newer QEMU ({QEMU_INSTALL_HINT}) \
             or set [qemu] run_as = \"\" to keep QEMU root",
            qemu.display()
        )))
    }
}

fn check_ifname(key: &str, name: &str) -> std::result::Result<(), QemuError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(QemuError::Config(format!(
            "{key} {name:?} is not a valid interface name (1-15 of [A-Za-z0-9._-])"
        )))
    }
}

/// Checks what of an extra disk or NIC becomes a file name, an interface name or a guest
/// command: disk serials, mount points and bridge names.
fn check_extras(vm: &VmRequest) -> Result<()> {
    for d in &vm.extra_disks {
        machine::check_serial(&d.serial).map_err(ProviderError::permanent)?;
        if let Some(m) = &d.mount {
            let ok = m
                .strip_prefix("/data")
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                return Err(ProviderError::permanent(format!(
                    "mount point {m:?} must be /data or /dataN"
                )));
            }
        }
    }
    for n in &vm.extra_nics {
        if let Some(b) = &n.bridge {
            check_ifname(&format!("networks.{}.bridge", n.network), b)
                .map_err(|e| ProviderError::permanent(e.to_string()))?;
        }
    }
    Ok(())
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> ProviderError {
    ProviderError::retryable(format!("{what}: {e}"))
}

/// Makes `dir` (and missing parents) a directory only root can enter: 0700.
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| {
            io_err(
                format_args!("cannot create {} (mode 0700)", dir.display()),
                e,
            )
        })
}

/// Makes `file` readable and writable by its owner only: 0600.
fn private_file(file: &Path) -> Result<()> {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(format_args!("cannot make {} private", file.display()), e))
}

/// Makes `dst` a copy of `src` (a hard link when possible), via a temporary name.
async fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("tmp");
    let _ = tokio::fs::remove_file(&tmp).await;
    if tokio::fs::hard_link(src, &tmp).await.is_err() {
        tokio::fs::copy(src, &tmp)
            .await
            .map_err(|e| io_err(format_args!("cannot copy {}", src.display()), e))?;
    }
    // A hard link shares the image's inode: the image file becomes 0600 too.
    private_file(&tmp)?;
    tokio::fs::rename(&tmp, dst)
        .await
        .map_err(|e| io_err(format_args!("cannot create {}", dst.display()), e))
}

async fn virtual_size(image: &Path) -> Result<u64> {
    let out = host::run(
        tokio::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(image),
    )
    .await
    .map_err(ProviderError::retryable)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| ProviderError::retryable(format!("qemu-img info: {e}")))?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| ProviderError::retryable("qemu-img info reported no virtual-size"))
}

fn pid_gone_within(pid: i32, marker: &str, limit: Duration) -> impl Future<Output = bool> {
    let marker = marker.to_string();
    async move {
        let until = Instant::now() + limit;
        while host::pid_is_ours(pid, &marker) {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }
}

impl Provider for QemuProvider {
    fn kind(&self) -> &'static str {
        "qemu"
    }
    fn readiness(&self) -> basphere_provider::ReadinessFuture<'_> {
        Box::pin(ready::provider_checks(self))
    }
}

#[async_trait::async_trait]
impl Machines for QemuProvider {
    async fn prepare(&self, vm: &VmRequest) -> Result<()> {
        let paths = self.paths(vm)?;
        private_dir(&self.config.state_dir)?;
        private_dir(&paths.dir)?;

        let needs_image =
            !paths.disk.is_file() || !paths.kernel.is_file() || !paths.initrd.is_file();
        if needs_image {
            let image = self.image_dir(vm)?;
            if !paths.disk.is_file() {
                let base = image.join("base.qcow2");
                let gib = vm
                    .spec
                    .disk_gib
                    .min(self.config.max_disk_gib.unwrap_or(u64::MAX));
                let wanted = gib.saturating_mul(1 << 30);
                let size = wanted.max(virtual_size(&base).await?);
                let tmp = paths.dir.join("disk.qcow2.tmp");
                let _ = tokio::fs::remove_file(&tmp).await;
                host::run(
                    tokio::process::Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(&base)
                        .arg(&tmp)
                        .arg(size.to_string()),
                )
                .await
                .map_err(ProviderError::retryable)?;
                private_file(&tmp)?;
                tokio::fs::rename(&tmp, &paths.disk)
                    .await
                    .map_err(|e| io_err("cannot move the disk into place", e))?;
            }
            if !paths.kernel.is_file() {
                link_or_copy(&image.join("vmlinuz"), &paths.kernel).await?;
            }
            if !paths.initrd.is_file() {
                link_or_copy(&image.join("initrd-tiny.img"), &paths.initrd).await?;
            }
        }

        check_extras(vm)?;
        for d in &vm.extra_disks {
            let file = machine::extra_disk_path(&paths.dir, &d.serial);
            if file.is_file() {
                continue;
            }
            let tmp = file.with_extension("qcow2.tmp");
            let _ = tokio::fs::remove_file(&tmp).await;
            let bytes = u64::from(d.size_gib).saturating_mul(1 << 30);
            host::run(
                tokio::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&tmp)
                    .arg(bytes.to_string()),
            )
            .await
            .map_err(ProviderError::retryable)?;
            private_file(&tmp)?;
            tokio::fs::rename(&tmp, &file)
                .await
                .map_err(|e| io_err("cannot move an extra disk into place", e))?;
        }

        if !paths.seed.is_file() {
            let files = seed::render(vm);
            let tmp = paths.dir.join("seed.iso.tmp");
            seed::write_iso(&files, &paths.dir, &tmp)
                .await
                .map_err(ProviderError::retryable)?;
            private_file(&tmp)?;
            tokio::fs::rename(&tmp, &paths.seed)
                .await
                .map_err(|e| io_err("cannot move the seed into place", e))?;
        }
        Ok(())
    }

    async fn start(&self, vm: &VmRequest) -> Result<()> {
        let paths = self.paths(vm)?;
        if Self::verified_pid(&paths).is_some() {
            return Ok(());
        }
        if !nix::unistd::Uid::effective().is_root() {
            return Err(ProviderError::permanent(
                "starting VMs needs root (network namespace, taps)",
            ));
        }
        for f in [&paths.disk, &paths.seed, &paths.kernel, &paths.initrd] {
            if !f.is_file() {
                return Err(ProviderError::permanent(format!(
                    "VM {} is not prepared: {} is missing (run prepare first)",
                    vm.name,
                    f.display()
                )));
            }
        }
        check_extras(vm)?;
        let extra_disks: Vec<(PathBuf, String)> = vm
            .extra_disks
            .iter()
            .map(|d| {
                (
                    machine::extra_disk_path(&paths.dir, &d.serial),
                    d.serial.clone(),
                )
            })
            .collect();
        if let Some((f, _)) = extra_disks.iter().find(|(f, _)| !f.is_file()) {
            return Err(ProviderError::permanent(format!(
                "VM {} is not prepared: {} is missing (run prepare first)",
                vm.name,
                f.display()
            )));
        }
        let tap = machine::tap_name(&vm.instance);
        self.ensure_network(vm, &tap).await?;
        let extra_nics = self.ensure_extra_networks(vm).await?;

        for stale in [&paths.pidfile, &paths.qmp, &paths.serial] {
            let _ = tokio::fs::remove_file(stale).await;
        }
        private_dir(&paths.dir)?;
        let resources = self.resources_for(vm);
        let args = machine::qemu_args(&machine::Launch {
            name: vm.name.as_str(),
            paths: &paths,
            accel: self.accel,
            resources,
            tap: &tap,
            mac: &vm.network.mac,
            drop: &self.drop_privileges,
            extra_disks: &extra_disks,
            extra_nics: &extra_nics,
        });
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&paths.qemu_log)
            .map_err(|e| {
                io_err(
                    format_args!("cannot create {}", paths.qemu_log.display()),
                    e,
                )
            })?;
        let dup = |f: &std::fs::File| {
            f.try_clone()
                .map_err(|e| io_err("cannot duplicate the log handle", e))
        };
        let console = ConsolePipe::start(
            &self.console_helper,
            &paths.serial,
            self.config.console_log_max_kib.saturating_mul(1024),
            dup(&log)?,
        )
        .map_err(|e| ProviderError::permanent(e.to_string()))?;
        let mut cmd = match self.netns_name() {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.qemu);
                c
            }
            None => tokio::process::Command::new(&self.qemu),
        };
        cmd.args(&args)
            .current_dir(&paths.dir)
            .stdin(std::process::Stdio::null())
            .stdout(dup(&log)?)
            .stderr(log);
        console.attach(&mut cmd);
        // SAFETY: umask is async-signal-safe. QEMU's pidfile and sockets are then 0600/0700.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        tracing::info!(vm = %vm.name, accel = self.accel.as_str(), vcpus = resources.vcpus,
            memory_mib = resources.memory_mib, tap, "starting qemu");
        let child = cmd.spawn();
        // QEMU holds the pipe now; the writer sees end of file once QEMU is gone.
        drop(console);
        let mut child =
            child.map_err(|e| io_err(format_args!("cannot run {}", self.qemu.display()), e))?;
        // Started = QEMU answers a QMP command (only its main loop does that), or it exited.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // A concurrent start of the same VM may have won (its pidfile lock stops this one).
                if Self::verified_pid(&paths).is_some() {
                    return Ok(());
                }
                return Err(ProviderError::permanent(format!(
                    "qemu for VM {} failed to start ({status}): {}",
                    vm.name,
                    Self::logs_tail(&paths)
                )));
            }
            if qmp::ready(&paths.qmp, Duration::from_secs(2)).await.is_ok() {
                break;
            }
            if Instant::now() >= until {
                let _ = child.start_kill();
                return Err(ProviderError::retryable(format!(
                    "qemu for VM {} did not finish starting within 60 s: {}",
                    vm.name,
                    Self::logs_tail(&paths)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not waited for: tokio reaps it once it exits.
        drop(child);
        if Self::verified_pid(&paths).is_none() {
            return Err(ProviderError::permanent(format!(
                "qemu for VM {} exited right after starting: {}",
                vm.name,
                Self::logs_tail(&paths)
            )));
        }
        Ok(())
    }

    async fn wait_ready(&self, vm: &VmRequest, deadline: Duration) -> Result<()> {
        let paths = self.paths(vm)?;
        let until = Instant::now() + deadline;
        let addr = SocketAddr::from((vm.network.ip, 22));
        let namespace = self.netns_name().map(str::to_string);
        let last = loop {
            if Self::verified_pid(&paths).is_none() {
                return Err(ProviderError::permanent(format!(
                    "qemu for VM {} is not running (it exited or was never started): {}",
                    vm.name,
                    Self::logs_tail(&paths)
                )));
            }
            let left = until.saturating_duration_since(Instant::now());
            let attempt = left
                .min(Duration::from_secs(3))
                .max(Duration::from_millis(200));
            match net::probe_ssh(namespace.clone(), addr, attempt).await {
                net::Probe::Banner(banner) => {
                    tracing::info!(vm = %vm.name, %banner, "guest answers SSH");
                    return Ok(());
                }
                other if Instant::now() >= until => break other,
                _ => {}
            }
            let pause = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            tokio::time::sleep(pause).await;
        };
        let serial = console::read_tail(&paths.serial, DIAGNOSE_BYTES);
        let serial = String::from_utf8_lossy(&serial);
        let why = diagnose(&serial, vm.network.ip, Some(&last)).explain(vm.network.ip);
        Err(ProviderError::retryable(format!(
            "VM {} did not answer SSH at {addr} within {deadline:?}: {why}. Last console lines: {}",
            vm.name,
            Some(host::tail(&paths.serial, 3))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "(none)".to_string())
        )))
    }

    async fn stop(&self, vm: &VmRequest) -> Result<()> {
        let paths = self.paths(vm)?;
        let marker = paths.marker();
        if let Some(pid) = Self::verified_pid(&paths) {
            if let Err(e) = qmp::quit(&paths.qmp, Duration::from_secs(5)).await {
                tracing::warn!(vm = %vm.name, "QMP quit failed, will kill: {e}");
            }
            if !pid_gone_within(pid, &marker, Duration::from_secs(10)).await {
                // Check again right before signalling: never kill a PID that is not ours.
                if host::pid_is_ours(pid, &marker) {
                    tracing::warn!(vm = %vm.name, pid, "qemu ignored quit, sending SIGKILL");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if !pid_gone_within(pid, &marker, Duration::from_secs(5)).await {
                    return Err(ProviderError::retryable(format!(
                        "qemu (pid {pid}) of VM {} survived SIGKILL",
                        vm.name
                    )));
                }
            }
        }
        let (namespace, _) = self.network_for_tap();
        net::release_tap(namespace, &machine::tap_name(&vm.instance))
            .await
            .map_err(ProviderError::retryable)?;
        for i in 0..vm.extra_nics.len() {
            net::release_tap(namespace, &machine::extra_tap_name(&vm.instance, i))
                .await
                .map_err(ProviderError::retryable)?;
        }
        for f in [&paths.pidfile, &paths.qmp] {
            let _ = tokio::fs::remove_file(f).await;
        }
        Ok(())
    }

    async fn remove(&self, vm: &VmRequest) -> Result<()> {
        let paths = self.paths(vm)?;
        // Stopping also releases the tap and its rules, even when QEMU is gone already.
        self.stop(vm).await?;
        // The console writer may still be finishing its last rotation: retry a moment.
        let mut attempt = 0;
        loop {
            match tokio::fs::remove_dir_all(&paths.dir).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) if attempt < 10 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(io_err(
                        format_args!("cannot remove {}", paths.dir.display()),
                        e,
                    ));
                }
            }
        }
    }

    async fn inspect(&self, vm: &VmRequest) -> Result<MachineState> {
        let paths = self.paths(vm)?;
        if Self::verified_pid(&paths).is_some() {
            Ok(MachineState::Running)
        } else if paths.dir.exists() {
            Ok(MachineState::Stopped)
        } else {
            Ok(MachineState::Absent)
        }
    }
}

//! The interface between Basphere's engine and the machines it makes, split by capability.
//!
//! - [`Machines`]: machine lifecycle. A provider turns a [`VmRequest`] into a running machine in
//!   three idempotent phases — [`Machines::prepare`], [`Machines::start`],
//!   [`Machines::wait_ready`] — and takes it apart with [`Machines::stop`] and [`Machines::remove`].
//! - [`NodeCommands`]: running a command on a node, whether a VM or a bare-metal machine.
//! - [`Provider`]: what the engine and the composition root hold: a named backend with the
//!   [`Machines`] capability that may offer others ([`Provider::commands`]).
//!
//! The lifecycle phases are idempotent: the engine persists which phase finished, so after a
//! crash any phase may be called again for the same request: each must notice work already done
//! (find the disk, the process or the cloned VM by [`VmRequest::instance`]) and neither duplicate
//! nor fail on it. `stop` and `remove` must succeed when there is nothing left to stop or remove.
//!
//! Architecture invariant: providers never touch the store; everything they need arrives in the
//! request, and everything they report goes back as return values.

use basphere_core::{DiskMode, ImageName, Spec, SshPublicKey, Username, VmName};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

mod null;
mod ready;
pub use null::{NullProvider, NullProviderCall};
pub use ready::{Check, CheckStatus, ReadinessFuture, all_ready};

/// Everything a provider needs to build one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRequest {
    /// Globally unique, stable id of this VM record (a UUID); providers name what they make after
    /// it so that a retried phase finds its earlier work.
    pub instance: String,
    pub name: VmName,
    pub owner: Username,
    pub image: ImageName,
    /// The provider's reference for the image: a base image path/name (qemu) or template (vsphere).
    pub image_ref: String,
    /// Account cloud-init creates in the guest, holding `ssh_keys`.
    pub login_user: String,
    pub spec: Spec,
    pub network: GuestNetwork,
    pub ssh_keys: Vec<SshPublicKey>,
    /// Disks beside the boot disk, in order (the guest sees them in this order).
    #[serde(default)]
    pub extra_disks: Vec<DiskRequest>,
    /// Interfaces on catalog networks beside `network`, in order (`eth1`, `eth2`, …).
    #[serde(default)]
    pub extra_nics: Vec<NicRequest>,
}

/// One extra disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRequest {
    /// Stable id ([`basphere_core::disk_serial`]): the virtio serial (qemu), so the guest finds
    /// the disk at `/dev/disk/by-id/virtio-<serial>`, and the file name.
    pub serial: String,
    pub size_gib: u32,
    pub mode: DiskMode,
    /// Where an `auto` disk is mounted (`/data`, `/data2`, …); `None` for `raw`.
    pub mount: Option<String>,
}

/// One interface of a VM on a catalog network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRequest {
    /// The catalog network's name.
    pub network: String,
    /// Locally administered MAC derived from the instance id and the interface's position.
    pub mac: String,
    /// `Some`: a static address with the network's prefix length; `None`: DHCP.
    pub address: Option<NicAddress>,
    /// Its gateway (held by the qemu lab bridge); never a default route in the guest.
    pub gateway: Option<Ipv4Addr>,
    /// qemu: the bridge the tap joins.
    pub bridge: Option<String>,
    /// vSphere: the port group the NIC joins.
    pub port_group: Option<String>,
}

/// A static address on an extra network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAddress {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

/// The first-boot shell command (for cloud-init's `runcmd`) that waits for block device `dev`,
/// formats it ext4 labelled `label` only if it holds no filesystem yet, and mounts it at
/// `mount`, recorded in `/etc/fstab` by `dev` with `nofail` (a missing disk never stops a
/// boot). Every argument must be shell-safe (`[A-Za-z0-9/_.:*-]`): providers build them from
/// checked serials and `/dataN` mount points.
pub fn mount_script(dev: &str, label: &str, mount: &str) -> String {
    format!(
        "d=$(ls -d {dev} 2>/dev/null | head -1); i=0; while [ -z \"$d\" ] && [ $i -lt 120 ]; do \
         sleep 1; i=$((i+1)); d=$(ls -d {dev} 2>/dev/null | head -1); done; [ -b \"$d\" ] || exit 1; \
         blkid $d >/dev/null 2>&1 || mkfs.ext4 -q -L {label} $d; mkdir -p {mount}; \
         grep -q ' {mount} ' /etc/fstab || echo \"$d {mount} ext4 defaults,nofail 0 2\" >> /etc/fstab; \
         mountpoint -q {mount} || mount {mount}"
    )
}

/// The guest's name of its `index`-th (from 0) extra interface: `eth1`, `eth2`, …
pub fn extra_nic_name(index: usize) -> String {
    format!("eth{}", index + 1)
}

/// The static network configuration of one guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u32,
    /// Locally administered MAC address derived from the instance id.
    pub mac: String,
}

/// What a provider sees of a VM it may have made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Nothing of it exists.
    Absent,
    /// Disks or a definition exist but it is not running.
    Stopped,
    Running,
}

/// A failure inside a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct ProviderError {
    /// Whether trying the same phase again may succeed (timeouts, busy hosts, lost connections).
    pub retryable: bool,
    /// One line for users and logs: what failed and, where known, what to do.
    pub message: String,
}

impl ProviderError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ProviderError>;

/// A backend the engine holds: a name, the [`Machines`] capability, and optional others.
pub trait Provider: Machines {
    /// Short name used in config and logs: `qemu`, `vsphere`, `null`.
    fn kind(&self) -> &'static str;

    /// Command execution on the nodes this backend makes, if it offers it.
    fn commands(&self) -> Option<&dyn NodeCommands> {
        None
    }

    /// What this backend needs to make machines (a vCenter session, QEMU and its network),
    /// checked now, for `/ready` and `basphere doctor`. Each check is bounded in time. Default:
    /// one ok check, for backends with nothing outside the process to reach.
    fn readiness(&self) -> ReadinessFuture<'_> {
        let detail = format!("{}: nothing outside this process to reach", self.kind());
        Box::pin(async move { vec![Check::ok("provider", detail)] })
    }
}

/// Machine lifecycle. See the crate documentation for the idempotency contract.
#[async_trait::async_trait]
pub trait Machines: Send + Sync + 'static {
    /// Makes the machine's disks/definition (clone, seed, reconfigure); does not start it.
    async fn prepare(&self, vm: &VmRequest) -> Result<()>;

    /// Starts the prepared machine.
    async fn start(&self, vm: &VmRequest) -> Result<()>;

    /// Waits until the guest answers SSH at its address, at most `deadline`. On expiry the error
    /// says why, as far as the provider can tell (no console output, no network, sshd refused).
    async fn wait_ready(&self, vm: &VmRequest, deadline: Duration) -> Result<()>;

    /// Stops the machine; succeeds if it is not running.
    async fn stop(&self, vm: &VmRequest) -> Result<()>;

    /// Removes everything `prepare` made; succeeds if nothing is left.
    async fn remove(&self, vm: &VmRequest) -> Result<()>;

    /// What exists of the machine now.
    async fn inspect(&self, vm: &VmRequest) -> Result<MachineState>;
}

/// Command execution on a node: the place where task services run. VMs (over SSH to their
/// login user) and bare-metal nodes will implement it; today only [`NullProvider`] does.
///
/// `run` is not idempotent: a caller that retries after a retryable error must use commands that
/// tolerate running twice.
#[async_trait::async_trait]
pub trait NodeCommands: Send + Sync + 'static {
    /// Runs `cmd` on `node` and returns how it ended. A non-zero exit is an `Ok` output, not an
    /// error; errors are failures to run it at all (unreachable node, refused login: retryable
    /// where trying again may help) or running past `cmd.timeout` (retryable).
    async fn run(&self, node: &NodeRef, cmd: &NodeCommand) -> Result<CommandOutput>;
}

/// The node a command runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    /// Where the node answers (its SSH endpoint for VMs).
    pub address: SocketAddr,
    /// The account commands run as.
    pub login_user: String,
    /// The id of the VM or bare-metal node record (see [`VmRequest::instance`]).
    pub instance: String,
}

/// One command to run on a node: a program and its arguments, never a shell string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommand {
    argv: Vec<String>,
    /// Bytes written to the command's standard input, which is then closed.
    pub stdin: Option<Vec<u8>>,
    /// How long the command may run before it is killed and `run` fails.
    pub timeout: Duration,
}

impl NodeCommand {
    /// `program` with `args`, no stdin.
    pub fn new(
        program: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
        timeout: Duration,
    ) -> Self {
        let mut argv = vec![program.into()];
        argv.extend(args.into_iter().map(Into::into));
        Self {
            argv,
            stdin: None,
            timeout,
        }
    }

    /// The same command with `stdin` written to its standard input.
    pub fn with_stdin(mut self, stdin: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// The program followed by its arguments; never empty.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }
}

/// How a command on a node ended. The default is a successful exit with no output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// The exit code; `None` if the command ended without one (killed by a signal).
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Default for CommandOutput {
    fn default() -> Self {
        Self {
            exit_code: Some(0),
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }
}

impl CommandOutput {
    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// A MAC address in the locally administered range, stable for an instance id.
pub fn mac_for(instance: &str) -> String {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in instance.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    #[test]
    fn mac_is_stable_and_local() {
        let a = super::mac_for("3f2a");
        assert_eq!(a, super::mac_for("3f2a"));
        assert_ne!(a, super::mac_for("3f2b"));
        assert!(a.starts_with("52:54:"));
        assert_eq!(a.len(), 17);
    }
}

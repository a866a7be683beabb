//! [`VsphereProvider`]: the [`Provider`] phases mapped onto vim25 calls.
//!
//! | phase | vSphere |
//! |---|---|
//! | prepare | find `<name>-<instance[..8]>` in the folder, else clone the template (linked when it has a snapshot); ReconfigVM_Task: CPU, memory, NIC port group, cloud-init `guestinfo.*` |
//! | start | PowerOnVM_Task; InvalidPowerState while already on is success |
//! | wait_ready | poll `guest.ipAddress` / `guest.net` until the requested address shows |
//! | stop | PowerOffVM_Task if on |
//! | remove | power off, Destroy_Task; nothing there is success |
//! | inspect | find by name: Absent / Stopped / Running |
//!
//! Every phase finds the VM by its inventory path, so a retry after a crash finds earlier work.

use crate::cloudinit;
use crate::config::{Credentials, VsphereConfig};
use crate::error::Error;
use crate::soap::{Client, MoRef, PropertyQuery, SoapStats};
use crate::xml::{Node, esc};
use base64::Engine;
use basphere_provider::{MachineState, Provider, ProviderError, Result, VmRequest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How long a clone that outlived its deadline may keep running in the background.
const BACKGROUND_CLONE_LIMIT: Duration = Duration::from_secs(3600);

/// Object references resolved once at connect time.
#[derive(Debug, Clone)]
struct Inventory {
    /// Inventory path of the VM folder, e.g. `DC0/vm/basphere`.
    folder_path: String,
    folder: MoRef,
    pool: MoRef,
    datastore: MoRef,
    /// `<backing>` element for NICs on the configured port group.
    nic_backing: String,
}

/// A VM seen in Basphere's folder, for inventory sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSummary {
    /// The vSphere VM name (`<name>-<instance[..8]>`).
    pub name: String,
    /// The instance id from the VM's annotation, if Basphere made it.
    pub instance: Option<String>,
    pub state: MachineState,
}

type CloneHandle = JoinHandle<crate::error::Result<MoRef>>;

/// The vSphere provider. Construct with [`VsphereProvider::connect`]; cheap to share in an `Arc`.
pub struct VsphereProvider {
    client: Arc<Client>,
    config: VsphereConfig,
    inv: Inventory,
    /// Template path → lock held while cloning it (when `serialize_clones`).
    clone_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Instance id → clone still running after its prepare gave up waiting.
    pending_clones: Mutex<HashMap<String, CloneHandle>>,
}

impl std::fmt::Debug for VsphereProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsphereProvider")
            .field("server", &self.config.server)
            .field("folder", &self.inv.folder_path)
            .finish_non_exhaustive()
    }
}

impl VsphereProvider {
    /// Reads the credentials file, logs in and resolves (or creates) the configured inventory.
    /// Fails with a message naming the config key when something is missing.
    pub async fn connect(config: VsphereConfig) -> std::result::Result<Self, Error> {
        config.validate()?;
        let credentials = Credentials::load(&config.credentials_file)?;
        let client = Client::connect(&config.sdk_url(), &config.tls, credentials).await?;
        let inv = resolve_inventory(&client, &config).await?;
        tracing::info!(server = %config.server, folder = %inv.folder_path, api = %client.content().api_version, "connected to vSphere");
        Ok(VsphereProvider {
            client: Arc::new(client),
            config,
            inv,
            clone_locks: Mutex::new(HashMap::new()),
            pending_clones: Mutex::new(HashMap::new()),
        })
    }

    /// The SOAP client, for calls the provider does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// SOAP round trips so far and the time spent in them.
    pub fn soap_stats(&self) -> SoapStats {
        self.client.stats()
    }

    /// The config this provider was built from.
    pub fn config(&self) -> &VsphereConfig {
        &self.config
    }

    /// Logs out of vCenter.
    pub async fn disconnect(&self) -> std::result::Result<(), Error> {
        self.client.logout().await
    }

    /// The vSphere name of a request's VM: `<name>-<first 8 characters of the instance id>`.
    pub fn vm_name(vm: &VmRequest) -> String {
        let short: String = vm
            .instance
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        format!("{}-{}", vm.name, short.to_ascii_lowercase())
    }

    /// Every VM in Basphere's folder (and its subfolders), for inventory sync.
    pub async fn list_machines(&self) -> Result<Vec<MachineSummary>> {
        let q = PropertyQuery {
            props: vec![(
                "VirtualMachine".into(),
                vec![
                    "name".into(),
                    "runtime.powerState".into(),
                    "config.annotation".into(),
                ],
            )],
            root: self.inv.folder.clone(),
            walk_folder: true,
        };
        let objects = self.client.retrieve(&q, 100).await?;
        Ok(objects
            .iter()
            .filter(|o| o.obj.kind == "VirtualMachine")
            .map(|o| MachineSummary {
                name: o.text("name").to_string(),
                instance: o
                    .text("config.annotation")
                    .split_once("instance ")
                    .and_then(|(_, rest)| rest.split([',', ' ', '\n']).next())
                    .map(str::to_string),
                state: power_state(o.text("runtime.powerState")),
            })
            .collect())
    }

    fn deadline(&self) -> Duration {
        self.config.task_deadline()
    }

    async fn find_vm(&self, vm: &VmRequest) -> Result<Option<MoRef>> {
        let path = format!("{}/{}", self.inv.folder_path, Self::vm_name(vm));
        Ok(self.client.find_by_inventory_path(&path).await?)
    }

    /// Template path, NIC name and login user for a request.
    fn template(&self, vm: &VmRequest) -> Result<(String, String, String)> {
        let entry = self
            .config
            .template_for(vm.image.as_str())
            .or_else(|| self.config.template_for(&vm.image_ref));
        let Some(entry) = entry else {
            if vm.image_ref.is_empty() || vm.login_user.is_empty() {
                return Err(ProviderError::permanent(format!(
                    "vsphere: image '{}' names no template; add a [vsphere.templates] entry with template, login_user and nic",
                    vm.image
                )));
            }
            return Ok((
                vm.image_ref.clone(),
                self.config.default_nic.clone(),
                vm.login_user.clone(),
            ));
        };
        // An explicit [vsphere.templates] entry wins over the image's generic provider_ref.
        let template = entry.template.clone();
        let user = if vm.login_user.is_empty() {
            entry.login_user.clone()
        } else {
            vm.login_user.clone()
        };
        Ok((template, entry.nic.clone(), user))
    }

    /// Waits (up to `wait`) for a clone of this instance that an earlier prepare left running.
    async fn settle_pending_clone(&self, instance: &str, wait: Duration) -> Result<()> {
        let handle = self.pending_clones.lock().unwrap().remove(instance);
        let Some(mut handle) = handle else {
            return Ok(());
        };
        match tokio::time::timeout(wait, &mut handle).await {
            Ok(_) => Ok(()), // done either way; the VM, if made, is found by name
            Err(_) => {
                self.pending_clones
                    .lock()
                    .unwrap()
                    .insert(instance.to_string(), handle);
                Err(ProviderError::retryable(
                    "vsphere: an earlier clone of this VM is still running in vCenter; try again when it has finished",
                ))
            }
        }
    }

    fn clone_lock(&self, template: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        if !self.config.serialize_clones {
            return None;
        }
        let mut locks = self.clone_locks.lock().unwrap();
        Some(locks.entry(template.to_string()).or_default().clone())
    }

    /// Clones the template as `name`. The clone runs in its own task: if it outlives the
    /// deadline it is remembered, and a later prepare or remove of this instance waits for it,
    /// so an undo never misses a VM that appears after the failure was reported.
    async fn clone_template(&self, vm: &VmRequest, template: &str, name: &str) -> Result<MoRef> {
        let client = self.client.clone();
        let lock = self.clone_lock(template);
        let template_path = format!("{}/vm/{}", self.config.datacenter, template);
        let (folder, pool, datastore) = (
            self.inv.folder.clone(),
            self.inv.pool.clone(),
            self.inv.datastore.clone(),
        );
        let name_owned = name.to_string();
        let mut handle: CloneHandle = tokio::spawn(async move {
            let _guard = match &lock {
                Some(l) => Some(l.lock().await),
                None => None,
            };
            let Some(source) = client.find_by_inventory_path(&template_path).await? else {
                return Err(Error::Config(format!(
                    "template not found at inventory path '{template_path}': check the template name in [vsphere.templates]"
                )));
            };
            let snapshot = client
                .properties(&source, &["snapshot.currentSnapshot"])
                .await?
                .and_then(|o| o.get("snapshot.currentSnapshot").and_then(MoRef::from_node));
            let mut spec = format!("<location>{}", datastore.xml("datastore"));
            if snapshot.is_some() {
                spec.push_str("<diskMoveType>createNewChildDiskBacking</diskMoveType>");
            }
            spec.push_str(&pool.xml("pool"));
            spec.push_str("</location><template>false</template><powerOn>false</powerOn>");
            if let Some(s) = &snapshot {
                spec.push_str(&s.xml("snapshot"));
            }
            tracing::debug!(vm = %name_owned, template = %template_path, linked = snapshot.is_some(), "cloning");
            client
                .clone_vm(&source, &folder, &name_owned, &spec, BACKGROUND_CLONE_LIMIT)
                .await
        });
        let deadline = self.deadline();
        match tokio::time::timeout(deadline, &mut handle).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(join)) => Err(ProviderError::retryable(format!(
                "vsphere: clone of {name} stopped unexpectedly: {join}"
            ))),
            Err(_) => {
                self.pending_clones
                    .lock()
                    .unwrap()
                    .insert(vm.instance.clone(), handle);
                Err(ProviderError::retryable(format!(
                    "vsphere: cloning template '{template}' to {name} did not finish within {deadline:?}; vCenter may still be working on it (retry to continue, or remove to undo)"
                )))
            }
        }
    }

    /// The ReconfigVM_Task spec: CPU, memory, NIC backing, annotation and cloud-init.
    fn config_spec(
        &self,
        vm: &VmRequest,
        nic_name: &str,
        login_user: &str,
        devices: Option<&Node>,
    ) -> String {
        let mut spec = format!(
            "<annotation>{}</annotation><numCPUs>{}</numCPUs><memoryMB>{}</memoryMB>",
            esc(&format!(
                "Managed by Basphere: instance {}, owner {}",
                vm.instance, vm.owner
            )),
            vm.spec.vcpus,
            vm.spec.memory_mib
        );
        if let Some(disk) = devices.and_then(|d| grown_disk(d, vm.spec.disk_gib)) {
            spec.push_str("<deviceChange><operation>edit</operation>");
            disk.to_xml(&mut spec);
            spec.push_str("</deviceChange>");
        }
        if let Some(nic) = devices.and_then(first_nic) {
            let mut device = nic.clone();
            device.name = "device".into();
            let backing = crate::xml::parse(&self.inv.nic_backing).ok();
            if let (Some(b), Some(slot)) = (
                backing,
                device.children.iter_mut().find(|c| c.name == "backing"),
            ) {
                *slot = b;
            }
            spec.push_str("<deviceChange><operation>edit</operation>");
            device.to_xml(&mut spec);
            spec.push_str("</deviceChange>");
        }
        let mut request = vm.clone();
        request.login_user = login_user.to_string();
        let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
        let mut extra = vec![
            ("guestinfo.metadata", b64(cloudinit::metadata(vm, nic_name))),
            ("guestinfo.metadata.encoding", "base64".to_string()),
            ("guestinfo.userdata", b64(cloudinit::userdata(&request))),
            ("guestinfo.userdata.encoding", "base64".to_string()),
        ];
        if self.config.simulator_guest_ip {
            extra.push(("SET.guest.ipAddress", vm.network.ip.to_string()));
        }
        for (k, v) in extra {
            spec.push_str(&format!(
                "<extraConfig><key>{}</key><value xsi:type=\"xsd:string\">{}</value></extraConfig>",
                esc(k),
                esc(&v)
            ));
        }
        spec
    }
}

fn power_state(s: &str) -> MachineState {
    if s == "poweredOn" {
        MachineState::Running
    } else {
        MachineState::Stopped
    }
}

/// The VM's first disk grown to `gib`, as a `<device>` for an edit; `None` when it is as large
/// already, or is a linked clone's child disk (those cannot be extended).
fn grown_disk(devices: &Node, gib: u64) -> Option<Node> {
    let disk = devices
        .children
        .iter()
        .find(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))?;
    let want_kb = gib * 1024 * 1024;
    let have_kb: u64 = disk.child_text("capacityInKB")?.trim().parse().ok()?;
    if have_kb >= want_kb || disk.path(&["backing", "parent"]).is_some() {
        return None;
    }
    let mut disk = disk.clone();
    disk.name = "device".into();
    for c in &mut disk.children {
        match c.name.as_str() {
            "capacityInKB" => c.text = want_kb.to_string(),
            "capacityInBytes" => c.text = (want_kb * 1024).to_string(),
            _ => {}
        }
    }
    Some(disk)
}

/// The first network card in a `config.hardware.device` value.
fn first_nic(devices: &Node) -> Option<&Node> {
    devices
        .children
        .iter()
        .find(|d| d.child("addressType").is_some() || d.child("macAddress").is_some())
}

fn not_found(key: &str, path: &str) -> Error {
    Error::Config(format!(
        "[vsphere] {key}: nothing at inventory path '{path}'; check the name (paths are case-sensitive)"
    ))
}

async fn resolve_inventory(
    client: &Client,
    c: &VsphereConfig,
) -> std::result::Result<Inventory, Error> {
    let dc = c.datacenter.trim_matches('/');
    client
        .find_by_inventory_path(dc)
        .await?
        .ok_or_else(|| not_found("datacenter", dc))?;

    // The folder, created one level at a time where missing.
    let mut path = format!("{dc}/vm");
    let mut folder = client
        .find_by_inventory_path(&path)
        .await?
        .ok_or_else(|| not_found("datacenter", &path))?;
    for part in c.folder.split('/').filter(|p| !p.is_empty()) {
        let next = format!("{path}/{part}");
        folder = match client.find_by_inventory_path(&next).await? {
            Some(f) => f,
            None => match client.create_folder(&folder, part).await {
                Ok(f) => {
                    tracing::info!(folder = %next, "created vSphere folder");
                    f
                }
                // Made by someone else in the meantime.
                Err(Error::DuplicateName { .. }) => client
                    .find_by_inventory_path(&next)
                    .await?
                    .ok_or_else(|| not_found("folder", &next))?,
                Err(e) => return Err(e),
            },
        };
        path = next;
    }

    let cluster_path = format!("{dc}/host/{}", c.cluster);
    let cluster = client
        .find_by_inventory_path(&cluster_path)
        .await?
        .ok_or_else(|| not_found("cluster", &cluster_path))?;
    let pool = match &c.resource_pool {
        Some(rp) => {
            let p = format!("{cluster_path}/Resources/{}", rp.trim_matches('/'));
            client
                .find_by_inventory_path(&p)
                .await?
                .ok_or_else(|| not_found("resource_pool", &p))?
        }
        None => client
            .properties(&cluster, &["resourcePool"])
            .await?
            .and_then(|o| o.get("resourcePool").and_then(MoRef::from_node))
            .ok_or_else(|| not_found("cluster (its resource pool)", &cluster_path))?,
    };
    let ds_path = format!("{dc}/datastore/{}", c.datastore);
    let datastore = client
        .find_by_inventory_path(&ds_path)
        .await?
        .ok_or_else(|| not_found("datastore", &ds_path))?;
    let net_path = format!("{dc}/network/{}", c.network);
    let network = client
        .find_by_inventory_path(&net_path)
        .await?
        .ok_or_else(|| not_found("network", &net_path))?;
    let nic_backing = if network.kind == "DistributedVirtualPortgroup" {
        let pg = client
            .properties(&network, &["key", "config.distributedVirtualSwitch"])
            .await?
            .ok_or_else(|| not_found("network", &net_path))?;
        let switch = pg
            .get("config.distributedVirtualSwitch")
            .and_then(MoRef::from_node)
            .ok_or_else(|| not_found("network (its switch)", &net_path))?;
        let uuid = client
            .properties(&switch, &["uuid"])
            .await?
            .map(|o| o.text("uuid").to_string())
            .unwrap_or_default();
        format!(
            "<backing xsi:type=\"VirtualEthernetCardDistributedVirtualPortBackingInfo\"><port><switchUuid>{}</switchUuid><portgroupKey>{}</portgroupKey></port></backing>",
            esc(&uuid),
            esc(pg.text("key"))
        )
    } else {
        format!(
            "<backing xsi:type=\"VirtualEthernetCardNetworkBackingInfo\"><deviceName>{}</deviceName>{}</backing>",
            esc(&c.network),
            network.xml("network")
        )
    };
    // The backing is parsed again when a spec is built; it has to carry the xsi namespace then.
    let nic_backing = nic_backing.replacen(
        "<backing ",
        "<backing xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ",
        1,
    );
    Ok(Inventory {
        folder_path: path,
        folder,
        pool,
        datastore,
        nic_backing,
    })
}

#[async_trait::async_trait]
impl Provider for VsphereProvider {
    fn kind(&self) -> &'static str {
        "vsphere"
    }

    async fn prepare(&self, vm: &VmRequest) -> Result<()> {
        let (template, nic_name, login_user) = self.template(vm)?;
        let name = Self::vm_name(vm);
        self.settle_pending_clone(&vm.instance, self.deadline())
            .await?;
        let vm_ref = match self.find_vm(vm).await? {
            Some(r) => {
                tracing::debug!(vm = %name, "clone exists already; reusing it");
                r
            }
            None => match self.clone_template(vm, &template, &name).await {
                Ok(r) => r,
                // Made by an earlier attempt we lost track of: use it.
                Err(e) if e.message.contains("DuplicateName") => {
                    self.find_vm(vm).await?.ok_or(e)?
                }
                Err(e) => return Err(e),
            },
        };
        // The device list is read right before each attempt: the spec edits the disk and NIC as
        // they are. vcsim 0.24 shares device objects between clones of one template, so a disk
        // read during another clone can name a file that is not there yet (FileNotFound): read
        // again and retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(props) = self
                .client
                .properties(&vm_ref, &["runtime.powerState", "config.hardware.device"])
                .await?
            else {
                return Err(ProviderError::retryable(format!(
                    "vsphere: VM {name} disappeared while being prepared"
                )));
            };
            if props.text("runtime.powerState") == "poweredOn" {
                return Ok(()); // prepared and started before
            }
            let devices = props.get("config.hardware.device");
            if attempt == 1 && devices.and_then(first_nic).is_none() {
                tracing::warn!(vm = %name, "template has no network card; the port group is not set");
            }
            let spec = self.config_spec(vm, &nic_name, &login_user, devices);
            match self
                .client
                .reconfigure_vm(&vm_ref, &spec, self.deadline())
                .await
            {
                Ok(()) => break,
                Err(e) if e.fault_type() == Some("FileNotFound") && attempt < 3 => {
                    tracing::debug!(vm = %name, error = %e, "reconfigure met FileNotFound; reading the devices again");
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(vm = %name, template = %template, "vSphere VM prepared");
        Ok(())
    }

    async fn start(&self, vm: &VmRequest) -> Result<()> {
        let name = Self::vm_name(vm);
        let Some(r) = self.find_vm(vm).await? else {
            return Err(ProviderError::permanent(format!(
                "vsphere: VM {name} is not in folder {}: it was never prepared or was removed outside Basphere",
                self.inv.folder_path
            )));
        };
        match self.client.power_on(&r, self.deadline()).await {
            Ok(()) => Ok(()),
            Err(Error::InvalidPowerState { .. }) => {
                let state = self
                    .client
                    .properties(&r, &["runtime.powerState"])
                    .await?
                    .map(|o| o.text("runtime.powerState").to_string())
                    .unwrap_or_default();
                if state == "poweredOn" {
                    tracing::debug!(vm = %name, "already powered on");
                    Ok(())
                } else {
                    Err(ProviderError::permanent(format!(
                        "vsphere: cannot power on VM {name}: it is {state:?}"
                    )))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn wait_ready(&self, vm: &VmRequest, deadline: Duration) -> Result<()> {
        let name = Self::vm_name(vm);
        let want = vm.network.ip.to_string();
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let Some(r) = self.find_vm(vm).await? else {
                return Err(ProviderError::permanent(format!(
                    "vsphere: VM {name} vanished while waiting for it to boot"
                )));
            };
            let paths = [
                "runtime.powerState",
                "guest.ipAddress",
                "guest.net",
                "guest.toolsRunningStatus",
            ];
            let Some(p) = self.client.properties(&r, &paths).await? else {
                return Err(ProviderError::permanent(format!(
                    "vsphere: VM {name} vanished while waiting for it to boot"
                )));
            };
            if p.text("runtime.powerState") != "poweredOn" {
                return Err(ProviderError::permanent(format!(
                    "vsphere: VM {name} is {} while waiting for it to boot; start it first",
                    p.text("runtime.powerState")
                )));
            }
            let mut ips: Vec<String> = vec![p.text("guest.ipAddress").to_string()];
            if let Some(net) = p.get("guest.net") {
                let mut found = Vec::new();
                net.descendants("ipAddress", &mut found);
                ips.extend(found.iter().map(|n| n.text.clone()));
            }
            if ips.contains(&want) {
                tracing::info!(vm = %name, ip = %want, "vSphere VM reports its address");
                return Ok(());
            }
            if started.elapsed() + pause > deadline {
                let tools = p.text("guest.toolsRunningStatus");
                let seen: Vec<&String> = ips.iter().filter(|s| !s.is_empty()).collect();
                let reason = if tools != "guestToolsRunning" {
                    format!(
                        "VMware Tools are not running in the guest (status {:?}): check the template has open-vm-tools and boots",
                        if tools.is_empty() { "unknown" } else { tools }
                    )
                } else if seen.is_empty() {
                    "the guest reports no IP address: cloud-init did not apply the network config (check the template's NIC name and guestinfo datasource)".to_string()
                } else {
                    format!(
                        "the guest reports {seen:?}, not {want}: cloud-init did not apply the static address"
                    )
                };
                return Err(ProviderError::retryable(format!(
                    "vsphere: VM {name} did not report address {want} within {deadline:?}: {reason}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn stop(&self, vm: &VmRequest) -> Result<()> {
        let Some(r) = self.find_vm(vm).await? else {
            return Ok(());
        };
        match self.client.power_off(&r, self.deadline()).await {
            Ok(()) | Err(Error::InvalidPowerState { .. }) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, vm: &VmRequest) -> Result<()> {
        self.settle_pending_clone(&vm.instance, self.deadline())
            .await?;
        let mut found = self.find_vm(vm).await?;
        if found.is_none() {
            // Look twice before reporting "nothing left": vcsim 0.24's FindByInventoryPath can
            // miss a VM while other VMs in the same folder are being destroyed.
            tokio::time::sleep(Duration::from_millis(20)).await;
            found = self.find_vm(vm).await?;
        }
        let Some(r) = found else {
            return Ok(());
        };
        match self.client.power_off(&r, self.deadline()).await {
            Ok(()) | Err(Error::InvalidPowerState { .. }) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match self.client.destroy(&r, self.deadline()).await {
            Ok(()) | Err(Error::NotFound { .. }) => {
                tracing::info!(vm = %Self::vm_name(vm), "vSphere VM destroyed");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn inspect(&self, vm: &VmRequest) -> Result<MachineState> {
        let Some(r) = self.find_vm(vm).await? else {
            return Ok(MachineState::Absent);
        };
        Ok(
            match self.client.properties(&r, &["runtime.powerState"]).await? {
                None => MachineState::Absent,
                Some(p) => power_state(p.text("runtime.powerState")),
            },
        )
    }
}

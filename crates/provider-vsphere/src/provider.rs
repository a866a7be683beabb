//! [`VsphereProvider`]: the [`Provider`] phases mapped onto vim25 calls.
//!
//! | phase | vSphere |
//! |---|---|
//! | prepare | find `<name>-<owner>-<instance tail>` in the folder, else clone the template (linked when it has a snapshot) marked with the instance id; ReconfigVM_Task: CPU, memory, NIC port group, cloud-init `guestinfo.*` |
//! | start | PowerOnVM_Task; InvalidPowerState while already on is success |
//! | wait_ready | poll `guest.ipAddress` / `guest.net` until the requested address shows |
//! | stop | PowerOffVM_Task if on |
//! | remove | power off, Destroy_Task; nothing there is success |
//! | inspect | find by name: Absent / Stopped / Running |
//!
//! Every phase finds the VM by its inventory path, so a retry after a crash finds earlier work.
//! A VM found by name is used (reconfigured, powered, destroyed) only when its `extraConfig` key
//! [`INSTANCE_KEY`], written by the clone itself, holds the request's instance id: a VM someone
//! else made under that name is reported, never touched.

use crate::cloudinit;
use crate::config::{Credentials, VsphereConfig};
use crate::error::Error;
use crate::soap::{Client, MoRef, PropertyQuery, SoapStats};
use crate::xml::{Node, esc};
use base64::Engine;
use basphere_provider::{MachineState, Machines, Provider, ProviderError, Result, VmRequest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How long a clone that outlived its deadline may keep running in the background.
const BACKGROUND_CLONE_LIMIT: Duration = Duration::from_secs(3600);

/// `extraConfig` key holding the Basphere instance id a VM was cloned for. It is set by the
/// CloneVM_Task itself, so no VM of ours ever exists without it. Not a `guestinfo.*` key: the guest
/// can set those from inside, but not this one.
pub const INSTANCE_KEY: &str = "basphere.instance_id";

/// Characters of the instance id in a VM's name: the id's last 16 hex digits, 62 random bits of
/// a UUID (v4 or v7), so names never depend on the creation time.
const NAME_ID_CHARS: usize = 16;

/// Longest VM name vCenter accepts.
pub const VCENTER_NAME_MAX: usize = 80;

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
    /// The vSphere VM name (`<name>-<owner>-<instance tail>`).
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

    /// The vSphere name of a request's VM: `<name>-<owner>-<last 16 hex digits of the instance
    /// id>`, e.g. `web-alice-9f3c2a1be04d7781`. At most 30 + 20 + 16 + 2 = 68 characters, within
    /// vCenter's 80.
    ///
    /// Distinct VMs get distinct names: the owner and name together are unique among a user's
    /// VMs, and the id's tail is random. (The first digits of a UUIDv7 are its timestamp, the
    /// same for every VM made within 65 s; names built from them collided across users.)
    pub fn vm_name(vm: &VmRequest) -> String {
        let id: Vec<char> = vm
            .instance
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let tail: String = id[id.len().saturating_sub(NAME_ID_CHARS)..]
            .iter()
            .collect();
        format!("{}-{}-{tail}", vm.name, vm.owner)
    }

    /// The name older releases gave a VM: `<name>-<first 8 characters of the instance id>`.
    /// Still looked up, so VMs made then can be stopped and removed; used only when the VM
    /// carries this request's instance id.
    fn legacy_vm_name(vm: &VmRequest) -> String {
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
                instance: annotation_instance(o.text("config.annotation")),
                state: power_state(o.text("runtime.powerState")),
            })
            .collect())
    }

    fn deadline(&self) -> Duration {
        self.config.task_deadline()
    }

    /// This request's VM, found by name and checked to be ours.
    ///
    /// A VM under [`Self::vm_name`] that does not carry the request's instance id in
    /// [`INSTANCE_KEY`] is a permanent error naming it; it is not touched. A VM under the legacy
    /// name counts only when its instance id (key or, from older releases, the annotation)
    /// matches: such names were shared across users, so anything else there is not ours.
    async fn find_vm(&self, vm: &VmRequest) -> Result<Option<MoRef>> {
        let path = format!("{}/{}", self.inv.folder_path, Self::vm_name(vm));
        if let Some(r) = self.client.find_by_inventory_path(&path).await? {
            return match self.mark_of(&r).await? {
                Mark::Gone => Ok(None),
                Mark::Of { key: Some(id), .. } if id == vm.instance => Ok(Some(r)),
                Mark::Of { .. } => Err(ProviderError::permanent(format!(
                    "vsphere: VM {path} exists but was not made by Basphere for this VM (its extraConfig {INSTANCE_KEY} is missing or is not {}); Basphere leaves it untouched: find out who made it and rename or remove it in vCenter, then retry",
                    vm.instance
                ))),
            };
        }
        let legacy = format!("{}/{}", self.inv.folder_path, Self::legacy_vm_name(vm));
        if let Some(r) = self.client.find_by_inventory_path(&legacy).await? {
            match self.mark_of(&r).await? {
                Mark::Of { key, annotation }
                    if key.as_ref().or(annotation.as_ref()) == Some(&vm.instance) =>
                {
                    return Ok(Some(r));
                }
                Mark::Of { .. } => {
                    tracing::warn!(vm = %legacy, instance = %vm.instance, "VM under this instance's legacy name belongs to another instance; ignoring it");
                }
                Mark::Gone => {}
            }
        }
        Ok(None)
    }

    /// Which Basphere instance a VM says it was made for.
    async fn mark_of(&self, r: &MoRef) -> Result<Mark> {
        let Some(p) = self
            .client
            .properties(r, &["config.extraConfig", "config.annotation"])
            .await?
        else {
            return Ok(Mark::Gone);
        };
        let key = p.get("config.extraConfig").and_then(|extra| {
            extra
                .children
                .iter()
                .find(|o| o.child_text("key") == Some(INSTANCE_KEY))
                .and_then(|o| o.child_text("value"))
                .map(|v| v.trim().to_string())
        });
        Ok(Mark::Of {
            key,
            annotation: annotation_instance(p.text("config.annotation")),
        })
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
        // The clone carries its owner's mark from its first moment: a prepare that resumes after
        // a crash recognises it, and nobody else mistakes it for theirs.
        let config = format!(
            "<config>{}<extraConfig><key>{}</key><value xsi:type=\"xsd:string\">{}</value></extraConfig></config>",
            annotation_xml(vm),
            esc(INSTANCE_KEY),
            esc(&vm.instance)
        );
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
            spec.push_str("</location><template>false</template>");
            spec.push_str(&config);
            spec.push_str("<powerOn>false</powerOn>");
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
        extra_backings: &[String],
    ) -> Result<String> {
        let mut spec = format!(
            "{}<numCPUs>{}</numCPUs><memoryMB>{}</memoryMB>",
            annotation_xml(vm),
            vm.spec.vcpus,
            vm.spec.memory_mib
        );
        if let Some(disk) = devices.and_then(|d| grown_disk(d, vm.spec.disk_gib)) {
            spec.push_str("<deviceChange><operation>edit</operation>");
            disk.to_xml(&mut spec);
            spec.push_str("</deviceChange>");
        }
        let extra_macs: Vec<String> = vm
            .extra_nics
            .iter()
            .map(|n| cloudinit::vmware_mac(&n.mac))
            .collect();
        if let Some(nic) = devices.and_then(|d| first_nic(d, &extra_macs)) {
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
        if let Some(devices) = devices {
            spec.push_str(&self.added_devices(vm, devices, extra_backings)?);
        }
        let mut request = vm.clone();
        request.login_user = login_user.to_string();
        let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
        let mut extra = vec![
            (INSTANCE_KEY, vm.instance.clone()),
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
        Ok(spec)
    }

    /// `add` device changes for the extra disks (thin, on the configured datastore, on the
    /// boot disk's controller at [`cloudinit::extra_disk_unit`]) and extra NICs (vmxnet3 with
    /// the MAC cloud-init matches, on their port groups) the VM does not have yet: a retried
    /// prepare that finds them added already adds nothing twice.
    fn added_devices(
        &self,
        vm: &VmRequest,
        devices: &Node,
        extra_backings: &[String],
    ) -> Result<String> {
        let mut out = String::new();
        let disks: Vec<&Node> = devices
            .children
            .iter()
            .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
            .collect();
        if !vm.extra_disks.is_empty() {
            let boot = disks.first().ok_or_else(|| {
                ProviderError::permanent("vsphere: the template has no disk to add disks beside")
            })?;
            let controller = boot.child_text("controllerKey").unwrap_or_default().trim();
            let used: Vec<u32> = devices
                .children
                .iter()
                .filter(|d| d.child_text("controllerKey").map(str::trim) == Some(controller))
                .filter_map(|d| d.child_text("unitNumber")?.trim().parse().ok())
                .collect();
            let have_extra = disks.len() - 1;
            for (i, d) in vm.extra_disks.iter().enumerate().skip(have_extra) {
                let unit = cloudinit::extra_disk_unit(i);
                if used.contains(&unit) {
                    return Err(ProviderError::permanent(format!(
                        "vsphere: unit {unit} of the template's disk controller is taken; extra \
                         disks go at units 1, 2, … (use a template with one disk)"
                    )));
                }
                out.push_str(&format!(
                    "<deviceChange><operation>add</operation><fileOperation>create</fileOperation>\
                     <device xsi:type=\"VirtualDisk\"><key>{}</key>\
                     <backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>[{}]</fileName>{}\
                     <diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing>\
                     <controllerKey>{}</controllerKey><unitNumber>{unit}</unitNumber>\
                     <capacityInKB>{}</capacityInKB></device></deviceChange>",
                    -101 - i as i64,
                    esc(&self.config.datastore),
                    self.inv.datastore.xml("datastore"),
                    esc(controller),
                    u64::from(d.size_gib) * 1024 * 1024,
                ));
            }
        }
        let macs: Vec<String> = devices
            .children
            .iter()
            .filter_map(|d| d.child_text("macAddress"))
            .map(|m| m.trim().to_ascii_lowercase())
            .collect();
        for (i, (nic, backing)) in vm.extra_nics.iter().zip(extra_backings).enumerate() {
            let mac = cloudinit::vmware_mac(&nic.mac);
            if macs.contains(&mac) {
                continue;
            }
            out.push_str(&format!(
                "<deviceChange><operation>add</operation><device xsi:type=\"VirtualVmxnet3\">\
                 <key>{}</key>{backing}<addressType>manual</addressType>\
                 <macAddress>{mac}</macAddress></device></deviceChange>",
                -201 - i as i64,
            ));
        }
        Ok(out)
    }

    /// The `<backing>` of each extra NIC's port group, looked up by name.
    async fn extra_backings(&self, vm: &VmRequest) -> Result<Vec<String>> {
        let mut out = vec![];
        for nic in &vm.extra_nics {
            let pg = nic.port_group.as_deref().ok_or_else(|| {
                ProviderError::permanent(format!(
                    "network {} has no port group for vSphere: set [networks.{}] port_group",
                    nic.network, nic.network
                ))
            })?;
            let key = format!("networks.{}.port_group", nic.network);
            out.push(
                nic_backing(
                    &self.client,
                    self.config.datacenter.trim_matches('/'),
                    pg,
                    &key,
                )
                .await?,
            );
        }
        Ok(out)
    }
}

/// The `<annotation>` element naming a VM's instance and owner.
fn annotation_xml(vm: &VmRequest) -> String {
    format!(
        "<annotation>{}</annotation>",
        esc(&format!(
            "Managed by Basphere: instance {}, owner {}",
            vm.instance, vm.owner
        ))
    )
}

/// What a VM found by name says about its maker.
enum Mark {
    /// It was destroyed between the lookup and the read.
    Gone,
    /// Its [`INSTANCE_KEY`] value and the instance id in its annotation, where present.
    Of {
        key: Option<String>,
        annotation: Option<String>,
    },
}

/// The instance id in an annotation written by [`VsphereProvider::config_spec`].
fn annotation_instance(annotation: &str) -> Option<String> {
    annotation
        .strip_prefix("Managed by Basphere: instance ")
        .and_then(|rest| rest.split([',', ' ', '\n']).next())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
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

/// The first network card in a `config.hardware.device` value that is not one of the extra
/// NICs (`extra_macs`) Basphere added.
fn first_nic<'a>(devices: &'a Node, extra_macs: &[String]) -> Option<&'a Node> {
    devices.children.iter().find(|d| {
        (d.child("addressType").is_some() || d.child("macAddress").is_some())
            && !d
                .child_text("macAddress")
                .is_some_and(|m| extra_macs.contains(&m.trim().to_ascii_lowercase()))
    })
}

fn not_found(key: &str, path: &str) -> Error {
    Error::Config(format!(
        "[vsphere] {key}: nothing at inventory path '{path}'; check the name (paths are case-sensitive)"
    ))
}

/// The `<backing>` element (carrying the xsi namespace, as it is parsed again) for NICs on the
/// port group `name` of datacenter `dc`; `key` names the setting in errors.
async fn nic_backing(
    client: &Client,
    dc: &str,
    name: &str,
    key: &str,
) -> std::result::Result<String, Error> {
    let net_path = format!("{dc}/network/{name}");
    let network = client
        .find_by_inventory_path(&net_path)
        .await?
        .ok_or_else(|| not_found(key, &net_path))?;
    let nic_backing = if network.kind == "DistributedVirtualPortgroup" {
        let pg = client
            .properties(&network, &["key", "config.distributedVirtualSwitch"])
            .await?
            .ok_or_else(|| not_found(key, &net_path))?;
        let switch = pg
            .get("config.distributedVirtualSwitch")
            .and_then(MoRef::from_node)
            .ok_or_else(|| not_found(&format!("{key} (its switch)"), &net_path))?;
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
            esc(name),
            network.xml("network")
        )
    };
    Ok(nic_backing.replacen(
        "<backing ",
        "<backing xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ",
        1,
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
    let nic_backing = nic_backing(client, dc, &c.network, "network").await?;
    Ok(Inventory {
        folder_path: path,
        folder,
        pool,
        datastore,
        nic_backing,
    })
}

impl Provider for VsphereProvider {
    fn kind(&self) -> &'static str {
        "vsphere"
    }
    fn readiness(&self) -> basphere_provider::ReadinessFuture<'_> {
        Box::pin(crate::ready::provider_checks(self))
    }
}

#[async_trait::async_trait]
impl Machines for VsphereProvider {
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
        let extra_backings = self.extra_backings(vm).await?;
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
            if attempt == 1 && devices.and_then(|d| first_nic(d, &[])).is_none() {
                tracing::warn!(vm = %name, "template has no network card; the port group is not set");
            }
            let spec = self.config_spec(vm, &nic_name, &login_user, devices, &extra_backings)?;
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
        let Some(r) = self.find_vm(vm).await? else {
            return Err(ProviderError::permanent(format!(
                "vsphere: VM {name} vanished while waiting for it to boot"
            )));
        };
        loop {
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

//! Response `data` of each route. Field names and optional-field behaviour are the contract:
//! an `Option` without `skip_serializing_if` is sent as `null`, as it always was.

use basphere_core::{
    Quota, RegistrationStatus, Role, Spec, SpecName, StepStatus, Usage, UserStatus, Username,
    VmName, VmStatus, WorkflowStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use utoipa::ToSchema;

// ---- users -------------------------------------------------------------------------------

/// A Basphere account (`GET /users`, `GET /me`, …).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub username: Username,
    pub email: String,
    pub team: String,
    pub public_key: String,
    pub role: Role,
    pub status: UserStatus,
    pub quota: Quota,
    /// Index of the user's block in the network pool, once approved.
    pub ip_block: Option<u32>,
    /// Whether Basphere made a Unix account for this user on the bastion.
    pub unix_account: bool,
    pub created_at: i64,
}

/// A registration request and what became of it (`POST /register`, `GET /pending`): the
/// prototype's `RegistrationRequest`. Times are RFC 3339; `updated_at` is when it was decided
/// (or filed, while pending).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    /// `req-` and the stored row's number in 8+ hex digits ([`request_id`]).
    pub id: String,
    pub username: String,
    pub email: String,
    /// Absent when none was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub team: String,
    pub public_key: String,
    pub status: RegistrationStatus,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<String>,
}

/// A request to replace a user's SSH key (`POST /key-change`, `GET /key-changes`): the
/// prototype's `KeyChangeRequest`, plus `public_key` (the same key, as older clients read it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyChange {
    /// `keychange-` and the stored row's number in 8+ hex digits ([`request_id`]).
    pub id: String,
    pub username: String,
    /// The registered email of the user (as given, when the request was made without a key).
    #[serde(default)]
    pub email: String,
    pub new_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub status: RegistrationStatus,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<String>,
    /// Ours: the same key as `new_public_key`.
    pub public_key: String,
}

/// Prefix of a registration's id.
pub const REGISTRATION_ID: &str = "req";
/// Prefix of a key change's id.
pub const KEY_CHANGE_ID: &str = "keychange";

/// The id a request of kind `prefix` shows for stored row `n`: `req-0000002a`. Stable (the
/// same row always has the same id) and unique per kind.
pub fn request_id(prefix: &str, n: i64) -> String {
    format!("{prefix}-{n:08x}")
}

/// The stored row number of a [`request_id`] (of any prefix), or of a plain number.
pub fn request_seq(id: &str) -> Option<i64> {
    if let Ok(n) = id.parse() {
        return Some(n);
    }
    let (prefix, hex) = id.rsplit_once('-')?;
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_lowercase()) || hex.len() < 8 {
        return None;
    }
    i64::from_str_radix(hex, 16).ok().filter(|n| *n >= 0)
}

/// An API token as listed (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
}

/// `POST /tokens` and `POST /enroll`: the secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub token: String,
    pub info: TokenInfo,
}

/// `DELETE /tokens/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenRevoked {
    pub id: String,
}

/// One line of the audit trail (`GET /audit`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    pub result: String,
    pub detail: Option<String>,
}

/// `GET /me`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub user: User,
    /// The user's address block (CIDR), once approved.
    pub ip_block: Option<String>,
    /// The newest registration of the user.
    pub registration: Option<Registration>,
}

/// `POST /users/{u}/approve` and `POST /users`: the updated registration request (the
/// prototype's answer), plus the account it made.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Approved {
    #[serde(flatten)]
    pub request: Registration,
    pub user: User,
    pub ip_block: Option<String>,
    /// One-time code (when the server manages no Unix accounts), shown only here.
    pub enrollment_code: Option<String>,
}

/// `POST /users/{u}/reject`: the updated registration request (with `reject_reason`), plus
/// `reason` (the same text, as older clients read it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Rejected {
    #[serde(flatten)]
    pub request: Registration,
    pub reason: String,
}

/// `GET /users/{u}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserDetail {
    pub user: User,
    pub usage: Usage,
    pub vms: Vec<VmRecord>,
    pub ip_block: Option<String>,
}

/// The user a change was made to (disable, enable, delete).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserRef {
    pub username: Username,
    /// `"left alone"` when the deleted user's Unix account was not Basphere's to remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_account: Option<String>,
}

/// `DELETE /users/{u}` of a user who holds VMs (202): their deletes started; call again
/// once they are gone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserVmsDeleting {
    /// The delete operation of each VM, to follow.
    pub operations: Vec<VmOperation>,
    /// VMs the user still holds.
    pub remaining_vms: usize,
    /// VMs whose delete the server could not start, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<VmRefusal>,
}

/// A VM and an operation on it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmOperation {
    pub vm: VmName,
    pub operation_id: String,
}

/// A VM an operation could not act on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmRefusal {
    pub vm: String,
    pub reason: String,
}

// ---- VMs ---------------------------------------------------------------------------------

/// A VM as the VM routes show it: the prototype's `VM` plus what the async model adds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub name: VmName,
    /// The VM's name in vCenter (empty for other providers).
    #[serde(default)]
    pub vsphere_vm_name: String,
    pub owner: Username,
    pub os: String,
    pub login_user: String,
    pub spec: String,
    /// `""` until the VM has an address (as the prototype sends it).
    #[serde(default, with = "ip_or_empty")]
    #[schema(value_type = String)]
    pub ip_address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_networks: Vec<String>,
    pub status: VmStatus,
    /// RFC 3339.
    pub created_at: String,
    // Ours.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub error: Option<String>,
    pub provider: String,
    /// `ssh LOGIN@IP`, once the VM has an address.
    pub ssh: Option<String>,
    /// The operation just started on it (create, delete), in that operation's answer.
    pub operation_id: Option<String>,
    /// Its interfaces on `extra_networks`, in order, with their addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_nics: Vec<VmNic>,
}

/// A VM's interface on an extra network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNic {
    pub network: String,
    /// `""` on a DHCP network (the guest's own business).
    #[serde(default, with = "ip_or_empty")]
    #[schema(value_type = String)]
    pub ip_address: Option<Ipv4Addr>,
}

/// A disk added to a VM beside its boot disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExtraDisk {
    pub size_gb: u32,
    /// `auto` (formatted and mounted) or `raw`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
}

/// An address that is `""` on the wire when there is none.
mod ip_or_empty {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::Ipv4Addr;

    pub fn serialize<S: Serializer>(ip: &Option<Ipv4Addr>, s: S) -> Result<S::Ok, S::Error> {
        match ip {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// A VM as `GET /users/{u}` lists it (timestamps in milliseconds, no derived fields).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub id: String,
    pub name: VmName,
    pub owner: Username,
    pub os: String,
    pub login_user: String,
    pub spec: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub ip_address: Option<Ipv4Addr>,
    pub status: VmStatus,
    pub error: Option<String>,
    pub provider: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// `POST /vms` (202: the VMs are admitted, their creation runs on): the prototype's
/// `CreateVMResponse` plus the operation of each VM. Admission is all or nothing, so
/// `failed` is 0 and `errors` empty in every 202 (a refusal is an error answer).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmsCreated {
    pub vms: Vec<Vm>,
    pub created: usize,
    pub failed: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Ours: the create operation of each VM, in the order of `vms`.
    pub operations: Vec<String>,
}

/// `GET /vms`: the prototype's `VMListResponse`. `total` counts the VMs of this answer (a
/// further page, if any, is named by the `X-Next-After` header).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<Vm>,
    pub total: usize,
    /// The quota of the owner listed (the caller's, when an admin lists everyone's).
    pub quota: QuotaSummary,
}

/// The prototype's `Quota` (`max_vms, used_vms, max_ips, used_ips`) plus our other limits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaSummary {
    pub max_vms: u32,
    pub used_vms: u32,
    pub max_ips: u32,
    pub used_ips: u32,
    pub max_clusters: u32,
    pub used_clusters: u32,
    /// Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    pub used_vcpus: u32,
    /// Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    pub used_memory_mib: u64,
}

impl QuotaSummary {
    pub fn of(q: &Quota, u: &Usage) -> Self {
        Self {
            max_vms: q.max_vms,
            used_vms: u.vms,
            max_ips: q.max_ips,
            used_ips: u.ips,
            max_clusters: q.max_clusters,
            used_clusters: u.clusters,
            max_vcpus: q.max_vcpus,
            used_vcpus: u.vcpus,
            max_memory_mib: q.max_memory_mib,
            used_memory_mib: u.memory_mib,
        }
    }
}

/// `GET /quota`: the prototype's `Quota` fields at the top, plus the user and the same
/// figures as `quota` and `usage` objects (as older clients read them).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaView {
    #[serde(flatten)]
    pub summary: QuotaSummary,
    pub username: Username,
    pub quota: Quota,
    pub usage: Usage,
    /// GiB of disk (boot and extra disks) the user may hold (their quota's); absent: no
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk_gib: Option<u64>,
    /// GiB of disk held now (boot and extra disks).
    #[serde(default)]
    pub used_disk_gib: u64,
}

/// `GET /resources`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub username: Username,
    pub ip_block: Option<String>,
    #[schema(value_type = String, format = Ipv4)]
    pub gateway: Ipv4Addr,
    pub quota: Quota,
    pub usage: Usage,
    pub vms: Vec<Vm>,
    /// Always empty until clusters arrive.
    pub clusters: Vec<Value>,
}

/// `GET /catalog`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Catalog {
    pub specs: BTreeMap<SpecName, Spec>,
    pub images: Vec<CatalogImage>,
    pub default_image: String,
    pub count: CountRange,
    pub provider: String,
    /// What each VM may add: extra disks (`max_count`, `min_gb`, `max_gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_disks: Option<ExtraDiskRange>,
    /// The extra networks VMs may join (`extra_networks`), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// How many extra networks one VM may join.
    #[serde(default)]
    pub max_extra_networks: u32,
}

/// How many extra disks a VM may have, and their sizes in GiB.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct ExtraDiskRange {
    pub max_count: u32,
    pub min_gb: u32,
    pub max_gb: u32,
}

/// An image VMs can be made of.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogImage {
    pub name: String,
    pub login_user: String,
    pub default: bool,
}

/// How many VMs one create may ask for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct CountRange {
    pub min: u32,
    pub max: u32,
}

// ---- operations --------------------------------------------------------------------------

/// An operation (a workflow) with its steps.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    /// The definition that runs it (`create_vm`, `delete_vm`, …).
    pub kind: String,
    /// The engine definition that runs the steps.
    pub definition: String,
    pub vm_id: Option<String>,
    pub owner: String,
    pub status: WorkflowStatus,
    /// Forward: the next step to run. Undoing: the next step to undo.
    pub step: i64,
    pub attempt: u32,
    pub priority: i64,
    pub error: Option<String>,
    pub input: Value,
    pub cancel_requested: bool,
    pub batch_id: Option<String>,
    /// The node name within its batch.
    pub node: Option<String>,
    /// Dependencies (batch edges) that have not ended yet.
    pub waiting_on: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub steps: Vec<Step>,
}

/// One step of an operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Step {
    pub idx: u32,
    pub name: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// `<operation id>/<idx>/<name>`.
    pub idem_key: String,
    pub deadline_at: Option<i64>,
    pub output: Option<Value>,
}

/// One entry of an operation's event log, as SSE streams send it (`data:` of each event).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: i64,
    pub operation_id: String,
    pub at: i64,
    pub step: Option<String>,
    /// `queued`, `step_started`, `step_done`, …, `succeeded`, `failed`, `cancelled`.
    pub kind: String,
    pub message: String,
}

// ---- batches -----------------------------------------------------------------------------

/// What applying a manifest would do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Plan {
    /// In a topological order.
    pub create: Vec<PlanCreate>,
    pub keep: Vec<PlanKeep>,
    pub delete: Vec<String>,
    pub layers: usize,
}

/// A node to create.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanCreate {
    pub name: String,
    pub os: Option<String>,
    pub spec: Option<String>,
    pub requires: Vec<String>,
    pub optional: Vec<String>,
    pub layer: usize,
    /// Extra disks as the manifest asks for them: `20G`, `50G:raw`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_networks: Vec<String>,
}

/// A declared node that exists already.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanKeep {
    pub name: String,
    pub status: VmStatus,
    pub differs: Vec<String>,
}

/// `POST /batches/plan`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Planned {
    pub plan: Plan,
    pub parallelism: u32,
}

/// `POST /batches` (202, or 200 with no batch when nothing is to be done).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchApplied {
    pub batch_id: Option<String>,
    pub nodes: Vec<BatchNodeRef>,
    pub plan: Plan,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
}

/// One node of an admitted batch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchNodeRef {
    pub node: String,
    /// `create` or `delete`.
    pub action: String,
    pub operation_id: String,
}

/// `GET /batches/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Batch {
    pub batch_id: String,
    pub nodes: Vec<BatchNode>,
}

/// A batch node's state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchNode {
    pub node: Option<String>,
    pub operation_id: String,
    /// `create` or `delete`.
    pub action: String,
    pub status: WorkflowStatus,
    pub step: i64,
    pub steps: Vec<StepState>,
    pub waiting_on: i64,
    pub error: Option<String>,
}

/// A step's name and status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepState {
    pub name: String,
    pub status: StepStatus,
}

/// `GET /ready`: whether the server can do its work, and each check (detail and fix only on
/// the Unix socket).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<ReadyCheck>,
}

/// One readiness check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyCheck {
    /// Dotted name: `database`, `engine`, `provider.session`, …
    pub name: String,
    /// `ok`, `warn` or `fail`.
    pub status: String,
    /// What was found (Unix socket only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What to do about it, when it is not ok (Unix socket only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub streams: usize,
}

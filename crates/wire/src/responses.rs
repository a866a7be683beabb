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

// ---- users -------------------------------------------------------------------------------

/// A Basphere account (`GET /users`, `GET /me`, …).
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// A registration and what became of it (`GET /pending`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub team: String,
    pub public_key: String,
    pub status: RegistrationStatus,
    pub created_at: i64,
    pub processed_by: Option<String>,
    pub processed_at: Option<i64>,
    pub reject_reason: Option<String>,
}

/// A request to replace a user's SSH key (`GET /key-changes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyChange {
    pub id: i64,
    pub username: String,
    pub public_key: String,
    pub status: RegistrationStatus,
    pub created_at: i64,
    pub processed_by: Option<String>,
    pub processed_at: Option<i64>,
    pub reject_reason: Option<String>,
}

/// An API token as listed (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
}

/// `POST /tokens` and `POST /enroll`: the secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub info: TokenInfo,
}

/// `DELETE /tokens/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub id: String,
}

/// One line of the audit trail (`GET /audit`).
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Me {
    pub user: User,
    /// The user's address block (CIDR), once approved.
    pub ip_block: Option<String>,
    /// The newest registration of the user.
    pub registration: Option<Registration>,
}

/// `POST /users/{u}/approve` and `POST /users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approved {
    pub user: User,
    pub ip_block: Option<String>,
    /// One-time code (when the server manages no Unix accounts), shown only here.
    pub enrollment_code: Option<String>,
}

/// `POST /users/{u}/reject`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rejected {
    pub username: Username,
    pub reason: String,
}

/// `GET /users/{u}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserDetail {
    pub user: User,
    pub usage: Usage,
    pub vms: Vec<VmRecord>,
    pub ip_block: Option<String>,
}

/// The user a change was made to (disable, enable, delete).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRef {
    pub username: Username,
    /// `"left alone"` when the deleted user's Unix account was not Basphere's to remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_account: Option<String>,
}

/// `DELETE /users/{u}` of a user who holds VMs (202): their deletes started; call again
/// once they are gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmOperation {
    pub vm: VmName,
    pub operation_id: String,
}

/// A VM an operation could not act on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRefusal {
    pub vm: String,
    pub reason: String,
}

// ---- VMs ---------------------------------------------------------------------------------

/// A VM as the VM routes show it: the prototype's fields plus what the async model adds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: VmName,
    pub owner: Username,
    pub os: String,
    pub login_user: String,
    pub spec: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub ip_address: Option<Ipv4Addr>,
    pub status: VmStatus,
    pub error: Option<String>,
    pub provider: String,
    /// RFC 3339.
    pub created_at: String,
    /// `ssh LOGIN@IP`, once the VM has an address.
    pub ssh: Option<String>,
    /// The operation just started on it (create, delete), in that operation's answer.
    pub operation_id: Option<String>,
}

/// A VM as `GET /users/{u}` lists it (timestamps in milliseconds, no derived fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub ip_address: Option<Ipv4Addr>,
    pub status: VmStatus,
    pub error: Option<String>,
    pub provider: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// `POST /vms` (202).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmsCreated {
    pub vms: Vec<Vm>,
    pub operations: Vec<String>,
}

/// `DELETE /vms/{name}` (202).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmDeleting {
    pub vm: Vm,
    pub operation_id: String,
}

/// `GET /quota`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuotaView {
    pub username: Username,
    pub quota: Quota,
    pub usage: Usage,
}

/// `GET /resources`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resources {
    pub username: Username,
    pub ip_block: Option<String>,
    pub gateway: Ipv4Addr,
    pub quota: Quota,
    pub usage: Usage,
    pub vms: Vec<Vm>,
    /// Always empty until clusters arrive.
    pub clusters: Vec<Value>,
}

/// `GET /catalog`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalog {
    pub specs: BTreeMap<SpecName, Spec>,
    pub images: Vec<CatalogImage>,
    pub default_image: String,
    pub count: CountRange,
    pub provider: String,
}

/// An image VMs can be made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogImage {
    pub name: String,
    pub login_user: String,
    pub default: bool,
}

/// How many VMs one create may ask for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CountRange {
    pub min: u32,
    pub max: u32,
}

// ---- operations --------------------------------------------------------------------------

/// An operation (a workflow) with its steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    /// In a topological order.
    pub create: Vec<PlanCreate>,
    pub keep: Vec<PlanKeep>,
    pub delete: Vec<String>,
    pub layers: usize,
}

/// A node to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanCreate {
    pub name: String,
    pub os: Option<String>,
    pub spec: Option<String>,
    pub requires: Vec<String>,
    pub optional: Vec<String>,
    pub layer: usize,
}

/// A declared node that exists already.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanKeep {
    pub name: String,
    pub status: VmStatus,
    pub differs: Vec<String>,
}

/// `POST /batches/plan`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Planned {
    pub plan: Plan,
    pub parallelism: u32,
}

/// `POST /batches` (202, or 200 with no batch when nothing is to be done).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchApplied {
    pub batch_id: Option<String>,
    pub nodes: Vec<BatchNodeRef>,
    pub plan: Plan,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
}

/// One node of an admitted batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchNodeRef {
    pub node: String,
    /// `create` or `delete`.
    pub action: String,
    pub operation_id: String,
}

/// `GET /batches/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub batch_id: String,
    pub nodes: Vec<BatchNode>,
}

/// A batch node's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub status: StepStatus,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub streams: usize,
}

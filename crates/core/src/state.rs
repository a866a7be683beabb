//! The states and kinds the system records as text.

crate::text_enum! {
    /// Lifecycle of a VM record.
    pub enum VmStatus {
        /// Admitted; its create workflow is running.
        Creating = "creating",
        /// Up and answering SSH.
        Running = "running",
        /// Its delete workflow is running.
        Deleting = "deleting",
        /// Create failed and was rolled back; the record stays to show why until deleted.
        Failed = "failed",
    }
}

crate::text_enum! {
    /// Lifecycle of a registration request.
    pub enum RegistrationStatus {
        Pending = "pending",
        Approved = "approved",
        Rejected = "rejected",
    }
}

crate::text_enum! {
    /// Whether a user account may act.
    pub enum UserStatus {
        /// Registered, waiting for an admin.
        Pending = "pending",
        Active = "active",
        Rejected = "rejected",
        Disabled = "disabled",
    }
}

crate::text_enum! {
    /// What a user may do: admins may do everything, users only to their own resources.
    pub enum Role {
        User = "user",
        Admin = "admin",
    }
}

crate::text_enum! {
    /// The workflow definitions of a VM: what a workflow whose resource is a VM does to it.
    /// The ledger knows only definition names (strings); this is the VM's own vocabulary,
    /// shared by the store's VM records, the VM workflows and the API.
    pub enum VmOperation {
        Create = "create_vm",
        Delete = "delete_vm",
    }
}

/// The resource a workflow acts on, by kind and id (`vm`/`<uuid>`); the ledger stores it
/// without knowing the kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ResourceRef {
    pub kind: String,
    pub id: String,
}

impl ResourceRef {
    /// The resource kind of VM records.
    pub const VM: &'static str = "vm";

    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            id: id.into(),
        }
    }

    /// A VM by its record id.
    pub fn vm(id: impl Into<String>) -> Self {
        Self::new(Self::VM, id)
    }

    /// The id, when this names a resource of `kind`.
    pub fn id_of(&self, kind: &str) -> Option<&str> {
        (self.kind == kind).then_some(self.id.as_str())
    }
}

crate::text_enum! {
    /// Lifecycle of a workflow.
    pub enum WorkflowStatus {
        /// Queued, waiting to be claimed (or for its batch dependencies).
        Pending = "pending",
        /// Claimed by a node, running its steps forward.
        Running = "running",
        /// Undoing its done steps in reverse after a failure or a cancel.
        Undoing = "undoing",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl WorkflowStatus {
    /// Whether the workflow will not change any more (until someone retries it).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

crate::text_enum! {
    /// Lifecycle of one step of a workflow.
    pub enum StepStatus {
        Pending = "pending",
        Running = "running",
        Done = "done",
        Failed = "failed",
        Undone = "undone",
        Skipped = "skipped",
    }
}

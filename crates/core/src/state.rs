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
    /// What a workflow does to its resource. Kept closed (other crates match it exhaustively);
    /// which code runs the steps is the workflow's definition, so new kinds of work (clusters,
    /// bare-metal setup, tests, benchmarks) need no new variant until they need a new verb here.
    pub enum WorkflowKind {
        CreateVm = "create_vm",
        DeleteVm = "delete_vm",
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

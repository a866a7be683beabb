//! Store rows into wire types: the one place per type where the `/api/v1` shape of a stored
//! thing is decided.

use basphere_store as store;
use basphere_wire as wire;

pub fn user(u: &store::User) -> wire::User {
    wire::User {
        username: u.username.clone(),
        email: u.email.clone(),
        team: u.team.clone(),
        public_key: u.public_key.clone(),
        role: u.role,
        status: u.status,
        quota: u.quota,
        ip_block: u.ip_block,
        unix_account: u.unix_account,
        created_at: u.created_at,
    }
}

pub fn registration(r: &store::Registration) -> wire::Registration {
    wire::Registration {
        id: wire::request_id(wire::REGISTRATION_ID, r.id),
        username: r.username.clone(),
        email: r.email.clone(),
        team: r.team.clone(),
        public_key: r.public_key.clone(),
        status: r.status,
        created_at: store::format_ms(r.created_at),
        updated_at: store::format_ms(r.processed_at.unwrap_or(r.created_at)),
        processed_by: r.processed_by.clone(),
        processed_at: r.processed_at.map(store::format_ms),
        reject_reason: r.reject_reason.clone().filter(|s| !s.is_empty()),
    }
}

pub fn key_change(k: &store::KeyChange) -> wire::KeyChange {
    wire::KeyChange {
        id: wire::request_id(wire::KEY_CHANGE_ID, k.id),
        username: k.username.clone(),
        email: k.email.clone().unwrap_or_default(),
        new_public_key: k.public_key.clone(),
        reason: k.reason.clone().filter(|s| !s.is_empty()),
        status: k.status,
        created_at: store::format_ms(k.created_at),
        updated_at: store::format_ms(k.processed_at.unwrap_or(k.created_at)),
        processed_by: k.processed_by.clone(),
        processed_at: k.processed_at.map(store::format_ms),
        reject_reason: k.reject_reason.clone().filter(|s| !s.is_empty()),
        public_key: k.public_key.clone(),
    }
}

pub fn token_info(t: &store::TokenInfo) -> wire::TokenInfo {
    wire::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        created_at: t.created_at,
        last_used_at: t.last_used_at,
        expires_at: t.expires_at,
    }
}

pub fn audit_record(a: &store::AuditRecord) -> wire::AuditRecord {
    wire::AuditRecord {
        id: a.id,
        at: a.at,
        actor: a.actor.clone(),
        source: a.source.clone(),
        action: a.action.clone(),
        target: a.target.clone(),
        result: a.result.clone(),
        detail: a.detail.clone(),
    }
}

/// A VM as the VM routes show it, with the operation just started on it.
pub fn vm(vm: store::Vm, operation_id: Option<&str>) -> wire::Vm {
    wire::Vm {
        vsphere_vm_name: vsphere_vm_name(&vm),
        ssh: vm
            .ip_address
            .map(|ip| format!("ssh {}@{}", vm.login_user, ip)),
        extra_disks: vm
            .extra_disks
            .iter()
            .map(|d| wire::ExtraDisk {
                size_gb: d.size_gib,
                mode: d.mode.to_string(),
            })
            .collect(),
        extra_networks: vm.extra_nics.iter().map(|n| n.network.clone()).collect(),
        created_at: store::format_ms(vm.created_at),
        operation_id: operation_id.map(str::to_string),
        extra_nics: vm
            .extra_nics
            .into_iter()
            .map(|n| wire::VmNic {
                network: n.network,
                ip_address: n.ip,
            })
            .collect(),
        name: vm.name,
        owner: vm.owner,
        os: vm.os,
        login_user: vm.login_user,
        spec: vm.spec,
        ip_address: vm.ip_address,
        status: vm.status,
        id: vm.id,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
        error: vm.error,
        provider: vm.provider,
    }
}

/// The name the vSphere provider gives a VM in vCenter (`<name>-<owner>-<last 16 alphanumerics
/// of its id>`, the rule of `basphere_vsphere::VsphereProvider::vm_name`); empty for VMs of
/// other providers.
fn vsphere_vm_name(vm: &store::Vm) -> String {
    if vm.provider != "vsphere" {
        return String::new();
    }
    let id: Vec<char> = vm
        .id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let tail: String = id[id.len().saturating_sub(16)..].iter().collect();
    format!("{}-{}-{tail}", vm.name, vm.owner)
}

pub fn vm_record(vm: &store::Vm) -> wire::VmRecord {
    wire::VmRecord {
        id: vm.id.clone(),
        name: vm.name.clone(),
        owner: vm.owner.clone(),
        os: vm.os.clone(),
        login_user: vm.login_user.clone(),
        spec: vm.spec.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
        ip_address: vm.ip_address,
        status: vm.status,
        error: vm.error.clone(),
        provider: vm.provider.clone(),
        created_at: vm.created_at,
        updated_at: vm.updated_at,
    }
}

/// An operation: the only place that reads a stored workflow's shape (its kind and VM).
pub fn operation(w: &store::Workflow) -> wire::Operation {
    wire::Operation {
        id: w.id.clone(),
        kind: w.definition.clone(),
        definition: w.definition.clone(),
        vm_id: w
            .resource
            .as_ref()
            .and_then(|r| r.id_of(basphere_core::ResourceRef::VM))
            .map(str::to_string),
        owner: w.owner.clone(),
        status: w.status,
        step: w.step,
        attempt: w.attempt,
        priority: w.priority,
        error: w.error.clone(),
        input: w.input.clone(),
        cancel_requested: w.cancel_requested,
        batch_id: w.batch_id.clone(),
        node: w.node.clone(),
        waiting_on: w.waiting_on,
        created_at: w.created_at,
        updated_at: w.updated_at,
        finished_at: w.finished_at,
        steps: w
            .steps
            .iter()
            .map(|s| wire::Step {
                idx: s.idx,
                name: s.name.clone(),
                status: s.status,
                attempts: s.attempts,
                error: s.error.clone(),
                started_at: s.started_at,
                finished_at: s.finished_at,
                idem_key: s.idem_key.clone(),
                deadline_at: s.deadline_at,
                output: s.output.clone(),
            })
            .collect(),
    }
}

/// A batch node's state, from its operation.
pub fn batch_node(op: &wire::Operation) -> wire::BatchNode {
    wire::BatchNode {
        node: op.node.clone(),
        operation_id: op.id.clone(),
        action: match op.kind.parse() {
            Ok(basphere_core::VmOperation::Create) => "create",
            Ok(basphere_core::VmOperation::Delete) => "delete",
            Err(_) => op.kind.as_str(),
        }
        .to_string(),
        status: op.status,
        step: op.step,
        steps: op
            .steps
            .iter()
            .map(|s| wire::StepState {
                name: s.name.clone(),
                status: s.status,
            })
            .collect(),
        waiting_on: op.waiting_on,
        error: op.error.clone(),
    }
}

pub fn event(e: &store::WorkflowEvent) -> wire::Event {
    wire::Event {
        seq: e.seq,
        operation_id: e.operation_id.clone(),
        at: e.at,
        step: e.step.clone(),
        kind: e.kind.clone(),
        message: e.message.clone(),
    }
}

pub fn plan(p: &basphere_plan::Plan) -> wire::Plan {
    wire::Plan {
        create: p
            .create
            .iter()
            .map(|c| wire::PlanCreate {
                name: c.name.clone(),
                os: c.os.clone(),
                spec: c.spec.clone(),
                requires: c.requires.clone(),
                optional: c.optional.clone(),
                layer: c.layer,
                extra_disks: c
                    .extra_disks
                    .iter()
                    .map(|d| match d {
                        basphere_plan::DiskEntry::Short(s) => s.clone(),
                        basphere_plan::DiskEntry::Full { size_gb, mode } => match mode {
                            Some(m) => format!("{size_gb}G:{m}"),
                            None => format!("{size_gb}G"),
                        },
                    })
                    .collect(),
                extra_networks: c.extra_networks.clone(),
            })
            .collect(),
        keep: p
            .keep
            .iter()
            .map(|k| wire::PlanKeep {
                name: k.name.clone(),
                status: k.status,
                differs: k.differs.clone(),
            })
            .collect(),
        delete: p.delete.clone(),
        layers: p.layers,
    }
}

pub fn batch_node_ref(n: &store::BatchNodeRef) -> wire::BatchNodeRef {
    wire::BatchNodeRef {
        node: n.node.clone(),
        action: n.action.to_string(),
        operation_id: n.operation_id.clone(),
    }
}

//! The wire types give the JSON the store rows gave when they were the `/api/v1` format, except
//! where the prototype's contract defines another shape (registration and key-change requests,
//! the VM view): there they give the prototype's fields, ours beside them.

use basphere_core::{Quota, RegistrationStatus, Role, StepStatus, UserStatus, VmStatus};
use basphere_service::convert;
use basphere_store as store;
use serde_json::{Value, json};

fn value(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn users_registrations_keys_tokens_and_audit_keep_their_row_shape() {
    let u = store::User {
        username: "bob".parse().unwrap(),
        email: "b@x.org".into(),
        team: "t".into(),
        public_key: "ssh-ed25519 AAAA".into(),
        role: Role::User,
        status: UserStatus::Active,
        quota: Quota::default(),
        ip_block: Some(3),
        unix_account: true,
        unix_uid: Some(1234),
        created_at: 1,
    };
    assert_eq!(value(convert::user(&u)), value(&u));
    assert!(value(convert::user(&u)).get("unix_uid").is_none());
    let r = store::Registration {
        id: 7,
        username: "bob".into(),
        email: "b@x.org".into(),
        team: "t".into(),
        public_key: "k".into(),
        status: RegistrationStatus::Rejected,
        created_at: 1,
        processed_by: Some("root".into()),
        processed_at: None,
        reject_reason: Some("no".into()),
    };
    // The prototype's `RegistrationRequest`: a `req-` id, RFC 3339 times, empty fields left out.
    assert_eq!(
        value(convert::registration(&r)),
        json!({
            "id": "req-00000007", "username": "bob", "email": "b@x.org", "team": "t",
            "public_key": "k", "status": "rejected", "created_at": "1970-01-01T00:00:00.001Z",
            "updated_at": "1970-01-01T00:00:00.001Z", "processed_by": "root",
            "reject_reason": "no",
        })
    );
    let k = store::KeyChange {
        id: 8,
        username: "bob".into(),
        public_key: "k".into(),
        email: Some("b@x.org".into()),
        reason: Some("lost".into()),
        status: RegistrationStatus::Approved,
        created_at: 2,
        processed_by: Some("root".into()),
        processed_at: Some(3),
        reject_reason: None,
    };
    // The prototype's `KeyChangeRequest`, plus `public_key` as before.
    assert_eq!(
        value(convert::key_change(&k)),
        json!({
            "id": "keychange-00000008", "username": "bob", "email": "b@x.org",
            "new_public_key": "k", "reason": "lost", "status": "approved",
            "created_at": "1970-01-01T00:00:00.002Z", "updated_at": "1970-01-01T00:00:00.003Z",
            "processed_by": "root", "processed_at": "1970-01-01T00:00:00.003Z",
            "public_key": "k",
        })
    );
    let t = store::TokenInfo {
        id: "t1".into(),
        name: "cli".into(),
        created_at: 3,
        last_used_at: None,
        expires_at: Some(9),
    };
    assert_eq!(value(convert::token_info(&t)), value(&t));
    let a = store::AuditRecord {
        id: 1,
        at: 2,
        actor: "root".into(),
        source: "unix".into(),
        action: "user.approve".into(),
        target: "bob".into(),
        result: "ok".into(),
        detail: None,
    };
    assert_eq!(value(convert::audit_record(&a)), value(&a));
}

fn vm() -> store::Vm {
    store::Vm {
        id: "v1".into(),
        name: "web".parse().unwrap(),
        owner: "bob".parse().unwrap(),
        os: "debian-13".into(),
        login_user: "debian".into(),
        spec: "small".into(),
        vcpus: 1,
        memory_mib: 1024,
        disk_gib: 10,
        ip_address: Some("10.254.0.10".parse().unwrap()),
        status: VmStatus::Running,
        error: None,
        provider: "null".into(),
        created_at: 0,
        updated_at: 5,
        extra_disks: vec![],
        extra_nics: vec![],
    }
}

#[test]
fn a_vm_keeps_its_row_shape_and_its_view() {
    let v = vm();
    assert_eq!(value(convert::vm_record(&v)), value(&v));
    assert_eq!(
        value(convert::vm(v.clone(), Some("op1"))),
        json!({
            "id": "v1", "name": "web", "vsphere_vm_name": "", "owner": "bob", "os": "debian-13",
            "login_user": "debian", "spec": "small", "vcpus": 1, "memory_mib": 1024,
            "disk_gib": 10, "ip_address": "10.254.0.10", "status": "running", "error": null,
            "provider": "null", "created_at": "1970-01-01T00:00:00Z",
            "ssh": "ssh debian@10.254.0.10", "operation_id": "op1",
        })
    );
    // No address yet: `""`, as the prototype sends it; a vSphere VM names its clone.
    let mut v = vm();
    v.ip_address = None;
    v.provider = "vsphere".into();
    v.id = "0190f5c2-7b1e-7c3d-9f3c-2a1be04d7781".into();
    let view = value(convert::vm(v, None));
    assert_eq!(view["ip_address"], "");
    assert_eq!(view["vsphere_vm_name"], "web-bob-9f3c2a1be04d7781");
    assert_eq!(view["ssh"], Value::Null);
    let back: basphere_wire::Vm = serde_json::from_value(view).unwrap();
    assert_eq!(back.ip_address, None);
}

#[test]
fn an_operation_keeps_its_kind_and_vm() {
    let w = store::Workflow {
        id: "w1".into(),
        definition: "delete_vm".into(),
        resource: Some(basphere_core::ResourceRef::vm("v1")),
        parent_id: None,
        owner: "bob".into(),
        status: basphere_core::WorkflowStatus::Running,
        step: 1,
        attempt: 0,
        priority: 10,
        error: None,
        input: json!({}),
        cancel_requested: false,
        batch_id: Some("b1".into()),
        node: Some("web".into()),
        waiting_on: 0,
        created_at: 1,
        updated_at: 2,
        finished_at: None,
        steps: vec![store::StepRecord {
            idx: 0,
            name: "stop".into(),
            status: StepStatus::Done,
            attempts: 1,
            error: None,
            started_at: Some(1),
            finished_at: Some(2),
            idem_key: "w1/0/stop".into(),
            deadline_at: None,
            timeout_ms: 60_000,
            output: None,
        }],
    };
    let step = json!({
        "idx": 0, "name": "stop", "status": "done", "attempts": 1, "error": null,
        "started_at": 1, "finished_at": 2, "idem_key": "w1/0/stop", "deadline_at": null,
        "output": null,
    });
    let op = convert::operation(&w);
    assert_eq!(
        value(&op),
        json!({
            "id": "w1", "kind": "delete_vm", "definition": "delete_vm", "vm_id": "v1",
            "owner": "bob", "status": "running", "step": 1, "attempt": 0, "priority": 10,
            "error": null, "input": {}, "cancel_requested": false, "batch_id": "b1",
            "node": "web", "waiting_on": 0, "created_at": 1, "updated_at": 2,
            "finished_at": null, "steps": [step],
        })
    );
    assert_eq!(
        value(convert::batch_node(&op)),
        json!({
            "node": "web", "operation_id": "w1", "action": "delete", "status": "running",
            "step": 1, "steps": [{"name": "stop", "status": "done"}], "waiting_on": 0,
            "error": null,
        })
    );
}

#[test]
fn an_event_keeps_its_fields_in_order() {
    let e = store::WorkflowEvent {
        seq: 4,
        operation_id: "w1".into(),
        at: 9,
        step: Some("stop".into()),
        kind: "step_done".into(),
        message: "stop done".into(),
    };
    // SSE sends the struct as serialized, field order and all.
    assert_eq!(
        serde_json::to_string(&convert::event(&e)).unwrap(),
        serde_json::to_string(&e).unwrap()
    );
}

//! H3: vCenter VM names must not collide across users, and a VM found by name is used only when
//! it carries this request's instance id. Against the real simulator (vcsim 0.24).

mod common;

use basphere_provider::{MachineState, Machines, VmRequest};
use basphere_vsphere::{Client, MoRef, VsphereProvider};
use common::{Vcsim, request_as};
use std::time::Duration;

const FOLDER: &str = "DC0/vm/basphere/vms";
const D: Duration = Duration::from_secs(10);

async fn setup() -> (Vcsim, VsphereProvider) {
    let sim = Vcsim::start(&[]);
    sim.make_template("user", "pass").await;
    let creds = sim.credentials_file("user", "pass", 0o600);
    let provider = VsphereProvider::connect(sim.config(creds)).await.unwrap();
    (sim, provider)
}

/// Two UUIDv7 instance ids made in the same millisecond: their first 12 hex digits are equal.
fn same_second_ids() -> (String, String) {
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, 1_790_000_000, 123_000_000);
    let a = uuid::Uuid::new_v7(ts).to_string();
    let b = uuid::Uuid::new_v7(ts).to_string();
    assert_ne!(a, b);
    assert_eq!(
        a[..8],
        b[..8],
        "the ids share the digits the old names used"
    );
    (a, b)
}

async fn find(c: &Client, name: &str) -> Option<MoRef> {
    c.find_by_inventory_path(&format!("{FOLDER}/{name}"))
        .await
        .unwrap()
}

/// What an attacker-planted or foreign VM looks like: the properties prepare/stop/remove change.
async fn snapshot(c: &Client, r: &MoRef) -> Vec<String> {
    let p = c
        .properties(
            r,
            &[
                "runtime.powerState",
                "config.hardware.numCPU",
                "config.hardware.memoryMB",
                "config.annotation",
            ],
        )
        .await
        .unwrap()
        .expect("the VM still exists");
    let extra = c
        .properties(r, &["config.extraConfig"])
        .await
        .unwrap()
        .unwrap();
    let mut keys = Vec::new();
    if let Some(e) = extra.get("config.extraConfig") {
        e.descendants("key", &mut keys);
    }
    let mut out: Vec<String> = [
        "runtime.powerState",
        "config.hardware.numCPU",
        "config.hardware.memoryMB",
        "config.annotation",
    ]
    .iter()
    .map(|k| format!("{k}={}", p.text(k)))
    .collect();
    out.extend(keys.iter().map(|k| format!("extra:{}", k.text)));
    out
}

/// Clones the template into Basphere's folder as `name`, as someone else in vCenter would, with
/// an optional `basphere.instance_id` and annotation, and powers it on.
async fn plant(c: &Client, name: &str, instance: Option<&str>, annotation: &str) -> MoRef {
    let template = c
        .find_by_inventory_path(&format!("DC0/vm/{}", common::TEMPLATE))
        .await
        .unwrap()
        .unwrap();
    let folder = c.find_by_inventory_path(FOLDER).await.unwrap().unwrap();
    let pool = c
        .find_by_inventory_path("DC0/host/DC0_C0/Resources")
        .await
        .unwrap()
        .unwrap();
    let mut config = format!("<annotation>{annotation}</annotation>");
    if let Some(id) = instance {
        config.push_str(&format!(
            "<extraConfig><key>basphere.instance_id</key><value xsi:type=\"xsd:string\">{id}</value></extraConfig>"
        ));
    }
    let spec = format!(
        "<location>{}</location><template>false</template><config>{config}</config><powerOn>false</powerOn>",
        pool.xml("pool")
    );
    let r = c
        .clone_vm(&template, &folder, name, &spec, D)
        .await
        .unwrap();
    // vcsim ignores the annotation in a clone spec; set it as vCenter would have.
    let args = format!("<spec><annotation>{annotation}</annotation></spec>");
    c.run_task("ReconfigVM_Task", &r, &args, D).await.unwrap();
    c.power_on(&r, D).await.unwrap();
    r
}

fn names_differ(a: &VmRequest, b: &VmRequest) {
    let (na, nb) = (VsphereProvider::vm_name(a), VsphereProvider::vm_name(b));
    assert_ne!(na, nb);
    assert!(na.len() <= 80 && nb.len() <= 80);
}

#[tokio::test]
async fn two_users_web_in_the_same_second_get_two_vms_and_deleting_one_spares_the_other() {
    let (mut sim, p) = setup().await;
    let (ia, ib) = same_second_ids();
    let alice = request_as("web", "alice", &ia, 1);
    let bob = request_as("web", "bob", &ib, 2);

    for vm in [&alice, &bob] {
        p.prepare(vm).await.unwrap();
        p.start(vm).await.unwrap();
    }
    let listed = p.list_machines().await.unwrap();
    assert_eq!(
        listed.len(),
        2,
        "Bob's prepare reused Alice's VM: {listed:?}"
    );
    for vm in [&alice, &bob] {
        p.wait_ready(vm, D).await.unwrap();
    }
    let c = p.client();
    let ra = find(c, &VsphereProvider::vm_name(&alice)).await.unwrap();
    let rb = find(c, &VsphereProvider::vm_name(&bob)).await.unwrap();
    assert_ne!(ra, rb);
    // Each VM carries its own owner's key and address, not the other's.
    let before_a = snapshot(c, &ra).await;
    assert!(
        before_a
            .iter()
            .any(|l| l.contains(&ia) && l.contains("owner alice")),
        "{before_a:?}"
    );

    // Bob deletes his `web`, then his create is undone again (a retried remove): Alice's runs on.
    p.remove(&bob).await.unwrap();
    p.remove(&bob).await.unwrap();
    assert_eq!(p.inspect(&bob).await.unwrap(), MachineState::Absent);
    assert_eq!(p.inspect(&alice).await.unwrap(), MachineState::Running);
    assert_eq!(snapshot(c, &ra).await, before_a, "Alice's VM changed");
    // Bob makes `web` again at once: a new VM, and Alice's is still untouched.
    let (_, ib2) = same_second_ids();
    let bob2 = request_as("web", "bob", &ib2, 3);
    p.prepare(&bob2).await.unwrap();
    assert_eq!(snapshot(c, &ra).await, before_a, "Alice's VM changed");
    p.remove(&bob2).await.unwrap();

    p.remove(&alice).await.unwrap();
    assert!(p.list_machines().await.unwrap().is_empty());
    names_differ(&alice, &bob);
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

#[tokio::test]
async fn a_foreign_vm_under_our_name_is_neither_reconfigured_nor_stopped_nor_destroyed() {
    let (mut sim, p) = setup().await;
    let (ours, theirs) = same_second_ids();
    let vm = request_as("web", "alice", &ours, 1);
    let name = VsphereProvider::vm_name(&vm);
    let c = p.client();

    for (label, marker) in [
        ("no instance id", None),
        ("another instance id", Some(theirs.as_str())),
    ] {
        // The foreign VM even claims our instance in its annotation: only the key counts.
        let annotation = format!("Managed by Basphere: instance {ours}, owner alice");
        let r = plant(c, &name, marker, &annotation).await;
        let before = snapshot(c, &r).await;

        for (phase, err) in [
            ("prepare", p.prepare(&vm).await.unwrap_err()),
            ("start", p.start(&vm).await.unwrap_err()),
            (
                "wait_ready",
                p.wait_ready(&vm, Duration::from_secs(1)).await.unwrap_err(),
            ),
            ("stop", p.stop(&vm).await.unwrap_err()),
            ("remove", p.remove(&vm).await.unwrap_err()),
            ("inspect", p.inspect(&vm).await.unwrap_err()),
        ] {
            assert!(!err.retryable, "{label}/{phase}: {err:?}");
            assert!(
                err.message.contains(&format!("{FOLDER}/{name}"))
                    && err.message.contains("basphere.instance_id")
                    && err.message.contains("untouched")
                    && err.message.contains("rename or remove it in vCenter"),
                "{label}/{phase}: {}",
                err.message
            );
            if let Some(t) = marker {
                assert!(
                    !err.message.contains(t),
                    "leaks the other id: {}",
                    err.message
                );
            }
        }
        assert_eq!(
            snapshot(c, &r).await,
            before,
            "{label}: the foreign VM changed"
        );
        assert_eq!(
            p.list_machines().await.unwrap().len(),
            1,
            "{label}: a clone was made"
        );

        c.power_off(&r, D).await.unwrap();
        c.destroy(&r, D).await.unwrap();
    }
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

#[tokio::test]
async fn a_vm_under_the_old_shared_name_is_removed_only_by_its_own_instance() {
    let (mut sim, p) = setup().await;
    let (ia, ib) = same_second_ids();
    let alice = request_as("web", "alice", &ia, 1);
    let bob = request_as("web", "bob", &ib, 2);
    // What an older release made for Alice: `web-<first 8 of the id>`, marked by annotation only.
    let legacy = format!("web-{}", &ia[..8]);
    let c = p.client();
    let r = plant(
        c,
        &legacy,
        None,
        &format!("Managed by Basphere: instance {ia}, owner alice"),
    )
    .await;
    let before = snapshot(c, &r).await;

    // Bob's `web` had the same old name: his undo and delete leave Alice's VM alone.
    assert_eq!(p.inspect(&bob).await.unwrap(), MachineState::Absent);
    p.stop(&bob).await.unwrap();
    p.remove(&bob).await.unwrap();
    assert_eq!(snapshot(c, &r).await, before, "Alice's VM changed");

    // Alice's delete after the upgrade still finds and removes her VM.
    assert_eq!(p.inspect(&alice).await.unwrap(), MachineState::Running);
    p.remove(&alice).await.unwrap();
    assert!(
        find(c, &legacy).await.is_none(),
        "Alice's VM was left behind"
    );
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

#[tokio::test]
async fn a_resumed_prepare_finishes_its_own_half_configured_clone() {
    let (mut sim, p) = setup().await;
    let (id, _) = same_second_ids();
    let vm = request_as("web", "alice", &id, 1);
    let name = VsphereProvider::vm_name(&vm);
    let c = p.client();
    // A crash between clone and reconfigure leaves the clone with only its mark, powered off.
    let r = plant(c, &name, Some(&id), "").await;
    c.power_off(&r, D).await.unwrap();

    p.prepare(&vm).await.unwrap();
    assert_eq!(
        p.list_machines().await.unwrap().len(),
        1,
        "a second clone was made"
    );
    let props = c
        .properties(&r, &["config.hardware.numCPU", "config.extraConfig"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(props.text("config.hardware.numCPU"), "2");
    let mut keys = Vec::new();
    props
        .get("config.extraConfig")
        .unwrap()
        .descendants("key", &mut keys);
    assert!(
        keys.iter().any(|k| k.text == "guestinfo.userdata"),
        "not configured"
    );
    p.start(&vm).await.unwrap();
    p.wait_ready(&vm, D).await.unwrap();
    p.remove(&vm).await.unwrap();
    assert!(p.list_machines().await.unwrap().is_empty());
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

#[test]
fn names_fit_vcenter_and_do_not_depend_on_the_creation_time() {
    let (ia, ib) = same_second_ids();
    let longest_name = "a".repeat(30);
    let longest_owner = format!("u{}", "x".repeat(19));
    let a = request_as(&longest_name, &longest_owner, &ia, 1);
    let b = request_as(&longest_name, &longest_owner, &ib, 1);
    let (na, nb) = (VsphereProvider::vm_name(&a), VsphereProvider::vm_name(&b));
    assert_ne!(na, nb, "same name, owner and second must still differ");
    assert!(
        na.len() <= basphere_vsphere::VCENTER_NAME_MAX,
        "{na}: {} chars",
        na.len()
    );
    let tail = ia.replace('-', "");
    assert_eq!(
        na,
        format!("{longest_name}-{longest_owner}-{}", &tail[16..])
    );
    // Readable: name and owner lead.
    let web = request_as("web", "alice", &ia, 1);
    assert!(VsphereProvider::vm_name(&web).starts_with("web-alice-"));
}

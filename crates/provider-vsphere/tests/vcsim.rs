//! The vSphere provider against the real vSphere API simulator (vcsim 0.24), one per test.
//!
//! vcsim is built once by `crates/provider-vsphere/vcsim.sh` (on first use, when missing).

mod common;

use base64::Engine;
use basphere_provider::{MachineState, Provider};
use basphere_vsphere::{Error, MoRef, VsphereProvider};
use common::{Vcsim, request};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn setup(args: &[&str]) -> (Vcsim, VsphereProvider) {
    let sim = Vcsim::start(args);
    sim.make_template("user", "pass").await;
    let creds = sim.credentials_file("user", "pass", 0o600);
    let provider = VsphereProvider::connect(sim.config(creds)).await.unwrap();
    (sim, provider)
}

async fn vm_ref(p: &VsphereProvider, vm: &basphere_provider::VmRequest) -> Option<MoRef> {
    let path = format!("DC0/vm/basphere/vms/{}", VsphereProvider::vm_name(vm));
    p.client().find_by_inventory_path(&path).await.unwrap()
}

#[tokio::test]
async fn create_runs_with_ip_then_delete_leaves_nothing() {
    let (mut sim, p) = setup(&[]).await;
    let vm = request("web", 0);
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);

    p.prepare(&vm).await.unwrap();
    p.prepare(&vm).await.unwrap(); // a retried prepare reuses the clone
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Stopped);
    assert_eq!(p.list_machines().await.unwrap().len(), 1, "no duplicate clone");

    // What prepare configured: size, port group and cloud-init guestinfo.
    let r = vm_ref(&p, &vm).await.expect("clone exists");
    let props = p
        .client()
        .properties(&r, &["config.hardware.numCPU", "config.hardware.memoryMB", "config.extraConfig", "config.annotation"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(props.text("config.hardware.numCPU"), "2");
    assert_eq!(props.text("config.hardware.memoryMB"), "8192");
    assert!(props.text("config.annotation").contains(&vm.instance));
    let extra = props.get("config.extraConfig").unwrap();
    let value = |key: &str| {
        extra
            .children
            .iter()
            .find(|o| o.child_text("key") == Some(key))
            .and_then(|o| o.child_text("value"))
            .map(str::to_string)
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let meta = String::from_utf8(b64.decode(value("guestinfo.metadata").unwrap()).unwrap()).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["local-hostname"], "web");
    assert_eq!(meta["network"]["ethernets"]["ens192"]["addresses"][0], "10.254.0.10/21");
    assert_eq!(value("guestinfo.metadata.encoding").as_deref(), Some("base64"));
    let user = String::from_utf8(b64.decode(value("guestinfo.userdata").unwrap()).unwrap()).unwrap();
    assert!(user.starts_with("#cloud-config\n"), "{user}");
    assert!(user.contains(common::KEY) && user.contains("\"debian\""), "{user}");
    assert_eq!(value("guestinfo.userdata.encoding").as_deref(), Some("base64"));

    p.start(&vm).await.unwrap();
    p.wait_ready(&vm, Duration::from_secs(10)).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Running);
    let listed = p.list_machines().await.unwrap();
    assert_eq!(listed[0].instance.as_deref(), Some(vm.instance.as_str()));
    assert_eq!(listed[0].state, MachineState::Running);

    p.stop(&vm).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Stopped);
    p.stop(&vm).await.unwrap();
    p.remove(&vm).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);
    p.remove(&vm).await.unwrap();
    assert!(p.list_machines().await.unwrap().is_empty());
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
    p.disconnect().await.unwrap();
}

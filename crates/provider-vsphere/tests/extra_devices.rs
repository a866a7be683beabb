//! Extra disks and NICs against vcsim 0.24: the clone's reconfigure spec adds thin disks on the
//! configured datastore and vmxnet3 NICs on the catalog's port groups; read back from vcsim's
//! own device list, a retried prepare adds nothing twice, and delete leaves nothing.

mod common;

use base64::Engine;
use basphere_core::DiskMode;
use basphere_provider::{DiskRequest, MachineState, Machines, NicAddress, NicRequest};
use basphere_vsphere::VsphereProvider;
use common::{Vcsim, request};

fn with_extras(mut vm: basphere_provider::VmRequest) -> basphere_provider::VmRequest {
    vm.extra_disks = vec![
        DiskRequest {
            serial: "bspabc123d1".into(),
            size_gib: 10,
            mode: DiskMode::Auto,
            mount: Some("/data".into()),
        },
        DiskRequest {
            serial: "bspabc123d2".into(),
            size_gib: 20,
            mode: DiskMode::Raw,
            mount: None,
        },
    ];
    vm.extra_nics = vec![NicRequest {
        network: "storage".into(),
        mac: "52:54:12:34:56:78".into(),
        address: Some(NicAddress {
            ip: "10.77.0.2".parse().unwrap(),
            prefix_len: 24,
        }),
        gateway: None,
        bridge: None,
        // vcsim's default distributed port group.
        port_group: Some("DC0_DVPG0".into()),
    }];
    vm
}

#[tokio::test]
async fn extra_disks_and_nics_are_added_once_and_removed_with_the_vm() {
    let mut sim = Vcsim::start(&[]);
    sim.make_template("user", "pass").await;
    let creds = sim.credentials_file("user", "pass", 0o600);
    let p = VsphereProvider::connect(sim.config(creds)).await.unwrap();
    let vm = with_extras(request("db", 0));

    p.prepare(&vm).await.unwrap();
    p.prepare(&vm).await.unwrap(); // retried: finds the devices added already
    let path = format!("DC0/vm/basphere/vms/{}", VsphereProvider::vm_name(&vm));
    let r = p
        .client()
        .find_by_inventory_path(&path)
        .await
        .unwrap()
        .expect("clone exists");
    let props = p
        .client()
        .properties(&r, &["config.hardware.device", "config.extraConfig"])
        .await
        .unwrap()
        .unwrap();
    let devices = props.get("config.hardware.device").unwrap();
    let disks: Vec<_> = devices
        .children
        .iter()
        .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
        .collect();
    assert_eq!(disks.len(), 3, "boot disk and two extra disks, once");
    let kb = |d: &basphere_vsphere::xml::Node| d.child_text("capacityInKB").unwrap().to_string();
    assert_eq!(kb(disks[1]), (10u64 << 20).to_string());
    assert_eq!(kb(disks[2]), (20u64 << 20).to_string());
    for d in &disks[1..] {
        let file = d.path(&["backing", "fileName"]).unwrap().text.clone();
        assert!(file.starts_with("[LocalDS_0]"), "on the datastore: {file}");
        assert_eq!(
            d.child_text("controllerKey"),
            disks[0].child_text("controllerKey"),
            "beside the boot disk"
        );
    }
    let units: Vec<_> = disks[1..]
        .iter()
        .map(|d| d.child_text("unitNumber").unwrap().trim().to_string())
        .collect();
    assert_eq!(units, ["1", "2"]);
    let nics: Vec<_> = devices
        .children
        .iter()
        .filter(|d| d.child("macAddress").is_some())
        .collect();
    assert_eq!(nics.len(), 2, "the template's NIC and one extra, once");
    // vcsim lists added devices first: find ours by the MAC it was given.
    let extra = *nics
        .iter()
        .find(|n| n.child_text("macAddress") == Some("00:50:56:34:56:78"))
        .expect("the extra NIC");
    let main = nics.iter().find(|n| !std::ptr::eq(**n, extra)).unwrap();
    let mut main_net = vec![];
    main.descendants("deviceName", &mut main_net);
    assert_eq!(
        main_net[0].text, "VM Network",
        "the template's NIC keeps its port group"
    );
    assert_eq!(extra.xsi_type.as_deref(), Some("VirtualVmxnet3"));
    let mut keys = vec![];
    extra.descendants("portgroupKey", &mut keys);
    assert!(!keys.is_empty(), "on the distributed port group: {extra:?}");

    // cloud-init: the extra NIC by its MAC with its address, the auto disk mounted at /data.
    let cfg = props.get("config.extraConfig").unwrap();
    let value = |key: &str| {
        cfg.children
            .iter()
            .find(|o| o.child_text("key") == Some(key))
            .and_then(|o| o.child_text("value"))
            .map(str::to_string)
            .unwrap()
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let meta: serde_json::Value =
        serde_json::from_slice(&b64.decode(value("guestinfo.metadata")).unwrap()).unwrap();
    let eth = &meta["network"]["ethernets"]["extra1"];
    assert_eq!(eth["match"]["macaddress"], "00:50:56:34:56:78");
    assert_eq!(eth["addresses"][0], "10.77.0.2/24");
    assert_eq!(eth["set-name"], "eth1");
    let user = String::from_utf8(b64.decode(value("guestinfo.userdata")).unwrap()).unwrap();
    assert!(
        user.contains("scsi-0:0:1:0") && user.contains("/data"),
        "{user}"
    );
    assert!(
        !user.contains("scsi-0:0:2:0"),
        "the raw disk is left alone: {user}"
    );

    p.remove(&vm).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

#[tokio::test]
async fn an_unknown_port_group_is_a_permanent_error_naming_the_setting() {
    let sim = Vcsim::start(&[]);
    sim.make_template("user", "pass").await;
    let creds = sim.credentials_file("user", "pass", 0o600);
    let p = VsphereProvider::connect(sim.config(creds)).await.unwrap();
    let mut vm = with_extras(request("db", 1));
    vm.extra_nics[0].port_group = Some("No Such PG".into());
    let e = p.prepare(&vm).await.unwrap_err();
    assert!(!e.retryable, "{e}");
    assert!(e.message.contains("networks.storage.port_group"), "{e}");
    p.remove(&vm).await.unwrap();
}

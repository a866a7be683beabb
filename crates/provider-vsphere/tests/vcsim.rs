//! The vSphere provider against the real vSphere API simulator (vcsim 0.24), one per test.
//!
//! vcsim is built once by `crates/provider-vsphere/vcsim.sh` (on first use, when missing).

mod common;

use base64::Engine;
use basphere_provider::{MachineState, Machines};
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

#[test]
fn the_simulator_keeps_its_datastores_in_its_own_directory_and_takes_them_along() {
    let sim = Vcsim::start(&[]);
    let dir = sim.dir.path().to_path_buf();
    let stores = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("govcsim-")
        })
        .count();
    assert!(stores > 0, "vcsim's datastores are under {}", dir.display());
    drop(sim);
    assert!(
        !dir.exists(),
        "{} is removed with the simulator",
        dir.display()
    );
}

#[tokio::test]
async fn create_runs_with_ip_then_delete_leaves_nothing() {
    let (mut sim, p) = setup(&[]).await;
    let vm = request("web", 0);
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);

    p.prepare(&vm).await.unwrap();
    p.prepare(&vm).await.unwrap(); // a retried prepare reuses the clone
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Stopped);
    assert_eq!(
        p.list_machines().await.unwrap().len(),
        1,
        "no duplicate clone"
    );

    // What prepare configured: size, port group and cloud-init guestinfo.
    let r = vm_ref(&p, &vm).await.expect("clone exists");
    let props = p
        .client()
        .properties(
            &r,
            &[
                "config.hardware.numCPU",
                "config.hardware.memoryMB",
                "config.extraConfig",
                "config.annotation",
            ],
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(props.text("config.hardware.numCPU"), "2");
    assert_eq!(props.text("config.hardware.memoryMB"), "8192");
    assert!(props.text("config.annotation").contains(&vm.instance));
    let devices = p
        .client()
        .properties(&r, &["config.hardware.device"])
        .await
        .unwrap()
        .unwrap();
    let mut capacities = Vec::new();
    devices
        .get("config.hardware.device")
        .unwrap()
        .descendants("capacityInKB", &mut capacities);
    assert_eq!(
        capacities[0].text,
        (50u64 * 1024 * 1024).to_string(),
        "disk grown to the spec"
    );
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
    let meta =
        String::from_utf8(b64.decode(value("guestinfo.metadata").unwrap()).unwrap()).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["local-hostname"], "web");
    assert_eq!(
        meta["network"]["ethernets"]["ens192"]["addresses"][0],
        "10.254.0.10/21"
    );
    assert_eq!(
        value("guestinfo.metadata.encoding").as_deref(),
        Some("base64")
    );
    let user =
        String::from_utf8(b64.decode(value("guestinfo.userdata").unwrap()).unwrap()).unwrap();
    assert!(user.starts_with("#cloud-config\n"), "{user}");
    assert!(
        user.contains(common::KEY) && user.contains("\"debian\""),
        "{user}"
    );
    assert_eq!(
        value("guestinfo.userdata.encoding").as_deref(),
        Some("base64")
    );

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

#[tokio::test]
async fn wrong_credentials_are_a_clear_permanent_error() {
    let sim = Vcsim::start(&["-username", "basphere", "-password", "right-horse-battery"]);
    let creds = sim.credentials_file("basphere", "wrong-password-1234", 0o600);
    let err = VsphereProvider::connect(sim.config(creds))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidLogin { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("InvalidLogin")
            && msg.contains("basphere")
            && msg.contains("credentials file"),
        "{msg}"
    );
    assert!(
        !msg.contains("wrong-password-1234") && !format!("{err:?}").contains("wrong-password-1234")
    );
    let pe: basphere_provider::ProviderError = err.into();
    assert!(!pe.retryable);

    // The right password works.
    sim.credentials_file("basphere", "right-horse-battery", 0o600);
    sim.make_template("basphere", "right-horse-battery").await;
    let creds = sim.dir.path().join("credentials.toml");
    VsphereProvider::connect(sim.config(creds)).await.unwrap();
}

#[tokio::test]
async fn power_on_twice_is_handled_and_undone() {
    let (mut sim, p) = setup(&[]).await;
    let vm = request("twice", 1);
    p.prepare(&vm).await.unwrap();
    p.start(&vm).await.unwrap();
    // The fault itself is typed…
    let r = vm_ref(&p, &vm).await.unwrap();
    let err = p
        .client()
        .power_on(&r, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPowerState { .. }), "{err:?}");
    assert_eq!(err.fault_type(), Some("InvalidPowerState"));
    // …and start, which meets it on a running VM, treats it as done.
    p.start(&vm).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Running);
    // Powering on a template is InvalidState, a permanent error.
    let t = p
        .client()
        .find_by_inventory_path("DC0/vm/DC0_C0_RP0_VM1")
        .await
        .unwrap()
        .unwrap();
    let err = p
        .client()
        .power_on(&t, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidState { .. }) && !err.is_retryable(),
        "{err:?}"
    );
    // Undo.
    p.remove(&vm).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

#[tokio::test]
async fn slow_clone_fails_cleanly_against_a_shorter_deadline_and_is_undone() {
    let sim = Vcsim::start(&["-method-delay", "CloneVM_Task:2000"]);
    sim.make_template("user", "pass").await;
    let mut config = sim.config(sim.credentials_file("user", "pass", 0o600));
    config.task_deadline_secs = 0.5;
    let p = VsphereProvider::connect(config).await.unwrap();
    let vm = request("slow", 2);

    let started = Instant::now();
    let err = p.prepare(&vm).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(err.retryable, "{err:?}");
    assert!(
        err.message.contains("did not finish within"),
        "{}",
        err.message
    );

    // Undo: remove waits for the clone vCenter is still making, then destroys it. Like the
    // engine, retry while it says the clone is still running.
    let mut tries = 0;
    loop {
        match p.remove(&vm).await {
            Ok(()) => break,
            Err(e) if e.retryable && tries < 20 => tries += 1,
            Err(e) => panic!("remove failed: {e:?}"),
        }
    }
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        p.list_machines().await.unwrap().is_empty(),
        "a clone was left behind"
    );
}

#[tokio::test]
async fn vm_destroyed_out_of_band_is_absent_and_remove_succeeds() {
    let (_sim, p) = setup(&[]).await;
    let vm = request("gone", 3);
    p.prepare(&vm).await.unwrap();
    p.start(&vm).await.unwrap();
    let r = vm_ref(&p, &vm).await.unwrap();
    let c = p.client();
    c.power_off(&r, Duration::from_secs(5)).await.unwrap();
    c.destroy(&r, Duration::from_secs(5)).await.unwrap();
    // The stale reference reads as absent, not as an error.
    assert!(c.properties(&r, &["name"]).await.unwrap().is_none());

    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);
    p.stop(&vm).await.unwrap();
    p.remove(&vm).await.unwrap();
    let err = p.start(&vm).await.unwrap_err();
    assert!(
        !err.retryable && err.message.contains("removed outside Basphere"),
        "{err:?}"
    );
    let err = p.wait_ready(&vm, Duration::from_secs(1)).await.unwrap_err();
    assert!(!err.retryable, "{err:?}");
}

#[tokio::test]
async fn twenty_concurrent_creates_on_a_distributed_port_group() {
    let sim = Vcsim::start(&[]);
    sim.make_template("user", "pass").await;
    let mut config = sim.config(sim.credentials_file("user", "pass", 0o600));
    config.network = "DC0_DVPG0".into();
    let p = Arc::new(VsphereProvider::connect(config).await.unwrap());
    let vms: Vec<_> = (0..20).map(|i| request(&format!("vm{i}"), i)).collect();

    let mut tasks = Vec::new();
    for vm in vms.clone() {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            p.prepare(&vm).await?;
            p.start(&vm).await?;
            p.wait_ready(&vm, Duration::from_secs(20)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let listed = p.list_machines().await.unwrap();
    assert_eq!(listed.len(), 20);
    assert!(listed.iter().all(|m| m.state == MachineState::Running));

    // The NIC sits on the distributed port group.
    let r = vm_ref(&p, &vms[0]).await.unwrap();
    let devices = p
        .client()
        .properties(&r, &["config.hardware.device"])
        .await
        .unwrap()
        .unwrap();
    let mut keys = Vec::new();
    devices
        .get("config.hardware.device")
        .unwrap()
        .descendants("portgroupKey", &mut keys);
    assert!(!keys.is_empty(), "NIC is not on a distributed port group");

    // Paging: 20 VMs in pages of 5 through ContinueRetrievePropertiesEx.
    let folder = p
        .client()
        .find_by_inventory_path("DC0/vm/basphere/vms")
        .await
        .unwrap()
        .unwrap();
    let q = basphere_vsphere::soap::PropertyQuery {
        props: vec![("VirtualMachine".into(), vec!["name".into()])],
        root: folder,
        walk_folder: true,
    };
    assert_eq!(p.client().retrieve(&q, 5).await.unwrap().len(), 20);

    let mut tasks = Vec::new();
    for vm in vms {
        let p = p.clone();
        tasks.push(tokio::spawn(async move { p.remove(&vm).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(p.list_machines().await.unwrap().is_empty());
}

#[tokio::test]
async fn credentials_file_readable_by_others_is_refused() {
    let sim = Vcsim::start(&[]);
    let creds = sim.credentials_file("user", "pass", 0o644);
    let err = VsphereProvider::connect(sim.config(creds))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
}

#[tokio::test]
async fn session_expiry_logs_in_again_once() {
    let (_sim, p) = setup(&[]).await;
    let vm = request("relogin", 4);
    p.prepare(&vm).await.unwrap();
    p.client().logout().await.unwrap();
    // Both a plain call (SOAP fault) and a property read (missingSet) recover.
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Stopped);
    p.client().logout().await.unwrap();
    p.start(&vm).await.unwrap();
    p.remove(&vm).await.unwrap();
}

#[tokio::test]
async fn template_with_a_snapshot_is_cloned_linked() {
    let trace = tempfile::NamedTempFile::new().unwrap();
    let trace_path = trace.path().to_str().unwrap().to_string();
    let sim = Vcsim::start(&["-trace", "-trace-file", &trace_path]);
    // Snapshot the VM, then make it the template.
    let c = sim.client("user", "pass").await;
    let t = c
        .find_by_inventory_path(&format!("DC0/vm/{}", common::TEMPLATE))
        .await
        .unwrap()
        .unwrap();
    let d = Duration::from_secs(5);
    c.power_off(&t, d).await.unwrap();
    let args = "<name>base</name><memory>false</memory><quiesce>false</quiesce>";
    c.run_task("CreateSnapshot_Task", &t, args, d)
        .await
        .unwrap();
    c.mark_as_template(&t).await.unwrap();

    let p = VsphereProvider::connect(sim.config(sim.credentials_file("user", "pass", 0o600)))
        .await
        .unwrap();
    let vm = request("linked", 6);
    p.prepare(&vm).await.unwrap();
    p.start(&vm).await.unwrap();
    p.wait_ready(&vm, Duration::from_secs(5)).await.unwrap();
    p.remove(&vm).await.unwrap();
    // vcsim ignores diskMoveType, so check what we asked for.
    let sent = std::fs::read_to_string(trace.path()).unwrap();
    let clone = sent
        .split("<CloneVM_Task")
        .nth(1)
        .expect("clone request traced");
    assert!(
        clone.contains("createNewChildDiskBacking") && clone.contains("VirtualMachineSnapshot"),
        "{clone}"
    );
}

#[tokio::test]
async fn tls_trusts_the_configured_ca_file_and_refuses_unknown_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "2", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (Debian package openssl) makes the test certificate");
    assert!(status.success());
    let sim = Vcsim::start(&[
        "-tlscert",
        cert.to_str().unwrap(),
        "-tlskey",
        key.to_str().unwrap(),
    ]);
    sim.make_template("user", "pass").await;
    let mut config = sim.config(sim.credentials_file("user", "pass", 0o600));

    config.tls = basphere_vsphere::TlsConfig {
        ca_file: Some(cert.clone()),
        insecure: false,
    };
    VsphereProvider::connect(config.clone()).await.unwrap();

    config.tls = basphere_vsphere::TlsConfig::default(); // system roots
    let err = VsphereProvider::connect(config).await.unwrap_err();
    assert!(
        matches!(err, Error::Certificate { .. }) && !err.is_retryable(),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca_file"), "{err}");
}

#[tokio::test]
async fn image_without_a_templates_entry_uses_image_ref_and_default_nic() {
    let (_sim, p) = setup(&[]).await;
    let mut vm = request("plain", 7);
    vm.image = "other-os".parse().unwrap();
    p.prepare(&vm).await.unwrap();
    p.remove(&vm).await.unwrap();
    // Without a template name there is nothing to clone: a permanent error saying what to add.
    vm.image_ref.clear();
    let err = p.prepare(&vm).await.unwrap_err();
    assert!(
        !err.retryable && err.message.contains("[vsphere.templates]"),
        "{err:?}"
    );
}

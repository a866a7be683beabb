//! The services over a real store on a temporary dir, with the engine driving the do-nothing
//! provider: the orchestration that used to live in the HTTP handlers.

use basphere_config::Config;
use basphere_core::{UserStatus, Username, VmStatus};
use basphere_engine::{Engine, EngineConfig};
use basphere_provider::NullProvider;
use basphere_service::{Actor, Principal, ServiceError, Services, UserDeletion};
use basphere_store::{NewRegistration, Store};
use basphere_vm_workflows::Catalog;
use basphere_wire::{CreateVmsRequest, ReasonRequest, RegisterRequest};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl t";

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    engine: Engine,
    services: Services,
    stop: Option<watch::Sender<bool>>,
}

impl World {
    /// A store on a temp dir and services over it; the engine runs only after [`World::run`].
    async fn new(provider_delay: Duration) -> Self {
        Self::with(provider_delay, &[]).await
    }

    /// [`World::new`] with config settings (`BASPHERE_*` keys) on top of the defaults.
    async fn with(provider_delay: Duration, settings: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = settings.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg = Arc::new(Config::load(None, env).unwrap());
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        let catalog = Catalog {
            pool: cfg.network.clone(),
            image_refs: cfg
                .images
                .keys()
                .map(|n| (n.to_string(), n.to_string()))
                .collect(),
            networks: Default::default(),
        };
        let tuning = EngineConfig {
            node_id: "test".into(),
            ..EngineConfig::default()
        };
        let engine = Engine::new(store.clone(), tuning.clone());
        let provider = Arc::new(NullProvider::new(provider_delay));
        basphere_vm_workflows::register(&engine, provider.clone(), catalog, &tuning);
        let services = Services::new(store.clone(), engine.clone(), provider, cfg, None);
        Self {
            _dir: dir,
            store,
            engine,
            services,
            stop: None,
        }
    }

    fn run(&mut self) {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(self.engine.clone().run(rx));
        self.stop = Some(tx);
    }

    fn admin() -> Actor {
        Actor::new("root", "test")
    }

    /// An active user `name` (registered and approved through the services).
    async fn user(&self, name: &str) -> Principal {
        let u: Username = name.parse().unwrap();
        self.store
            .register(
                &NewRegistration {
                    username: u.clone(),
                    email: "a@b.org".parse().unwrap(),
                    team: "t".parse().unwrap(),
                    public_key: KEY.parse().unwrap(),
                },
                &self.services.config().quota,
                &Self::admin(),
            )
            .await
            .unwrap();
        self.services.approve(&Self::admin(), &u).await.unwrap();
        Principal {
            user: self.store.user(name).await.unwrap().unwrap(),
            admin: false,
            actor: Actor::new(name, "test"),
        }
    }

    async fn create(&self, me: &Principal, name: &str, count: i64) {
        let req = CreateVmsRequest {
            name: Some(name.into()),
            count: Some(count),
            ..Default::default()
        };
        self.services.create_vms(me, &req).await.unwrap();
    }

    /// Waits until every VM of `owner` has `status` (or, with `None`, until none is left).
    async fn wait_vms(&self, owner: &str, status: Option<VmStatus>) {
        for _ in 0..200 {
            let vms = self.store.vms(Some(owner)).await.unwrap();
            let done = match status {
                Some(s) => !vms.is_empty() && vms.iter().all(|v| v.status == s),
                None => vms.is_empty(),
            };
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "VMs of {owner} did not reach {status:?}: {:?}",
            self.store.vms(Some(owner)).await.unwrap()
        );
    }

    async fn status(&self, name: &str) -> Option<UserStatus> {
        self.store.user(name).await.unwrap().map(|u| u.status)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            let _ = s.send(true);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_with_a_vm_being_created_changes_nothing_and_names_it() {
    // The engine is not running: the VMs stay `creating`.
    let w = World::new(Duration::ZERO).await;
    let bob = w.user("bob").await;
    w.create(&bob, "web", 2).await;
    let u: Username = "bob".parse().unwrap();
    let e = w
        .services
        .delete_user(&World::admin(), &u, false)
        .await
        .expect_err("refused while VMs are being created");
    let ServiceError::Conflict(msg) = e else {
        panic!("a conflict, got {e:?}");
    };
    assert!(
        msg.contains("web-1") && msg.contains("web-2") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(
        w.status("bob").await,
        Some(UserStatus::Active),
        "not disabled"
    );
    let vms = w.store.vms(Some("bob")).await.unwrap();
    assert!(
        vms.iter().all(|v| v.status == VmStatus::Creating),
        "{vms:?}"
    );
    let ops = w.store.workflows(Some("bob"), 10).await.unwrap();
    assert_eq!(ops.len(), 2, "no delete was started: {ops:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_deletes_every_vm_first_then_the_account() {
    let mut w = World::new(Duration::from_millis(200)).await;
    w.run();
    let bob = w.user("bob").await;
    w.create(&bob, "web", 2).await;
    w.wait_vms("bob", Some(VmStatus::Running)).await;
    let u: Username = "bob".parse().unwrap();

    let UserDeletion::VmsDeleting(first) = w
        .services
        .delete_user(&World::admin(), &u, true)
        .await
        .unwrap()
    else {
        panic!("the VMs go first");
    };
    assert_eq!(first.data.remaining_vms, 2);
    assert_eq!(first.data.operations.len(), 2);
    assert!(first.data.refused.is_empty(), "{:?}", first.data.refused);
    assert_eq!(w.status("bob").await, Some(UserStatus::Disabled));

    // Called again while the deletes run: the deletes under way are reported, not dropped.
    let UserDeletion::VmsDeleting(again) = w
        .services
        .delete_user(&World::admin(), &u, true)
        .await
        .unwrap()
    else {
        panic!("the VMs are still being deleted");
    };
    let ids = |d: &basphere_wire::UserVmsDeleting| {
        let mut v: Vec<String> = d
            .operations
            .iter()
            .map(|o| o.operation_id.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(&again.data), ids(&first.data), "the same two deletes");
    assert!(again.data.refused.is_empty());

    w.wait_vms("bob", None).await;
    let UserDeletion::Deleted(done) = w
        .services
        .delete_user(&World::admin(), &u, true)
        .await
        .unwrap()
    else {
        panic!("no VMs left: the user goes");
    };
    assert_eq!(done.message, "user bob purged");
    assert_eq!(w.status("bob").await, None);
    assert!(w.store.registrations(Some("bob")).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_are_never_deleted() {
    let w = World::new(Duration::ZERO).await;
    let admin = &w.services.config().server.admin;
    w.store
        .ensure_admin(
            admin,
            &w.services.config().quota,
            &w.services.config().network,
        )
        .await
        .unwrap();
    let e = w
        .services
        .delete_user(&World::admin(), admin, false)
        .await
        .unwrap_err();
    assert!(matches!(e, ServiceError::Conflict(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_registration_field_is_reported_in_field_order() {
    let w = World::new(Duration::ZERO).await;
    let body = json!({"username": "X", "email": 5, "team": "\u{7}", "public_key": "x"});
    let req = RegisterRequest::read(body.as_object().unwrap());
    let e = w
        .services
        .register(&World::admin(), None, &req)
        .await
        .unwrap_err();
    let ServiceError::Invalid(f) = e else {
        panic!("invalid input, got {e:?}");
    };
    let fields: Vec<&str> = f.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["username", "email", "team", "public_key"]);
    assert_eq!(f.0[1].message, "must be a string");
    assert!(w.store.registrations(Some("X")).await.unwrap().is_empty());
    // Team is optional (the prototype's rule): without it, only the other fields are wrong.
    let body = json!({"username": "X", "email": 5, "public_key": "x"});
    let req = RegisterRequest::read(body.as_object().unwrap());
    let e = w
        .services
        .register(&World::admin(), None, &req)
        .await
        .unwrap_err();
    let ServiceError::Invalid(f) = e else {
        panic!("invalid input, got {e:?}");
    };
    let fields: Vec<&str> = f.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["username", "email", "public_key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_caller_registers_only_their_own_name() {
    let w = World::new(Duration::ZERO).await;
    let req = RegisterRequest {
        username: Some("carol".into()),
        email: Some("c@b.org".into()),
        team: Some("t".into()),
        public_key: Some(KEY.into()),
        ..Default::default()
    };
    let e = w
        .services
        .register(&Actor::new("dave", "unix:uid=1"), Some("dave"), &req)
        .await
        .unwrap_err();
    assert!(matches!(e, ServiceError::Forbidden(_)), "{e:?}");
    let ok = w
        .services
        .register(&Actor::new("carol", "unix:uid=2"), Some("carol"), &req)
        .await
        .unwrap();
    assert_eq!(ok.data.username, "carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_without_unix_accounts_gives_a_one_time_code() {
    let w = World::new(Duration::ZERO).await;
    let bob = w.user("bob").await;
    assert_eq!(bob.user.status, UserStatus::Active);
    // Approving again is refused (a bad request, as the prototype answers): bob is no
    // longer pending.
    let e = w
        .services
        .approve(&World::admin(), &bob.user.username)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ServiceError::BadRequest(ref m) if m.contains("not pending")),
        "{e:?}"
    );
    // A rejection reason of the wrong type is reported, and nothing is rejected.
    let body = json!({"reason": 7});
    let e = w
        .services
        .reject(
            &World::admin(),
            &bob.user.username,
            &ReasonRequest::read(body.as_object().unwrap()),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ServiceError::Invalid(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_refusals_carry_the_limit() {
    let w = World::new(Duration::ZERO).await;
    let bob = w.user("bob").await;
    let q = basphere_wire::QuotaRequest {
        max_vms: Some(1),
        ..Default::default()
    };
    w.services
        .set_quota(&World::admin(), &bob.user.username, &q)
        .await
        .unwrap();
    let req = CreateVmsRequest {
        name: Some("web".into()),
        count: Some(2),
        ..Default::default()
    };
    let e = w.services.create_vms(&bob, &req).await.unwrap_err();
    assert!(
        matches!(e, ServiceError::Quota(ref q) if q.max == 1),
        "{e:?}"
    );
    assert!(w.store.vms(Some("bob")).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_their_owners_and_admins_only() {
    let w = World::new(Duration::ZERO).await;
    let bob = w.user("bob").await;
    let carol = w.user("carol").await;
    w.create(&bob, "web", 1).await;
    let id = w.store.workflows(Some("bob"), 1).await.unwrap()[0]
        .id
        .clone();
    let e = w.services.operation(&carol, &id).await.unwrap_err();
    assert!(matches!(e, ServiceError::NotFound(_)), "{e:?}");
    let e = w.services.cancel(&carol, &id).await.unwrap_err();
    assert!(matches!(e, ServiceError::NotFound(_)), "{e:?}");
    let admin = Principal {
        admin: true,
        ..carol.clone()
    };
    assert_eq!(
        w.services.operation(&admin, &id).await.unwrap().owner,
        "bob"
    );
    let d = w.services.cancel(&bob, &id).await.unwrap();
    assert!(
        d.message.starts_with(&format!("cancelling {id}")),
        "{}",
        d.message
    );
    assert_eq!(d.data.expect("the operation").id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_in_pages_with_the_key_of_the_next() {
    let w = World::new(Duration::ZERO).await;
    let bob = w.user("bob").await;
    w.create(&bob, "web", 3).await;
    let page = |limit, after: Option<String>| basphere_service::Paging {
        limit: Some(limit),
        after,
    };
    let first = w.services.vms(Some("bob"), &page(2, None)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let next = first.next_after.clone().expect("more follow");
    assert_eq!(next, first.items[1].id);
    let second = w
        .services
        .vms(Some("bob"), &page(2, Some(next)))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(
        second.next_after, None,
        "the last page says nothing follows"
    );
    let e = w.services.vms(None, &page(0, None)).await.unwrap_err();
    assert!(matches!(e, ServiceError::BadRequest(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_stream_holds_every_vm_once_in_order_across_chunks() {
    let w = World::with(
        Duration::ZERO,
        &[
            ("BASPHERE_NETWORK__CIDR", "10.200.0.0/16"),
            ("BASPHERE_NETWORK__GATEWAY", "10.200.0.1"),
        ],
    )
    .await;
    // 1,010 VMs (a chunk holds 1,000), 10 per owner, admitted straight into the store.
    let cfg = w.services.config().clone();
    let spec = cfg.specs[&"tiny".parse().unwrap()];
    for i in 0..101 {
        let owner = w.user(&format!("u{i:03}")).await.user.username;
        let names = (0..10).map(|j| format!("vm{j}").parse().unwrap()).collect();
        let req = basphere_store::AdmitRequest {
            owner,
            names,
            os: "debian-12".parse().unwrap(),
            login_user: "debian".into(),
            spec_name: "tiny".parse().unwrap(),
            spec,
            provider: "null".into(),
            steps: vec![],
        };
        w.store
            .admit_vms(&req, &cfg.network, &World::admin())
            .await
            .unwrap();
    }
    let drain = |order, owner: Option<&str>, after: Option<&str>| {
        let rx = w
            .services
            .vm_stream(owner.map(str::to_string), order, after.map(str::to_string));
        async move {
            let mut rx = rx.unwrap();
            let mut chunks = vec![];
            while let Some(c) = rx.recv().await {
                chunks.push(c.unwrap());
            }
            chunks
        }
    };
    let key = |v: &basphere_wire::Vm| format!("{}/{}", v.owner, v.name);
    let chunks = drain(basphere_service::VmOrder::Name, None, None).await;
    assert_eq!(
        chunks.iter().map(Vec::len).collect::<Vec<_>>(),
        [1000, 10],
        "chunks of the most a page holds"
    );
    let got: Vec<String> = chunks.iter().flatten().map(key).collect();
    let mut want: Vec<String> = (0..101)
        .flat_map(|i| (0..10).map(move |j| format!("u{i:03}/vm{j}")))
        .collect();
    want.sort();
    assert_eq!(got, want, "every VM once, by owner and name");

    // From a key on, and in creation order for one owner (what a page of it shows).
    let rest = drain(basphere_service::VmOrder::Name, None, Some("u099/vm4")).await;
    let rest: Vec<String> = rest.iter().flatten().map(key).collect();
    assert_eq!(rest, want[want.len() - 15..]);
    let created = drain(basphere_service::VmOrder::Created, Some("u042"), None).await;
    let page = w
        .services
        .vms(
            Some("u042"),
            &basphere_service::Paging {
                limit: Some(1000),
                after: None,
            },
        )
        .await
        .unwrap();
    let ids = |vms: &[basphere_wire::Vm]| vms.iter().map(|v| v.id.clone()).collect::<Vec<_>>();
    assert_eq!(created.len(), 1);
    assert_eq!(ids(&created[0]), ids(&page.items));
    assert_eq!(page.items.len(), 10);

    // A bad key is refused before anything is read.
    let e = w
        .services
        .vm_stream(None, basphere_service::VmOrder::Name, Some("nosep".into()))
        .unwrap_err();
    assert!(matches!(e, ServiceError::BadRequest(_)), "{e:?}");
}

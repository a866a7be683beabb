//! The composition root end to end: an `App` built from a config serves the API and the portal
//! behind one `Host` check, runs its engine through the given provider, keeps its node id
//! across restarts, and shuts down with its listeners closed and its store closed.

use basphere_api::{Listeners, ServeOptions};
use basphere_app::{App, Overrides};
use basphere_client::{Client, Endpoint};
use basphere_config::Config;
use basphere_provider::NullProvider;
use basphere_store::Actor;
use serde_json::json;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl app";

fn config(dir: &Path) -> Arc<Config> {
    let env = [
        ("BASPHERE_DATA_DIR", dir.display().to_string()),
        ("BASPHERE_SERVER__SOCKET", "\"\"".into()),
        ("BASPHERE_SERVER__LISTEN", "\"\"".into()),
        ("BASPHERE_PROVIDER__KIND", "null".into()),
    ];
    Arc::new(Config::load(None, env.map(|(k, v)| (k.to_string(), v))).unwrap())
}

async fn tcp() -> (Listeners, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (
        Listeners {
            unix: None,
            tcp: Some(l),
        },
        addr,
    )
}

/// The status code of `GET /` sent with `Host: host`.
fn status_of_root(addr: SocketAddr, host: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_api_portal_and_engine_then_shuts_down() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let provider = Arc::new(NullProvider::default());
    let app = App::build(cfg.clone(), Overrides::with_provider(provider.clone()))
        .await
        .unwrap();
    let store = app.store().clone();
    assert!(
        store
            .user(cfg.server.admin.as_str())
            .await
            .unwrap()
            .is_some(),
        "the admin account exists once built"
    );
    let sys = Actor::new("test", "test");
    let (_, admin_token) = store
        .create_token(&cfg.server.admin, "test", None, &sys)
        .await
        .unwrap();

    let (listeners, addr) = tcp().await;
    let running = app.serve(listeners, ServeOptions::from_config(&cfg.server).unwrap());
    let client = |token: String| {
        Client::new(Endpoint::Tcp {
            addr: addr.to_string(),
            token: Some(token),
        })
    };
    let added = client(admin_token)
        .post(
            "/api/v1/users",
            &json!({"username": "alice", "email": "alice@example.org", "team": "app", "public_key": KEY}),
        )
        .await
        .unwrap();
    assert!(added.body.success, "{:?}", added.body);
    let alice: basphere_core::Username = "alice".parse().unwrap();
    let c = client(
        store
            .create_token(&alice, "test", None, &sys)
            .await
            .unwrap()
            .1,
    );
    let me = c.get("/api/v1/me").await.unwrap();
    assert!(me.body.success, "{:?}", me.body);
    assert_eq!(me.body.data["user"]["username"], "alice");

    // The portal is merged beside the API, and the Host check covers both.
    assert_eq!(status_of_root(addr, "127.0.0.1"), 200);
    assert_eq!(status_of_root(addr, "evil.example"), 421);

    // The engine runs, through the provider given.
    let r = c
        .post("/api/v1/vms", &json!({"name": "web", "spec": "tiny"}))
        .await
        .unwrap();
    assert!(r.body.success, "{:?}", r.body);
    let id = r.body.data["vms"][0]["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    while !provider
        .calls()
        .iter()
        .any(|call| call.instance == id && call.phase == "start")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the provider never started {id}: {:?}",
            provider.calls()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    running.shutdown().await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed after shutdown"
    );
    assert!(
        store.user("alice").await.is_err(),
        "the store is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_is_kept_across_restarts_unless_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let first = App::build(cfg.clone(), Overrides::default()).await.unwrap();
    let id = first.engine().config().node_id.clone();
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("node-id")).unwrap(),
        id
    );
    let (l, _) = tcp().await;
    first.serve(l, ServeOptions::default()).shutdown().await;

    let again = App::build(cfg.clone(), Overrides::default()).await.unwrap();
    assert_eq!(
        again.engine().config().node_id,
        id,
        "a restart is the same node"
    );
    assert_eq!(again.provider().kind(), "null", "provider.kind decides");
    let (l, _) = tcp().await;
    again.serve(l, ServeOptions::default()).shutdown().await;

    let other = App::build(
        cfg,
        Overrides {
            node_id: Some("replica-2".into()),
            ..Overrides::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(other.engine().config().node_id, "replica-2");
    let (l, _) = tcp().await;
    other.serve(l, ServeOptions::default()).shutdown().await;
}

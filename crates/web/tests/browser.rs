//! The portal in real headless Chromium: an in-process server built as `basphere serve` builds
//! it (`basphere_app::App`: store on a temp dir, engine with the do-nothing test provider
//! `NullProvider`, API + portal routers on 127.0.0.1:0), driven by
//! `e2e/portal.mjs` (playwright-core + Debian's /usr/bin/chromium). Screenshots of every page at
//! desktop and phone width land in `target/web-screenshots/`.
//!
//! Needs `crates/web/install-deps.sh` (run by `scripts/install-deps`); fails, never skips,
//! when node, chromium or playwright-core is missing.

use basphere_api::{Caller, Listeners, ServeOptions};
use basphere_app::{App, Overrides};
use basphere_config::Config;
use basphere_provider::NullProvider;
use basphere_store::{Actor, NewRegistration};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

const BASTION: &str = "bastion.example.org";

fn prerequisites(e2e: &Path) -> Vec<String> {
    let mut missing = vec![];
    let on_path = |c: &str| {
        std::process::Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !on_path("node") {
        missing.push("node (Debian package nodejs)".to_string());
    }
    if !Path::new("/usr/bin/chromium").exists() {
        missing.push("/usr/bin/chromium (Debian package chromium)".to_string());
    }
    if !e2e
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(format!("playwright-core in {}/node_modules", e2e.display()));
    }
    missing
}

fn screenshot_dir(manifest: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"));
    let target = if target.is_absolute() {
        target
    } else {
        manifest.join("../..").join(target)
    };
    target.join("web-screenshots")
}

fn config(dir: &Path) -> Config {
    let env = vec![
        ("BASPHERE_DATA_DIR".to_string(), dir.display().to_string()),
        ("BASPHERE_SERVER__SOCKET".into(), "\"\"".into()),
        ("BASPHERE_SERVER__LISTEN".into(), "\"\"".into()),
        ("BASPHERE_PROVIDER__KIND".into(), "null".into()),
        ("BASPHERE_BASTION__HOST".into(), BASTION.into()),
        // The browser posts many forms in a few seconds; rate limits have their own tests.
        ("BASPHERE_LIMITS__ANON_BURST".into(), "0".into()),
    ];
    Config::load(None, env).expect("test config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_in_chromium() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let e2e = manifest.join("e2e");
    let missing = prerequisites(&e2e);
    assert!(
        missing.is_empty(),
        "the browser test needs: {}.\nInstall them as root with: crates/web/install-deps.sh \
         (apt-get install chromium; npm ci in crates/web/e2e), or scripts/install-deps",
        missing.join(", ")
    );

    let tmp = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(tmp.path()));
    // Each provider phase takes a while, so that the page can show the steps moving.
    let app = App::build(
        cfg.clone(),
        Overrides::with_provider(Arc::new(NullProvider::new(Duration::from_millis(1500)))),
    )
    .await
    .unwrap();
    let store = app.store().clone();
    let state = app.state().clone();
    let sys = Actor::new("test", "test");
    let (_, admin_token) = store
        .create_token(&cfg.server.admin, "test", None, &sys)
        .await
        .unwrap();

    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let server = app.serve(
        Listeners {
            unix: None,
            tcp: Some(tcp),
        },
        ServeOptions::from_config(&cfg.server).unwrap(),
    );

    // Another user, carol, with a VM that dora must not see.
    let carol: basphere_core::Username = "carol".parse().unwrap();
    store
        .register(
            &NewRegistration {
                username: carol.clone(),
                email: "carol@example.org".parse().unwrap(),
                team: "search".parse().unwrap(),
                public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl carol"
                    .parse()
                    .unwrap(),
            },
            &cfg.quota,
            &sys,
        )
        .await
        .unwrap();
    store
        .approve(&carol, &cfg.network, false, None, &sys)
        .await
        .unwrap();
    let carol_caller = Caller {
        user: store.user("carol").await.unwrap(),
        name: "carol".into(),
        source: "test".into(),
        local: false,
        unidentified: None,
    };
    let mut body = serde_json::Map::new();
    body.insert("name".into(), "carol-db".into());
    basphere_api::routes::vms::create(
        axum::extract::State(state.clone()),
        carol_caller,
        basphere_api::Body(body),
    )
    .await
    .map_err(|e| e.message)
    .expect("carol's VM admitted");

    let shots = screenshot_dir(&manifest);
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let run = tokio::process::Command::new("node")
        .arg(e2e.join("portal.mjs"))
        .current_dir(&e2e)
        .env("BASE_URL", format!("http://{addr}"))
        .env("ADMIN_TOKEN", &admin_token)
        .env("OTHER_VM", "carol-db")
        .env("BASTION_HOST", BASTION)
        .env("SHOT_DIR", &shots)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("browser test finished within 300 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    println!("screenshots: {}", shots.display());
    assert!(
        out.status.success(),
        "browser test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // What the browser did, as the store saw it.
    assert!(
        store
            .registrations(Some("dora-bad"))
            .await
            .unwrap()
            .is_empty(),
        "a refused registration stored nothing"
    );
    assert!(store.user("dora-bad").await.unwrap().is_none());
    let dora = store.user("dora").await.unwrap().expect("dora registered");
    assert_eq!(dora.status, basphere_core::UserStatus::Active);
    assert_eq!(dora.quota.max_vms, 5, "quota edited in the browser");
    assert!(
        store.vms(Some("dora")).await.unwrap().is_empty(),
        "dora's VM was deleted"
    );
    let audit = store
        .audit_list(&basphere_store::AuditFilter {
            actor: Some("dora".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        audit.iter().all(|a| a.target != "nocsrf"),
        "the CSRF-less form created nothing"
    );
    assert!(
        audit.iter().any(|a| a.source.starts_with("web:tcp:")),
        "web actions are audited with their source"
    );

    server.shutdown().await;
}

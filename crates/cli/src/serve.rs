//! `basphere init` and `basphere serve`.

use anyhow::{Context, bail};
use basphere_api::{AppState, Listeners, UnixAccounts};
use basphere_config::{Config, DEFAULT_TOML};
use basphere_engine::{Catalog, Engine, EngineConfig};
use basphere_store::{Actor, Store};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default place of the config file.
pub const DEFAULT_CONFIG: &str = "/etc/basphere/basphere.toml";

/// The config path in effect: `--config`, else the default if it exists.
pub fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    match flag {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
    }
}

pub fn load_config(flag: Option<&Path>) -> anyhow::Result<Config> {
    let path = config_path(flag);
    Ok(Config::load(path.as_deref(), std::env::vars())?)
}

/// Writes the config (if missing), makes the data dir, database and first admin token.
pub async fn init(flag: Option<&Path>, force: bool) -> anyhow::Result<()> {
    crate::modes::private_umask();
    let path = flag
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    if !path.exists() || force {
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Readable configuration (it holds no secrets) for the CLI of every bastion user.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(&path, DEFAULT_TOML)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    } else {
        println!("keeping existing {}", path.display());
    }
    let cfg = Config::load(Some(&path), std::env::vars())?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    // Only root enters: the socket lives under /run/basphere, tokens of users in their homes.
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))?;
    let store = Store::open(&cfg.db_path()).await?;
    store
        .ensure_admin(&cfg.server.admin, &cfg.quota, &cfg.network)
        .await?;
    give_admin_a_key(&store, &cfg).await?;
    let token_path = cfg.admin_token_path();
    if !token_path.exists() {
        let (_, secret) = store
            .create_token(
                &cfg.server.admin,
                "init",
                None,
                &Actor::new("basphere", "init"),
            )
            .await?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_path)
            .with_context(|| format!("writing {}", token_path.display()))?;
        writeln!(f, "{secret}")?;
        println!(
            "admin token written to {} (mode 0600)",
            token_path.display()
        );
    }
    store.close().await;
    println!("data dir {} ready", cfg.data_dir.display());
    Ok(())
}

/// The admin's VMs need an SSH key: use the invoking user's `~/.ssh/id_ed25519.pub`, making one
/// with ssh-keygen when there is none, so `basphere ssh` works for the admin out of the box.
async fn give_admin_a_key(store: &Store, cfg: &Config) -> anyhow::Result<()> {
    let admin = store
        .user(cfg.server.admin.as_str())
        .await?
        .context("the admin account is missing")?;
    if !admin.public_key.is_empty() {
        return Ok(());
    }
    let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return Ok(());
    };
    let private = home.join(".ssh/id_ed25519");
    let public = home.join(".ssh/id_ed25519.pub");
    if !public.exists() {
        std::fs::create_dir_all(home.join(".ssh"))?;
        let st = std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "basphere-admin",
                "-f",
            ])
            .arg(&private)
            .status()
            .context("running ssh-keygen (apt-get install openssh-client)")?;
        anyhow::ensure!(st.success(), "ssh-keygen failed");
        println!("made an SSH key for the admin: {}", public.display());
    }
    let key: basphere_core::SshPublicKey = std::fs::read_to_string(&public)?
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", public.display()))?;
    let actor = Actor::new("basphere", "init");
    store
        .request_key_change(&cfg.server.admin, &key, &actor)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    store
        .decide_key_change(&cfg.server.admin, true, None, &actor)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("admin's VMs get the SSH key {}", public.display());
    Ok(())
}

/// A stable id for this data dir's server, so a restart reclaims its own leases at once.
fn node_id(data_dir: &Path) -> anyhow::Result<String> {
    let p = data_dir.join("node-id");
    if let Ok(s) = std::fs::read_to_string(&p) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let id = format!("node-{}", &uuid_like()[..12]);
    std::fs::write(&p, &id)?;
    Ok(id)
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .ok();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the server until SIGTERM/SIGINT.
pub async fn serve(flag: Option<&Path>) -> anyhow::Result<()> {
    crate::modes::private_umask();
    let cfg = Arc::new(load_config(flag)?);
    crate::modes::socket_dir(&cfg.server.socket)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    crate::modes::repair_install(&cfg)?;
    // One server per data dir: the node id (and its leases) must not be shared.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.data_dir.join("serve.lock"))?;
    let _lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err(_) => bail!(
                "another basphere server already runs on data dir {}",
                cfg.data_dir.display()
            ),
        };
    let store = Store::open(&cfg.db_path()).await?;
    store
        .ensure_admin(&cfg.server.admin, &cfg.quota, &cfg.network)
        .await?;
    let provider = crate::providers::build(&cfg).await?;
    let engine_cfg = EngineConfig {
        node_id: node_id(&cfg.data_dir)?,
        lease: Duration::from_secs(cfg.engine.lease_secs.max(3)),
        max_parallel: cfg.engine.max_parallel,
        max_attempts: cfg.engine.max_attempts,
        ready_deadline: Duration::from_secs(cfg.engine.ready_timeout_secs),
        limits: basphere_store::ClaimLimits {
            per_user: cfg.engine.max_per_user,
            per_provider: cfg.engine.max_per_provider,
            per_host: cfg.engine.max_per_host,
        },
        ..EngineConfig::default()
    };
    let catalog = Catalog {
        pool: cfg.network.clone(),
        image_refs: cfg
            .images
            .iter()
            .map(|(n, i)| {
                (
                    n.to_string(),
                    i.provider_ref.clone().unwrap_or_else(|| n.to_string()),
                )
            })
            .collect(),
    };
    let engine = Engine::new(store.clone(), provider.clone(), catalog, engine_cfg);
    let accounts = cfg.bastion.manage_accounts.then(|| UnixAccounts {
        group: cfg.bastion.group.clone(),
    });
    let listeners = Listeners::bind(&cfg)
        .await
        .context("binding the server's sockets")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let engine_task = tokio::spawn(engine.clone().run(rx.clone()));
    let state = AppState {
        store: store.clone(),
        engine,
        config: cfg.clone(),
        accounts,
    };
    tracing::info!(
        socket = %cfg.server.socket.display(),
        listen = %cfg.server.listen,
        provider = provider.kind(),
        "basphere serving"
    );
    eprintln!(
        "basphere {} serving: socket {} tcp {} provider {}",
        env!("CARGO_PKG_VERSION"),
        cfg.server.socket.display(),
        if cfg.server.listen.is_empty() {
            "off"
        } else {
            &cfg.server.listen
        },
        provider.kind()
    );
    let app = basphere_api::router(state.clone()).merge(basphere_web::router(state));
    let server = tokio::spawn(basphere_api::serve(app, listeners, rx));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("basphere: shutting down");
    let _ = tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), engine_task).await;
    store.close().await;
    Ok(())
}

use crate::accounts::UnixAccounts;
use crate::auth::PeerInfo;
use crate::input::MAX_BODY;
use crate::routes;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use basphere_config::Config;
use basphere_engine::Engine;
use basphere_store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub engine: Engine,
    pub config: Arc<Config>,
    /// Present when Basphere manages Unix accounts on this bastion.
    pub accounts: Option<UnixAccounts>,
}

/// The sockets the server answers on.
pub struct Listeners {
    pub unix: Option<(UnixListener, PathBuf)>,
    pub tcp: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured Unix socket (mode 0666: the kernel authenticates callers) and TCP
    /// address. A stale socket file left by a crash is replaced.
    pub async fn bind(cfg: &Config) -> std::io::Result<Self> {
        let unix = if cfg.server.socket.as_os_str().is_empty() {
            None
        } else {
            let path = cfg.server.socket.clone();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("another basphere server answers on {}", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
            }
            let l = UnixListener::bind(&path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
            Some((l, path))
        };
        let tcp = if cfg.server.listen.is_empty() {
            None
        } else {
            Some(TcpListener::bind(&cfg.server.listen).await?)
        };
        Ok(Self { unix, tcp })
    }
}

/// All routes with their limits.
pub fn router(state: AppState) -> Router {
    routes::all()
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves `app` (the API router, plus whatever is merged beside it) until `shutdown` turns true.
pub async fn serve(
    app: Router,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    if let Some((l, path)) = listeners.unix {
        let app = app.clone();
        let mut sd = shutdown.clone();
        tasks.spawn(async move {
            let r = axum::serve(l, app.into_make_service_with_connect_info::<PeerInfo>())
                .with_graceful_shutdown(async move {
                    let _ = sd.wait_for(|s| *s).await;
                })
                .await;
            let _ = std::fs::remove_file(&path);
            r
        });
    }
    if let Some(l) = listeners.tcp {
        let mut sd = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(l, app.into_make_service_with_connect_info::<PeerInfo>())
                .with_graceful_shutdown(async move {
                    let _ = sd.wait_for(|s| *s).await;
                })
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(std::io::Error::other)??;
    }
    Ok(())
}

//! The composition root: from one [`Config`], the store, the provider, the engine, the
//! application [`Services`] in the handlers' [`AppState`] and the merged, hardened router,
//! served and shut down in one order.
//!
//! Invariant: this is the only place that wires these parts together. `basphere serve`, the
//! benches and the tests build their server here, so what they run is what production runs;
//! a test changes only what [`Overrides`] (or the config) lets it change.

pub mod alloc;
pub mod doctor;
pub mod metrics;
pub mod providers;

use axum::Router;
use basphere_api::{AppState, Listeners, ServeOptions, Services, UnixAccounts};
use basphere_config::Config;
use basphere_engine::{Engine, EngineConfig};
use basphere_provider::Provider;
use basphere_store::{ClaimLimits, Location, Store};
use basphere_vm_workflows::Catalog;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a shutdown waits for open requests to finish, then for the engine's steps.
const SERVER_GRACE: Duration = Duration::from_secs(10);
const ENGINE_GRACE: Duration = Duration::from_secs(5);

/// What a test or bench sets that the config does not say; the default changes nothing.
#[derive(Default, Clone)]
pub struct Overrides {
    /// This provider instead of the one `provider.kind` names (e.g. a slow `NullProvider`, or
    /// one whose calls a bench reads).
    pub provider: Option<Arc<dyn Provider>>,
    /// This node id instead of the one stored in the data dir's `node-id` file.
    pub node_id: Option<String>,
}

impl Overrides {
    /// Only the provider overridden.
    pub fn with_provider(p: Arc<dyn Provider>) -> Self {
        Self {
            provider: Some(p),
            ..Self::default()
        }
    }
}

/// Engine tuning from `[engine]` for the node `node_id`; what the config has no key for
/// (backoff, the deadline of steps other than `wait_ready`) keeps the engine's default.
pub fn engine_config(cfg: &Config, node_id: String) -> EngineConfig {
    let e = &cfg.engine;
    EngineConfig {
        node_id,
        lease: Duration::from_secs(e.lease_secs.max(3)),
        max_parallel: e.max_parallel,
        max_attempts: e.max_attempts,
        ready_deadline: Duration::from_secs(e.ready_timeout_secs),
        fuse_window: Duration::from_millis(e.fuse_window_ms),
        limits: ClaimLimits {
            per_user: e.max_per_user,
            per_provider: e.max_per_provider,
            per_host: e.max_per_host,
        },
        ..EngineConfig::default()
    }
}

/// The network pool and each image's provider reference (its `provider_ref`, else its name).
pub fn catalog(cfg: &Config) -> Catalog {
    Catalog {
        pool: cfg.network.clone(),
        image_refs: cfg
            .images
            .iter()
            .map(|(n, i)| {
                let name = n.to_string();
                (name.clone(), i.provider_ref.clone().unwrap_or(name))
            })
            .collect(),
        networks: cfg
            .networks
            .iter()
            .map(|(n, d)| {
                let net = basphere_vm_workflows::CatalogNetwork {
                    prefix_len: d.cidr.prefix_len(),
                    gateway: d.gateway,
                    bridge: d.bridge.clone(),
                    port_group: d.port_group.clone(),
                };
                (n.clone(), net)
            })
            .collect(),
    }
}

/// Opens the database `[database] url` names (PostgreSQL), else the embedded SQLite file in
/// the data dir, applying pending migrations.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let location = database(cfg);
    location.open().await.map_err(|e| match location {
        Location::Postgres(_) => anyhow::anyhow!("opening the database at [database] url: {e}"),
        Location::Sqlite(_) => e.into(),
    })
}

/// Where `cfg`'s database lives: `[database] url`, else the SQLite file in the data dir.
pub fn database(cfg: &Config) -> Location {
    match &cfg.database.url {
        Some(url) => Location::Postgres(url.clone()),
        None => Location::Sqlite(cfg.db_path()),
    }
}

/// An engine over `store` with the VM workflows registered, driving `provider` with `cfg`'s
/// catalog and the given tuning (usually [`engine_config`]); not yet running.
pub fn engine(
    store: &Store,
    provider: Arc<dyn Provider>,
    cfg: &Config,
    tuning: EngineConfig,
) -> Engine {
    let engine = Engine::new(store.clone(), tuning);
    let tuning = engine.config().clone();
    basphere_vm_workflows::register(&engine, provider, catalog(cfg), &tuning);
    engine
}

/// A server built from a config and not yet serving: its store is open (with the admin
/// account), its provider ready and its engine registered, so definitions can still be added
/// (`app.engine().register(…)`) before [`App::serve`].
pub struct App {
    state: AppState,
    provider: Arc<dyn Provider>,
    /// `[metrics] listen`, bound at build so a taken port stops the start.
    metrics: Option<tokio::net::TcpListener>,
}

impl App {
    /// Opens the store in `cfg.data_dir` (made if missing) and makes sure the admin account
    /// exists, builds the provider (unless overridden) and the engine.
    pub async fn build(cfg: Arc<Config>, o: Overrides) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("creating data dir {}: {e}", cfg.data_dir.display()))?;
        if !cfg.metrics.listen.is_empty() {
            // Before anything records (the engine's registrations set series to 0).
            metrics::recorder()?;
        }
        let store = open_store(&cfg).await?;
        store
            .ensure_admin(&cfg.server.admin, &cfg.quota, &cfg.network)
            .await?;
        let schema = store.schema_version().await?;
        let provider = match o.provider {
            Some(p) => p,
            None => providers::build(&cfg).await?,
        };
        // With metrics on, every provider call is timed and counted.
        let provider: Arc<dyn Provider> = if cfg.metrics.listen.is_empty() {
            provider
        } else {
            Arc::new(metrics::Metered(provider))
        };
        let node_id = match o.node_id {
            Some(id) => id,
            None => node_id(&cfg.data_dir)?,
        };
        let engine = engine(&store, provider.clone(), &cfg, engine_config(&cfg, node_id));
        let accounts = cfg.bastion.manage_accounts.then(|| UnixAccounts {
            group: cfg.bastion.group.clone(),
        });
        let state = AppState::new(store, engine, provider.clone(), cfg, accounts);
        state.services.readiness_state().expect_schema(schema);
        let metrics = match state.config.metrics.listen.as_str() {
            "" => None,
            listen => {
                metrics::build_info(state.store.backend(), provider.kind());
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("binding [metrics] listen = {listen:?}: {e}"))?;
                tracing::info!(listen, "metrics served at /metrics");
                Some(l)
            }
        };
        Ok(Self {
            state,
            provider,
            metrics,
        })
    }

    /// What every handler reaches (the services, and the store and engine for streams).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The application services the API and the portal call.
    pub fn services(&self) -> &Services {
        &self.state.services
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.state.config
    }

    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.provider
    }

    /// The API and the portal on one router, with the `Host` check and body limit over both.
    pub fn router(&self) -> Router {
        let app = basphere_api::router(self.state.clone())
            .merge(basphere_web::router(self.state.clone()));
        basphere_api::observe(basphere_api::limits::harden(app, &self.state.config))
    }

    /// Starts the engine, then serves [`App::router`] on `listeners` under `opts`, both until
    /// [`Running::shutdown`].
    pub fn serve(mut self, listeners: Listeners, opts: ServeOptions) -> Running {
        let (stop, rx) = watch::channel(false);
        let metrics = self.metrics.take().map(|l| {
            let app = metrics::router(self.state.store.clone(), self.state.config.clone());
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stopped).await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            })
        });
        let readiness = self.services().readiness_state().clone();
        let run = self.engine().clone().run(rx.clone());
        // Started before any request can ask; stopped when the loop ends, a panic included.
        readiness.engine_started();
        let stopped = EngineStopped(readiness);
        let engine = tokio::spawn(async move {
            let _stopped = stopped;
            run.await;
        });
        let server = tokio::spawn(basphere_api::serve_with(self.router(), listeners, opts, rx));
        Running {
            app: self,
            stop,
            engine,
            server,
            metrics,
        }
    }
}

/// Tells `/ready` the engine stopped when dropped with the engine's task.
struct EngineStopped(basphere_service::Readiness);

impl Drop for EngineStopped {
    fn drop(&mut self) {
        self.0.engine_stopped();
    }
}

/// A serving [`App`]. Dropping it without [`Running::shutdown`] stops serving too (the
/// listeners close when the shutdown channel does) but leaves the store open.
pub struct Running {
    app: App,
    stop: watch::Sender<bool>,
    engine: JoinHandle<()>,
    server: JoinHandle<std::io::Result<()>>,
    metrics: Option<JoinHandle<()>>,
}

impl Running {
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Stops accepting, lets open requests finish (at most 10 s), lets the engine's running
    /// steps end (at most 5 s), then closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(SERVER_GRACE, self.server).await;
        let _ = tokio::time::timeout(ENGINE_GRACE, self.engine).await;
        if let Some(m) = self.metrics {
            let _ = tokio::time::timeout(SERVER_GRACE, m).await;
        }
        self.app.state.store.close().await;
    }
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
    let id = format!("node-{}", &random_hex()[..12]);
    std::fs::write(&p, &id).map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?;
    Ok(id)
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .ok();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)]) -> Config {
        Config::load(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    }

    #[test]
    fn engine_tuning_comes_from_the_engine_section() {
        let cfg = config(&[
            ("BASPHERE_ENGINE__LEASE_SECS", "1"),
            ("BASPHERE_ENGINE__MAX_PARALLEL", "7"),
            ("BASPHERE_ENGINE__MAX_ATTEMPTS", "2"),
            ("BASPHERE_ENGINE__READY_TIMEOUT_SECS", "9"),
            ("BASPHERE_ENGINE__MAX_PER_USER", "4"),
        ]);
        let e = engine_config(&cfg, "n1".into());
        assert_eq!(e.node_id, "n1");
        assert_eq!(
            e.lease,
            Duration::from_secs(3),
            "a lease under 3 s is raised"
        );
        assert_eq!(e.max_parallel, 7);
        assert_eq!(e.max_attempts, 2);
        assert_eq!(e.ready_deadline, Duration::from_secs(9));
        assert_eq!(e.limits.per_user, Some(4));
        assert_eq!(e.limits.per_provider, None);
    }

    #[test]
    fn images_map_to_their_provider_reference() {
        let cfg = config(&[]);
        let c = catalog(&cfg);
        assert_eq!(c.pool, cfg.network);
        assert!(!cfg.images.is_empty());
        for (name, img) in &cfg.images {
            let want = img.provider_ref.clone().unwrap_or_else(|| name.to_string());
            assert_eq!(c.image_refs[name.as_str()], want);
        }
    }

    #[test]
    fn the_node_id_is_kept_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = node_id(dir.path()).unwrap();
        assert!(a.starts_with("node-") && a.len() == 17, "{a}");
        assert_eq!(node_id(dir.path()).unwrap(), a);
        assert_ne!(node_id(tempfile::tempdir().unwrap().path()).unwrap(), a);
    }
}

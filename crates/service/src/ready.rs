//! Readiness: whether this server can do its work now — the database reachable and at the
//! schema this server runs, the engine's loop running, the provider's own checks — as `/ready`
//! answers it and `basphere doctor` prints it. The checks are computed in one place,
//! [`Services::readiness`]; [`database_check`] also serves `doctor` when no server runs.

use crate::Services;
use basphere_provider::{Check, Provider};
use basphere_store::Store;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long a provider's checks may take before they count as failed.
const PROVIDER_DEADLINE: Duration = Duration::from_secs(15);
/// Answers within this age are reused: `/ready` needs no authentication, and a flood of it must
/// not become a flood of database reads and vCenter calls.
const REUSE: Duration = Duration::from_secs(2);

const NOT_STARTED: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

/// What the checks remember: the engine loop's state (told by whoever runs it), the schema
/// version this server opened the database at, and the last answer.
#[derive(Clone, Default)]
pub struct Readiness {
    engine: Arc<AtomicU8>,
    schema: Arc<OnceLock<i64>>,
    last: Arc<tokio::sync::Mutex<Option<Answer>>>,
}

/// The checks and when they were made.
type Answer = (Instant, Vec<Check>);

impl Readiness {
    /// The engine's loop started.
    pub fn engine_started(&self) {
        self.engine.store(RUNNING, Ordering::Relaxed);
    }

    /// The engine's loop ended (shutdown, or a panic).
    pub fn engine_stopped(&self) {
        self.engine.store(STOPPED, Ordering::Relaxed);
    }

    /// The schema version the store was migrated to when this server opened it.
    pub fn expect_schema(&self, version: i64) {
        let _ = self.schema.set(version);
    }

    fn engine_check(&self) -> Check {
        match self.engine.load(Ordering::Relaxed) {
            RUNNING => Check::ok("engine", "the workflow engine runs"),
            NOT_STARTED => Check::fail(
                "engine",
                "the workflow engine has not started",
                "wait for the server to finish starting; if it stays, read its log",
            ),
            _ => Check::fail(
                "engine",
                "the workflow engine stopped: workflows do not advance",
                "read the server's log for the engine's last error and restart basphere",
            ),
        }
    }
}

/// The database answers, and is at schema `expected` when given (a newer replica may have
/// migrated it past what this server knows).
pub async fn database_check(store: &Store, expected: Option<i64>) -> Check {
    let backend = store.backend();
    match store.schema_version().await {
        Ok(v) if expected.is_none_or(|e| e == v) => {
            Check::ok("database", format!("{backend}, schema version {v}"))
        }
        Ok(v) => Check::fail(
            "database",
            format!(
                "{backend} schema version is {v}, this server runs version {}",
                expected.unwrap_or_default()
            ),
            "run the same basphere version on every replica: upgrade this one and restart it",
        ),
        Err(e) => Check::fail(
            "database",
            format!("{backend} does not answer: {e}"),
            match backend {
                "postgres" => {
                    "check that PostgreSQL runs and accepts [database] url from this host"
                }
                _ => "check the data dir's disk (space, permissions) and restart basphere",
            },
        ),
    }
}

/// The provider's own checks, bounded by [`PROVIDER_DEADLINE`].
pub async fn provider_checks(provider: &dyn Provider) -> Vec<Check> {
    match tokio::time::timeout(PROVIDER_DEADLINE, provider.readiness()).await {
        Ok(checks) => checks,
        Err(_) => vec![Check::fail(
            "provider",
            format!(
                "{} checks did not end within {} s",
                provider.kind(),
                PROVIDER_DEADLINE.as_secs()
            ),
            "see `basphere doctor` on the host and the server's log",
        )],
    }
}

impl Services {
    /// What the server's readiness remembers (the composition root tells it about the engine).
    pub fn readiness_state(&self) -> &Readiness {
        &self.readiness
    }

    /// Every readiness check, database first (reused for 2 s).
    pub async fn readiness(&self) -> Vec<Check> {
        let mut last = self.readiness.last.lock().await;
        if let Some((at, checks)) = last.as_ref()
            && at.elapsed() < REUSE
        {
            return checks.clone();
        }
        let mut checks = vec![
            database_check(&self.store, self.readiness.schema.get().copied()).await,
            self.readiness.engine_check(),
        ];
        checks.extend(provider_checks(self.provider.as_ref()).await);
        *last = Some((Instant::now(), checks.clone()));
        checks
    }
}

//! Basphere's application services: what a request means, as typed operations over the store,
//! the engine and the bastion's Unix accounts.
//!
//! Architecture invariant: handlers never orchestrate. The API's handlers (and the web
//! portal's pages) parse and authorize, then call one method here and turn its typed result
//! into a response; every sequence of store calls, engine wake-ups and host side effects (with
//! their undo on failure) lives in this crate. Authorization stays with the caller: a method
//! takes the already-authorized identity ([`Principal`], or an [`Actor`] for the audit trail).
//! Results are `/api/v1` wire types (`basphere-wire`), converted from store rows only in
//! [`convert`]; every refusal is a [`ServiceError`] variant that says what to do.

mod captcha;
mod check;
pub mod convert;
mod credentials;
mod error;
mod lease;
mod ops;
mod paging;
mod ready;
mod users;
mod vms;

pub use captcha::CAPTCHA_FIELD;
pub use credentials::KeyDecision;
pub use error::ServiceError;
pub use ops::{BatchOutcome, PlanOutcome};
pub use paging::{DEFAULT_LIMIT, MAX_LIMIT, Paged, Paging};
pub use ready::{Readiness, database_check, provider_checks};
pub use users::{Approval, DisableOutcome, UserDeletion, username};
pub use vms::{Dashboard, VmOrder};

pub use basphere_accounts::UnixAccounts;
pub use basphere_store::Actor;

use basphere_config::Config;
use basphere_engine::Engine;
use basphere_store::{Store, User};
use std::sync::Arc;

/// The services of one server: cheap to clone (handles to the store, the engine and the
/// config).
#[derive(Clone)]
pub struct Services {
    store: Store,
    engine: Engine,
    /// The provider the VM workflows drive (its kind is shown and recorded).
    provider: Arc<dyn basphere_provider::Provider>,
    config: Arc<Config>,
    /// Present when Basphere manages Unix accounts on this bastion.
    accounts: Option<UnixAccounts>,
    /// What `/ready` remembers between its checks.
    readiness: ready::Readiness,
}

impl Services {
    pub fn new(
        store: Store,
        engine: Engine,
        provider: Arc<dyn basphere_provider::Provider>,
        config: Arc<Config>,
        accounts: Option<UnixAccounts>,
    ) -> Self {
        Self {
            store,
            engine,
            provider,
            config,
            accounts,
            readiness: ready::Readiness::default(),
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Whether Basphere manages Unix accounts on this host.
    pub fn manages_accounts(&self) -> bool {
        self.accounts.is_some()
    }

    /// The address block (CIDR) of pool block `index`.
    fn block(&self, index: Option<u32>) -> Option<String> {
        index
            .and_then(|b| self.config.network.block(b))
            .map(|b| b.net.to_string())
    }
}

/// An active account acting, as the API authenticated and authorized it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The account (active).
    pub user: User,
    /// Whether it is an active admin.
    pub admin: bool,
    /// Who and from where, for the audit trail.
    pub actor: Actor,
}

impl Principal {
    pub fn name(&self) -> &str {
        self.user.username.as_str()
    }

    /// Whether this principal may see a resource of `owner`.
    fn sees(&self, owner: &str) -> bool {
        self.admin || self.name() == owner
    }
}

/// A change made, with the sentence that tells the caller what happened.
#[derive(Debug, Clone)]
pub struct Done<T> {
    pub message: String,
    pub data: T,
}

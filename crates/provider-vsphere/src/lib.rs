//! The vSphere provider: VMs cloned from templates on vCenter, configured through cloud-init's
//! VMware datasource (`guestinfo.*`), spoken to over the vim25 SOAP API.
//!
//! - [`VsphereConfig`]: the `[vsphere]` config section; [`Credentials`] come from a 0600 file.
//! - [`soap::Client`]: the vim25 calls the provider needs, with typed faults ([`Error`]).
//! - [`VsphereProvider`]: the [`basphere_provider::Provider`] implementation.
//!
//! Architecture invariant: credentials and the session cookie live in [`config::Secret`]s and never
//! reach a log line, an error message or a `Debug` output.

mod cloudinit;
pub mod config;
mod error;
mod provider;
mod ready;
pub mod soap;
pub mod xml;

pub use config::{Credentials, Secret, TemplateConfig, TlsConfig, VsphereConfig};
pub use error::Error;
pub use provider::{INSTANCE_KEY, MachineSummary, VCENTER_NAME_MAX, VsphereProvider};
pub use ready::config_checks;
pub use soap::{Client, MoRef, SoapStats, install_crypto_provider};

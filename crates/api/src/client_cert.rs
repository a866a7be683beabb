//! What a TLS client's certificate says about who it is (mTLS, `[server] tls.client_ca`): its
//! subject CN and SANs, read after the handshake has verified the chain.

use crate::envelope::ApiError;
use crate::server::AppState;
use basphere_config::{CertField, CertIdentity, Unmapped};
use basphere_core::UserStatus;
use basphere_store::User;
use x509_parser::extensions::GeneralName;

/// The verified end-entity certificate a TCP client presented.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Its subject CNs and its email, DNS and URI SANs.
    pub identities: Vec<CertIdentity>,
    /// SHA-256 of the certificate (DER).
    pub fingerprint: String,
}

impl ClientCert {
    /// Reads a DER certificate; one that does not parse carries no identity.
    pub fn from_der(der: &[u8]) -> Self {
        let identities = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => identities(&cert),
            Err(e) => {
                tracing::warn!(error = %e, "a verified client certificate did not parse");
                Vec::new()
            }
        };
        Self {
            identities,
            fingerprint: crate::tls::fingerprint(der),
        }
    }

    /// Its identities as an operator writes them in `client_users`.
    pub fn describe(&self) -> String {
        if self.identities.is_empty() {
            return "a certificate with no CN and no email, DNS or URI SAN".into();
        }
        self.identities
            .iter()
            .map(|i| format!("{:?}", i.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whom a client certificate stands for.
pub(crate) enum CertUser {
    /// An active user, through the identity `by` that `client_users` maps.
    Active { user: User, by: String },
    /// Nobody: why, and what to do (the 401's message).
    Refused(String),
}

impl ClientCert {
    /// Maps the certificate through `[server.tls.client_users]` to an active user.
    pub(crate) async fn user(&self, st: &AppState) -> Result<CertUser, ApiError> {
        const FIX: &str = "an admin maps it in [server.tls.client_users] \
                           (e.g. \"cn:NAME\" = \"USERNAME\")";
        let mapped = st
            .config
            .server
            .tls
            .as_ref()
            .map(|t| t.client_user(&self.identities));
        let (name, by) = match mapped {
            Some(Ok(found)) => found,
            None | Some(Err(Unmapped::NoEntry)) => {
                return Ok(CertUser::Refused(format!(
                    "client certificate {} is not mapped to a Basphere user; {FIX}",
                    self.describe()
                )));
            }
            Some(Err(Unmapped::Ambiguous)) => {
                return Ok(CertUser::Refused(format!(
                    "client certificate {} maps to more than one user in \
                     [server.tls.client_users]; an admin must map it to one",
                    self.describe()
                )));
            }
        };
        let Some(user) = st.store.user(name.as_str()).await? else {
            return Ok(CertUser::Refused(format!(
                "client certificate {by} is mapped to user {name}, who is not registered; \
                 register {name} (basphere register) or ask an admin to fix \
                 [server.tls.client_users]"
            )));
        };
        if user.status != UserStatus::Active {
            return Ok(CertUser::Refused(format!(
                "client certificate {by} is mapped to user {name}, whose account is {}; \
                 ask an admin",
                user.status
            )));
        }
        Ok(CertUser::Active {
            user,
            by: format!("cert={by}"),
        })
    }
}

fn identities(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<CertIdentity> {
    let mut out: Vec<CertIdentity> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| CertIdentity::new(CertField::Cn, cn))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        out.extend(san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::RFC822Name(v) => Some(CertIdentity::new(CertField::Email, v)),
            GeneralName::DNSName(v) => Some(CertIdentity::new(CertField::Dns, v)),
            GeneralName::URI(v) => Some(CertIdentity::new(CertField::Uri, v)),
            _ => None,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_subject_cn_and_the_sans() {
        let mut p = rcgen::CertificateParams::new(vec!["CI.example.org".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Alice Example");
        p.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "Alice@Example.org".try_into().unwrap(),
        ));
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/alice".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let c = ClientCert::from_der(cert.der());
        let got: Vec<String> = c.identities.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            got,
            [
                "cn:Alice Example",
                "dns:ci.example.org",
                "email:alice@example.org",
                "uri:spiffe://example.org/alice"
            ]
        );
        assert_eq!(c.fingerprint.len(), 95);
        assert!(c.describe().contains("\"cn:Alice Example\""));
        let junk = ClientCert::from_der(b"not a certificate");
        assert!(junk.identities.is_empty());
        assert!(junk.describe().contains("no CN"));
    }
}

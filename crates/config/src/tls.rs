//! `[server] tls`: the TCP listener's certificate and, with `client_ca`, client certificates
//! (mTLS) mapped to Basphere users.

use basphere_core::Username;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// PEM files of the TCP listener's certificate chain and private key, and the client
/// certificate settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM file of the CA certificate(s) client certificates must chain to. Set, every TCP
    /// client must present such a certificate in the handshake (re-read on SIGHUP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Which user a client certificate stands for: a subject CN or SAN (`"cn:alice"`,
    /// `"email:alice@example.org"`, `"dns:ci.example.org"`, `"uri:spiffe://…"`) → username.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_users: BTreeMap<CertIdentity, Username>,
    /// Bearer tokens (and portal sessions) on TCP; `false` with `client_ca` leaves the client
    /// certificate as the only credential there. The Unix socket is unaffected.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub tokens: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl TlsFiles {
    /// The listener's certificate and key, without client certificates.
    pub fn new(cert: PathBuf, key: PathBuf) -> Self {
        Self {
            cert,
            key,
            client_ca: None,
            client_users: BTreeMap::new(),
            tokens: true,
        }
    }

    /// Checks what a file-free look can: client settings need `client_ca`.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.cert.as_os_str().is_empty() || self.key.as_os_str().is_empty() {
            return Err((
                "server.tls",
                "needs both cert and key (PEM file paths)".into(),
            ));
        }
        if self.client_ca.is_none() {
            if !self.client_users.is_empty() {
                return Err((
                    "server.tls.client_users",
                    "maps client certificates, but server.tls.client_ca (the CA file they \
                     chain to) is not set"
                        .into(),
                ));
            }
            if !self.tokens {
                return Err((
                    "server.tls.tokens",
                    "false would leave TCP with no credential: set server.tls.client_ca too".into(),
                ));
            }
        }
        if self
            .client_ca
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("server.tls.client_ca", "is empty (a PEM file path)".into()));
        }
        Ok(())
    }

    /// The user `ids` (a certificate's identities) map to: the one user every mapped identity
    /// names, else why none.
    pub fn client_user<'a>(
        &'a self,
        ids: &'a [CertIdentity],
    ) -> Result<(&'a Username, &'a CertIdentity), Unmapped> {
        let mut found: Option<(&Username, &CertIdentity)> = None;
        for id in ids {
            if let Some(u) = self.client_users.get(id) {
                match found {
                    Some((prev, _)) if prev != u => return Err(Unmapped::Ambiguous),
                    Some(_) => {}
                    None => found = Some((u, id)),
                }
            }
        }
        found.ok_or(Unmapped::NoEntry)
    }
}

/// Why a client certificate stands for no user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmapped {
    /// None of its identities is in `client_users`.
    NoEntry,
    /// Its identities map to different users.
    Ambiguous,
}

/// The part of a certificate an identity is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertField {
    /// The subject's common name.
    Cn,
    /// A SAN rfc822Name (compared in lower case).
    Email,
    /// A SAN dNSName (compared in lower case).
    Dns,
    /// A SAN uniformResourceIdentifier.
    Uri,
}

impl CertField {
    const ALL: [(CertField, &'static str); 4] = [
        (CertField::Cn, "cn"),
        (CertField::Email, "email"),
        (CertField::Dns, "dns"),
        (CertField::Uri, "uri"),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, s)| *s)
            .expect("every field is listed")
    }
}

/// One identity a client certificate carries, written `FIELD:VALUE` (`cn:alice`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertIdentity {
    field: CertField,
    value: String,
}

impl CertIdentity {
    /// `value` read from `field` (case-folded where the field is case-insensitive).
    pub fn new(field: CertField, value: &str) -> Self {
        let value = match field {
            CertField::Email | CertField::Dns => value.to_ascii_lowercase(),
            CertField::Cn | CertField::Uri => value.to_string(),
        };
        Self { field, value }
    }

    pub fn field(&self) -> CertField {
        self.field
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl std::fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.field.as_str(), self.value)
    }
}

impl std::str::FromStr for CertIdentity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a client certificate identity: write cn:NAME, email:ADDRESS, \
                 dns:NAME or uri:URI (server.tls.client_users)"
            )
        };
        let (field, value) = s.split_once(':').ok_or_else(bad)?;
        let field = CertField::ALL
            .iter()
            .find(|(_, n)| *n == field)
            .map(|(f, _)| *f)
            .ok_or_else(bad)?;
        if value.trim().is_empty() || value.trim() != value {
            return Err(bad());
        }
        Ok(Self::new(field, value))
    }
}

impl TryFrom<String> for CertIdentity {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<CertIdentity> for String {
    fn from(id: CertIdentity) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(users: &[(&str, &str)]) -> TlsFiles {
        TlsFiles {
            client_ca: Some("/ca.pem".into()),
            client_users: users
                .iter()
                .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                .collect(),
            ..TlsFiles::new("/c.pem".into(), "/k.pem".into())
        }
    }

    #[test]
    fn identities_parse_and_fold_case_where_the_field_does() {
        let id: CertIdentity = "dns:CI.Example.org".parse().unwrap();
        assert_eq!(id.to_string(), "dns:ci.example.org");
        let cn: CertIdentity = "cn:Alice".parse().unwrap();
        assert_eq!(cn.to_string(), "cn:Alice");
        for bad in ["alice", "cn:", "ou:x", "cn: alice", ""] {
            let e = bad.parse::<CertIdentity>().unwrap_err();
            assert!(e.contains("cn:NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_certificate_maps_to_one_user_or_none() {
        let f = files(&[
            ("cn:alice", "alice"),
            ("email:a@x.org", "alice"),
            ("cn:bob", "bob"),
        ]);
        let id = |s: &str| s.parse::<CertIdentity>().unwrap();
        let ids = [id("cn:alice"), id("email:A@X.org")];
        let (u, by) = f.client_user(&ids).unwrap();
        assert_eq!((u.as_str(), by.to_string().as_str()), ("alice", "cn:alice"));
        assert_eq!(f.client_user(&[id("cn:carol")]), Err(Unmapped::NoEntry));
        assert_eq!(f.client_user(&[]), Err(Unmapped::NoEntry));
        assert_eq!(
            f.client_user(&[id("cn:bob"), id("email:a@x.org")]),
            Err(Unmapped::Ambiguous)
        );
    }

    #[test]
    fn client_settings_need_a_client_ca() {
        let mut f = files(&[("cn:alice", "alice")]);
        assert!(f.validate().is_ok());
        f.client_ca = None;
        assert_eq!(f.validate().unwrap_err().0, "server.tls.client_users");
        f.client_users.clear();
        f.tokens = false;
        assert_eq!(f.validate().unwrap_err().0, "server.tls.tokens");
    }
}

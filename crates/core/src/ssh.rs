use base64::Engine;
use serde::{Deserialize, Serialize};

/// An OpenSSH public key line (`type base64 [comment]`) whose blob was decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SshPublicKey {
    line: String,
}

/// Why a public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshKeyError {
    #[error("is empty; paste the single line of your ~/.ssh/id_ed25519.pub")]
    Empty,
    #[error("must be one line")]
    MultiLine,
    #[error(
        "key type {0:?} is not accepted; use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa"
    )]
    Type(String),
    #[error("key data is not valid base64 (truncated or mangled copy?)")]
    Base64,
    #[error("key data is truncated or malformed")]
    Malformed,
    #[error("key data says {inner:?} but the line says {outer:?}")]
    Mismatch { outer: String, inner: String },
    #[error("RSA keys must have at least 2048 bits")]
    WeakRsa,
    #[error("is too long (over 16 KiB)")]
    TooLong,
    #[error(
        "may hold printable ASCII only; character {0:?} is not allowed (edit the comment at the end of the line)"
    )]
    Unprintable(char),
}

const TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn field(&mut self) -> Result<&'a [u8], SshKeyError> {
        if self.0.len() < 4 {
            return Err(SshKeyError::Malformed);
        }
        let n = u32::from_be_bytes(self.0[..4].try_into().unwrap()) as usize;
        let rest = &self.0[4..];
        if rest.len() < n {
            return Err(SshKeyError::Malformed);
        }
        let (f, r) = rest.split_at(n);
        self.0 = r;
        Ok(f)
    }
}

impl SshPublicKey {
    /// The key type, e.g. `ssh-ed25519`.
    pub fn key_type(&self) -> &str {
        self.line.split(' ').next().unwrap_or_default()
    }

    /// The full line as given (whitespace normalised).
    pub fn as_str(&self) -> &str {
        &self.line
    }
}

impl std::str::FromStr for SshPublicKey {
    type Err = SshKeyError;
    fn from_str(s: &str) -> Result<Self, SshKeyError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(SshKeyError::Empty);
        }
        if s.len() > 16 * 1024 {
            return Err(SshKeyError::TooLong);
        }
        if s.contains(['\n', '\r']) {
            return Err(SshKeyError::MultiLine);
        }
        // Control or non-ASCII characters in the comment would reach authorized_keys and
        // cloud-init user data verbatim.
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_graphic() || *c == ' ' || *c == '\t'))
        {
            return Err(SshKeyError::Unprintable(c));
        }
        let mut parts = s.split_whitespace();
        let ty = parts.next().ok_or(SshKeyError::Empty)?;
        if !TYPES.contains(&ty) {
            return Err(SshKeyError::Type(ty.chars().take(40).collect()));
        }
        let b64 = parts.next().ok_or(SshKeyError::Malformed)?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| SshKeyError::Base64)?;
        let mut r = Reader(&blob);
        let inner = r.field()?;
        if inner != ty.as_bytes() {
            return Err(SshKeyError::Mismatch {
                outer: ty.to_string(),
                inner: String::from_utf8_lossy(inner).chars().take(40).collect(),
            });
        }
        match ty {
            "ssh-ed25519" => {
                if r.field()?.len() != 32 {
                    return Err(SshKeyError::Malformed);
                }
            }
            "ssh-rsa" => {
                let _e = r.field()?;
                let n = r.field()?;
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < 2048 {
                    return Err(SshKeyError::WeakRsa);
                }
            }
            t if t.starts_with("ecdsa-") => {
                let _curve = r.field()?;
                if r.field()?.is_empty() {
                    return Err(SshKeyError::Malformed);
                }
            }
            _ => {
                r.field()?;
            }
        }
        if ty.starts_with("sk-") {
            r.field()?; // application
        }
        if !r.0.is_empty() {
            return Err(SshKeyError::Malformed);
        }
        let comment: Vec<&str> = parts.collect();
        let line = if comment.is_empty() {
            format!("{ty} {b64}")
        } else {
            format!("{ty} {b64} {}", comment.join(" "))
        };
        Ok(Self { line })
    }
}

impl TryFrom<String> for SshPublicKey {
    type Error = SshKeyError;
    fn try_from(s: String) -> Result<Self, SshKeyError> {
        s.parse()
    }
}

impl From<SshPublicKey> for String {
    fn from(k: SshPublicKey) -> String {
        k.line
    }
}

impl std::fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop";

    #[test]
    fn accepts_ed25519() {
        let k: SshPublicKey = ED.parse().unwrap();
        assert_eq!(k.key_type(), "ssh-ed25519");
        assert_eq!(k.as_str(), ED);
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!("".parse::<SshPublicKey>(), Err(SshKeyError::Empty));
        assert!(matches!(
            "ssh-dss AAAA".parse::<SshPublicKey>(),
            Err(SshKeyError::Type(_))
        ));
        let truncated = &ED[..60];
        assert!(truncated.parse::<SshPublicKey>().is_err());
        assert_eq!(
            "ssh-ed25519 !!!notbase64".parse::<SshPublicKey>(),
            Err(SshKeyError::Base64)
        );
        // ed25519 blob relabelled as rsa
        let relabel = ED.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(matches!(
            relabel.parse::<SshPublicKey>(),
            Err(SshKeyError::Mismatch { .. })
        ));
        assert_eq!(
            format!("{ED}\nssh-ed25519 AAAA").parse::<SshPublicKey>(),
            Err(SshKeyError::MultiLine)
        );
    }

    #[test]
    fn refuses_unprintable_comments() {
        for bad in [
            '\u{1b}', '\0', '\u{7f}', '\u{b}', '\u{c}', '\u{85}', '\u{2028}', 'é',
        ] {
            let line = format!("{ED} evil{bad}comment");
            assert_eq!(
                line.parse::<SshPublicKey>(),
                Err(SshKeyError::Unprintable(bad)),
                "{line:?}"
            );
        }
        let k: SshPublicKey = format!("{ED}\tand more: ~!@#$%^&*()[]{{}}")
            .parse()
            .unwrap();
        assert!(
            k.as_str()
                .ends_with("alice@laptop and more: ~!@#$%^&*()[]{}")
        );
    }
}

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be {min} to {max} characters long (got {got})")]
    Length { min: usize, max: usize, got: usize },
    #[error("may contain only lowercase letters a-z, digits 0-9 and '-' (found {0:?})")]
    Char(char),
    #[error("must not start or end with '-'")]
    Hyphen,
    #[error("must start with a letter")]
    Start,
    #[error("{0}")]
    Other(&'static str),
}

fn check_dns_label(s: &str, min: usize, max: usize, edge_hyphen_ok: bool) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    let got = s.chars().count();
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::Char(c));
    }
    if got < min || got > max {
        return Err(NameError::Length { min, max, got });
    }
    if !edge_hyphen_ok && (s.starts_with('-') || s.ends_with('-')) {
        return Err(NameError::Hyphen);
    }
    Ok(())
}

/// The OpenAPI schema of a type sent as a plain string (its rules are checked by the server).
macro_rules! string_schema {
    ($name:ident) => {
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .into()
            }
        }
        impl utoipa::ToSchema for $name {}
    };
}
pub(crate) use string_schema;

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                s.parse()
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        crate::names::string_schema!($name);
    };
}

string_newtype!(
    /// A Basphere user name: 3–20 of `[a-z0-9-]`, starting with a letter, no trailing hyphen.
    /// It doubles as the user's Unix account name on a bastion, hence the letter first.
    Username
);
string_newtype!(
    /// A VM name: 1–30 of `[a-z0-9-]`, no leading or trailing hyphen (a DNS label).
    VmName
);
string_newtype!(
    /// An OS image name as listed in the config, e.g. `debian-12`: 1–40 of `[a-z0-9.-]`.
    ImageName
);
string_newtype!(
    /// An e-mail address (checked for shape only).
    Email
);
string_newtype!(
    /// A team name: 1–64 printable characters.
    Team
);

impl std::str::FromStr for Username {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check_dns_label(s, 3, 20, false)?;
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(NameError::Start);
        }
        Ok(Self(s.to_string()))
    }
}

impl std::str::FromStr for VmName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check_dns_label(s, 1, 30, false)?;
        Ok(Self(s.to_string()))
    }
}

impl std::str::FromStr for ImageName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let plain: String = s.replace('.', "");
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        check_dns_label(&plain, 0, 40, false).map_err(|e| match e {
            NameError::Char(c) => NameError::Char(c),
            other => other,
        })?;
        if s.len() > 40 {
            return Err(NameError::Length {
                min: 1,
                max: 40,
                got: s.len(),
            });
        }
        if s.starts_with(['-', '.']) || s.ends_with(['-', '.']) {
            return Err(NameError::Hyphen);
        }
        Ok(Self(s.to_string()))
    }
}

impl std::str::FromStr for Email {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 254 {
            return Err(NameError::Length {
                min: 3,
                max: 254,
                got: s.len(),
            });
        }
        let Some((local, domain)) = s.split_once('@') else {
            return Err(NameError::Other("must look like name@example.org"));
        };
        let ok_chars = s
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '<' && c != '>' && c != '"');
        if local.is_empty()
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains('@')
            || !ok_chars
        {
            return Err(NameError::Other("must look like name@example.org"));
        }
        Ok(Self(s.to_string()))
    }
}

impl Team {
    /// No team given (the team is optional at registration); stored and shown as empty.
    pub fn none() -> Self {
        Self(String::new())
    }
}

impl std::str::FromStr for Team {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let got = s.chars().count();
        if got > 64 {
            return Err(NameError::Length {
                min: 1,
                max: 64,
                got,
            });
        }
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(NameError::Char(c));
        }
        Ok(Self(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["abc", "alice", "a-1", "dev-team-01", "abcdefghijklmnopqrst"] {
            assert!(ok.parse::<Username>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ab",
            "Alice",
            "-abc",
            "abc-",
            "a_b",
            "../x",
            "ünï",
            "abcdefghijklmnopqrstu",
            "1abc",
            "a b",
        ] {
            assert!(bad.parse::<Username>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vm_names() {
        for ok in ["a", "web", "web-1", "0", "abcdefghijklmnopqrstuvwxyz0123"] {
            assert!(ok.parse::<VmName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "../x",
            "web.1",
            "ŵeb",
            "abcdefghijklmnopqrstuvwxyz01234",
        ] {
            assert!(bad.parse::<VmName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn image_names_and_emails() {
        assert!("debian-12".parse::<ImageName>().is_ok());
        assert!("ubuntu-24.04".parse::<ImageName>().is_ok());
        assert!("../etc".parse::<ImageName>().is_err());
        assert!("a@b.org".parse::<Email>().is_ok());
        assert!("nope".parse::<Email>().is_err());
        assert!("a@b".parse::<Email>().is_err());
    }
}

use serde::{Deserialize, Serialize};

/// The name of a VM size from the config (`tiny`, `small`, …): 1–20 of `[a-z0-9-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpecName(String);

impl SpecName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SpecName {
    type Err = crate::NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v: crate::VmName = s.parse()?;
        if s.len() > 20 {
            return Err(crate::NameError::Length {
                min: 1,
                max: 20,
                got: s.len(),
            });
        }
        Ok(Self(v.into()))
    }
}

impl TryFrom<String> for SpecName {
    type Error = crate::NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpecName> for String {
    fn from(v: SpecName) -> String {
        v.0
    }
}

crate::names::string_schema!(SpecName);

impl std::fmt::Display for SpecName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resources of one VM size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Spec {
    /// The prototype's sizes: tiny 2/4G/50G, small 2/8G/50G, medium 4/16G/100G,
    /// large 8/32G/200G, huge 16/64G/200G.
    pub fn defaults() -> Vec<(SpecName, Spec)> {
        [
            ("tiny", 2, 4, 50),
            ("small", 2, 8, 50),
            ("medium", 4, 16, 100),
            ("large", 8, 32, 200),
            ("huge", 16, 64, 200),
        ]
        .into_iter()
        .map(|(n, c, m, d)| {
            (
                n.parse().expect("valid spec name"),
                Spec {
                    vcpus: c,
                    memory_mib: m * 1024,
                    disk_gib: d,
                },
            )
        })
        .collect()
    }
}

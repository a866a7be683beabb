use serde::{Deserialize, Serialize};

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$var),)+
                    other => Err(format!(
                        "unknown {} {other:?}; expected one of: {}",
                        stringify!($name),
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Lifecycle of a VM record.
    VmStatus {
        /// Admitted; its create workflow is running.
        Creating = "creating",
        /// Up and answering SSH.
        Running = "running",
        /// Its delete workflow is running.
        Deleting = "deleting",
        /// Create failed and was rolled back; the record stays to show why until deleted.
        Failed = "failed",
    }
);

text_enum!(
    /// Lifecycle of a registration request.
    RegistrationStatus {
        Pending = "pending",
        Approved = "approved",
        Rejected = "rejected",
    }
);

text_enum!(
    /// Whether a user account may act.
    UserStatus {
        /// Registered, waiting for an admin.
        Pending = "pending",
        Active = "active",
        Rejected = "rejected",
        Disabled = "disabled",
    }
);

text_enum!(
    /// What a user may do: admins may do everything, users only to their own resources.
    Role {
        User = "user",
        Admin = "admin",
    }
);

//! Enums stored and sent as fixed strings (states, kinds, roles).

/// A string that names no variant of a [`text_enum!`] type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of: {}", allowed.join(", "))]
pub struct UnknownVariant {
    /// The enum's name.
    pub kind: &'static str,
    /// The string given.
    pub value: String,
    /// Every string the enum accepts.
    pub allowed: &'static [&'static str],
}

impl From<UnknownVariant> for String {
    fn from(e: UnknownVariant) -> String {
        e.to_string()
    }
}

/// Declares a fieldless enum whose variants are written as the given strings (in the database,
/// on the wire, in URLs).
///
/// Generates `as_str`, `Display`, `FromStr` (erring with [`UnknownVariant`]), serde as the
/// string, its OpenAPI schema (a string enum), `ALL` (every variant) and `STRINGS` (every
/// string, in the same order): the one string table of the type.
///
/// ```
/// basphere_core::text_enum! {
///     /// A light.
///     pub enum Light { Red = "red", Green = "green" }
/// }
/// assert_eq!("green".parse::<Light>().unwrap(), Light::Green);
/// assert_eq!(Light::Red.to_string(), "red");
/// assert!("blue".parse::<Light>().unwrap_err().to_string().contains("red, green"));
/// ```
#[macro_export]
macro_rules! text_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident {
        $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// Every variant's string, in declaration order.
            pub const STRINGS: &'static [&'static str] = &[$($s),+];

            /// The variant's string.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::UnknownVariant;
            fn from_str(s: &str) -> ::std::result::Result<Self, $crate::UnknownVariant> {
                match s {
                    $($s => Ok($name::$var),)+
                    other => Err($crate::UnknownVariant {
                        kind: stringify!($name),
                        value: other.to_owned(),
                        allowed: $name::STRINGS,
                    }),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::__private::serde::Serialize for $name {
            fn serialize<S>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error>
            where
                S: $crate::__private::serde::Serializer,
            {
                s.serialize_str(self.as_str())
            }
        }

        impl $crate::__private::utoipa::PartialSchema for $name {
            fn schema() -> $crate::__private::utoipa::openapi::RefOr<
                $crate::__private::utoipa::openapi::schema::Schema,
            > {
                $crate::__private::utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type($crate::__private::utoipa::openapi::schema::Type::String)
                    .enum_values(Some($name::STRINGS.iter().copied()))
                    .into()
            }
        }

        impl $crate::__private::utoipa::ToSchema for $name {}

        impl<'de> $crate::__private::serde::Deserialize<'de> for $name {
            fn deserialize<D>(d: D) -> ::std::result::Result<Self, D::Error>
            where
                D: $crate::__private::serde::Deserializer<'de>,
            {
                struct V;
                impl $crate::__private::serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        write!(f, "one of: {}", $name::STRINGS.join(", "))
                    }
                    fn visit_str<E>(self, s: &str) -> ::std::result::Result<$name, E>
                    where
                        E: $crate::__private::serde::de::Error,
                    {
                        s.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::{StepStatus, VmOperation};

    #[test]
    fn strings_round_trip_through_every_form() {
        for &k in VmOperation::ALL {
            assert_eq!(k.as_str().parse::<VmOperation>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
            let j = serde_json::to_string(&k).unwrap();
            assert_eq!(j, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<VmOperation>(&j).unwrap(), k);
        }
        assert_eq!(VmOperation::STRINGS, ["create_vm", "delete_vm"]);
    }

    #[test]
    fn unknown_strings_name_the_value_and_the_allowed_ones() {
        let e = "paused".parse::<StepStatus>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown StepStatus \"paused\"; expected one of: \
             pending, running, done, failed, undone, skipped"
        );
        let e = serde_json::from_str::<StepStatus>("\"paused\"").unwrap_err();
        assert!(e.to_string().contains("\"paused\""), "{e}");
        assert!(serde_json::from_str::<StepStatus>("3").is_err());
    }
}

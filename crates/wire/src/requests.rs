//! Request bodies. Every field is optional on the wire: which are required, and what a valid
//! value is, the server's services decide (reporting every bad field at once). `read` takes a
//! JSON object (the API's body, or the portal's form) and keeps the fields of the wrong JSON
//! type in `unreadable`, which never goes on the wire.

use crate::read::Object;
use basphere_core::FieldErrors;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::PartialSchema;
use utoipa::openapi::schema::{
    ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, SchemaType, Type,
};

/// Declares a request body: its fields (each read by its type's [`Field`]) and its `read`.
macro_rules! request {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
        $(#[$m])*
        pub struct $name {
            $($(#[$fm])*
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schema(schema_with = field_schema::<$ty>)]
            pub $field: Option<$ty>,)*
            /// Fields that were present with the wrong JSON type, as field errors.
            #[serde(skip)]
            pub unreadable: FieldErrors,
        }

        impl $name {
            /// Reads the fields out of a JSON object.
            pub fn read(map: &Map<String, Value>) -> Self {
                let mut o = Object::new(map);
                $(let $field = <$ty as Field>::read(&mut o, stringify!($field));)*
                Self { $($field,)* unreadable: o.errors }
            }
        }
    };
}

/// A type a request field is read as, out of a JSON object (wrong types recorded), and what it
/// takes on the wire: `null` reads as absent, and a whole number or a list may come as a string
/// (as the portal's forms send them).
trait Field: Sized {
    fn read(o: &mut Object, key: &str) -> Option<Self>;
    fn schema() -> Schema;
}

impl Field for String {
    fn read(o: &mut Object, key: &str) -> Option<Self> {
        o.str(key)
    }
    fn schema() -> Schema {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
            .into()
    }
}

impl Field for i64 {
    fn read(o: &mut Object, key: &str) -> Option<Self> {
        o.int(key)
    }
    fn schema() -> Schema {
        one_of_or_null([whole_number_text(), whole_number_json()])
    }
}

impl Field for Vec<DiskRequest> {
    fn read(o: &mut Object, key: &str) -> Option<Self> {
        o.disks(key)
    }
    fn schema() -> Schema {
        let list = ArrayBuilder::new().items(DiskRequest::schema());
        let text = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("Comma-separated `SIZE[G][:MODE]`: `20G, 50G:raw`"));
        one_of_or_null([list.into(), text.into()])
    }
}

impl Field for Vec<String> {
    fn read(o: &mut Object, key: &str) -> Option<Self> {
        o.strs(key)
    }
    fn schema() -> Schema {
        let list = ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String));
        let text = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("Comma-separated names"));
        one_of_or_null([list.into(), text.into()])
    }
}

/// The schema of a request field of type `T`.
fn field_schema<T: Field>() -> Schema {
    T::schema()
}

fn one_of_or_null<const N: usize>(alternatives: [Schema; N]) -> Schema {
    let mut b = OneOfBuilder::new();
    for a in alternatives {
        b = b.item(a);
    }
    b.item(ObjectBuilder::new().schema_type(Type::Null)).into()
}

/// A whole number as JSON.
fn whole_number_json() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .into()
}

/// A whole number as text, as a form sends it.
fn whole_number_text() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[+-]?[0-9]{1,18}$"))
        .into()
}

/// A whole number, as JSON or as text.
fn whole_number() -> Schema {
    OneOfBuilder::new()
        .item(whole_number_json())
        .item(whole_number_text())
        .into()
}

request!(
    /// `POST /register` and `POST /users` (`team` optional).
    #[schema(example = json!({"username": "dora", "email": "dora@example.org", "team": "payments",
        "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g dora@laptop"}))]
    RegisterRequest {
        #[schema(required = true)]
        username: String,
        #[schema(required = true)]
        email: String,
        team: String,
        #[schema(required = true)]
        public_key: String,
    }
);

request!(
    /// `POST /enroll`: exchanges a one-time code for a token.
    EnrollRequest {
        #[schema(required = true)]
        username: String,
        #[schema(required = true)]
        code: String,
    }
);

request!(
    /// `POST /users/{u}/reject`, `POST /key-changes/{u}/approve|reject`.
    #[schema(example = json!({"reason": "not a member of the team"}))]
    ReasonRequest { reason: String }
);

request!(
    /// `PUT /users/{u}/quota`: absent fields keep their value.
    #[schema(example = json!({"max_vms": 20, "max_vcpus": 64}))]
    QuotaRequest {
        max_vms: i64,
        max_clusters: i64,
        max_ips: i64,
        max_vcpus: i64,
        max_memory_mib: i64,
        max_disk_gib: i64,
    }
);

request!(
    /// `POST /key-change`: either a signed-in user's `public_key`, or the prototype's form for
    /// someone who may have lost every credential: `username`, `email` (the registered one),
    /// `new_public_key` and an optional `reason`.
    #[schema(example = json!({"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g dora@laptop"}))]
    KeyChangeRequest {
        public_key: String,
        username: String,
        email: String,
        new_public_key: String,
        reason: String,
    }
);

request!(
    /// `POST /tokens`.
    #[schema(example = json!({"name": "laptop", "ttl_days": 30}))]
    TokenRequest {
        /// Default `cli`.
        name: String,
        ttl_days: i64,
    }
);

request!(
    /// `POST /vms`.
    #[schema(example = json!({"name": "web", "spec": "small", "count": 1}))]
    CreateVmsRequest {
        #[schema(required = true)]
        name: String,
        /// Default `small`.
        spec: String,
        /// Default: the configured default image.
        os: String,
        /// Absent or 0: 1. Above 1 the VMs are named `NAME-1` … `NAME-N`.
        count: i64,
        /// Disks beside the boot disk: `[{size_gb, mode: "auto"|"raw"}]` (each VM gets them).
        extra_disks: Vec<DiskRequest>,
        /// Catalog networks (`[networks.NAME]`) each VM joins beside its own.
        extra_networks: Vec<String>,
    }
);

/// One extra disk as a request asks for it; the server checks size and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskRequest {
    #[schema(schema_with = whole_number)]
    pub size_gb: i64,
    /// `auto` (default: formatted and mounted) or `raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl DiskRequest {
    /// Parses the command line's and the form's `SIZE[G][:MODE]`: `20G`, `20`, `50G:raw`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (size, mode) = match s.split_once(':') {
            Some((size, mode)) => (size, Some(mode.trim().to_string())),
            None => (s, None),
        };
        let size = size.trim();
        let lower = size.to_ascii_lowercase();
        let digits = ["gib", "gb", "g"]
            .iter()
            .find_map(|u| lower.strip_suffix(u))
            .unwrap_or(&lower)
            .trim();
        let size_gb = digits.parse::<i64>().map_err(|_| {
            format!("{s:?} is not SIZE[G][:MODE] (e.g. 20G or 50G:raw); SIZE is whole GiB")
        })?;
        Ok(Self { size_gb, mode })
    }
}

request!(
    /// `POST /batches/plan` and `POST /batches`.
    #[schema(example = json!({"manifest": "[vms.db]\nspec = \"tiny\"\n[vms.app]\nrequires = [\"db\"]\n",
        "format": "toml", "parallelism": 2}))]
    BatchRequest {
        /// The manifest's text.
        #[schema(required = true)]
        manifest: String,
        /// `toml` (default) or `yaml`.
        format: String,
        parallelism: i64,
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_and_writes_the_same_fields() {
        let v = json!({"name": "web", "count": "3", "os": 7});
        let r = CreateVmsRequest::read(v.as_object().unwrap());
        assert_eq!(r.name.as_deref(), Some("web"));
        assert_eq!(r.count, Some(3));
        assert_eq!(r.os, None);
        assert_eq!(r.unreadable.lines(), ["os: must be a string"]);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"name": "web", "count": 3})
        );
    }

    #[test]
    fn extra_disks_and_networks_read_from_json_and_forms() {
        let v = json!({"extra_disks": [{"size_gb": 20}, {"size_gb": "50", "mode": "raw"},
            {"mode": "auto"}, 7, {"size_gb": "x"}, {"size_gb": null}],
            "extra_networks": ["storage", 3]});
        let r = CreateVmsRequest::read(v.as_object().unwrap());
        assert_eq!(
            r.extra_disks.unwrap(),
            [
                DiskRequest {
                    size_gb: 20,
                    mode: None
                },
                DiskRequest {
                    size_gb: 50,
                    mode: Some("raw".into())
                }
            ]
        );
        assert_eq!(r.extra_networks.unwrap(), ["storage"]);
        assert_eq!(
            r.unreadable.lines(),
            [
                "extra_disks[2].size_gb: is required",
                "extra_disks[3]: must be an object {\"size_gb\": N, \"mode\": \"auto\"|\"raw\"}",
                "extra_disks[4].size_gb: must be a whole number",
                "extra_disks[5].size_gb: is required",
                "extra_networks[1]: must be a string",
            ]
        );
        let form = json!({"extra_disks": "20G, 50g:raw", "extra_networks": "storage"});
        let r = CreateVmsRequest::read(form.as_object().unwrap());
        assert_eq!(r.extra_disks.unwrap().len(), 2);
        assert_eq!(r.extra_networks.unwrap(), ["storage"]);
        assert!(DiskRequest::parse("big").is_err());
        assert_eq!(DiskRequest::parse("20GiB").unwrap().size_gb, 20);
    }
}

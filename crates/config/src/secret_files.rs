//! `<key>_file` keys: a secret read from a file — a mounted container secret, a 0600 file —
//! instead of written into the config file or the environment. When the config is loaded,
//! each file named here is read and its content (without the trailing newline) becomes the
//! key's value; naming both a key (not `""`) and its file is refused.

use crate::ConfigError;

/// `(section, key)`: the keys whose value may come from `<section>.<key>_file`.
pub const SECRET_FILE_KEYS: &[(&str, &str)] = &[("database", "url"), ("recaptcha", "secret_key")];

/// Replaces every `<key>_file` of [`SECRET_FILE_KEYS`] in `table` by `<key>` with the file's
/// content.
pub(crate) fn resolve(table: &mut toml::Table) -> Result<(), ConfigError> {
    for (section, key) in SECRET_FILE_KEYS {
        let Some(sec) = table.get_mut(*section).and_then(toml::Value::as_table_mut) else {
            continue;
        };
        let file_key = format!("{key}_file");
        let Some(path) = sec.remove(&file_key) else {
            continue;
        };
        let invalid = |reason: String| ConfigError::Invalid {
            key: format!("{section}.{file_key}"),
            reason,
        };
        let path = path
            .as_str()
            .ok_or_else(|| invalid("must be the path of a file (a string)".into()))?;
        // `""` is the defaults' way of leaving a key unset.
        if sec.get(*key).is_some_and(|v| v.as_str() != Some("")) {
            return Err(invalid(format!(
                "{section}.{key} is set as well; set only one of them"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(format!(
                "cannot read {path}: {e} (mount the secret there, readable by the server's user)"
            ))
        })?;
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(invalid(format!("{path} is empty")));
        }
        sec.insert(key.to_string(), toml::Value::String(value.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{Config, ConfigError, DEFAULT_TOML};
    use std::path::Path;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            DEFAULT_TOML,
            Path::new("t.toml"),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    fn secret(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    #[test]
    fn secrets_come_from_their_files_without_the_newline() {
        let d = tempfile::tempdir().unwrap();
        let url = secret(&d, "url", "postgres://b:pw@127.0.0.1:5432/b\n");
        let key = secret(&d, "key", "s3cret\r\n");
        let c = load(&[
            ("BASPHERE_DATABASE__URL_FILE", &url),
            ("BASPHERE_RECAPTCHA__SECRET_KEY_FILE", &key),
            ("BASPHERE_RECAPTCHA__SITE_KEY", "site"),
        ])
        .unwrap();
        assert_eq!(
            c.database.url.as_deref(),
            Some("postgres://b:pw@127.0.0.1:5432/b")
        );
        assert_eq!(c.recaptcha.secret_key, "s3cret");
        assert!(c.recaptcha.enabled());
    }

    #[test]
    fn a_file_key_in_the_config_file_works_and_is_still_validated() {
        let d = tempfile::tempdir().unwrap();
        let url = secret(&d, "url", "mysql://x/y\n");
        let text =
            DEFAULT_TOML.replace("[database]\n", &format!("[database]\nurl_file = {url:?}\n"));
        let e = Config::from_toml(&text, Path::new("t.toml"), []).unwrap_err();
        assert!(e.to_string().contains("database.url:"), "{e}");
    }

    #[test]
    fn unreadable_empty_or_doubled_secrets_are_refused_with_the_key() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("absent").display().to_string();
        let e = load(&[("BASPHERE_DATABASE__URL_FILE", &missing)]).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("database.url_file") && shown.contains(&missing),
            "{shown}"
        );

        let empty = secret(&d, "empty", "\n");
        let e = load(&[("BASPHERE_RECAPTCHA__SECRET_KEY_FILE", &empty)]).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");

        let url = secret(&d, "url", "postgres://b@127.0.0.1/b");
        let e = load(&[
            ("BASPHERE_DATABASE__URL_FILE", &url),
            ("BASPHERE_DATABASE__URL", "postgres://c@127.0.0.1/c"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("set only one"), "{e}");

        let e = load(&[("BASPHERE_DATABASE__URL_FILE", "[1]")]).unwrap_err();
        assert!(e.to_string().contains("path of a file"), "{e}");
    }
}

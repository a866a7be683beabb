//! `basphere backup` and `basphere restore`: a whole-database snapshot taken while the server
//! runs, and putting one back into a new install (the store does both, per backend).

use crate::args::Output;
use anyhow::{Context, bail};
use basphere_store::{Location, Summary};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Instant;

/// What the database of `location` is, for messages (never a url: it may hold a password).
fn describe(location: &Location) -> String {
    match location {
        Location::Sqlite(path) => format!("the SQLite database {}", path.display()),
        Location::Postgres(_) => "the PostgreSQL database at [database] url".to_string(),
    }
}

/// Rows per table, as the JSON object `{table: rows}`.
pub fn tables_json(tables: &[(String, u64)]) -> Value {
    tables
        .iter()
        .map(|(t, n)| (t.clone(), Value::from(*n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Rows per table, one line each.
pub fn print_tables(tables: &[(String, u64)]) {
    for (t, n) in tables {
        println!("{t:<18} {n:>8} rows");
    }
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "backend": s.backend,
        "schema_version": s.schema_version,
        "tables": tables_json(&s.tables),
        "unfinished_workflows": s.unfinished_workflows,
    })
}

pub async fn backup(config: Option<&Path>, out: Output, file: &Path) -> anyhow::Result<()> {
    crate::modes::private_umask();
    let cfg = crate::serve::load_config(config)?;
    let location = basphere_app::database(&cfg);
    eprintln!(
        "backing up {} into {} (online: servers keep running)…",
        describe(&location),
        file.display()
    );
    let started = Instant::now();
    let report = location
        .backup(file)
        .await
        .context("backup failed (nothing was written)")?;
    let seconds = started.elapsed().as_secs_f64();
    match out {
        Output::Json => {
            let mut v = summary_json(&report.summary);
            v["file"] = report.file.display().to_string().into();
            v["bytes"] = report.bytes.into();
            v["seconds"] = json!((seconds * 1000.0).round() / 1000.0);
            println!("{v}");
        }
        Output::Table => {
            print_tables(&report.summary.tables);
            println!(
                "backup {} written: {} bytes, {} schema version {}, {} unfinished workflows, in \
                 {seconds:.1} s",
                report.file.display(),
                report.bytes,
                report.summary.backend,
                report.summary.schema_version,
                report.summary.unfinished_workflows,
            );
        }
    }
    Ok(())
}

pub async fn restore(config: Option<&Path>, out: Output, file: &Path) -> anyhow::Result<()> {
    crate::modes::private_umask();
    let cfg = crate::serve::load_config(config)?;
    let location = basphere_app::database(&cfg);
    if !file.is_file() {
        bail!("no backup file at {}", file.display());
    }
    // SQLite: the whole data dir must be new (a node id, images or VM disks there belong to
    // another install). Made here when missing, and removed again if the restore fails.
    let made_dir = match &location {
        Location::Sqlite(_) => empty_data_dir(&cfg.data_dir)?,
        Location::Postgres(_) => false,
    };
    eprintln!("restoring {} into {}…", file.display(), describe(&location));
    let done = location.restore(file).await;
    let report = match done {
        Ok(r) => r,
        Err(e) => {
            if made_dir {
                let _ = std::fs::remove_dir(&cfg.data_dir);
            }
            return Err(anyhow::Error::new(e).context("restore failed (nothing was changed)"));
        }
    };
    let s = &report.summary;
    match out {
        Output::Json => {
            let mut v = summary_json(s);
            v["backup_schema_version"] = report.backup_schema_version.into();
            v["leases_released"] = report.leases_released.into();
            println!("{v}");
        }
        Output::Table => {
            print_tables(&s.tables);
            println!(
                "restored: {} schema version {} (the backup's: {}), {} unfinished workflows{}.\n\
                 The admin token file is not part of a backup: `basphere init` writes a new one \
                 (it keeps the restored database).",
                s.backend,
                s.schema_version,
                report.backup_schema_version,
                s.unfinished_workflows,
                if s.unfinished_workflows > 0 {
                    format!(
                        " ({} leases released): `basphere serve` resumes them",
                        report.leases_released
                    )
                } else {
                    String::new()
                },
            );
        }
    }
    Ok(())
}

/// Makes sure `dir` is an empty directory, creating it (0700) when missing; whether it did.
fn empty_data_dir(dir: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !names.is_empty() {
                names.sort();
                names.truncate(5);
                bail!(
                    "the data dir {} is not empty ({}): restore only into a new, empty data dir \
                     (set data_dir in the config, or move this one away); nothing was changed",
                    dir.display(),
                    names.join(", ")
                );
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the data dir {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("reading the data dir {}", dir.display())),
    }
}

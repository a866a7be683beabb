//! `basphere db`: migrations and moving an install onto PostgreSQL.

use crate::args::{DbCmd, Output};
use anyhow::Context;
use basphere_store::Store;
use std::path::Path;

pub async fn run(config: Option<&Path>, out: Output, cmd: DbCmd) -> anyhow::Result<()> {
    let cfg = crate::serve::load_config(config)?;
    match cmd {
        DbCmd::Migrate => {
            let store = basphere_app::open_store(&cfg).await?;
            let version = store.schema_version().await?;
            let backend = store.backend();
            store.close().await;
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"backend": backend, "schema_version": version})
                ),
                Output::Table => println!("{backend} database at schema version {version}"),
            }
        }
        DbCmd::Copy { to } => {
            // Writes during the copy would be lost: the server must not be running.
            if std::os::unix::net::UnixStream::connect(&cfg.server.socket).is_ok() {
                anyhow::bail!(
                    "the server is running (its socket {} answers); stop it first \
                     (systemctl stop basphere) so nothing is written during the copy",
                    cfg.server.socket.display()
                );
            }
            if cfg.database.url.as_deref() == Some(to.as_str()) {
                anyhow::bail!("--to names the database this install already uses");
            }
            let source = basphere_app::open_store(&cfg).await?;
            let target = Store::open_postgres(&to)
                .await
                .with_context(|| "opening the target database (--to)")?;
            let report = source
                .copy_into(&target)
                .await
                .context("copying (nothing was committed to the target)")?;
            source.close().await;
            target.close().await;
            match out {
                Output::Json => {
                    println!(
                        "{}",
                        serde_json::json!({"copied": crate::backup::tables_json(&report.tables)})
                    );
                }
                Output::Table => {
                    crate::backup::print_tables(&report.tables);
                    println!(
                        "copied. Now set in the config:\n\n[database]\nurl = \"{to}\"\n\n\
                         and start the server (the SQLite file stays as it was)."
                    );
                }
            }
        }
    }
    Ok(())
}

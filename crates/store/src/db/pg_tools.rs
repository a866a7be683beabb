//! PostgreSQL's own tools for whole-database backups: `pg_dump` (custom format) on a snapshot
//! the store exported, and `pg_restore` in one transaction. The connection is handed to them
//! in `PG*` variables, so a password in the url never shows on a command line.

use crate::{Result, StoreError};
use std::path::Path;
use tokio::process::Command;
use tokio_postgres::config::Host;

/// `tool` (`pg_dump`, `pg_restore`) with the connection of `url` in its environment.
fn command(tool: &str, url: Option<&str>) -> Result<Command> {
    let mut cmd = Command::new(tool);
    cmd.stdin(std::process::Stdio::null())
        .env_remove("PGSERVICE")
        .env_remove("PGPASSFILE")
        .kill_on_drop(true);
    let Some(url) = url else { return Ok(cmd) };
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Unavailable(format!("the database url is not valid: {e}")))?;
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        cmd.env("PGHOST", hosts.join(","));
    }
    let ports: Vec<String> = cfg.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        cmd.env("PGPORT", ports.join(","));
    }
    if let Some(user) = cfg.get_user() {
        cmd.env("PGUSER", user);
    }
    if let Some(password) = cfg.get_password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(password).into_owned());
    }
    if let Some(db) = cfg.get_dbname() {
        cmd.env("PGDATABASE", db);
    }
    Ok(cmd)
}

/// Runs `cmd` (`tool`) to its end; its standard output, or an error with the end of its
/// standard error.
async fn run(tool: &str, mut cmd: Command) -> Result<Vec<u8>> {
    let out = cmd.output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::Unavailable(format!(
                "{tool} is not installed: install the PostgreSQL client tools \
                 (Debian: postgresql-client, the server's major version or newer)"
            ))
        } else {
            StoreError::Unavailable(format!("cannot run {tool}: {e}"))
        }
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(StoreError::Backup(format!(
        "{tool} failed ({}): {}",
        out.status,
        tail.join(" / ")
    )))
}

/// Dumps the database of `url`, as it is in the exported `snapshot`, into `dest`.
pub(crate) async fn dump(url: &str, snapshot: &str, dest: &Path) -> Result<()> {
    let mut cmd = command("pg_dump", Some(url))?;
    cmd.arg("--format=custom")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--file")
        .arg(dest);
    run("pg_dump", cmd).await.map(drop)
}

/// The schema version `file` (a `pg_dump` archive) holds: reading its `schema_migrations`
/// also proves its table of contents and that table's data are whole.
pub(crate) async fn schema_version(file: &Path) -> Result<i64> {
    let mut cmd = command("pg_restore", None)?;
    cmd.args(["--data-only", "--table=schema_migrations", "--file=-"])
        .arg(file);
    let sql = run("pg_restore", cmd).await.map_err(|e| {
        StoreError::Backup(format!(
            "{} is not a whole pg_dump archive: {e}",
            file.display()
        ))
    })?;
    let sql = String::from_utf8_lossy(&sql);
    let mut rows = sql
        .lines()
        .skip_while(|l| !l.starts_with("COPY "))
        .skip(1)
        .take_while(|l| *l != "\\.");
    let newest = rows.try_fold(None::<i64>, |max, row| {
        let v = row.split('\t').next()?.parse::<i64>().ok()?;
        Some(Some(max.map_or(v, |m| m.max(v))))
    });
    match newest {
        Some(Some(v)) => Ok(v),
        _ => Err(StoreError::Backup(format!(
            "{} holds no Basphere database (no schema_migrations rows)",
            file.display()
        ))),
    }
}

/// Restores `file` into the (empty) database of `url` in one transaction: on any error
/// nothing of it stays.
pub(crate) async fn restore(url: &str, file: &Path) -> Result<()> {
    let mut cmd = command("pg_restore", Some(url))?;
    cmd.args([
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
    ])
    .arg("--dbname")
    .arg(url_db(url)?)
    .arg(file);
    run("pg_restore", cmd).await.map(drop)
}

/// The database name of `url` (pg_restore needs `--dbname` to restore into a database).
fn url_db(url: &str) -> Result<String> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Unavailable(format!("the database url is not valid: {e}")))?;
    Ok(cfg
        .get_dbname()
        .or(cfg.get_user())
        .unwrap_or("postgres")
        .to_string())
}

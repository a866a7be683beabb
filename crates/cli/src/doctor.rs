//! `basphere doctor`: the readiness checks for an operator on the host. A running server's
//! own `/ready` (asked on the Unix socket, so with details) gives the database, engine and
//! provider checks; without one, the same checks run here against the config
//! (`basphere_app::doctor`). The install's file modes are checked either way.

use crate::args::Global;
use basphere_client::{Client, Endpoint};
use basphere_provider::Check;
use std::process::ExitCode;

pub async fn run(g: &Global) -> anyhow::Result<ExitCode> {
    let cfg = match crate::serve::load_config(g.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            let c = Check::fail(
                "config",
                format!("{e:#}")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                "fix the config file (basphere init writes a commented default)",
            );
            return Ok(crate::extra::print_checks(g.output, &[c]));
        }
    };
    let socket = g
        .socket
        .clone()
        .unwrap_or_else(|| cfg.server.socket.clone());
    let mut checks = vec![];
    match server_checks(&socket).await {
        Some(server) => {
            checks.push(Check::ok(
                "server",
                format!("answers on {}", socket.display()),
            ));
            checks.extend(server);
        }
        None => {
            checks.push(Check::fail(
                "server",
                format!("no basphere server answers on {}", socket.display()),
                "systemctl start basphere (or basphere serve); the checks below ran here",
            ));
            checks.push(basphere_app::doctor::database(&cfg).await);
            checks.extend(basphere_app::doctor::provider(&cfg).await);
        }
    }
    checks.extend(basphere_app::doctor::file_checks(&cfg));
    Ok(crate::extra::print_checks(g.output, &checks))
}

/// The checks of the server on `socket`, or `None` when nothing answers there as a server.
async fn server_checks(socket: &std::path::Path) -> Option<Vec<Check>> {
    if !socket.exists() {
        return None;
    }
    let c = Client::new(Endpoint::Unix(socket.to_path_buf()));
    let r = tokio::time::timeout(std::time::Duration::from_secs(30), c.get("/ready"))
        .await
        .ok()?
        .ok()?;
    let checks = r.body.data.get("checks")?.clone();
    serde_json::from_value(checks).ok()
}

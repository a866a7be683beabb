//! Operator commands: `doctor` (runs with or without a server), `ready` (a running server's
//! `/ready`, the container image's health check), `completions` and `man`. They are added
//! beside the commands of [`crate::args::Cli`] (see [`augment`]) and run before any of them.

use crate::args::{Cli, Global, Output};
use basphere_provider::{Check, CheckStatus, all_ready};
use clap::{Command, CommandFactory, FromArgMatches, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum Extra {
    /// Check this install (database, engine, provider, files) and say how to fix each problem;
    /// exits 1 when a check fails.
    Doctor,
    /// Ask the running server's /ready (on its socket, or --url) and print each check; exits 1
    /// unless it answers ready (the container image's health check).
    Ready,
    /// Print a shell completion script (bash, zsh or fish) to standard output.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the manual page (roff) to standard output, or with --dir write one page per command.
    Man {
        /// Write basphere.1, basphere-vm.1, basphere-vm-create.1 … into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// `cmd` with the extra commands beside its own.
pub fn augment(cmd: Command) -> Command {
    Extra::augment_subcommands(cmd)
}

/// The whole command line of `basphere`, extra commands included.
pub fn full_command() -> Command {
    augment(Cli::command())
}

/// The extra command `matches` names, with the global options, if it names one.
pub fn from_matches(matches: &clap::ArgMatches) -> Option<(Extra, Global)> {
    let (name, _) = matches.subcommand()?;
    if !Extra::has_subcommand(name) {
        return None;
    }
    let extra = Extra::from_arg_matches(matches).unwrap_or_else(|e| e.exit());
    let global = Global::from_arg_matches(matches).unwrap_or_else(|e| e.exit());
    Some((extra, global))
}

pub async fn run(extra: Extra, g: Global) -> anyhow::Result<ExitCode> {
    match extra {
        Extra::Doctor => return crate::doctor::run(&g).await,
        Extra::Ready => return ready(&g).await,
        Extra::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = vec![];
            clap_complete::generate(shell, &mut full_command(), "basphere", &mut script);
            write_stdout(&script)?;
        }
        Extra::Man { dir: None } => {
            let mut page = vec![];
            clap_mangen::Man::new(full_command()).render(&mut page)?;
            write_stdout(&page)?;
        }
        Extra::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(full_command(), &dir)?;
            println!("manual pages written to {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `basphere ready` waits for the answer (the server bounds its own checks at 15 s).
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

async fn ready(g: &Global) -> anyhow::Result<ExitCode> {
    let client = crate::commands::client(g)?;
    let answer = match tokio::time::timeout(READY_WAIT, client.get("/ready")).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("not ready: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(_) => {
            eprintln!(
                "not ready: the server did not answer /ready within {}s",
                READY_WAIT.as_secs()
            );
            return Ok(ExitCode::from(1));
        }
    };
    let checks: Vec<Check> = answer
        .body
        .data
        .get("checks")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    if checks.is_empty() {
        eprintln!(
            "not ready: /ready answered {} without checks: {}",
            answer.status, answer.body.message
        );
        return Ok(ExitCode::from(1));
    }
    Ok(print_checks(g.output, &checks))
}

/// Writes `bytes` to standard output; a reader that went away (`| head`) is no error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Prints `checks` for an operator (or as JSON); the exit code says whether one failed.
pub fn print_checks(out: Output, checks: &[Check]) -> ExitCode {
    let ready = all_ready(checks);
    if out == Output::Json {
        let v = serde_json::json!({"ready": ready, "checks": checks});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in checks {
            println!("{:<4}  {:w$}  {}", c.status.as_str(), c.name, c.detail);
            if c.status != CheckStatus::Ok
                && let Some(fix) = &c.fix
            {
                println!("{:<4}  {:w$}  fix: {fix}", "", "");
            }
        }
        let failed = checks.iter().filter(|c| c.failed()).count();
        let warned = checks
            .iter()
            .filter(|c| c.status == CheckStatus::Warn)
            .count();
        println!(
            "{}: {failed} failed, {warned} warning(s), {} ok",
            if ready { "ready" } else { "not ready" },
            checks.len() - failed - warned
        );
    }
    if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

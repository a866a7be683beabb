//! `basphere`: the server, the admin tool and the user CLI in one binary. Invoked under the
//! prototype's names (create-vm, list-vms, delete-vm, show-quota, list-resources,
//! basphere-admin) it behaves as those commands.

mod args;
mod backup;
mod bench;
mod commands;
mod db;
mod doctor;
mod extra;
mod listing;
mod logging;
mod modes;
mod output;
mod providers;
mod serve;
mod vm;

use clap::{Args, Command, CommandFactory, FromArgMatches};
use std::process::ExitCode;

/// The prototype's command names and the subcommand each stands for.
pub const ALIASES: &[(&str, &[&str])] = &[
    ("create-vm", &["vm", "create"]),
    ("list-vms", &["vm", "list"]),
    ("delete-vm", &["vm", "delete"]),
    ("show-quota", &["quota"]),
    ("list-resources", &["resources"]),
    ("basphere-admin", &["admin"]),
];

/// The file name the binary was invoked as.
fn prog_name(argv: &[String]) -> String {
    argv.first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rewrites `create-vm -n x` into `basphere vm create -n x`, etc.
fn expand_alias(mut argv: Vec<String>) -> Vec<String> {
    let prog = prog_name(&argv);
    if let Some((_, sub)) = ALIASES.iter().find(|(n, _)| *n == prog) {
        let rest = argv.split_off(1);
        let mut out = vec![prog];
        out.extend(sub.iter().map(|s| s.to_string()));
        out.extend(rest);
        return out;
    }
    argv
}

/// The command line, with the subcommand a prototype name stands for renamed to it: its help
/// and errors read `Usage: create-vm [OPTIONS]`, and its own subcommands
/// `basphere-admin user list`, as the prototype's commands did.
fn command_for(argv: &[String]) -> Command {
    let cmd = args::Cli::command();
    let prog = prog_name(argv);
    match ALIASES.iter().find(|(n, _)| *n == prog) {
        Some((alias, path)) => rename(cmd, path, alias),
        None => cmd,
    }
}

/// `cmd` with its subcommand at `path` shown under the name `alias`.
fn rename(cmd: Command, path: &[&str], alias: &str) -> Command {
    let Some((first, rest)) = path.split_first() else {
        return cmd;
    };
    cmd.mut_subcommand(*first, |sc| {
        if rest.is_empty() {
            shown_as(sc, alias)
        } else {
            rename(sc, rest, alias)
        }
    })
}

/// `cmd` and its subcommands with the usage lines of a program named `name` (clap would name
/// them after the full path they were reached by).
fn shown_as(cmd: Command, name: &str) -> Command {
    // Its usage as a program of its own, with the global options it also takes.
    let mut alone = args::Global::augment_args(cmd.clone()).bin_name(name);
    let usage = alone.render_usage().to_string();
    let usage = usage
        .strip_prefix("Usage: ")
        .unwrap_or(&usage)
        .trim()
        .to_string();
    let mut cmd = cmd.override_usage(usage);
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for sub in subs {
        let full = format!("{name} {sub}");
        cmd = cmd.mut_subcommand(&sub, |c| shown_as(c, &full));
    }
    cmd
}

/// What the command line asks for.
enum Parsed {
    Cli(args::Cli),
    Extra(extra::Extra, args::Global),
}

/// Parses the command line (exits with clap's message on an error or for `--help`).
fn parse(argv: Vec<String>) -> Parsed {
    let matches = extra::augment(command_for(&argv)).get_matches_from(expand_alias(argv));
    if let Some((e, g)) = extra::from_matches(&matches) {
        return Parsed::Extra(e, g);
    }
    Parsed::Cli(args::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn main() -> ExitCode {
    // The qemu provider starts this binary as each VM's console ring writer.
    if let Some(code) = basphere_qemu::console_helper_main() {
        return code;
    }
    basphere_app::alloc::tune();
    let cli = parse(std::env::args().collect());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    logging::init(matches!(&cli, Parsed::Cli(c) if matches!(c.cmd, args::Cmd::Serve)));
    let done = match cli {
        Parsed::Cli(cli) => rt.block_on(commands::run(cli)),
        Parsed::Extra(e, g) => rt.block_on(extra::run(e, g)),
    };
    match done {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aliases_expand() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            super::expand_alias(v(&["/usr/local/bin/create-vm", "-n", "web"])),
            v(&["create-vm", "vm", "create", "-n", "web"])
        );
        assert_eq!(
            super::expand_alias(v(&["basphere-admin", "user", "list"])),
            v(&["basphere-admin", "admin", "user", "list"])
        );
        assert_eq!(
            super::expand_alias(v(&["basphere", "serve"])),
            v(&["basphere", "serve"])
        );
    }

    /// The usage line `cmd` prints for `args` (its `--help`'s first `Usage:` line).
    fn usage(argv: &[&str]) -> String {
        let argv: Vec<String> = argv.iter().map(|x| x.to_string()).collect();
        let err = super::command_for(&argv)
            .try_get_matches_from(super::expand_alias(argv))
            .unwrap_err();
        let text = err.render().to_string();
        text.lines()
            .find(|l| l.starts_with("Usage: "))
            .unwrap_or_else(|| panic!("no usage line: {text}"))
            .to_string()
    }

    #[test]
    fn usage_lines_read_as_the_prototype_names() {
        assert_eq!(
            usage(&["/usr/local/bin/create-vm", "--help"]),
            "Usage: create-vm [OPTIONS]"
        );
        assert_eq!(
            usage(&["basphere-admin", "--help"]),
            "Usage: basphere-admin [OPTIONS] <COMMAND>"
        );
        assert_eq!(
            usage(&["basphere-admin", "user", "list", "--help"]),
            "Usage: basphere-admin user list [OPTIONS]"
        );
        assert_eq!(
            usage(&["delete-vm", "--help"]),
            "Usage: delete-vm [OPTIONS] <NAME>"
        );
        assert_eq!(
            usage(&["show-quota", "--help"]),
            "Usage: show-quota [OPTIONS]"
        );
        // An error shows the same line.
        assert_eq!(
            usage(&["create-vm", "--no-such-flag"]),
            "Usage: create-vm [OPTIONS]"
        );
        // Under its own name the binary is unchanged.
        assert_eq!(
            usage(&["basphere", "vm", "create", "--help"]),
            "Usage: basphere vm create [OPTIONS]"
        );
    }

    #[test]
    fn every_subcommand_has_a_description() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sc in c.get_subcommands() {
                let p = format!("{path} {}", sc.get_name());
                if sc.get_about().is_none() && sc.get_name() != "help" {
                    missing.push(p.clone());
                }
                walk(sc, &p, missing);
            }
        }
        let mut missing = vec![];
        walk(
            &<crate::args::Cli as clap::CommandFactory>::command(),
            "basphere",
            &mut missing,
        );
        assert!(missing.is_empty(), "no one-line description: {missing:?}");
    }

    #[test]
    fn global_options_have_their_own_heading() {
        let argv: Vec<String> = ["basphere", "vm", "create", "--help"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        let help = super::command_for(&argv)
            .try_get_matches_from(argv)
            .unwrap_err()
            .render()
            .to_string();
        let (own, global) = help
            .split_once(&format!("{}:", crate::args::GLOBAL))
            .unwrap_or_else(|| panic!("no global heading: {help}"));
        for flag in [
            "--socket", "--url", "--token", "--output", "--config", "--ca",
        ] {
            assert!(
                global.contains(flag),
                "{flag} under the global heading: {help}"
            );
            assert!(
                !own.contains(flag),
                "{flag} among the command's own: {help}"
            );
        }
        assert!(
            own.contains("--name") && !global.contains("--name"),
            "{help}"
        );
    }
}

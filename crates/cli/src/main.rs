//! `basphere`: the server, the admin tool and the user CLI in one binary. Invoked under the
//! prototype's names (create-vm, list-vms, delete-vm, show-quota, list-resources,
//! basphere-admin) it behaves as those commands.

mod args;
mod bench;
mod commands;
mod db;
mod modes;
mod output;
mod providers;
mod serve;

use clap::Parser;
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

/// Rewrites `create-vm -n x` into `basphere vm create -n x`, etc.
fn expand_alias(mut argv: Vec<String>) -> Vec<String> {
    let prog = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((_, sub)) = ALIASES.iter().find(|(n, _)| *n == prog) {
        let rest = argv.split_off(1);
        let mut out = vec![prog];
        out.extend(sub.iter().map(|s| s.to_string()));
        out.extend(rest);
        return out;
    }
    argv
}

fn main() -> ExitCode {
    // The qemu provider starts this binary as each VM's console ring writer.
    if let Some(code) = basphere_qemu::console_helper_main() {
        return code;
    }
    // glibc gives every thread that allocates its own arena; with a dozen threads (runtime,
    // SQLite workers, the write thread) a server then keeps ~10 MB of partly used heaps. Two
    // arenas keep the resident size close to what is live. Set before any thread starts.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let argv = expand_alias(std::env::args().collect());
    let cli = args::Cli::parse_from(argv);
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
    match rt.block_on(commands::run(cli)) {
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
}

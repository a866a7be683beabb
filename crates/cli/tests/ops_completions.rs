//! `basphere completions bash|zsh|fish` and `basphere man`: generated from the same command
//! line the binary parses, so every subcommand (the operator commands too) is in them.
mod common;
use common::*;
use std::process::Command;

fn out(args: &[&str]) -> String {
    let o = run_ok(Command::new(BIN).args(args));
    String::from_utf8(o.stdout).unwrap()
}

/// Every subcommand path of `basphere --help`, read from the binary's own help pages.
fn subcommands(path: &[&str], acc: &mut Vec<String>) {
    let mut args: Vec<&str> = path.to_vec();
    args.push("--help");
    let help = out(&args);
    let Some((_, list)) = help.split_once("Commands:\n") else {
        return;
    };
    for line in list.lines() {
        if !line.starts_with("  ") || line.starts_with("   ") {
            if !line.starts_with(' ') {
                break;
            }
            continue;
        }
        let name = line.split_whitespace().next().unwrap().to_string();
        if name == "help" || name == "bench" {
            continue;
        }
        acc.push(name.clone());
        let mut next = path.to_vec();
        next.push(&name);
        subcommands(&next, acc);
    }
}

#[test]
fn bash_completion_offers_every_subcommand_and_loads() {
    let script = out(&["completions", "bash"]);
    let mut names = vec![];
    subcommands(&[], &mut names);
    for must in [
        "doctor",
        "completions",
        "man",
        "vm",
        "create",
        "admin",
        "approve",
        "serve",
    ] {
        assert!(names.iter().any(|n| n == must), "{must} in {names:?}");
    }
    for n in &names {
        assert!(
            script
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .any(|w| w == n),
            "the bash completion lacks the subcommand {n}"
        );
    }
    // bash accepts it and registers it for `basphere`.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("basphere.bash");
    std::fs::write(&f, &script).unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p basphere", f.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("basphere"));
}

#[test]
fn zsh_and_fish_completions_are_generated() {
    let zsh = out(&["completions", "zsh"]);
    assert!(
        zsh.starts_with("#compdef basphere"),
        "{}",
        &zsh[..80.min(zsh.len())]
    );
    assert!(zsh.contains("doctor"));
    let fish = out(&["completions", "fish"]);
    assert!(fish.contains("complete -c basphere"), "{fish}");
    assert!(fish.contains("doctor"));
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn man_renders_a_page_and_one_per_command() {
    let page = out(&["man"]);
    assert!(page.contains(".TH basphere 1"), "{page}");
    assert!(
        page.contains(".SH NAME") && page.contains(".SH SUBCOMMANDS"),
        "{page}"
    );
    assert!(page.contains("doctor"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    out(&["man", "--dir", dir.path().to_str().unwrap()]);
    for f in [
        "basphere.1",
        "basphere-vm-create.1",
        "basphere-doctor.1",
        "basphere-admin-user-approve.1",
    ] {
        let p = dir.path().join(f);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(text.contains(".TH"), "{f}");
    }
    // Where man(1) is installed, it formats the page.
    if let Ok(o) = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(dir.path().join("basphere-vm-create.1"))
        .env("MANWIDTH", "100")
        .output()
        && o.status.success()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("--name"), "{text}");
    }
}

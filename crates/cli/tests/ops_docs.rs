//! `docs/operations.md` stays true: every `basphere …` command it shows parses (the binary
//! accepts its subcommands and options, asked with `--help`), and every alert of
//! `contrib/prometheus/rules.yml` is explained there.
mod common;
use common::BIN;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn runbook() -> String {
    std::fs::read_to_string(repo("docs/operations.md")).unwrap()
}

/// The words of each `basphere …` command line in the text: in code blocks and in inline code,
/// up to shell syntax (redirection, pipes, comments); a `$(…)` stands for a value.
fn commands(text: &str) -> Vec<Vec<String>> {
    let mut lines: Vec<&str> = vec![];
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            lines.push(line);
        } else {
            // Inline code that is a command (not a message quoting the word).
            lines.extend(
                line.split('`')
                    .skip(1)
                    .step_by(2)
                    .filter(|c| c.starts_with("basphere ")),
            );
        }
    }
    lines
        .iter()
        .filter_map(|l| {
            let at = l.find("basphere ")?;
            let before = &l[..at];
            // `basphere` as the command: first on the line, or after `sudo` or a cron line's user
            // (not an argument, as in `journalctl -u basphere`).
            let before = before.trim_end();
            if !(before.is_empty() || before.ends_with("sudo") || before.ends_with(" root")) {
                return None;
            }
            let mut l = l[at..].to_string();
            while let Some(i) = l.find("$(") {
                let end = l[i..].find(')').map_or(l.len(), |j| i + j + 1);
                l.replace_range(i..end, "VALUE");
            }
            let words: Vec<String> = l
                .split_whitespace()
                .skip(1)
                .take_while(|w| {
                    !(w.starts_with('>')
                        || w.starts_with('<')
                        || w.starts_with('|')
                        || w.starts_with('#')
                        || w.starts_with("&&"))
                })
                .map(|w| w.trim_matches(|c| c == '\'' || c == '"').to_string())
                .collect();
            (!words.is_empty()).then_some(words)
        })
        .collect()
}

/// `basphere WORDS --help`: succeeds only when every subcommand and option in WORDS exists.
fn help_of(words: &[String]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(words)
        .arg("--help")
        .env_remove("BASPHERE_OUTPUT")
        .output()
        .unwrap()
}

#[test]
fn every_command_in_the_runbook_exists() {
    let cmds = commands(&runbook());
    assert!(cmds.len() > 20, "found only {cmds:?}");
    for c in &cmds {
        let out = help_of(c);
        assert!(
            out.status.success(),
            "`basphere {}` does not parse: {}",
            c.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_misspelt_command_is_caught() {
    let cmds = commands("run `basphere ops shw ID` and\n```\nbasphere backup --overwrite F\n```\n");
    for c in &cmds {
        assert!(!help_of(c).status.success(), "{c:?} parsed");
    }
    assert_eq!(cmds.len(), 2);
}

#[test]
fn every_alert_is_explained() {
    let rules = std::fs::read_to_string(repo("contrib/prometheus/rules.yml")).unwrap();
    let text = runbook();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(!alerts.is_empty());
    for a in alerts {
        assert!(
            text.contains(&format!("| `{a}` |")),
            "docs/operations.md does not explain {a}"
        );
    }
}

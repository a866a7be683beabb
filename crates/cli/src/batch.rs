//! `basphere plan -f`, `basphere apply -f` and batch progress (`ops watch --batch`).

use crate::args::Output;
use anyhow::{Context, bail};
use basphere_client::Client;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

fn body(file: &str, parallelism: Option<u32>) -> anyhow::Result<Value> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the manifest from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading manifest {file}"))?
    };
    let format = if file.ends_with(".yaml") || file.ends_with(".yml") {
        "yaml"
    } else {
        "toml"
    };
    Ok(json!({"manifest": text, "format": format, "parallelism": parallelism}))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Prints a plan like Terraform: `+` create, `=` keep, `-` delete.
fn print_plan(p: &Value) {
    for c in p["create"].as_array().into_iter().flatten() {
        let after: Vec<String> = c["requires"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| s(r).to_string())
            .chain(
                c["optional"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| format!("{}?", s(r))),
            )
            .collect();
        println!(
            "  + {:<24} {:<8} {:<12}{}",
            s(&c["name"]),
            c["spec"].as_str().unwrap_or("-"),
            c["os"].as_str().unwrap_or("(default)"),
            if after.is_empty() {
                String::new()
            } else {
                format!(" after {}", after.join(", "))
            }
        );
    }
    for k in p["keep"].as_array().into_iter().flatten() {
        let differs: Vec<&str> = k["differs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        println!(
            "  = {:<24} {}{}",
            s(&k["name"]),
            s(&k["status"]),
            if differs.is_empty() {
                String::new()
            } else {
                format!(
                    "  (differs: {}; not changed — delete it and apply again)",
                    differs.join(", ")
                )
            }
        );
    }
    for d in p["delete"].as_array().into_iter().flatten() {
        println!("  - {}", s(d));
    }
    let n = |k: &str| p[k].as_array().map(|a| a.len()).unwrap_or(0);
    println!(
        "Plan: {} to create, {} to keep, {} to delete ({} layer(s)).",
        n("create"),
        n("keep"),
        n("delete"),
        p["layers"]
    );
}

pub async fn plan(
    c: &Client,
    out: Output,
    file: &str,
    parallelism: Option<u32>,
) -> anyhow::Result<ExitCode> {
    let d = crate::commands::check(
        c.post("/api/v1/batches/plan", &body(file, parallelism)?)
            .await?,
    )?;
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print_plan(&d["plan"]);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn apply(
    c: &Client,
    out: Output,
    file: &str,
    parallelism: Option<u32>,
    yes: bool,
    no_wait: bool,
) -> anyhow::Result<ExitCode> {
    let b = body(file, parallelism)?;
    let d = crate::commands::check(c.post("/api/v1/batches/plan", &b).await?)?;
    let deletes = d["plan"]["delete"].as_array().map(|a| a.len()).unwrap_or(0);
    if out == Output::Table {
        print_plan(&d["plan"]);
    }
    if deletes > 0 && !yes {
        if !std::io::stdin().is_terminal() {
            bail!("the plan deletes {deletes} VM(s); pass --yes to apply it");
        }
        if !crate::commands::confirm(&format!("Delete {deletes} VM(s) and apply?"))? {
            bail!("not applied");
        }
    }
    let r = crate::commands::check(c.post("/api/v1/batches", &b).await?)?;
    let Some(batch) = r["batch_id"].as_str() else {
        if out == Output::Json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!("Nothing to do.");
        }
        return Ok(ExitCode::SUCCESS);
    };
    if no_wait {
        if out == Output::Json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!("batch {batch} accepted; follow with: basphere ops watch --batch {batch}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    watch(c, out, batch).await
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    action: String,
    status: String,
    steps: usize,
    done: usize,
    current: String,
    error: Option<String>,
}

impl Node {
    fn terminal(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let f = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!("{}{}", "█".repeat(f), "░".repeat(width - f))
}

/// Redraws the progress block on a terminal: an overall bar, then a bar per node in flight.
struct Screen {
    tty: bool,
    lines: usize,
    started: Instant,
}

impl Screen {
    fn draw(&mut self, nodes: &[Node]) {
        if !self.tty {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.lines > 0 {
            let _ = write!(err, "\x1b[{}A\x1b[J", self.lines);
        }
        let total = nodes.len();
        let ended = nodes.iter().filter(|n| n.terminal()).count();
        let ok = nodes.iter().filter(|n| n.status == "succeeded").count();
        let bad = nodes
            .iter()
            .filter(|n| n.terminal() && n.status != "succeeded")
            .count();
        let running: Vec<&Node> = nodes
            .iter()
            .filter(|n| !n.terminal() && n.done + usize::from(!n.current.is_empty()) > 0)
            .collect();
        let mut out = vec![format!(
            "{:>6.1}s batch [{}] {ended}/{total} ended · {ok} ok · {bad} failed/skipped · {} running",
            self.started.elapsed().as_secs_f64(),
            bar(ended, total, 30),
            running.len()
        )];
        const SHOWN: usize = 12;
        for n in running.iter().take(SHOWN) {
            out.push(format!(
                "  {:<6} {:<24} [{}] {}",
                n.action,
                n.name,
                bar(n.done, n.steps, 12),
                n.current
            ));
        }
        if running.len() > SHOWN {
            out.push(format!("  … and {} more running", running.len() - SHOWN));
        }
        for l in &out {
            let _ = writeln!(err, "{l}");
        }
        self.lines = out.len();
    }
}

/// Follows a batch until every node ended, with multi-line progress bars on a terminal.
pub async fn watch(c: &Client, out: Output, batch: &str) -> anyhow::Result<ExitCode> {
    let d = crate::commands::check(c.get(&format!("/api/v1/batches/{batch}")).await?)?;
    let mut order = vec![];
    let mut nodes: HashMap<String, Node> = HashMap::new();
    for n in d["nodes"].as_array().into_iter().flatten() {
        let id = s(&n["operation_id"]).to_string();
        let steps = n["steps"].as_array().map(|a| a.len()).unwrap_or(0);
        // The stream replays the batch's events from its start: counts are rebuilt from it.
        let done = 0;
        order.push(id.clone());
        nodes.insert(
            id,
            Node {
                name: s(&n["node"]).to_string(),
                action: s(&n["action"]).to_string(),
                status: s(&n["status"]).to_string(),
                steps,
                done,
                current: String::new(),
                error: n["error"].as_str().map(str::to_string),
            },
        );
    }
    let tty = out == Output::Table && std::io::stderr().is_terminal();
    let mut screen = Screen {
        tty,
        lines: 0,
        started: Instant::now(),
    };
    let snapshot = |nodes: &HashMap<String, Node>| -> Vec<Node> {
        order.iter().map(|id| nodes[id].clone()).collect()
    };
    let all_ended = |nodes: &HashMap<String, Node>| nodes.values().all(Node::terminal);
    if !all_ended(&nodes) {
        screen.draw(&snapshot(&nodes));
        let mut last_draw = Instant::now();
        let started = screen.started;
        let r = c
            .follow(&format!("/api/v1/events?batch={batch}"), |kind, ev| {
                let Some(n) = nodes.get_mut(s(&ev["operation_id"])) else {
                    return true;
                };
                let step = s(&ev["step"]).to_string();
                match kind {
                    "step_started" => n.current = step,
                    "step_done" => {
                        n.done = (n.done + 1).min(n.steps);
                        n.current.clear();
                    }
                    "step_retry" => n.current = format!("{step} (retrying)"),
                    "undo_started" => n.current = "undoing".into(),
                    "step_undone" => n.done = n.done.saturating_sub(1),
                    "succeeded" | "failed" | "cancelled" => {
                        n.status = kind.to_string();
                        n.current.clear();
                        if kind != "succeeded" {
                            n.error = Some(s(&ev["message"]).to_string());
                        }
                        if !tty && out == Output::Table {
                            let mark = if kind == "succeeded" { "✓" } else { "✗" };
                            eprintln!(
                                "{:>7.1}s {mark} {} {}: {}",
                                started.elapsed().as_secs_f64(),
                                n.action,
                                n.name,
                                s(&ev["message"])
                            );
                        }
                    }
                    _ => {}
                }
                let done = nodes.values().all(Node::terminal);
                if done || last_draw.elapsed().as_millis() >= 100 {
                    screen.draw(&order.iter().map(|id| nodes[id].clone()).collect::<Vec<_>>());
                    last_draw = Instant::now();
                }
                !done
            })
            .await;
        r?;
    }
    // The final state from the server (also covers a stream that ended early).
    let d = crate::commands::check(c.get(&format!("/api/v1/batches/{batch}")).await?)?;
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    }
    let list = d["nodes"].as_array().cloned().unwrap_or_default();
    let failed: Vec<&Value> = list.iter().filter(|n| n["status"] != "succeeded").collect();
    if out == Output::Table {
        let ok = list.len() - failed.len();
        println!(
            "batch {batch}: {ok} of {} node(s) succeeded in {:.1}s",
            list.len(),
            screen.started.elapsed().as_secs_f64()
        );
        for n in &failed {
            println!(
                "  ✗ {} {} {}: {}",
                s(&n["action"]),
                s(&n["node"]),
                s(&n["status"]),
                n["error"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Follows one operation by polling until it ends, printing each step change (the event
/// stream of a retried operation replays its earlier ending first).
pub async fn wait_op(c: &Client, out: Output, id: &str) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut seen: HashMap<String, String> = HashMap::new();
    loop {
        let w = crate::commands::check(c.get(&format!("/api/v1/operations/{id}")).await?)?;
        for st in w["steps"].as_array().into_iter().flatten() {
            let (name, status) = (s(&st["name"]).to_string(), s(&st["status"]).to_string());
            if seen.get(&name) != Some(&status) {
                if out == Output::Table && status != "pending" {
                    eprintln!(
                        "{:>7.1}s · {id}: {name} {status}",
                        started.elapsed().as_secs_f64()
                    );
                }
                seen.insert(name, status);
            }
        }
        let status = s(&w["status"]);
        if matches!(status, "succeeded" | "failed" | "cancelled") {
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!(
                    "{id}: {status}{}",
                    w["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            return Ok(if status == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

//! `basphere plan -f`, `basphere apply -f` and batch progress (`ops watch --batch`).

use crate::args::Output;
use crate::commands::typed;
use anyhow::{Context, bail};
use basphere_client::Client;
use basphere_client::wire;
use basphere_core::WorkflowStatus;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

fn body(file: &str, parallelism: Option<u32>) -> anyhow::Result<wire::BatchRequest> {
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
    Ok(wire::BatchRequest {
        manifest: Some(text),
        format: Some(format.into()),
        parallelism: parallelism.map(i64::from),
        ..Default::default()
    })
}

/// Prints a plan like Terraform: `+` create, `=` keep, `-` delete.
fn print_plan(p: &wire::Plan) {
    for c in &p.create {
        let after: Vec<String> = c
            .requires
            .iter()
            .cloned()
            .chain(c.optional.iter().map(|r| format!("{r}?")))
            .collect();
        let extras: Vec<String> = c
            .extra_disks
            .iter()
            .map(|d| format!("disk {d}"))
            .chain(c.extra_networks.iter().map(|n| format!("net {n}")))
            .collect();
        println!(
            "  + {:<24} {:<8} {:<12}{}{}",
            c.name,
            c.spec.as_deref().unwrap_or("-"),
            c.os.as_deref().unwrap_or("(default)"),
            if extras.is_empty() {
                String::new()
            } else {
                format!(" [{}]", extras.join(", "))
            },
            if after.is_empty() {
                String::new()
            } else {
                format!(" after {}", after.join(", "))
            }
        );
    }
    for k in &p.keep {
        println!(
            "  = {:<24} {}{}",
            k.name,
            k.status,
            if k.differs.is_empty() {
                String::new()
            } else {
                format!(
                    "  (differs: {}; not changed — delete it and apply again)",
                    k.differs.join(", ")
                )
            }
        );
    }
    for d in &p.delete {
        println!("  - {d}");
    }
    println!(
        "Plan: {} to create, {} to keep, {} to delete ({} layer(s)).",
        p.create.len(),
        p.keep.len(),
        p.delete.len(),
        p.layers
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
        print_plan(&typed::<wire::Planned>(&d)?.plan);
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
    let planned: wire::Planned = typed(&d)?;
    let deletes = planned.plan.delete.len();
    if out == Output::Table {
        print_plan(&planned.plan);
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
    let applied: wire::BatchApplied = typed(&r)?;
    let Some(batch) = applied.batch_id.as_deref() else {
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
    for n in typed::<wire::Batch>(&d)?.nodes {
        // The stream replays the batch's events from its start: counts are rebuilt from it.
        order.push(n.operation_id.clone());
        nodes.insert(
            n.operation_id,
            Node {
                name: n.node.unwrap_or_default(),
                action: n.action,
                status: n.status.to_string(),
                steps: n.steps.len(),
                done: 0,
                current: String::new(),
                error: n.error,
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
                // Events of the batch's operations (a `truncated` notice is not one).
                let Ok(ev) = wire::Event::deserialize(ev) else {
                    return true;
                };
                let Some(n) = nodes.get_mut(&ev.operation_id) else {
                    return true;
                };
                let step = ev.step.clone().unwrap_or_default();
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
                            n.error = Some(ev.message.clone());
                        }
                        if !tty && out == Output::Table {
                            let mark = if kind == "succeeded" { "✓" } else { "✗" };
                            eprintln!(
                                "{:>7.1}s {mark} {} {}: {}",
                                started.elapsed().as_secs_f64(),
                                n.action,
                                n.name,
                                ev.message
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
    let list = typed::<wire::Batch>(&d)?.nodes;
    let failed: Vec<&wire::BatchNode> = list
        .iter()
        .filter(|n| n.status != WorkflowStatus::Succeeded)
        .collect();
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
                n.action,
                n.node.as_deref().unwrap_or(""),
                n.status,
                n.error.as_deref().unwrap_or("")
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
        let op: wire::Operation = typed(&w)?;
        for st in &op.steps {
            let (name, status) = (st.name.clone(), st.status.to_string());
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
        let status = op.status.as_str();
        if op.status.is_terminal() {
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!(
                    "{id}: {status}{}",
                    op.error
                        .as_deref()
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

//! VM commands: create (`create-vm`), list, show, delete, following their operations, and
//! `basphere ssh`.

use crate::args::*;
use crate::commands::{check, client, confirm, or_dash, prompt, say, typed};
use crate::output;
use anyhow::{Context, anyhow, bail};
use basphere_client::{Client, wire};
use serde_json::Value;
use std::io::IsTerminal;
use std::process::ExitCode;

/// The columns of a VM table.
pub(crate) const VM_COLS: &[(&str, &str)] = &[
    ("NAME", "/name"),
    ("STATUS", "/status"),
    ("IP", "/ip_address"),
    ("SPEC", "/spec"),
    ("OS", "/os"),
    ("CREATED", "/created_at"),
];

/// Follows operations (id, label) until each ends; prints step progress. True if all succeeded.
pub(crate) async fn follow(
    c: &Client,
    out: Output,
    ops: &[(String, String)],
) -> anyhow::Result<bool> {
    let mut tasks = tokio::task::JoinSet::new();
    let started = std::time::Instant::now();
    for (id, label) in ops {
        let c = c.clone();
        let (id, label) = (id.clone(), label.clone());
        tasks.spawn(async move {
            let mut result = None;
            let r = c
                .follow(&format!("/api/v1/operations/{id}/events"), |kind, ev| {
                    let msg = ev["message"].as_str().unwrap_or_default();
                    let t = started.elapsed().as_secs_f64();
                    if out == Output::Table {
                        let mark = match kind {
                            "step_done" | "succeeded" => "✓",
                            "step_failed" | "failed" => "✗",
                            "step_retry" => "↻",
                            "step_undone" | "undo_started" => "↶",
                            _ => "·",
                        };
                        eprintln!("{t:>7.1}s {mark} {label}: {msg}");
                    }
                    match kind {
                        "succeeded" => result = Some(Ok(())),
                        "failed" | "cancelled" => result = Some(Err(msg.to_string())),
                        _ => {}
                    }
                    true
                })
                .await;
            (label, r, result)
        });
    }
    let mut all_ok = true;
    while let Some(j) = tasks.join_next().await {
        let (label, r, result) = j?;
        r?;
        match result {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                all_ok = false;
                eprintln!("error: {label}: {e}");
            }
            None => {
                all_ok = false;
                eprintln!(
                    "error: {label}: the progress stream ended early; check with basphere ops show"
                );
            }
        }
    }
    Ok(all_ok)
}

pub(crate) async fn vm_cmd(c: &Client, out: Output, v: VmCmd) -> anyhow::Result<ExitCode> {
    match v {
        VmCmd::Create {
            name,
            os,
            spec,
            count,
            disks,
            nets,
            no_wait,
        } => {
            let extra_disks = disks
                .iter()
                .map(|d| wire::DiskRequest::parse(d).map_err(|e| anyhow::anyhow!("--disk: {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tty = std::io::stdin().is_terminal();
            let (name, os, spec, count) = if name.is_none() && tty {
                let cat: wire::Catalog = typed(&check(c.get("/api/v1/catalog").await?)?)?;
                let name = prompt("VM name (1-30 of a-z 0-9 -): ")?;
                let images: Vec<String> = cat.images.iter().map(|i| i.name.clone()).collect();
                let os = os.or_else(|| {
                    let def = &cat.default_image;
                    prompt(&format!("OS [{}] (default {def}): ", images.join(", ")))
                        .ok()
                        .filter(|s| !s.is_empty())
                });
                let specs: Vec<String> = cat.specs.keys().map(|k| k.to_string()).collect();
                let spec = spec.or_else(|| {
                    prompt(&format!("spec [{}] (default small): ", specs.join(", ")))
                        .ok()
                        .filter(|s| !s.is_empty())
                });
                let count = count.or_else(|| {
                    prompt("count (1-10, default 1): ")
                        .ok()
                        .and_then(|s| s.parse().ok())
                });
                (Some(name), os, spec, count)
            } else {
                (name, os, spec, count)
            };
            let Some(name) = name else {
                bail!("missing -n NAME (e.g. create-vm -n web -s small); see create-vm --help");
            };
            let req = wire::CreateVmsRequest {
                name: Some(name),
                os,
                spec,
                count: Some(i64::from(count.unwrap_or(1))),
                extra_disks: (!extra_disks.is_empty()).then_some(extra_disks),
                extra_networks: (!nets.is_empty()).then_some(nets),
                ..Default::default()
            };
            let d = check(c.post("/api/v1/vms", &req).await?)?;
            let vms = typed::<wire::VmsCreated>(&d)?.vms;
            if no_wait {
                if out == Output::Json {
                    output::fields(out, &d);
                } else {
                    for vm in &vms {
                        println!(
                            "{} accepted (ip {}), operation {}",
                            vm.name,
                            or_dash(vm.ip_address),
                            or_dash(vm.operation_id.as_deref())
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let ops: Vec<(String, String)> = vms
                .iter()
                .map(|v| (or_dash(v.operation_id.as_deref()), v.name.to_string()))
                .collect();
            let ok = follow(c, out, &ops).await?;
            let mut finals: Vec<Value> = vec![];
            for (_, n) in &ops {
                if let Ok(d) = check(c.get(&format!("/api/v1/vms/{n}")).await?) {
                    finals.push(d);
                }
            }
            if out == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&finals).unwrap_or_default()
                );
            } else {
                for vm in &finals {
                    let vm: wire::Vm = typed(vm)?;
                    if vm.status == basphere_core::VmStatus::Running {
                        println!("{} is running: {}", vm.name, or_dash(vm.ssh.as_deref()));
                    } else {
                        println!(
                            "{} is {}: {}",
                            vm.name,
                            vm.status,
                            or_dash(vm.error.as_deref())
                        );
                    }
                }
            }
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        VmCmd::List { all, json } => {
            if json || out == Output::Json {
                crate::listing::vms_json(c, all).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let d = serde_json::Value::Array(crate::listing::vms(c, all).await?);
            let mut cols = VM_COLS.to_vec();
            if all {
                cols.insert(1, ("OWNER", "/owner"));
            }
            output::table(out, &d, &cols);
        }
        VmCmd::Show { name, owner } => {
            let q = owner.map(|o| format!("?owner={o}")).unwrap_or_default();
            let d = check(c.get(&format!("/api/v1/vms/{name}{q}")).await?)?;
            output::fields(out, &d);
        }
        VmCmd::Delete {
            name,
            force,
            owner,
            no_wait,
        } => {
            let q = owner.map(|o| format!("?owner={o}")).unwrap_or_default();
            if !force {
                if !std::io::stdin().is_terminal() {
                    bail!(
                        "not on a terminal, so cannot ask for confirmation; pass -f to delete {name}"
                    );
                }
                let vm: wire::Vm = typed(&check(c.get(&format!("/api/v1/vms/{name}{q}")).await?)?)?;
                if !confirm(&format!("Delete VM {name} ({})?", or_dash(vm.ip_address)))? {
                    println!("not deleted");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let d = check(c.delete(&format!("/api/v1/vms/{name}{q}")).await?)?;
            let op = typed::<wire::Vm>(&d)?
                .operation_id
                .context("the server's answer names no delete operation")?;
            if no_wait {
                say(out, &d, &format!("deleting {name}, operation {op}"));
                return Ok(ExitCode::SUCCESS);
            }
            let ok = follow(c, out, &[(op, name.clone())]).await?;
            say(
                out,
                &d,
                &format!("{name} {}", if ok { "deleted" } else { "not deleted" }),
            );
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        VmCmd::Catalog => {
            let d = check(c.get("/api/v1/catalog").await?)?;
            if out == Output::Json {
                output::fields(out, &d);
            } else {
                let cat: wire::Catalog = typed(&d)?;
                println!("specs:");
                for (n, s) in &cat.specs {
                    println!(
                        "  {:8} {} vCPU  {} MiB  {} GiB",
                        n.as_str(),
                        s.vcpus,
                        s.memory_mib,
                        s.disk_gib
                    );
                }
                println!("images (default {}):", cat.default_image);
                for i in &cat.images {
                    println!("  {:12} login {}", i.name, i.login_user);
                }
                if let Some(d) = cat.extra_disks.filter(|d| d.max_count > 0) {
                    println!(
                        "extra disks: up to {}, {}-{} GiB each (--disk 20G, --disk 20G:raw)",
                        d.max_count, d.min_gb, d.max_gb
                    );
                }
                if !cat.networks.is_empty() {
                    println!(
                        "extra networks (up to {} per VM, --net NAME): {}",
                        cat.max_extra_networks,
                        cat.networks.join(", ")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens an SSH session (or runs `command`) on the caller's VM `name`.
pub(crate) async fn ssh(g: &Global, name: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    let c = client(g)?;
    let vm: wire::Vm = typed(&check(c.get(&format!("/api/v1/vms/{name}")).await?)?)?;
    let ip = vm
        .ip_address
        .ok_or_else(|| anyhow!("VM {name} has no address (status {})", vm.status))?;
    let user = vm.login_user.as_str();
    let mut cmd = crate::providers::ssh_command(g.config.as_deref());
    // Addresses are reused by later VMs: pin each VM instance's host key under its own alias.
    let alias = format!("HostKeyAlias=basphere-{}", vm.id);
    cmd.args([
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        &alias,
        &format!("{user}@{ip}"),
    ]);
    cmd.args(command);
    let status = cmd.status().context("running ssh")?;
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}

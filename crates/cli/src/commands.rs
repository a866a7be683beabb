//! Client commands: each is one or a few API calls and a readable rendering of the answer.

use crate::args::*;
use crate::output::{self, cell};
use anyhow::{Context, anyhow, bail};
use basphere_client::{Client, Endpoint, Response, wire};
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[path = "batch.rs"]
mod batch;

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

fn token_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/basphere/token"))
}

/// The client the global options name: `--url` (TCP with a token) or the Unix socket.
pub(crate) fn client(g: &Global) -> anyhow::Result<Client> {
    if let Some(url) = &g.url {
        // With a client certificate the token file is not read: the certificate may be the
        // only credential the server accepts.
        let token = g.token.clone().or_else(|| {
            g.cert
                .is_none()
                .then(token_file)
                .flatten()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|s| s.trim().to_string())
        });
        if let Some(rest) = url.strip_prefix("https://") {
            let addr = rest.trim_end_matches('/');
            let (host, addr) = match addr.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    (h.to_string(), addr.to_string())
                }
                _ => (addr.to_string(), format!("{addr}:443")),
            };
            let identity = g.cert.as_deref().zip(g.key.as_deref());
            let tls = basphere_client::TlsClient::new(&host, g.ca.as_deref(), identity)?;
            return Ok(Client::new(Endpoint::Tcp { addr, token }).with_tls(tls));
        }
        if g.ca.is_some() || g.cert.is_some() {
            bail!("--ca and --cert (BASPHERE_CA, BASPHERE_CERT) need an https:// --url");
        }
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        return Ok(Client::new(Endpoint::Tcp { addr, token }));
    }
    let socket = match &g.socket {
        Some(s) => s.clone(),
        None => crate::serve::load_config(g.config.as_deref())
            .map(|c| c.server.socket)
            .unwrap_or_else(|_| PathBuf::from("/run/basphere/basphere.sock")),
    };
    Ok(Client::new(Endpoint::Unix(socket)))
}

/// Every item of a paged list route (up to `max`), following `?after=` with the `key` of
/// each page's last item.
async fn get_all(c: &Client, path: &str, key: &str, max: Option<usize>) -> anyhow::Result<Value> {
    const PAGE: usize = 1000;
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut all: Vec<Value> = vec![];
    let mut after = String::new();
    loop {
        let want = max.map_or(PAGE, |m| (m - all.len()).min(PAGE));
        let d = check(c.get(&format!("{path}{sep}limit={want}{after}")).await?)?;
        let Value::Array(items) = d else {
            return Ok(d);
        };
        let full = items.len() == want;
        let last = items.last().map(|l| match &l[key] {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        });
        all.extend(items);
        match last {
            Some(l) if full && max.is_none_or(|m| all.len() < m) => after = format!("&after={l}"),
            _ => return Ok(Value::Array(all)),
        }
    }
}

/// Turns a refused request into an error with the server's message and field errors.
pub(crate) fn check(r: Response) -> anyhow::Result<Value> {
    if r.body.success {
        return Ok(r.body.data);
    }
    let mut msg = r.body.message.clone();
    let extra: Vec<&String> = r
        .body
        .errors
        .iter()
        .filter(|e| **e != r.body.message)
        .collect();
    for e in extra {
        msg.push_str(&format!("\n  - {e}"));
    }
    let hint = match r.status.as_u16() {
        401 => {
            "\nhint: make a token with `basphere token create` on the Basphere host, then pass --token or BASPHERE_TOKEN"
        }
        403 if r.body.message.contains("admin") => {
            "\nhint: run this as an admin (root on the Basphere host, or with the admin token)"
        }
        _ => "",
    };
    Err(anyhow!("{msg}{hint}"))
}

/// `data` as the route's wire type.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(data: &Value) -> anyhow::Result<T> {
    T::deserialize(data).context("the server's answer is not in the shape this client knows")
}

/// `-` for an absent value, as `cell` shows JSON's null.
pub(crate) fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub(crate) fn say(out: Output, data: &Value, message: &str) {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
    } else {
        println!("{message}");
    }
}

fn read_key(path: &str) -> anyhow::Result<String> {
    let p = expand_home(path);
    let s = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot read SSH public key {} (make one with: ssh-keygen -t ed25519)",
            p.display()
        )
    })?;
    Ok(s.trim().to_string())
}

pub(crate) fn prompt(question: &str) -> anyhow::Result<String> {
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

pub(crate) fn confirm(question: &str) -> anyhow::Result<bool> {
    Ok(matches!(
        prompt(&format!("{question} [y/N] "))?.as_str(),
        "y" | "Y" | "yes"
    ))
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global.clone();
    let out = g.output;
    match cli.cmd {
        Cmd::Init { force, tls_cert } => {
            crate::serve::init(g.config.as_deref(), force, tls_cert.as_deref()).await?
        }
        Cmd::Serve => crate::serve::serve(g.config.as_deref()).await?,
        Cmd::InstallAliases { dir } => install_aliases(&dir)?,
        Cmd::Bench(a) => crate::bench::run(a).await?,
        Cmd::Image(ImageCmd::Build { name, force }) => {
            crate::providers::build_image(g.config.as_deref(), &name, force).await?
        }
        Cmd::Db(c) => crate::db::run(g.config.as_deref(), out, c).await?,
        Cmd::Backup { file } => crate::backup::backup(g.config.as_deref(), out, &file).await?,
        Cmd::Restore { file } => crate::backup::restore(g.config.as_deref(), out, &file).await?,
        Cmd::Ssh { name, command } => return crate::vm::ssh(&g, &name, &command).await,
        cmd => return client_cmd(&g, out, cmd).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn install_aliases(dir: &Path) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating this binary")?;
    std::fs::create_dir_all(dir)?;
    for (name, _) in crate::ALIASES {
        let link = dir.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)?;
        }
        std::os::unix::fs::symlink(&me, &link)
            .with_context(|| format!("linking {}", link.display()))?;
        println!("{} -> {}", link.display(), me.display());
    }
    Ok(())
}

async fn client_cmd(g: &Global, out: Output, cmd: Cmd) -> anyhow::Result<ExitCode> {
    let c = client(g)?;
    match cmd {
        Cmd::Register {
            username,
            email,
            team,
            key_file,
        } => {
            let username = match username {
                Some(u) => u,
                None => nix::unistd::User::from_uid(nix::unistd::getuid())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .ok_or_else(|| anyhow!("pass --username"))?,
            };
            let key = read_key(&key_file)?;
            let d = check(
                c.post(
                    "/api/v1/register",
                    &json!({"username": username, "email": email, "team": team, "public_key": key}),
                )
                .await?,
            )?;
            say(
                out,
                &d,
                &format!(
                    "registration of {username} received; an admin will review it (check with: basphere me)"
                ),
            );
        }
        Cmd::Me => {
            let d = check(c.get("/api/v1/me").await?)?;
            if out == Output::Json {
                output::fields(out, &d);
            } else {
                let me: wire::Me = typed(&d)?;
                let u = &me.user;
                println!("username  {}", u.username);
                println!("status    {}", u.status);
                println!("role      {}", u.role);
                println!("team      {}", u.team);
                println!("ip block  {}", or_dash(me.ip_block.as_deref()));
                if let Some(r) = me
                    .registration
                    .as_ref()
                    .and_then(|r| r.reject_reason.as_deref())
                    .filter(|s| !s.is_empty())
                {
                    println!("rejected  {r}");
                }
            }
        }
        Cmd::Enroll {
            username,
            code,
            save,
        } => {
            let d = check(
                c.without_token()
                    .post(
                        "/api/v1/enroll",
                        &json!({"username": username, "code": code}),
                    )
                    .await?,
            )?;
            let token = typed::<wire::TokenCreated>(&d)?.token;
            if save {
                let p = token_file().ok_or_else(|| anyhow!("HOME is not set"))?;
                save_token(&p, &token)?;
                say(out, &d, &format!("token saved to {}", p.display()));
            } else {
                say(
                    out,
                    &d,
                    &format!(
                        "{token}\n(shown once; keep it in ~/.config/basphere/token or BASPHERE_TOKEN)"
                    ),
                );
            }
        }
        Cmd::Token(t) => match t {
            TokenCmd::Create { name, ttl_days } => {
                let d = check(
                    c.post(
                        "/api/v1/tokens",
                        &json!({"name": name, "ttl_days": ttl_days}),
                    )
                    .await?,
                )?;
                let t: wire::TokenCreated = typed(&d)?;
                say(out, &d, &format!("{}\n(shown once)", t.token));
            }
            TokenCmd::List => {
                let d = get_all(&c, "/api/v1/tokens", "id", None).await?;
                output::table(
                    out,
                    &d,
                    &[
                        ("ID", "/id"),
                        ("NAME", "/name"),
                        ("CREATED", "/created_at"),
                        ("LAST USED", "/last_used_at"),
                    ],
                );
            }
            TokenCmd::Revoke { id } => {
                let d = check(c.delete(&format!("/api/v1/tokens/{id}")).await?)?;
                say(out, &d, &format!("token {id} revoked"));
            }
        },
        Cmd::Key(KeyCmd::Change { key_file }) => {
            let key = read_key(&key_file)?;
            let d = check(
                c.post("/api/v1/key-change", &json!({"public_key": key}))
                    .await?,
            )?;
            say(out, &d, "key change requested; an admin will review it");
        }
        Cmd::Vm(v) => return crate::vm::vm_cmd(&c, out, v).await,
        Cmd::Quota => {
            let d = check(c.get("/api/v1/quota").await?)?;
            if out == Output::Json {
                output::fields(out, &d);
            } else {
                let v: wire::QuotaView = typed(&d)?;
                let (q, u) = (&v.quota, &v.usage);
                println!("quota of {}", v.username);
                println!("  VMs       {:>4} / {}", u.vms, q.max_vms);
                println!("  IPs       {:>4} / {}", u.ips, q.max_ips);
                println!("  clusters  {:>4} / {}", u.clusters, q.max_clusters);
                println!(
                    "  vCPUs     {:>4} / {}",
                    u.vcpus,
                    q.max_vcpus
                        .map_or_else(|| "unlimited".into(), |m| m.to_string())
                );
                println!(
                    "  disk GiB  {:>4} / {}",
                    v.used_disk_gib,
                    v.max_disk_gib
                        .map_or_else(|| "unlimited".into(), |m| m.to_string())
                );
            }
        }
        Cmd::Resources => {
            let d = check(c.get("/api/v1/resources").await?)?;
            if out == Output::Json {
                output::fields(out, &d);
            } else {
                let r: wire::Resources = typed(&d)?;
                println!("user      {}", r.username);
                println!(
                    "ip block  {} (gateway {})",
                    or_dash(r.ip_block.as_deref()),
                    r.gateway
                );
                println!("VMs       {} / {}", r.usage.vms, r.quota.max_vms);
                output::table(out, &d["vms"], crate::vm::VM_COLS);
                println!("clusters  none");
            }
        }
        Cmd::Ops(o) => match o {
            OpsCmd::List { all } => {
                let d = check(c.get(&format!("/api/v1/operations?all={all}")).await?)?;
                output::table(
                    out,
                    &d,
                    &[
                        ("ID", "/id"),
                        ("KIND", "/kind"),
                        ("OWNER", "/owner"),
                        ("STATUS", "/status"),
                        ("ERROR", "/error"),
                    ],
                );
            }
            OpsCmd::Show { id } => {
                let d = check(c.get(&format!("/api/v1/operations/{id}")).await?)?;
                if out == Output::Json {
                    output::fields(out, &d);
                } else {
                    let op: wire::Operation = typed(&d)?;
                    println!("{} {} ({})", op.kind, op.id, op.status);
                    output::table(
                        out,
                        &d["steps"],
                        &[
                            ("STEP", "/name"),
                            ("STATUS", "/status"),
                            ("ATTEMPTS", "/attempts"),
                            ("ERROR", "/error"),
                        ],
                    );
                }
            }
            OpsCmd::Watch { id, batch } => {
                if let Some(b) = batch {
                    return batch::watch(&c, out, &b).await;
                }
                let id = id.unwrap_or_default();
                let ok = crate::vm::follow(&c, out, &[(id.clone(), id)]).await?;
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            OpsCmd::Cancel { id } => {
                let r = c
                    .post(&format!("/api/v1/operations/{id}/cancel"), &json!({}))
                    .await?;
                let msg = r.body.message.clone();
                let d = check(r)?;
                say(
                    out,
                    &d,
                    &format!("{msg}\nfollow with: basphere ops watch {id}"),
                );
            }
            OpsCmd::Retry { id, wait } => {
                let r = c
                    .post(&format!("/api/v1/operations/{id}/retry"), &json!({}))
                    .await?;
                let msg = r.body.message.clone();
                let d = check(r)?;
                if !wait {
                    say(
                        out,
                        &d,
                        &format!("{msg}\nfollow with: basphere ops watch {id}"),
                    );
                } else {
                    return batch::wait_op(&c, out, &id).await;
                }
            }
        },
        Cmd::Plan { file, parallelism } => return batch::plan(&c, out, &file, parallelism).await,
        Cmd::Apply {
            file,
            parallelism,
            yes,
            no_wait,
        } => return batch::apply(&c, out, &file, parallelism, yes, no_wait).await,
        Cmd::Admin(a) => admin_cmd(&c, out, a).await?,
        _ => unreachable!("server commands are handled before"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the token with mode 0600, also over an existing file with a wider mode.
fn save_token(p: &Path, token: &str) -> anyhow::Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    crate::serve::write_private(p, format!("{token}\n").as_bytes())
}

const USER_COLS: &[(&str, &str)] = &[
    ("USERNAME", "/username"),
    ("STATUS", "/status"),
    ("ROLE", "/role"),
    ("TEAM", "/team"),
    ("EMAIL", "/email"),
    ("MAX VMS", "/quota/max_vms"),
];

async fn admin_cmd(c: &Client, out: Output, a: AdminCmd) -> anyhow::Result<()> {
    match a {
        AdminCmd::User(u) => match u {
            UserCmd::Add {
                username,
                email,
                team,
                key_file,
            } => {
                let key = read_key(&key_file)?;
                let d = check(c.post("/api/v1/users", &json!({"username": username, "email": email, "team": team, "public_key": key})).await?)?;
                approved(out, &username, &d)?;
            }
            UserCmd::List { status } => {
                let q = status.map(|s| format!("?status={s}")).unwrap_or_default();
                let d = get_all(c, &format!("/api/v1/users{q}"), "username", None).await?;
                output::table(out, &d, USER_COLS);
            }
            UserCmd::Show { username } => {
                let d = check(c.get(&format!("/api/v1/users/{username}")).await?)?;
                if out == Output::Json {
                    output::fields(out, &d);
                } else {
                    output::fields(out, &d["user"]);
                    println!("ip block       {}", cell(&d["ip_block"]));
                    println!("usage          {}", d["usage"]);
                    output::table(out, &d["vms"], crate::vm::VM_COLS);
                }
            }
            UserCmd::Delete { username, force } => {
                delete_user(c, out, &username, force, false).await?
            }
            UserCmd::Purge { username, force } => {
                delete_user(c, out, &username, force, true).await?
            }
            UserCmd::Pending => {
                let d = get_all(c, "/api/v1/pending", "id", None).await?;
                output::table(
                    out,
                    &d,
                    &[
                        ("USERNAME", "/username"),
                        ("EMAIL", "/email"),
                        ("TEAM", "/team"),
                        ("KEY", "/public_key"),
                    ],
                );
            }
            UserCmd::Approve { username } => {
                let d = check(
                    c.post(&format!("/api/v1/users/{username}/approve"), &json!({}))
                        .await?,
                )?;
                approved(out, &username, &d)?;
            }
            UserCmd::Reject { username, reason } => {
                let d = check(
                    c.post(
                        &format!("/api/v1/users/{username}/reject"),
                        &json!({"reason": reason}),
                    )
                    .await?,
                )?;
                say(out, &d, &format!("registration of {username} rejected"));
            }
            UserCmd::Disable { username } => {
                let d = check(
                    c.post(&format!("/api/v1/users/{username}/disable"), &json!({}))
                        .await?,
                )?;
                say(out, &d, &format!("{username} disabled"));
            }
            UserCmd::Enable { username } => {
                let d = check(
                    c.post(&format!("/api/v1/users/{username}/enable"), &json!({}))
                        .await?,
                )?;
                say(out, &d, &format!("{username} enabled"));
            }
            UserCmd::Quota {
                username,
                max_vms,
                max_ips,
                max_clusters,
                max_vcpus,
                max_memory_mib,
                max_disk_gib,
            } => {
                let body = json!({"max_vms": max_vms, "max_ips": max_ips,
                    "max_clusters": max_clusters, "max_vcpus": max_vcpus,
                    "max_memory_mib": max_memory_mib, "max_disk_gib": max_disk_gib});
                let d = c
                    .call(
                        basphere_client::Method::PUT,
                        &format!("/api/v1/users/{username}/quota"),
                        Some(&body),
                    )
                    .await?;
                let d = check(d)?;
                if out == Output::Json {
                    output::fields(out, &d)
                } else {
                    println!("quota of {username}: {d}")
                }
            }
        },
        AdminCmd::Key(k) => match k {
            AdminKeyCmd::Pending => {
                let d = get_all(c, "/api/v1/key-changes", "id", None).await?;
                output::table(
                    out,
                    &d,
                    &[
                        ("USERNAME", "/username"),
                        ("REQUESTED", "/created_at"),
                        ("KEY", "/public_key"),
                    ],
                );
            }
            AdminKeyCmd::Approve { username } => {
                let d = check(
                    c.post(
                        &format!("/api/v1/key-changes/{username}/approve"),
                        &json!({}),
                    )
                    .await?,
                )?;
                say(out, &d, &format!("new key of {username} approved"));
            }
            AdminKeyCmd::Reject { username, reason } => {
                let d = check(
                    c.post(
                        &format!("/api/v1/key-changes/{username}/reject"),
                        &json!({"reason": reason}),
                    )
                    .await?,
                )?;
                say(out, &d, &format!("key change of {username} rejected"));
            }
        },
        AdminCmd::Audit {
            actor,
            action,
            target,
            limit,
        } => {
            let mut q = String::new();
            for (k, v) in [("actor", actor), ("action", action), ("target", target)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={v}"));
                }
            }
            let path = format!("/api/v1/audit{}", q.replacen('&', "?", 1));
            let mut d = get_all(c, &path, "id", Some(limit.max(1) as usize)).await?;
            if let Some(rows) = d.as_array_mut() {
                for r in rows {
                    if let Some(ms) = r["at"].as_i64() {
                        r["at"] = Value::String(basphere_store::format_ms(ms));
                    }
                }
            }
            output::table(
                out,
                &d,
                &[
                    ("AT", "/at"),
                    ("ACTOR", "/actor"),
                    ("ACTION", "/action"),
                    ("TARGET", "/target"),
                    ("RESULT", "/result"),
                    ("FROM", "/source"),
                    ("DETAIL", "/detail"),
                ],
            );
        }
    }
    Ok(())
}

fn approved(out: Output, username: &str, d: &Value) -> anyhow::Result<()> {
    if out == Output::Json {
        output::fields(out, d);
        return Ok(());
    }
    let a: wire::Approved = typed(d)?;
    println!(
        "{username} approved; IP block {}",
        or_dash(a.ip_block.as_deref())
    );
    if let Some(code) = a.enrollment_code.as_deref() {
        println!("enrollment code (works once): {code}");
        println!("the user runs: basphere enroll --username {username} --code {code} --save");
    }
    Ok(())
}

async fn delete_user(
    c: &Client,
    out: Output,
    username: &str,
    force: bool,
    purge: bool,
) -> anyhow::Result<()> {
    if !force {
        if !std::io::stdin().is_terminal() {
            bail!(
                "not on a terminal, so cannot ask for confirmation; pass -f to delete {username} and all their VMs"
            );
        }
        if !confirm(&format!("Delete user {username} and all their VMs?"))? {
            println!("not deleted");
            return Ok(());
        }
    }
    let path = format!("/api/v1/users/{username}?purge={purge}");
    for _ in 0..2 {
        let r = c.delete(&path).await?;
        let status = r.status.as_u16();
        let d = check(r)?;
        if status == 202 {
            let deleting: wire::UserVmsDeleting = typed(&d)?;
            for r in &deleting.refused {
                eprintln!("cannot delete {} now: {}", r.vm, r.reason);
            }
            let ops: Vec<(String, String)> = deleting
                .operations
                .iter()
                .map(|o| (o.operation_id.clone(), o.vm.to_string()))
                .collect();
            if out == Output::Table {
                eprintln!("deleting {} VM(s) of {username} first", ops.len());
            }
            crate::vm::follow(c, out, &ops).await?;
            continue;
        }
        say(
            out,
            &d,
            &format!(
                "user {username} {}",
                if purge { "purged" } else { "deleted" }
            ),
        );
        return Ok(());
    }
    bail!("user {username} still has VMs that could not be deleted; see basphere vm list --all")
}

//! `list-vms`: every VM from the server's NDJSON stream, in owner/name order (the server
//! sorts); with `-j` passed through to stdout as it arrives, without building a JSON tree.

use crate::commands::check;
use basphere_client::Client;
use std::io::Write;

/// Prints the caller's VMs (`all`: everyone's) as one JSON array, one VM per line: the
/// server's NDJSON stream of every VM passed through as it arrives.
pub async fn vms_json(c: &Client, all: bool) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut first = true;
    out.write_all(b"[")?;
    each_vm(c, all, |vm| {
        out.write_all(if first { b"\n" } else { b",\n" })?;
        out.write_all(vm)?;
        first = false;
        Ok(())
    })
    .await?;
    out.write_all(if first { b"]\n" } else { b"\n]\n" })?;
    out.flush()?;
    Ok(())
}

/// The caller's VMs (`all`: everyone's) by owner and name, as JSON values (for a table).
pub async fn vms(c: &Client, all: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut vms = vec![];
    each_vm(c, all, |vm| {
        vms.push(serde_json::from_slice(vm)?);
        Ok(())
    })
    .await?;
    Ok(vms)
}

/// Calls `f` with each VM (its JSON object) of the server's NDJSON stream of the caller's VMs
/// (`all`: everyone's), by owner and name, as they arrive.
async fn each_vm(
    c: &Client,
    all: bool,
    mut f: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut r = c
        .open(&format!("/api/v1/vms?all={all}&sort=name"), NDJSON)
        .await?;
    let streamed = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with(NDJSON));
    if !(r.status.is_success() && streamed) {
        let (status, bytes) = (r.status, r.bytes().await?);
        check(Client::response(status, &bytes)?)?;
        anyhow::bail!(
            "the server answered {status} without a stream of VMs (is it older than this \
             client? upgrade the server first)"
        );
    }
    let mut rest: Vec<u8> = vec![];
    while let Some(chunk) = r.chunk().await? {
        rest.extend_from_slice(&chunk);
        let Some(end) = rest.iter().rposition(|&b| b == b'\n').map(|i| i + 1) else {
            continue;
        };
        for vm in rest[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            f(vm)?;
        }
        rest.drain(..end);
    }
    anyhow::ensure!(
        rest.is_empty(),
        "the server's list of VMs ended in the middle of one; try again"
    );
    Ok(())
}

const NDJSON: &str = "application/x-ndjson";

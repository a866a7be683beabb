//! `list-vms -j`: every VM passed through to stdout as it arrives, in owner/name order (the
//! server sorts), without building a JSON tree of them.

use crate::commands::check;
use basphere_client::Client;
use std::io::Write;

/// Prints the caller's VMs (`all`: everyone's) as one JSON array, one VM per line: the
/// server's NDJSON stream of every VM passed through as it arrives.
pub async fn vms_json(c: &Client, all: bool) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
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
            "the server answered {status} without a stream of VMs (a server older than this \
             client? `basphere vm list -a` shows them as a table)"
        );
    }
    let mut first = true;
    let mut rest: Vec<u8> = vec![];
    out.write_all(b"[")?;
    while let Some(chunk) = r.chunk().await? {
        rest.extend_from_slice(&chunk);
        let end = match rest.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => continue,
        };
        for vm in rest[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            out.write_all(if first { b"\n" } else { b",\n" })?;
            out.write_all(vm)?;
            first = false;
        }
        rest.drain(..end);
    }
    anyhow::ensure!(
        rest.is_empty(),
        "the server's list of VMs ended in the middle of one; try again"
    );
    out.write_all(if first { b"]\n" } else { b"\n]\n" })?;
    out.flush()?;
    Ok(())
}

const NDJSON: &str = "application/x-ndjson";

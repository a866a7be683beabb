//! `list-vms -j`: every page of VMs passed through to stdout as it arrives, in owner/name order
//! (the server sorts), without building a JSON tree of them.

use crate::commands::check;
use basphere_client::{Client, Method};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::io::Write;

/// A page of `GET /vms`, its VMs left as the server wrote them.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    data: Data<'a>,
}

#[derive(Deserialize)]
struct Data<'a> {
    #[serde(borrow)]
    vms: Vec<&'a RawValue>,
}

/// Prints the caller's VMs (`all`: everyone's) as one JSON array, one VM per line.
pub async fn vms_json(c: &Client, all: bool) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut after = String::new();
    let mut first = true;
    out.write_all(b"[")?;
    loop {
        let path = format!("/api/v1/vms?all={all}&sort=name&limit=1000{after}");
        let (status, headers, bytes) = c.send_raw(Method::GET, &path, None).await?;
        let page = match serde_json::from_slice::<Page>(&bytes) {
            Ok(p) if status.is_success() => p,
            // A refusal (or an answer not shaped as a page) says what went wrong.
            _ => {
                check(Client::response(status, &bytes)?)?;
                anyhow::bail!("the server answered {status} without a page of VMs");
            }
        };
        for vm in page.data.vms {
            out.write_all(if first { b"\n" } else { b",\n" })?;
            out.write_all(vm.get().as_bytes())?;
            first = false;
        }
        match headers.get("x-next-after").and_then(|v| v.to_str().ok()) {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    out.write_all(if first { b"]\n" } else { b"\n]\n" })?;
    out.flush()?;
    Ok(())
}

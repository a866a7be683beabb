//! Just enough QMP (QEMU Machine Protocol) to stop a VM: greeting, `qmp_capabilities`, `quit`.

use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Sends `quit` to the QEMU listening on `socket`. Returns once QEMU acknowledged or hung up.
pub async fn quit(socket: &Path, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, execute(socket, "quit"))
        .await
        .map_err(|_| format!("QMP on {} did not answer in {timeout:?}", socket.display()))?
}

/// Asks the QEMU on `socket` for its status. QEMU runs QMP commands in its main loop, so an
/// answer means it finished starting (and, with `-run-with user=`, has dropped root).
pub async fn ready(socket: &Path, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, execute(socket, "query-status"))
        .await
        .map_err(|_| format!("QMP on {} did not answer in {timeout:?}", socket.display()))?
}

async fn execute(socket: &Path, command: &str) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to QMP socket {}: {e}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();

    // The greeting: {"QMP": {...}}
    let greeting = next_message(&mut lines).await?.unwrap_or_default();
    if !greeting.contains("\"QMP\"") {
        return Err(format!("unexpected QMP greeting: {greeting}"));
    }
    send(&mut write, "qmp_capabilities").await?;
    await_return(&mut lines).await?;
    send(&mut write, command).await?;
    // `quit` may close the socket before its reply arrives: a hang-up is success too.
    match await_return(&mut lines).await {
        Ok(()) => Ok(()),
        Err(e) if e.contains("closed") && command == "quit" => Ok(()),
        Err(e) => Err(e),
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, command: &str) -> Result<(), String> {
    let msg = format!("{}\n", serde_json::json!({ "execute": command }));
    write
        .write_all(msg.as_bytes())
        .await
        .map_err(|e| format!("QMP write failed: {e}"))
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn next_message(lines: &mut Lines) -> Result<Option<String>, String> {
    lines
        .next_line()
        .await
        .map_err(|e| format!("QMP read failed: {e}"))
}

/// Reads until the reply to the last command (`return` or `error`), skipping async events.
async fn await_return(lines: &mut Lines) -> Result<(), String> {
    loop {
        let Some(line) = next_message(lines).await? else {
            return Err("QMP connection closed".to_string());
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))?;
        if v.get("return").is_some() {
            return Ok(());
        }
        if let Some(err) = v.get("error") {
            return Err(format!("QMP error: {err}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn speaks_the_quit_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let caps = lines.next_line().await.unwrap().unwrap();
            assert!(caps.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            let quit = lines.next_line().await.unwrap().unwrap();
            assert!(quit.contains("\"quit\""));
            w.write_all(b"{\"timestamp\": {}, \"event\": \"SHUTDOWN\"}\n")
                .await
                .unwrap();
            // Hang up without replying, as QEMU sometimes does.
        });
        quit(&path, Duration::from_secs(5)).await.unwrap();
        server.await.unwrap();
    }
}

//! create-vm asks for what is missing when it runs on a terminal, and refuses without one.
mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_vm_prompts_on_a_terminal() {
    let s = server(&[]);
    // `script` runs the CLI on a pseudo-terminal and feeds it our answers.
    let cmd = format!("{BIN} --socket {} vm create --no-wait", s.socket.display());
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    // name, OS (empty = default), spec, count
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"web\n\ntiny\n2\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("VM name") && text.contains("spec [") && text.contains("count"),
        "{text}"
    );
    let vms = get_data(&s.root(), "/api/v1/vms").await;
    let got: Vec<(String, String)> = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().into(),
                v["spec"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("web-1".into(), "tiny".into()),
            ("web-2".into(), "tiny".into())
        ]
    );

    // without a terminal, a missing name is an error that says what to pass
    let out = s.cli(&["vm", "create"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing -n NAME"));
}

//! The stock Azure IoT Node.js provisioning clients over HTTPS (`tests/node/`: pinned in
//! its package-lock, installed by `scripts/test` with `npm ci --ignore-scripts`), run as
//! `node provision.js` with one JSON request. A missing Node or install fails the test.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// `tests/node`.
pub fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// Runs `provision.js` with `request`; its JSON answer.
pub async fn run_node(request: &Value, limit: Duration) -> Value {
    let dir = node_dir();
    assert!(
        dir.join("node_modules/azure-iot-provisioning-device-http")
            .exists(),
        "the Node clients are not installed: run scripts/test (npm ci in {})",
        dir.display()
    );
    let mut child = tokio::process::Command::new("node")
        .arg("provision.js")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (scripts/test installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(&serde_json::to_vec(request).expect("json"))
        .await
        .expect("write the request");
    drop(stdin);
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("the Node client finishes in time")
        .expect("node output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "the Node client printed no answer: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

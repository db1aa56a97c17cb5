//! Python clients (the stock Azure SDK, paho-mqtt) run from the venv `scripts/test`
//! makes: a script reads one JSON request on stdin and prints one JSON object per line.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// The interpreter: `EDGEDPS_PYTHON`, or `.venv` at the workspace root. A missing venv
/// fails the test.
/// The stock SDKs dial 8883 only: one test of the binary at a time holds it.
static PORT_8883: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds 127.0.0.1:8883 for the caller until the guard drops.
pub async fn hold_port_8883() -> tokio::sync::MutexGuard<'static, ()> {
    PORT_8883.lock().await
}

/// With `websockets=True` they dial 443: the same, for that port.
static PORT_443: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds 127.0.0.1:443 for the caller until the guard drops.
pub async fn hold_port_443() -> tokio::sync::MutexGuard<'static, ()> {
    PORT_443.lock().await
}

/// Checks that a script's case raised nothing (its trace shown otherwise) and was
/// assigned to `hub`; `context` goes in front of every message.
pub fn assert_assigned(result: &Value, hub: &str, context: &str) {
    assert!(
        result.get("error").is_none(),
        "{context}{}: {}",
        result["name"],
        result["trace"].as_str().unwrap_or_default()
    );
    assert_eq!(result["status"], "assigned", "{context}{result}");
    assert_eq!(result["assignedHub"], hub, "{context}{result}");
}

pub fn python() -> PathBuf {
    if let Ok(python) = std::env::var("EDGEDPS_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test (it creates the venv with azure-iot-device==2.14.0)",
        venv.display()
    );
    venv
}

/// Runs `tests/python/{script}` with `request` on stdin, within `limit`; its lines.
pub async fn run_python(script: &str, request: &Value, limit: Duration) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut child = tokio::process::Command::new(python())
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(&serde_json::to_vec(request).expect("JSON"))
        .await
        .expect("the request is written");
    drop(stdin);
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} finishes within {limit:?}"))
        .expect("python runs");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

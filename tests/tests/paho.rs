//! The gateway's MQTT broker seen by a second, independent client library: Eclipse
//! paho-mqtt (Python, in the venv `scripts/test` makes; a dependency of the Azure SDK),
//! for MQTT 3.1.1 and 5: QoS 2 exactly once, delivery at the lower QoS, retained
//! messages, wills, a persistent session, `$`-topics (`tests/python/paho_broker.py`).

use std::path::PathBuf;
use std::process::Stdio;

use edgedps_tests::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

fn python() -> PathBuf {
    if let Ok(python) = std::env::var("EDGEDPS_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test (it creates the venv)",
        venv.display()
    );
    venv
}

async fn checks(port: u16, protocol: u8) -> Vec<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/paho_broker.py");
    let mut child = tokio::process::Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let request = json!({"port": port, "protocol": protocol});
    stdin
        .write_all(&serde_json::to_vec(&request).unwrap())
        .await
        .unwrap();
    drop(stdin);
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .expect("paho finishes within 2 minutes")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_clients_get_mqtt_semantics_in_3_1_1_and_5() {
    let server = Server::start().await;
    for protocol in [4, 5] {
        let results = checks(server.local_port, protocol).await;
        assert_eq!(results.len(), 7, "MQTT {protocol}: {results:?}");
        let failed: Vec<&Value> = results.iter().filter(|r| r["ok"] != true).collect();
        assert!(failed.is_empty(), "MQTT {protocol}: {failed:#?}");
    }
}

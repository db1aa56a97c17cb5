//! The gateway's MQTT broker seen by a second, independent client library: Eclipse
//! paho-mqtt (Python, in the venv `scripts/test` makes; a dependency of the Azure SDK),
//! for MQTT 3.1.1 and 5: QoS 2 exactly once, delivery at the lower QoS, retained
//! messages, wills, a persistent session and the bound of its queue, `$`-topics
//! (`tests/python/paho_broker.py`).

use edgedps_tests::*;
use serde_json::{json, Value};

/// The server's `limits.max_queued_messages` here.
const QUEUE_LIMIT: usize = 4;

async fn checks(port: u16, protocol: u8) -> Vec<Value> {
    let request = json!({"port": port, "protocol": protocol, "queue_limit": QUEUE_LIMIT});
    run_python(
        "paho_broker.py",
        &request,
        std::time::Duration::from_secs(120),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_clients_get_mqtt_semantics_in_3_1_1_and_5() {
    let server = Server::start_with(|config| config.limits.max_queued_messages = QUEUE_LIMIT).await;
    for protocol in [4, 5] {
        let results = checks(server.local_port, protocol).await;
        assert_eq!(results.len(), 8, "MQTT {protocol}: {results:?}");
        let failed: Vec<&Value> = results.iter().filter(|r| r["ok"] != true).collect();
        assert!(failed.is_empty(), "MQTT {protocol}: {failed:#?}");
    }
}

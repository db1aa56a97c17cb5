//! The gateway's MQTT broker seen by a second, independent client library: Eclipse
//! paho-mqtt (Python, in the venv `scripts/test` makes; a dependency of the Azure SDK),
//! for MQTT 3.1.1 and 5: QoS 2 exactly once, delivery at the lower QoS, retained
//! messages, wills, a persistent session, `$`-topics (`tests/python/paho_broker.py`).

use edgedps_tests::*;
use serde_json::{json, Value};

async fn checks(port: u16, protocol: u8) -> Vec<Value> {
    let request = json!({"port": port, "protocol": protocol});
    run_python(
        "paho_broker.py",
        &request,
        std::time::Duration::from_secs(120),
    )
    .await
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

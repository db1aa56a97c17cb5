//! The stock Azure IoT device SDK for Python (azure-iot-device 2.14.0) uses the gateway
//! as its hub (PROTOCOL E), unmodified: provisioned with `ProvisioningDeviceClient`
//! (symmetric key group, and X.509), it connects `IoTHubDeviceClient` to the hub it was
//! assigned (`localhost`, this gateway), reads its twin (the enrollment's initial
//! twin), reports properties, sends telemetry, and receives a desired-property patch,
//! cloud-to-device messages (one sent while it was away) and a method call from an
//! operator.
//!
//! As `python_sdk.rs`: the real binary on 127.0.0.1:8883 (the SDK's fixed port), the
//! Python environment of `scripts/test`.

use std::time::Duration;

use edgedps_device::provision::register;
use edgedps_policies::sas::derive_device_key;
use edgedps_tests::hub::patch_twin;
use edgedps_tests::*;
use serde_json::{json, Value};

/// The next publish on `topic_prefix`, waiting up to `limit`.
async fn next_within(operator: &mut Operator, topic_prefix: &str, limit: Duration) -> Vec<u8> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some((_, body)) = operator.next_publish(topic_prefix).await {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing on {topic_prefix} within {limit:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_python_sdk_uses_the_gateway_as_its_hub() {
    let _port = hold_port_8883().await;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (_, local_port) = free_ports();
    let _process = Process::start(
        dir.path(),
        8883,
        local_port,
        "[local_hub]\nhost_name = \"localhost\"\n",
    )
    .await;
    let mut operator = Operator::connect(local_port).await;
    operator.subscribe("devices/+/messages/events/#").await;
    operator.subscribe("hub/methods/responses/#").await;

    let group_key = new_key();
    let mut group = symmetric_group("py-hub-group", &group_key);
    group["initialTwin"] = json!({"properties": {"desired": {"interval": 30}}});
    group["iotHubs"] = json!(["localhost"]);
    operator
        .put("dps/enrollment-groups/py-hub-group", group)
        .await;
    let member_key = derive_device_key(&group_key, "py-hub-sym").unwrap();

    let cert = pki.device_root.device("py-hub-x509");
    let cert_file = dir.path().join("py-hub-x509.pem");
    let key_file = dir.path().join("py-hub-x509.key");
    std::fs::write(&cert_file, &cert.cert_pem).unwrap();
    std::fs::write(&key_file, &cert.key_pem).unwrap();
    let mut enrollment = x509_enrollment("py-hub-x509", &cert.cert_pem);
    enrollment["initialTwin"] = json!({"properties": {"desired": {"mode": "eco"}}});
    enrollment["iotHubs"] = json!(["localhost"]);
    operator
        .put("dps/enrollments/py-hub-x509", enrollment)
        .await;

    // The symmetric-key device was provisioned before, and a message waits for it.
    let earlier = register(
        &device_config(
            8883,
            "py-hub-sym",
            DeviceAuth::SymmetricKey {
                key: member_key.clone(),
            },
        ),
        None,
    )
    .await
    .expect("provisioned");
    assert_eq!(
        earlier.body["registrationState"]["assignedHub"], "localhost",
        "{earlier:?}"
    );
    operator
        .send(
            "devices/py-hub-sym/messages/devicebound/sent=away",
            b"while away",
        )
        .await;

    let server_ca = dir.path().join("server-ca.pem");
    std::fs::write(&server_ca, &pki.server_ca.pem).unwrap();
    let request = json!({
        "serverCaFile": server_ca,
        "cases": [
            {"name": "symmetric key group", "kind": "symmetricKey", "idScope": ID_SCOPE,
             "registrationId": "py-hub-sym", "key": member_key, "expectedMessages": 2},
            {"name": "x509 individual", "kind": "x509", "idScope": ID_SCOPE,
             "registrationId": "py-hub-x509", "certFile": cert_file, "keyFile": key_file,
             "expectedMessages": 1},
        ]
    });
    let python =
        tokio::spawn(async move { run_python("hub.py", &request, Duration::from_secs(300)).await });

    // The operator's side, device by device, once it says it is ready (telemetry).
    for device in ["py-hub-sym", "py-hub-x509"] {
        let telemetry = next_within(
            &mut operator,
            &format!("devices/{device}/messages/events/"),
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(
            serde_json::from_slice::<Value>(&telemetry).unwrap(),
            json!({"temperature": 21})
        );
        let result = patch_twin(&mut operator, device, "desired", br#"{"interval": 60}"#).await;
        assert_eq!(result["ok"], true);
        operator
            .send(
                &format!("devices/{device}/messages/devicebound/sent=live"),
                b"while connected",
            )
            .await;
        operator
            .send(
                &format!("hub/methods/{device}/call-{device}"),
                br#"{"methodName": "blink", "payload": {"times": 3}}"#,
            )
            .await;
        let answer = next_within(
            &mut operator,
            &format!("hub/methods/responses/call-{device}"),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(
            serde_json::from_slice::<Value>(&answer).unwrap(),
            json!({"status": 200, "payload": {"echo": {"times": 3}}})
        );
    }

    let results = python.await.expect("python task");
    assert_eq!(results.len(), 2, "{results:?}");
    for (result, initial, messages) in [
        (
            &results[0],
            json!({"interval": 30}),
            vec![("while away", "away"), ("while connected", "live")],
        ),
        (
            &results[1],
            json!({"mode": "eco"}),
            vec![("while connected", "live")],
        ),
    ] {
        let name = &result["name"];
        assert!(
            result.get("error").is_none(),
            "{name}: {}",
            result["trace"].as_str().unwrap_or_default()
        );
        assert!(result.get("missing").is_none(), "{name}: {result}");
        assert_eq!(result["assignedHub"], "localhost", "{name}");
        // get_twin(): the enrollment's desired properties.
        let mut desired = initial.clone();
        desired["$version"] = json!(1);
        assert_eq!(result["twin"]["desired"], desired, "{name}: {result}");
        // The operator's patch reached the handler.
        assert_eq!(
            result["desiredPatch"],
            json!({"interval": 60, "$version": 2}),
            "{name}"
        );
        let received: Vec<(String, String)> = result["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                (
                    m["data"].as_str().unwrap_or_default().to_owned(),
                    m["properties"]["sent"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = messages
            .iter()
            .map(|(d, p)| (d.to_string(), p.to_string()))
            .collect();
        assert_eq!(received, expected, "{name}");
        // Each message has an id of its own (`message_id` in the SDK).
        let ids: std::collections::BTreeSet<&str> = result["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["messageId"].as_str())
            .collect();
        assert_eq!(ids.len(), expected.len(), "{name}: {result}");
        assert_eq!(
            result["method"],
            json!({"name": "blink", "payload": {"times": 3}}),
            "{name}"
        );
        // The reported patch is in the twin, as the device and the operator see it.
        assert_eq!(
            result["twinAfter"]["reported"]["firmware"], "1.2.3",
            "{name}"
        );
        assert_eq!(result["twinAfter"]["reported"]["$version"], 2, "{name}");
        let device = result["deviceId"].as_str().expect("device id");
        let mut reader = Operator::connect(local_port).await;
        reader.subscribe(&format!("hub/twins/{device}")).await;
        let (_, record) = reader
            .next_publish(&format!("hub/twins/{device}"))
            .await
            .expect("twin record");
        let record: Value = serde_json::from_slice(&record).unwrap();
        assert_eq!(record["properties"]["reported"]["firmware"], "1.2.3");
        assert_eq!(record["properties"]["desired"]["interval"], 60);
    }
}

//! The stock Azure IoT device SDK for Python (azure-iot-device 2.14.0) provisions
//! through edgedps, unmodified: symmetric key individual and group, X.509 individual
//! and group via an intermediate, in both response modes; and learns `disabled` once
//! taken out of service after its assignment.
//!
//! The SDK always connects to port 8883 and checks the host name, so this test runs
//! the real binary on 127.0.0.1:8883 with a server certificate for `localhost`. The
//! Python environment is `.venv` at the workspace root (`scripts/test` makes it);
//! `EDGEDPS_PYTHON` may name another interpreter. A missing SDK fails the test.

use edgedps_policies::sas::derive_device_key;
use edgedps_tests::*;
use serde_json::{json, Value};

async fn run_sdk(request: Value) -> Vec<Value> {
    run_python(
        "provision.py",
        &request,
        std::time::Duration::from_secs(180),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_sdk_provisions_every_attestation_kind_in_both_modes() {
    let _port = hold_port_8883().await;
    let pki = pki();
    for (mode, extra) in [
        ("one round trip", ""),
        ("accept then poll", "always_accept_then_poll = true"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_, local_port) = free_ports();
        let _process = Process::start(dir.path(), 8883, local_port, extra).await;
        let mut operator = Operator::connect(local_port).await;

        let individual_key = new_key();
        operator
            .put(
                "dps/enrollments/py-sym-1",
                symmetric_enrollment("py-sym-1", &individual_key),
            )
            .await;
        let group_key = new_key();
        let mut group = symmetric_group("py-sym-group", &group_key);
        group["initialTwin"] =
            json!({"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}});
        operator
            .put("dps/enrollment-groups/py-sym-group", group)
            .await;

        let individual_cert = pki.device_root.device("py-x509-1");
        let individual_cert_file = dir.path().join("py-x509-1.pem");
        let individual_key_file = dir.path().join("py-x509-1.key");
        std::fs::write(&individual_cert_file, &individual_cert.cert_pem).unwrap();
        std::fs::write(&individual_key_file, &individual_cert.key_pem).unwrap();
        operator
            .put(
                "dps/enrollments/py-x509-1",
                x509_enrollment("py-x509-1", &individual_cert.cert_pem),
            )
            .await;

        operator
            .put(
                "dps/enrollment-groups/py-x509-group",
                x509_group("py-x509-group", &pki.device_root.pem),
            )
            .await;
        let member = pki.device_intermediate.device("py-x509-member");
        let member_chain = dir.path().join("py-x509-member.pem");
        let member_key = dir.path().join("py-x509-member.key");
        std::fs::write(
            &member_chain,
            format!("{}{}", member.cert_pem, pki.device_intermediate.pem),
        )
        .unwrap();
        std::fs::write(&member_key, &member.key_pem).unwrap();

        // An enrollment that no linked hub can serve: the operation fails as a 200.
        let mut stranded = symmetric_enrollment("py-stranded", &individual_key);
        stranded["iotHubs"] = json!(["hub-z.example.net"]);
        operator.put("dps/enrollments/py-stranded", stranded).await;

        let server_ca = dir.path().join("server-ca.pem");
        std::fs::write(&server_ca, &pki.server_ca.pem).unwrap();
        let request = json!({
            "serverCaFile": server_ca,
            "cases": [
                {"name": "symmetric key individual", "kind": "symmetricKey", "idScope": ID_SCOPE,
                 "registrationId": "py-sym-1", "key": individual_key, "payload": {"model": "t1000"}},
                {"name": "symmetric key group", "kind": "symmetricKey", "idScope": ID_SCOPE,
                 "registrationId": "py-sym-member", "key": derive_device_key(&group_key, "py-sym-member").unwrap()},
                {"name": "x509 individual", "kind": "x509", "idScope": ID_SCOPE,
                 "registrationId": "py-x509-1", "certFile": individual_cert_file, "keyFile": individual_key_file},
                {"name": "x509 group via intermediate", "kind": "x509", "idScope": ID_SCOPE,
                 "registrationId": "py-x509-member", "certFile": member_chain, "keyFile": member_key},
                {"name": "no hub can be assigned", "kind": "symmetricKey", "idScope": ID_SCOPE,
                 "registrationId": "py-stranded", "key": individual_key},
            ]
        });
        let mut results = run_sdk(request).await;
        assert_eq!(results.len(), 5, "{results:?}");
        // The SDK reports a `failed` operation as a service error, as it does for Azure.
        let stranded = results.pop().unwrap_or_default();
        let trace = stranded["trace"].as_str().unwrap_or_default();
        assert!(
            trace.contains("failed registration status with a status code of 200"),
            "{mode}: {stranded}"
        );
        for result in &results {
            assert_assigned(result, "hub-a.example.net", &format!("{mode}: "));
            assert!(result["etag"].is_string(), "{mode}: {result}");
        }
        assert_eq!(results[0]["deviceId"], "py-sym-1");
        assert_eq!(results[1]["deviceId"], "py-sym-member");
        // The stock SDK exposes only `payload`: it carries the initial twin.
        assert_eq!(
            results[1]["payload"]["properties"]["desired"]["interval"], 30,
            "{}",
            results[1]
        );

        // Taken out of service after their assignment: an individual enrollment
        // disabled, and one certificate of the X.509 group blocked by a disabled
        // individual enrollment. The SDK gets Azure's `disabled` status, which it
        // reports as a service error, exactly as against Azure.
        let mut disabled = symmetric_enrollment("py-sym-1", &individual_key);
        disabled["provisioningStatus"] = json!("disabled");
        operator.put("dps/enrollments/py-sym-1", disabled).await;
        let mut blocked = x509_enrollment("py-x509-member", &member.cert_pem);
        blocked["provisioningStatus"] = json!("disabled");
        operator
            .put("dps/enrollments/py-x509-member", blocked)
            .await;
        let request = json!({
            "serverCaFile": server_ca,
            "cases": [
                {"name": "disabled after assignment", "kind": "symmetricKey", "idScope": ID_SCOPE,
                 "registrationId": "py-sym-1", "key": individual_key},
                {"name": "certificate blocked after assignment", "kind": "x509", "idScope": ID_SCOPE,
                 "registrationId": "py-x509-member", "certFile": member_chain, "keyFile": member_key},
            ]
        });
        let results = run_sdk(request).await;
        assert_eq!(results.len(), 2, "{results:?}");
        for result in &results {
            let trace = result["trace"].as_str().unwrap_or_default();
            assert!(
                trace.contains("invalid registration status disabled with a status code of 200"),
                "{mode}: {}: {result}",
                result["name"]
            );
        }
        // Re-enabled, the device provisions again.
        operator
            .put(
                "dps/enrollments/py-sym-1",
                symmetric_enrollment("py-sym-1", &individual_key),
            )
            .await;
        let request = json!({
            "serverCaFile": server_ca,
            "cases": [{"name": "enabled again", "kind": "symmetricKey", "idScope": ID_SCOPE,
                       "registrationId": "py-sym-1", "key": individual_key}]
        });
        let results = run_sdk(request).await;
        assert_eq!(results[0]["status"], "assigned", "{mode}: {}", results[0]);
    }
}

/// The stock SDK provisions a symmetric-key device, an X.509 device and a group device
/// to a cloud hub with a connection string: the (fake) hub then holds their identities,
/// with the credentials they attested with, and their initial twins, as IoT Hub would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_sdk_devices_are_registered_at_their_cloud_hub() {
    use edgedps_tests::iothub::FakeHub;
    let _port = hold_port_8883().await;
    let pki = pki();
    let hub = FakeHub::start("py-cloud.example.net").await;
    let dir = tempfile::tempdir().unwrap();
    let extra = hub.config_toml(dir.path(), "");
    let (_, local_port) = free_ports();
    let _process = Process::start(dir.path(), 8883, local_port, &extra).await;
    let mut operator = Operator::connect(local_port).await;
    let twin = json!({"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}});
    let cloud = json!([hub.host_name]);

    let key = new_key();
    let mut e = symmetric_enrollment("pyc-sym", &key);
    e["iotHubs"] = cloud.clone();
    e["initialTwin"] = twin.clone();
    operator.put("dps/enrollments/pyc-sym", e).await;
    let device = pki.device_root.device("pyc-x509");
    let (cert_file, key_file) = (dir.path().join("x.pem"), dir.path().join("x.key"));
    std::fs::write(&cert_file, &device.cert_pem).unwrap();
    std::fs::write(&key_file, &device.key_pem).unwrap();
    let mut e = x509_enrollment("pyc-x509", &device.cert_pem);
    e["iotHubs"] = cloud.clone();
    operator.put("dps/enrollments/pyc-x509", e).await;
    let group_key = new_key();
    let mut group = symmetric_group("pyc-group", &group_key);
    group["iotHubs"] = cloud.clone();
    group["initialTwin"] = twin.clone();
    operator.put("dps/enrollment-groups/pyc-group", group).await;
    let member_key = derive_device_key(&group_key, "pyc-member").unwrap();

    let server_ca = dir.path().join("server-ca.pem");
    std::fs::write(&server_ca, &pki.server_ca.pem).unwrap();
    let results = run_sdk(json!({
        "serverCaFile": server_ca,
        "cases": [
            {"name": "symmetric key", "kind": "symmetricKey", "idScope": ID_SCOPE,
             "registrationId": "pyc-sym", "key": key},
            {"name": "x509", "kind": "x509", "idScope": ID_SCOPE,
             "registrationId": "pyc-x509", "certFile": cert_file, "keyFile": key_file},
            {"name": "group member", "kind": "symmetricKey", "idScope": ID_SCOPE,
             "registrationId": "pyc-member", "key": member_key},
        ]
    }))
    .await;
    assert_eq!(results.len(), 3, "{results:?}");
    for result in &results {
        assert_assigned(result, &hub.host_name, "");
    }
    hub.wait_for(
        std::time::Duration::from_secs(20),
        "the three devices and their twins",
        |h| {
            ["pyc-sym", "pyc-x509", "pyc-member"].iter().all(|id| {
                h.twin(id)
                    .is_some_and(|t| t["properties"]["desired"]["$version"] == 2)
            })
        },
    )
    .await;
    let sym = hub.identity("pyc-sym").unwrap();
    assert_eq!(
        sym["authentication"]["symmetricKey"]["primaryKey"],
        key.as_str()
    );
    let member = hub.identity("pyc-member").unwrap();
    assert_eq!(
        member["authentication"]["symmetricKey"]["primaryKey"],
        member_key.as_str()
    );
    let x509 = hub.identity("pyc-x509").unwrap();
    assert_eq!(x509["authentication"]["type"], "selfSigned");
    assert_eq!(
        x509["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        device.thumbprint()
    );
    for id in ["pyc-sym", "pyc-member"] {
        let twin = hub.twin(id).unwrap();
        assert_eq!(twin["tags"], json!({"site": "lab"}), "{id}: {twin}");
        assert_eq!(
            twin["properties"]["desired"]["interval"], 30,
            "{id}: {twin}"
        );
    }
    // The X.509 enrollment has no initial twin: the hub's twin is empty.
    assert_eq!(hub.twin("pyc-x509").unwrap()["tags"], json!({}));
}

/// The stock SDK with `websockets=True` (MQTT over WebSocket on 443, as a device behind
/// a firewall that lets only 443 out): a symmetric-key device and an X.509 device
/// provision through the HTTPS listener's `/$iothub/websocket`, then use the gateway
/// as their hub over the same port (twin, telemetry); a wrong key is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_sdk_provisions_and_uses_its_hub_over_websocket_on_443() {
    let _port = hold_port_443().await;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let extra =
        "[local_hub]\nhost_name = \"localhost\"\n\n[listeners.https]\nbind = \"127.0.0.1:443\"\n";
    let _process = Process::start(dir.path(), devices_port, local_port, extra).await;
    let mut operator = Operator::connect(local_port).await;
    operator.subscribe("devices/+/messages/events/#").await;

    let key = new_key();
    let mut e = symmetric_enrollment("pyws-sym", &key);
    e["iotHubs"] = json!(["localhost"]);
    e["initialTwin"] = json!({"properties": {"desired": {"interval": 15}}});
    operator.put("dps/enrollments/pyws-sym", e).await;
    let device = pki.device_root.device("pyws-x509");
    let (cert_file, key_file) = (dir.path().join("x.pem"), dir.path().join("x.key"));
    std::fs::write(&cert_file, &device.cert_pem).unwrap();
    std::fs::write(&key_file, &device.key_pem).unwrap();
    let mut e = x509_enrollment("pyws-x509", &device.cert_pem);
    e["iotHubs"] = json!(["localhost"]);
    operator.put("dps/enrollments/pyws-x509", e).await;

    let server_ca = dir.path().join("server-ca.pem");
    std::fs::write(&server_ca, &pki.server_ca.pem).unwrap();
    let results = run_sdk(json!({
        "serverCaFile": server_ca,
        "cases": [
            {"name": "symmetric key", "kind": "symmetricKey", "idScope": ID_SCOPE,
             "registrationId": "pyws-sym", "key": key, "websockets": true, "hub": true,
             "payload": {"over": "443"}},
            {"name": "x509", "kind": "x509", "idScope": ID_SCOPE, "registrationId": "pyws-x509",
             "certFile": cert_file, "keyFile": key_file, "websockets": true, "hub": true},
            {"name": "wrong key", "kind": "symmetricKey", "idScope": ID_SCOPE,
             "registrationId": "pyws-sym", "key": new_key(), "websockets": true},
        ]
    }))
    .await;
    assert_eq!(results.len(), 3, "{results:?}");
    for result in &results[..2] {
        assert_assigned(result, "localhost", "");
    }
    assert_eq!(
        results[0]["twin"]["desired"]["interval"], 15,
        "the initial twin, read over WebSocket: {}",
        results[0]
    );
    assert!(results[1]["twin"]["desired"].is_object(), "{}", results[1]);
    // Refused at CONNECT, as over TCP: the SDK reports it as an error.
    assert!(results[2].get("error").is_some(), "{}", results[2]);
    // Both devices' telemetry reached the operator.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let (topic, body) = operator
            .next_publish("devices/")
            .await
            .expect("telemetry from both devices");
        assert_eq!(body, br#"{"over": "websocket"}"#, "{topic}");
        seen.insert(topic.split('/').nth(1).unwrap_or_default().to_owned());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["pyws-sym", "pyws-x509"]
    );
}

/// The stock SDK under custom allocation: the payload it sends reaches the webhook, and
/// the payload the webhook answers is what the SDK hands back, assigned to the hub the
/// webhook chose; both in one round trip and after Azure's 202 and poll (a webhook
/// slower than the register's short wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_sdk_receives_the_custom_allocators_payload() {
    use edgedps_tests::webhook::{Behaviour, Webhook};
    let _port = hold_port_8883().await;
    let hook = Webhook::start(
        false,
        Behaviour::Assign {
            hub: "hub-b.example.net".into(),
            twin: None,
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_, local_port) = free_ports();
    let _process = Process::start(
        dir.path(),
        8883,
        local_port,
        "[[hubs]]\nhost_name = \"hub-b.example.net\"\n",
    )
    .await;
    let mut operator = Operator::connect(local_port).await;
    let group_key = new_key();
    let mut group = symmetric_group("py-custom", &group_key);
    group["allocationPolicy"] = json!("custom");
    group["customAllocationDefinition"] = json!({"webhookUrl": hook.url()});
    operator.put("dps/enrollment-groups/py-custom", group).await;
    let server_ca = dir.path().join("server-ca.pem");
    std::fs::write(&server_ca, &pki().server_ca.pem).unwrap();
    let case = |id: &str, model: &str| {
        json!({"name": id, "kind": "symmetricKey", "idScope": ID_SCOPE, "registrationId": id,
               "key": derive_device_key(&group_key, id).unwrap(), "payload": {"model": model}})
    };
    let results =
        run_sdk(json!({"serverCaFile": server_ca, "cases": [case("py-cus-1", "m1")]})).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_assigned(&results[0], "hub-b.example.net", "");
    assert_eq!(
        results[0]["payload"],
        json!({"allocatedBy": "webhook", "echo": {"model": "m1"}}),
        "{}",
        results[0]
    );
    // Slower than the register's wait: 202, the SDK polls, and gets the same.
    hook.behave(Behaviour::Slow(
        std::time::Duration::from_millis(400),
        "hub-b.example.net".into(),
    ));
    let results =
        run_sdk(json!({"serverCaFile": server_ca, "cases": [case("py-cus-2", "m2")]})).await;
    assert_assigned(&results[0], "hub-b.example.net", "after a poll: ");
    assert_eq!(
        results[0]["payload"],
        json!({"allocatedBy": "webhook", "echo": {"model": "m2"}}),
        "{}",
        results[0]
    );
    assert_eq!(hook.seen().len(), 2);
}

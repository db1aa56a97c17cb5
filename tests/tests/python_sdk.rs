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
            assert!(
                result.get("error").is_none(),
                "{mode}: {}: {}",
                result["name"],
                result["trace"].as_str().unwrap_or_default()
            );
            assert_eq!(result["status"], "assigned", "{mode}: {result}");
            assert_eq!(
                result["assignedHub"], "hub-a.example.net",
                "{mode}: {result}"
            );
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

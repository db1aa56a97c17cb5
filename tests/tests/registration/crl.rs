//! Certificate revocation lists (PROTOCOL B): accepted only when a CA edgedps trusts
//! signed them, consulted at every X.509 CONNECT, kept across restarts.

use std::time::Duration;

use edgedps_tests::live::{LiveDevice, Protocol};
use edgedps_tests::*;
use serde_json::Value;

async fn x509_group(server: &Server, operator: &mut Operator, group: &str) {
    operator
        .put(
            &format!("dps/enrollment-groups/{group}"),
            edgedps_tests::x509_group(group, &pki().device_root.pem),
        )
        .await;
    let _ = server;
}

fn member(id: &str) -> (Identity, DeviceAuth) {
    let identity = pki().device_intermediate.device(id);
    let auth = x509(&identity, &[&pki().device_intermediate]);
    (identity, auth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_lists_are_refused_and_change_nothing() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    x509_group(&server, &mut operator, "crl-fleet").await;
    let (identity, auth) = member("crl-live");
    let mut device = LiveDevice::connect(&server, "crl-live", &auth, Protocol::V311)
        .await
        .expect("connects");
    assert_eq!(device.register().await.0, 200);
    assert!(device.subscribe("devices/crl-live/#").await);

    // Signed by a rogue CA that has the intermediate's name: the signature does not
    // verify with the real intermediate's key.
    let rogue = pki()
        .rogue_root
        .intermediate("edgedps test device intermediate");
    let forged = format!(
        "{}{}",
        rogue.crl(&[&identity]),
        pki().device_intermediate.pem
    );
    let result = operator.write("dps/crls/forged", forged.as_bytes()).await;
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["errorCode"], 400);
    assert!(
        result["message"]
            .as_str()
            .unwrap_or_default()
            .contains("signature does not verify"),
        "{result}"
    );
    // The rogue CA's list with its own certificate: that CA is no group's.
    let rogue_chain = format!("{}{}", rogue.crl(&[&identity]), rogue.pem);
    let result = operator
        .write("dps/crls/rogue", rogue_chain.as_bytes())
        .await;
    assert_eq!(result["ok"], false, "{result}");
    assert!(
        result["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not signed by any enrollment group's CA"),
        "{result}"
    );
    // A list from the intermediate without the intermediate: its issuer is unknown.
    let alone = pki().device_intermediate.crl(&[&identity]);
    let result = operator.write("dps/crls/alone", alone.as_bytes()).await;
    assert!(
        result["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is not an enrollment group's signing certificate"),
        "{result}"
    );
    for (name, body) in [
        ("garbage", b"not a CRL".to_vec()),
        ("truncated", alone.as_bytes()[..alone.len() / 2].to_vec()),
        ("der-garbage", vec![0x30, 0x03, 0x02, 0x01, 0x01]),
    ] {
        let result = operator.write(&format!("dps/crls/{name}"), &body).await;
        assert_eq!(result["ok"], false, "{name}: {result}");
        assert_eq!(result["errorCode"], 400, "{name}: {result}");
    }
    // Nothing changed: the device kept its session and its topics, and it can connect.
    assert_eq!(device.closed_within(Duration::from_millis(200)).await, None);
    assert!(
        device
            .publish_accepted("devices/crl-live/messages/events/")
            .await
    );
    assert!(
        LiveDevice::connect(&server, "crl-live", &auth, Protocol::V5)
            .await
            .is_ok()
    );
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_at_connect_before_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (devices_port, local_port) = free_ports();
    let mut process = Process::start(dir.path(), devices_port, local_port, "").await;
    let mut operator = Operator::connect(local_port).await;
    operator
        .put(
            "dps/enrollment-groups/crl-restart",
            edgedps_tests::x509_group("crl-restart", &pki().device_root.pem),
        )
        .await;
    let (revoked, revoked_auth) = member("crl-revoked");
    let (_, fine_auth) = member("crl-fine");
    // The intermediate's list, sent with the intermediate (signed by the group's root).
    let body = format!(
        "{}{}",
        pki().device_intermediate.crl(&[&revoked]),
        pki().device_intermediate.pem
    );
    let result = operator
        .write("dps/crls/intermediate", body.as_bytes())
        .await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["revokedCertificates"], 1, "{result}");
    assert_eq!(result["sessionsClosed"], 0, "{result}");

    let device = |auth: DeviceAuth, id: &str| {
        let mut config = device_config(devices_port, id, auth);
        config.tcp_nodelay = true;
        config
    };
    for round in ["before", "after"] {
        match edgedps_device::provision::register(
            &device(revoked_auth.clone(), "crl-revoked"),
            None,
        )
        .await
        {
            Err(edgedps_device::provision::DeviceError::Refused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized, "{round}")
            }
            other => panic!("{round} the restart, a revoked certificate: {other:?}"),
        }
        let outcome =
            edgedps_device::provision::register(&device(fine_auth.clone(), "crl-fine"), None)
                .await
                .expect("an unrevoked certificate of the same CA registers");
        assert_eq!(outcome.status_word(), Some("assigned"), "{round}");
        if round == "before" {
            process.kill();
            process = Process::start(dir.path(), devices_port, local_port, "").await;
            operator = Operator::connect(local_port).await;
        }
    }
    // The list is republished as a retained record, in PEM with its certificate.
    operator.subscribe("dps/crls/#").await;
    let (topic, body) = operator
        .next_publish("dps/crls/")
        .await
        .expect("the retained list");
    assert_eq!(topic, "dps/crls/intermediate");
    let text = String::from_utf8(body).expect("PEM");
    assert!(text.starts_with("-----BEGIN X509 CRL-----"), "{text}");
    assert!(text.contains("-----BEGIN CERTIFICATE-----"), "{text}");
    // Deleting it lets the certificate in again.
    let result: Value = operator.write("dps/crls/intermediate", b"").await;
    assert_eq!(result["ok"], true, "{result}");
    let outcome = edgedps_device::provision::register(&device(revoked_auth, "crl-revoked"), None)
        .await
        .expect("registers once the list is gone");
    assert_eq!(outcome.status_word(), Some("assigned"));
}

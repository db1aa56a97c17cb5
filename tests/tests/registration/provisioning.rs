//! Devices provision end to end against the real listeners: every attestation kind,
//! both response modes, enrollment status, precedence, and the refusals.

use edgedps_device::provision::{register, DeviceError};
use edgedps_policies::sas::derive_device_key;
use edgedps_tests::*;
use rumqttc::ConnectReturnCode;
use serde_json::json;

fn assert_assigned(outcome: &Outcome, registration_id: &str, hub: &str) {
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    assert_eq!(outcome.assigned_hub(), Some(hub));
    assert_eq!(
        outcome.body["registrationState"]["registrationId"],
        registration_id
    );
    assert!(outcome.body["operationId"].is_string());
    assert!(outcome.body["registrationState"]["etag"].is_string());
}

fn refused_with(result: Result<Outcome, DeviceError>, code: ConnectReturnCode) {
    match result {
        Err(DeviceError::Refused(got)) => assert_eq!(got, code),
        other => panic!("expected CONNACK {code:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_individual_enrollment_is_assigned_in_one_round_trip() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("sym-1").await;
    let outcome = register(&server.device("sym-1", sas(&key)), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "sym-1", "hub-a.example.net");
    assert_eq!(outcome.polls, 0);
    assert_eq!(outcome.body["registrationState"]["deviceId"], "sym-1");
    assert_eq!(
        outcome.body["registrationState"]["substatus"],
        "initialAssignment"
    );
    assert!(outcome.body["registrationState"]["symmetricKey"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_then_poll_answers_202_then_assigned() {
    let server = Server::start_with(|c| c.always_accept_then_poll = true).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("poller").await;
    let outcome = register(&server.device("poller", sas(&key)), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "poller", "hub-a.example.net");
    assert_eq!(outcome.polls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_group_admits_devices_with_derived_keys_only() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/fleet",
            symmetric_group("fleet", &group_key),
        )
        .await;
    let device_key = derive_device_key(&group_key, "fleet-dev-7").unwrap();
    let outcome = register(&server.device("fleet-dev-7", sas(&device_key)), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "fleet-dev-7", "hub-a.example.net");
    assert_eq!(
        outcome.body["registrationState"]["symmetricKey"]["enrollmentGroupId"],
        "fleet"
    );
    // The group key itself is not a device key.
    refused_with(
        register(&server.device("fleet-dev-8", sas(&group_key)), None).await,
        ConnectReturnCode::NotAuthorized,
    );
    // Another device's derived key does not work for this id.
    refused_with(
        register(&server.device("fleet-dev-9", sas(&device_key)), None).await,
        ConnectReturnCode::NotAuthorized,
    );
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_individual_enrollment_by_certificate_and_thumbprint() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let pki = pki();
    let device = self_signed("x509-ind-1");
    operator
        .put(
            "dps/enrollments/x509-ind-1",
            x509_enrollment("x509-ind-1", &device.cert_pem),
        )
        .await;
    let outcome = register(&server.device("x509-ind-1", x509(&device, &[])), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "x509-ind-1", "hub-a.example.net");
    assert!(outcome.body["registrationState"]["x509"].is_object());

    let second = pki.device_root.device("x509-ind-2");
    let der = edgedps_policies::x509::pem_to_der(&second.cert_pem).unwrap();
    let thumbprint = edgedps_policies::x509::thumbprint(&der);
    operator
        .put(
            "dps/enrollments/x509-ind-2",
            json!({"registrationId": "x509-ind-2", "attestation": {"type": "x509",
                "x509": {"clientCertificates": {"primary": {"sha256Thumbprint": thumbprint}}}}}),
        )
        .await;
    let outcome = register(&server.device("x509-ind-2", x509(&second, &[])), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "x509-ind-2", "hub-a.example.net");

    // Another certificate with the same CN is refused.
    let impostor = self_signed("x509-ind-1");
    refused_with(
        register(&server.device("x509-ind-1", x509(&impostor, &[])), None).await,
        ConnectReturnCode::NotAuthorized,
    );
    // The owner of the certificate is unaffected, and so is everyone else.
    let outcome = register(&server.device("x509-ind-1", x509(&device, &[])), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "x509-ind-1", "hub-a.example.net");
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_group_via_intermediate_and_its_refusals() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let pki = pki();
    operator
        .put(
            "dps/enrollment-groups/roots",
            x509_group("roots", &pki.device_root.pem),
        )
        .await;
    let device = pki.device_intermediate.device("grp-dev-1");
    let outcome = register(
        &server.device("grp-dev-1", x509(&device, &[&pki.device_intermediate])),
        None,
    )
    .await
    .unwrap();
    assert_assigned(&outcome, "grp-dev-1", "hub-a.example.net");
    assert_eq!(
        outcome.body["registrationState"]["x509"]["enrollmentGroupId"],
        "roots"
    );

    // A leaf from a rogue CA with the same name.
    let rogue = pki.rogue_root.device("grp-dev-2");
    refused_with(
        register(&server.device("grp-dev-2", x509(&rogue, &[])), None).await,
        ConnectReturnCode::NotAuthorized,
    );
    // CN is not the client id.
    let other = pki.device_intermediate.device("grp-dev-3");
    refused_with(
        register(
            &server.device("grp-dev-4", x509(&other, &[&pki.device_intermediate])),
            None,
        )
        .await,
        ConnectReturnCode::NotAuthorized,
    );
    // No certificate and no password.
    refused_with(
        register(
            &server.device(
                "grp-dev-5",
                edgedps_device::provision::DeviceAuth::SymmetricKey { key: new_key() },
            ),
            None,
        )
        .await,
        ConnectReturnCode::NotAuthorized,
    );
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_enrollment_answers_disabled_and_individual_overrides_group() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let group_key = new_key();
    operator
        .put("dps/enrollment-groups/g", symmetric_group("g", &group_key))
        .await;
    // An individual enrollment under the group, disabled: it wins over the enabled group.
    let mut enrollment = symmetric_enrollment(
        "member-1",
        &derive_device_key(&group_key, "member-1").unwrap(),
    );
    enrollment["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollments/member-1", enrollment).await;
    let key = derive_device_key(&group_key, "member-1").unwrap();
    let outcome = register(&server.device("member-1", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status, 200);
    assert_eq!(outcome.status_word(), Some("disabled"), "{}", outcome.body);
    assert_eq!(outcome.body["registrationState"]["status"], "disabled");

    // An individual enrollment with its own key: the group key no longer admits the id.
    let own_key = new_key();
    let mut own = symmetric_enrollment("member-2", &own_key);
    own["iotHubs"] = json!(["hub-b.example.net"]);
    operator
        .put(
            "dps/hubs/hub-b.example.net",
            json!({"allocationWeight": 1, "applyAllocationPolicy": false}),
        )
        .await;
    operator.put("dps/enrollments/member-2", own).await;
    refused_with(
        register(
            &server.device(
                "member-2",
                sas(&derive_device_key(&group_key, "member-2").unwrap()),
            ),
            None,
        )
        .await,
        ConnectReturnCode::NotAuthorized,
    );
    let outcome = register(&server.device("member-2", sas(&own_key)), None)
        .await
        .unwrap();
    assert_assigned(&outcome, "member-2", "hub-b.example.net");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registering_without_change_is_idempotent() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("again").await;
    let first = register(&server.device("again", sas(&key)), None)
        .await
        .unwrap();
    let second = register(&server.device("again", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(
        first.body["registrationState"]["etag"],
        second.body["registrationState"]["etag"]
    );
    assert_eq!(first.assigned_hub(), second.assigned_hub());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_forged_and_misdirected_sas_tokens_are_refused() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("sas-dev").await;
    let now = edgedps_responder::unix_now();
    let cases = [
        (
            "expired",
            edgedps_policies::sas::sign(&key, ID_SCOPE, "sas-dev", now - 3600).unwrap(),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "forged",
            edgedps_policies::sas::sign(&new_key(), ID_SCOPE, "sas-dev", now + 3600).unwrap(),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "for another id",
            edgedps_policies::sas::sign(&key, ID_SCOPE, "other-dev", now + 3600).unwrap(),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "truncated",
            "SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fsas-dev&sig=".to_string(),
            ConnectReturnCode::BadUserNamePassword,
        ),
    ];
    let config = server.device("sas-dev", sas(&key));
    for (name, password, expected) in cases {
        let refusal = connack_refusal(
            server.devices_port,
            "sas-dev",
            &config.username(),
            &password,
        )
        .await;
        assert_eq!(refusal, Some(expected), "{name}");
    }
    // The device itself is unaffected.
    let outcome = register(&config, None).await.unwrap();
    assert_assigned(&outcome, "sas-dev", "hub-a.example.net");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_for_another_id_and_bad_client_ids_are_refused() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("dev-u").await;
    let now = edgedps_responder::unix_now();
    let token = edgedps_policies::sas::sign(&key, ID_SCOPE, "dev-u", now + 3600).unwrap();
    let cases = [
        (
            "dev-u",
            format!("{ID_SCOPE}/registrations/dev-x/api-version=2019-03-31"),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "dev-u",
            "0ne99999999/registrations/dev-u/api-version=2019-03-31".to_string(),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "dev-u",
            "garbage".to_string(),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "dev/u",
            format!("{ID_SCOPE}/registrations/dev/u/api-version=2019-03-31"),
            ConnectReturnCode::BadClientId,
        ),
    ];
    for (client_id, username, expected) in cases {
        let refusal = connack_refusal(server.devices_port, client_id, &username, &token).await;
        assert_eq!(refusal, Some(expected), "{client_id} {username}");
    }
    bystander_provisions(&server, &mut operator).await;
}

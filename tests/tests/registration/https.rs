//! The DPS device API over HTTPS (`[listeners.https]`): the same enrollments and answers
//! as the `$dps` topics, for symmetric-key, X.509 and TPM devices, and the refusals of
//! requests that are not the API's.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use edgedps_device::tpm::{self as device_tpm, TpmDevice};
use edgedps_policies::sas::derive_device_key;
use edgedps_tests::dps_http::{dps_token, DpsHttp};
use edgedps_tests::tpm::SoftwareTpm;
use edgedps_tests::*;
use serde_json::json;

/// A server with the HTTPS device API on a free port, answering 202 first if `poll`.
async fn https_server(poll: bool) -> (Server, u16) {
    let server = Server::start_with(|config| {
        config.listeners.https = Some(edgedps::config::HttpsListener {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_cert: None,
            tls_key: None,
        });
        config.always_accept_then_poll = poll;
    })
    .await;
    let port = server.running.https_addr.expect("https listener").port();
    (server, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_devices_register_poll_and_look_up_over_https() {
    let (server, port) = https_server(false).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("http-sym-1").await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/http-group",
            symmetric_group("http-group", &group_key),
        )
        .await;
    operator.subscribe("dps/events/#").await;
    let mut api = DpsHttp::connect(port, None).await;

    let token = dps_token(&key, "http-sym-1");
    let answer = api
        .register(
            "http-sym-1",
            Some(&token),
            &json!({"registrationId": "http-sym-1"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer);
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(answer.body["status"], "assigned");
    let state = &answer.body["registrationState"];
    assert_eq!(state["registrationId"], "http-sym-1");
    assert_eq!(state["assignedHub"], "hub-a.example.net");
    // The same events as over MQTT: the attestation, then the registration.
    let (topic, _) = operator
        .next_publish("dps/events/attestation/")
        .await
        .expect("attestation event");
    assert!(topic.ends_with("http-sym-1"), "{topic}");
    let (_, event) = operator
        .next_publish("dps/events/registrations/")
        .await
        .expect("registration event");
    let event: serde_json::Value = serde_json::from_slice(&event).unwrap();
    assert_eq!(event["outcome"], "assigned");

    // The status lookup, on the same connection, with the other api-version.
    api.api_version = "2021-06-01".into();
    let looked_up = api.lookup("http-sym-1", Some(&token)).await;
    assert_eq!(looked_up.status, 200, "{looked_up:?}");
    assert_eq!(looked_up.body["assignedHub"], "hub-a.example.net");
    assert!(looked_up.body.get("hubRegistration").is_none());

    // A device of the group, with its derived key.
    let derived = derive_device_key(&group_key, "http-member-1").unwrap();
    let answer = api
        .register(
            "http-member-1",
            Some(&dps_token(&derived, "http-member-1")),
            &json!({}),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body["registrationState"]["symmetricKey"]["enrollmentGroupId"],
        "http-group"
    );
    // Not registered yet: the lookup is a 404.
    let derived = derive_device_key(&group_key, "http-member-2").unwrap();
    let missing = api
        .lookup("http-member-2", Some(&dps_token(&derived, "http-member-2")))
        .await;
    assert_eq!(missing.status, 404, "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_registration_is_polled_with_retry_after_and_an_x509_device_uses_its_certificate(
) {
    let (server, port) = https_server(true).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("http-poll-1").await;
    let mut api = DpsHttp::connect(port, None).await;
    let token = dps_token(&key, "http-poll-1");
    let accepted = api.register("http-poll-1", Some(&token), &json!({})).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.retry_after.as_deref(), Some("1"));
    assert_eq!(accepted.body["status"], "assigning");
    let operation = accepted.body["operationId"].as_str().unwrap().to_owned();
    let done = api.poll("http-poll-1", Some(&token), &operation).await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.body["status"], "assigned");
    assert_eq!(done.body["operationId"], operation.as_str());
    // Polled too often (more than 5 in 10 s): 429 with Retry-After, as on MQTT.
    let mut throttled = None;
    for _ in 0..6 {
        let answer = api.poll("http-poll-1", Some(&token), &operation).await;
        if answer.status == 429 {
            throttled = Some(answer);
            break;
        }
    }
    let throttled = throttled.expect("throttled within 6 more polls");
    assert_eq!(throttled.error_code(), Some(429001), "{throttled:?}");
    assert!(throttled.retry_after.is_some(), "{throttled:?}");
    // Another device's token does not poll this operation.
    let other = operator.enroll("http-poll-2").await;
    let refused = api
        .poll(
            "http-poll-2",
            Some(&dps_token(&other, "http-poll-2")),
            &operation,
        )
        .await;
    assert_eq!(refused.status, 404, "{refused:?}");

    // X.509: the TLS client certificate attests; no Authorization.
    let device = self_signed("http-x509-1");
    operator
        .put(
            "dps/enrollments/http-x509-1",
            x509_enrollment("http-x509-1", &device.cert_pem),
        )
        .await;
    let mut with_cert = DpsHttp::connect(
        port,
        Some((device.cert_pem.as_bytes(), device.key_pem.as_bytes())),
    )
    .await;
    let accepted = with_cert.register("http-x509-1", None, &json!({})).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let operation = accepted.body["operationId"].as_str().unwrap().to_owned();
    let done = with_cert.poll("http-x509-1", None, &operation).await;
    assert_eq!(done.body["status"], "assigned", "{done:?}");
    assert!(done.body["registrationState"]["x509"].is_object());
    // The certificate names http-x509-1, not another enrolled device.
    let refused = with_cert.register("http-poll-2", None, &json!({})).await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (401, Some(401002)),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_device_is_challenged_and_provisions_over_https() {
    let (server, port) = https_server(false).await;
    let mut operator = server.operator().await;
    let soft = SoftwareTpm::start();
    soft.make_keys();
    let id = device_tpm::registration_id(&soft);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    operator
        .put(
            &format!("dps/enrollments/{id}"),
            json!({"registrationId": id, "attestation": {"type": "tpm",
                "tpm": {"endorsementKey": b64(&soft.endorsement_key())}}}),
        )
        .await;
    let body = json!({"registrationId": id, "tpm": device_tpm::register_member(&soft)});
    let mut api = DpsHttp::connect(port, None).await;
    let challenge = api.register(&id, None, &body).await;
    assert_eq!(challenge.status, 401, "{challenge:?}");
    assert!(challenge.body.get("status").is_none(), "{challenge:?}");
    assert_eq!(challenge.body["keyName"], "registration");
    let blob = base64::engine::general_purpose::STANDARD
        .decode(challenge.body["authenticationKey"].as_str().unwrap())
        .unwrap();
    assert_eq!(blob.len(), 766);
    soft.activate(&blob)
        .expect("the TPM takes the challenge in");
    let device: Arc<dyn TpmDevice> = Arc::new(soft);
    let sr = edgedps_policies::sas::registration_resource(ID_SCOPE, &id);
    let token = device_tpm::token(
        &device,
        sr,
        edgedps_responder::unix_now() + 600,
        Some("registration"),
    )
    .await
    .unwrap();
    let assigned = api.register(&id, Some(&token), &body).await;
    assert_eq!(assigned.status, 200, "{assigned:?}");
    assert_eq!(assigned.body["status"], "assigned");
    let hub_key = assigned.body["registrationState"]["tpm"]["authenticationKey"]
        .as_str()
        .expect("the hub key");
    device_tpm::activate(&device, hub_key)
        .await
        .expect("the hub key is taken in");
    // Its lookup with the registration key's token.
    let looked_up = api.lookup(&id, Some(&token)).await;
    assert_eq!(looked_up.status, 200, "{looked_up:?}");
    assert!(
        looked_up.body.get("tpm").is_none(),
        "never the key again: {looked_up:?}"
    );
}

/// A refused request: what it is, method, path, headers, body, and the status and code.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<(&'a str, String)>,
    &'a [u8],
    (u16, u64),
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_the_api_s_are_refused_with_azure_s_codes() {
    let (server, port) = https_server(false).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("http-bad-1").await;
    let token = dps_token(&key, "http-bad-1");
    // A TCP connection that never says hello holds no one up.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut api = DpsHttp::connect(port, None).await;

    let path = "/0ne00000001/registrations/http-bad-1/register?api-version=2019-03-31";
    let wrong = dps_token(&new_key(), "http-bad-1");
    let expired = edgedps_policies::sas::sign(
        &key,
        ID_SCOPE,
        "http-bad-1",
        edgedps_responder::unix_now() - 400,
    )
    .unwrap();
    let with_token = |token: &str| {
        vec![
            ("Content-Type", "application/json".to_owned()),
            ("Authorization", token.to_owned()),
        ]
    };
    let auth = with_token(&token);
    let big = vec![b' '; 300 * 1024];
    let cases: Vec<Case> = vec![
        (
            "another id scope",
            "PUT",
            "/0ne0000FFFF/registrations/http-bad-1/register?api-version=2019-03-31",
            auth.clone(),
            b"{}",
            (401, 401002),
        ),
        (
            "no token",
            "PUT",
            path,
            vec![("Content-Type", "application/json".to_owned())],
            b"{}",
            (401, 401002),
        ),
        (
            "a bad token",
            "PUT",
            path,
            with_token(&wrong),
            b"{}",
            (401, 401002),
        ),
        (
            "an expired token",
            "PUT",
            path,
            with_token(&expired),
            b"{}",
            (401, 401002),
        ),
        (
            "no Content-Type",
            "PUT",
            path,
            vec![("Authorization", token.clone())],
            b"{}",
            (400, 400004),
        ),
        (
            "another Content-Type",
            "PUT",
            path,
            vec![
                ("Content-Type", "text/plain".to_owned()),
                ("Authorization", token.clone()),
            ],
            b"{}",
            (400, 400004),
        ),
        (
            "a body that is not JSON",
            "PUT",
            path,
            auth.clone(),
            b"not json",
            (400, 400004),
        ),
        (
            "no api-version",
            "PUT",
            "/0ne00000001/registrations/http-bad-1/register",
            auth.clone(),
            b"{}",
            (400, 400004),
        ),
        (
            "an unknown api-version",
            "PUT",
            "/0ne00000001/registrations/http-bad-1/register?api-version=2030-01-01",
            auth.clone(),
            b"{}",
            (400, 400004),
        ),
        (
            "another path",
            "GET",
            "/nothing/here",
            auth.clone(),
            b"",
            (404, 404000),
        ),
        (
            "another method",
            "DELETE",
            path,
            auth.clone(),
            b"",
            (405, 405000),
        ),
        (
            "a body over the limit",
            "PUT",
            path,
            auth.clone(),
            &big,
            (413, 413000),
        ),
    ];
    for (case, method, target, headers, body, (status, code)) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = api.send(method, target, &headers, body).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (status, Some(code)),
            "{case}: {answer:?}"
        );
    }
    // Nothing of this was recorded; the device still registers on a new connection.
    assert!(server
        .running
        .responder
        .registration_record("http-bad-1")
        .unwrap()
        .is_none());
    let mut api = DpsHttp::connect(port, None).await;
    let answer = api
        .send(
            "PUT",
            path,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &token),
            ],
            b"{}",
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

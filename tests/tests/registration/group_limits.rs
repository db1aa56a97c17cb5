//! Enrollment group limits (PROTOCOL B, `limits`): a leaked group key admits only the
//! ids the group's pattern allows, at its rate, up to its number of devices; each
//! refusal with a reason of its own, in the answer and the event.

use std::time::Duration;

use edgedps_device::provision::register;
use edgedps_tests::*;
use serde_json::{json, Value};

async fn limited_group(operator: &mut Operator, group: &str, limits: Value) -> String {
    let key = new_key();
    let mut body = symmetric_group(group, &key);
    body["limits"] = limits;
    operator
        .put(&format!("dps/enrollment-groups/{group}"), body)
        .await;
    key
}

fn device_key(group_key: &str, id: &str) -> String {
    edgedps_policies::sas::derive_device_key(group_key, id).expect("key")
}

/// The next registration event of `id` with outcome `refused`.
async fn refusal_of(operator: &mut Operator, id: &str) -> Value {
    let topic = format!("dps/events/registrations/{id}");
    for _ in 0..20 {
        if let Some((t, body)) = operator.next_publish(&topic).await {
            let event: Value = serde_json::from_slice(&body).expect("event");
            if t == topic && event["outcome"] == "refused" {
                return event;
            }
        }
    }
    panic!("no refusal event for {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_devices_counts_distinct_devices_once_and_frees_a_place_on_deregistration() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/events/registrations/#").await;
    let key = limited_group(&mut operator, "two", json!({"maxDevices": 2})).await;
    for id in ["two-a", "two-b"] {
        let outcome = server.register_member(&key, id, None).await;
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    }
    // The third is refused with its reason, in the answer and the event.
    let third = server.register_member(&key, "two-c", None).await;
    assert_eq!(third.status, 403, "{}", third.body);
    assert_eq!(third.body["errorCode"], 403001, "{}", third.body);
    let message = third.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("holds its limit of 2 devices"),
        "{message}"
    );
    let event = refusal_of(&mut operator, "two-c").await;
    assert_eq!(event["errorCode"], 403001, "{event}");
    // Two at once cannot both take a last place: a group of one, four devices at once.
    let one = limited_group(&mut operator, "one", json!({"maxDevices": 1})).await;
    let mut racing = Vec::new();
    for i in 0..4 {
        let id = format!("one-{i}");
        let config = server.member(&one, &id);
        racing.push(tokio::spawn(async move { register(&config, None).await }));
    }
    let mut assigned = 0;
    for task in racing {
        let outcome = task.await.expect("task").expect("answered");
        if outcome.status_word() == Some("assigned") {
            assigned += 1;
        } else {
            assert_eq!(outcome.body["errorCode"], 403001, "{}", outcome.body);
        }
    }
    assert_eq!(assigned, 1);
    // A device already in the group re-registers: it never counts twice.
    let again = server.register_member(&key, "two-a", None).await;
    assert_eq!(again.status_word(), Some("assigned"), "{}", again.body);
    // Deregistering one frees its place (within a second).
    let cleared = operator.write("dps/registrations/two-b", b"").await;
    assert_eq!(cleared["ok"], true, "{cleared}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = server.register_member(&key, "two-c", None).await;
    assert_eq!(third.status_word(), Some("assigned"), "{}", third.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_over_its_rate_answers_429_with_retry_after() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/events/registrations/#").await;
    let key = limited_group(
        &mut operator,
        "slowgroup",
        json!({"registrationsPerMinute": 3}),
    )
    .await;
    for i in 0..3 {
        let id = format!("slowgroup-{i}");
        let outcome = server.register_member(&key, &id, None).await;
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    }
    let (client, mut eventloop) = server
        .listening("slowgroup-3", &device_key(&key, "slowgroup-3"))
        .await;
    let answer = ask(
        &client,
        &mut eventloop,
        &edgedps_topics::dps::register_topic("1"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(answer.status, 429);
    assert!(
        answer.retry_after.is_some_and(|s| (1..=20).contains(&s)),
        "{answer:?}"
    );
    let body: Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(body["errorCode"], 429001, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("limits.registrationsPerMinute")),
        "{body}"
    );
    let event = refusal_of(&mut operator, "slowgroup-3").await;
    assert_eq!(event["errorCode"], 429001, "{event}");
    // Another group is not slowed.
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_outside_the_pattern_is_refused_at_connect_and_a_bad_pattern_at_the_write() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/events/attestation/#").await;
    let key = limited_group(
        &mut operator,
        "sensors",
        json!({"registrationIdPattern": "sensor-[0-9]+"}),
    )
    .await;
    let ok = server.register_member(&key, "sensor-17", None).await;
    assert_eq!(ok.status_word(), Some("assigned"), "{}", ok.body);
    // The key is right, the id is not the group's: 401 at CONNECT, with the reason.
    for id in ["camera-1", "sensor-17x", "xsensor-1"] {
        let now = edgedps_responder::unix_now();
        let token = edgedps_policies::sas::sign(&device_key(&key, id), ID_SCOPE, id, now + 3600)
            .expect("token");
        let config = server.member(&key, id);
        let refused = connack_refusal(server.devices_port, id, &config.username(), &token).await;
        assert_eq!(
            refused,
            Some(rumqttc::ConnectReturnCode::NotAuthorized),
            "{id}"
        );
        let (_, body) = operator
            .next_publish(&format!("dps/events/attestation/{id}"))
            .await
            .expect("attestation event");
        let event: Value = serde_json::from_slice(&body).expect("event");
        assert!(
            event["reason"]
                .as_str()
                .is_some_and(|r| r
                    .contains("does not match enrollment group `sensors`'s registrationIdPattern")),
            "{event}"
        );
    }
    // An invalid pattern never reaches the store.
    let mut bad = symmetric_group("broken", &new_key());
    bad["limits"] = json!({"registrationIdPattern": "sensor-[0-9"});
    let refused = operator
        .write(
            "dps/enrollment-groups/broken",
            &serde_json::to_vec(&bad).expect("json"),
        )
        .await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["errorCode"], 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("registrationIdPattern is not a valid regular expression")),
        "{refused}"
    );
    // Editing the pattern applies at the next register of a connected device: 400.
    let (client, mut eventloop) = server
        .listening("sensor-18", &device_key(&key, "sensor-18"))
        .await;
    let mut narrowed = symmetric_group("sensors", &key);
    narrowed["limits"] = json!({"registrationIdPattern": "sensor-1[0-7]"});
    operator
        .put("dps/enrollment-groups/sensors", narrowed)
        .await;
    let answer = ask(
        &client,
        &mut eventloop,
        &edgedps_topics::dps::register_topic("1"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    let body: Value = serde_json::from_slice(&answer.body).expect("json");
    assert_eq!(body["errorCode"], 400210, "{body}");
}

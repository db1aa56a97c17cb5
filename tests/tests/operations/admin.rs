//! The operator plane end to end (PROTOCOL B): retained writes, validation before the
//! store, etags, deletes, hubs, registration records and events.

use edgedps_device::provision::{register, DeviceError};
use edgedps_tests::*;
use rumqttc::ConnectReturnCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_writes_are_rejected_with_a_reason_and_leave_the_store_unchanged() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("keep").await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "dps/enrollments/keep",
            json!({"registrationId": "other", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": new_key()}}}),
            "topic",
        ),
        (
            "dps/enrollments/keep",
            json!({"registrationId": "keep", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}),
            "16 to 64 bytes",
        ),
        (
            "dps/enrollments/keep",
            json!({"registrationId": "keep", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "not a pem"}}}}}),
            "PEM",
        ),
        (
            "dps/enrollments/keep",
            json!({"registrationId": "keep", "attestation": {"type": "symmetricKey"}, "provisioningstatus": "disabled"}),
            "provisioningstatus",
        ),
        (
            "dps/enrollments/keep",
            json!({"registrationId": "keep", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}),
            "TPM",
        ),
        (
            "dps/enrollment-groups/g1",
            json!({"enrollmentGroupId": "g1", "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pki().device_root.device("leaf").cert_pem}}}}}),
            "not a CA",
        ),
        (
            "dps/hubs/hub-c.example.net",
            json!({"allocationWeight": 5000}),
            "allocationWeight",
        ),
    ];
    for (topic, body, reason) in cases {
        let result = operator
            .write(topic, &serde_json::to_vec(&body).unwrap())
            .await;
        assert_eq!(result["ok"], false, "{topic} {body}");
        assert_eq!(result["errorCode"], 400, "{result}");
        let message = result["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(reason),
            "{message} should mention {reason}"
        );
    }
    let result = operator.write("dps/enrollments/keep", b"{not json").await;
    assert_eq!(result["errorCode"], 400);
    // The enrollment is still the valid one.
    let outcome = register(&server.device("keep", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_mismatch_is_refused_and_matching_etag_is_accepted() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = new_key();
    let first = operator
        .put(
            "dps/enrollments/tagged",
            symmetric_enrollment("tagged", &key),
        )
        .await;
    let etag = first["etag"].as_str().unwrap().to_owned();
    let mut stale = symmetric_enrollment("tagged", &key);
    stale["etag"] = json!("\"stale\"");
    let result = operator
        .write(
            "dps/enrollments/tagged",
            &serde_json::to_vec(&stale).unwrap(),
        )
        .await;
    assert_eq!(result["ok"], false);
    assert_eq!(result["errorCode"], 412);
    let mut fresh = symmetric_enrollment("tagged", &key);
    fresh["etag"] = json!(etag);
    let result = operator.put("dps/enrollments/tagged", fresh).await;
    assert_ne!(result["etag"], json!(etag));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_retained_message_deletes_the_enrollment() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("gone").await;
    let result = operator.write("dps/enrollments/gone", b"").await;
    assert_eq!(result["ok"], true, "{result}");
    match register(&server.device("gone", sas(&key)), None).await {
        Err(DeviceError::Refused(code)) => assert_eq!(code, ConnectReturnCode::NotAuthorized),
        other => panic!("deleted enrollment still admits: {other:?}"),
    }
    let result = operator.write("dps/enrollments/gone", b"").await;
    assert_eq!(result["errorCode"], 404);
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_records_show_the_stored_state_without_keys() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("shown").await;
    register(&server.device("shown", sas(&key)), None)
        .await
        .unwrap();

    let mut watcher = server.operator().await;
    watcher.subscribe("dps/enrollments/#").await;
    let (topic, payload) = watcher
        .next_publish("dps/enrollments/")
        .await
        .expect("retained enrollment");
    assert_eq!(topic, "dps/enrollments/shown");
    let body: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(body["registrationId"], "shown");
    assert!(body["etag"].is_string());
    assert!(
        !String::from_utf8_lossy(&payload).contains(&key),
        "key leaked: {body}"
    );

    watcher.subscribe("dps/registrations/#").await;
    let (topic, payload) = watcher
        .next_publish("dps/registrations/")
        .await
        .expect("retained registration");
    assert_eq!(topic, "dps/registrations/shown");
    let record: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(record["assignedHub"], "hub-a.example.net");
    assert_eq!(record["status"], "assigned");

    // Publishing the redacted record back keeps the stored keys.
    operator.put("dps/enrollments/shown", body).await;
    let outcome = register(&server.device("shown", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
}

/// Events are not retained and go only where a subscription takes them
/// (`broker/src/interest.rs`): every form of subscription that matches must still get
/// them, a persistent session's included once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_subscription_that_matches_them() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let server = Server::start().await;
    let mut operator = server.operator().await;

    // Alone first: nothing else holds a matching subscription.
    let keeper_options = || {
        let mut options = MqttOptions::new("events-keeper", "127.0.0.1", server.local_port);
        options.set_clean_session(false);
        options
    };
    let (keeper, mut keeper_loop) =
        subscribed(keeper_options(), "dps/events/#", QoS::AtLeastOnce).await;
    keeper.disconnect().await.unwrap();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while keeper_loop.poll().await.is_ok() {}
    })
    .await;
    let (_keeper, mut keeper_loop) = AsyncClient::new(keeper_options(), 16);
    edgedps_device::provision::wait_for(
        &mut keeper_loop,
        "CONNACK with the session",
        |p| matches!(p, Packet::ConnAck(ack) if ack.session_present),
    )
    .await
    .unwrap();
    let key = operator.enroll("heard-once-back").await;
    register(&server.device("heard-once-back", sas(&key)), None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, keeper_loop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p))))
                if p.topic == "dps/events/registrations/heard-once-back" =>
            {
                break
            }
            Ok(Ok(_)) => {}
            other => panic!("the resumed session got no event: {other:?}"),
        }
    }

    let mut watchers = Vec::new();
    for filter in ["#", "+/events/registrations/+", "$share/ops/dps/events/#"] {
        let mut watcher = server.operator().await;
        watcher.subscribe(filter).await;
        watchers.push((filter, watcher));
    }
    let key = operator.enroll("heard").await;
    register(&server.device("heard", sas(&key)), None)
        .await
        .unwrap();
    for (filter, watcher) in &mut watchers {
        let (topic, _) = watcher
            .next_publish("dps/events/registrations/")
            .await
            .unwrap_or_else(|| panic!("no event for `{filter}`"));
        assert_eq!(topic, "dps/events/registrations/heard", "{filter}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_events_are_published() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/events/registrations/#").await;
    let key = operator.enroll("evented").await;
    register(&server.device("evented", sas(&key)), None)
        .await
        .unwrap();
    let (topic, payload) = operator.next_publish("dps/events/").await.expect("event");
    assert_eq!(topic, "dps/events/registrations/evented");
    let event: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(event["outcome"], "assigned");
    assert_eq!(event["assignedHub"], "hub-a.example.net");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_hubs_and_iot_hubs_decide_the_assignment() {
    let server = Server::start_with(|c| c.hubs.clear()).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("hubless").await;
    // No hub linked: the operation completes as failed, 400208 in the state.
    let outcome = register(&server.device("hubless", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(outcome.status_word(), Some("failed"));
    assert_eq!(outcome.body["registrationState"]["status"], "failed");
    assert_eq!(outcome.body["registrationState"]["errorCode"], 400208);
    assert!(outcome.body["registrationState"]["errorMessage"].is_string());

    operator
        .put("dps/hubs/hub-x.example.net", json!({"allocationWeight": 1}))
        .await;
    operator
        .put(
            "dps/hubs/hub-y.example.net",
            json!({"allocationWeight": 1, "applyAllocationPolicy": false}),
        )
        .await;
    let outcome = register(&server.device("hubless", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.assigned_hub(), Some("hub-x.example.net"));

    // Static allocation to a hub outside the policy set.
    let mut pinned = symmetric_enrollment("pinned", &key);
    pinned["allocationPolicy"] = json!("static");
    pinned["iotHubs"] = json!(["hub-y.example.net"]);
    operator.put("dps/enrollments/pinned", pinned).await;
    let outcome = register(&server.device("pinned", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.assigned_hub(), Some("hub-y.example.net"));

    // Unlinking the only candidate leaves the enrollment with none.
    assert_eq!(
        operator.write("dps/hubs/hub-y.example.net", b"").await["ok"],
        true
    );
    let mut moved = symmetric_enrollment("pinned", &key);
    moved["allocationPolicy"] = json!("static");
    moved["iotHubs"] = json!(["hub-y.example.net"]);
    operator.put("dps/enrollments/pinned", moved).await;
    let outcome = register(&server.device("pinned", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.body["registrationState"]["errorCode"], 400208);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_clears_a_registration_record() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("dereg").await;
    let first = register(&server.device("dereg", sas(&key)), None)
        .await
        .unwrap();
    // Records are edgedps's to write.
    let result = operator.write("dps/registrations/dereg", b"{}").await;
    assert_eq!(result["errorCode"], 403);
    assert_eq!(
        operator.write("dps/registrations/dereg", b"").await["ok"],
        true
    );
    let second = register(&server.device("dereg", sas(&key)), None)
        .await
        .unwrap();
    assert_ne!(
        first.body["registrationState"]["etag"],
        second.body["registrationState"]["etag"]
    );
    assert_eq!(
        second.body["registrationState"]["substatus"],
        "initialAssignment"
    );
}

/// The records are read from the store for each new subscription
/// (`broker/src/session/records.rs`), in pages: every filter that matches gets each of
/// its records exactly once, as a retained message, and nothing else of the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_receives_every_retained_record_once() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    // More than one page of the store's reading (256), and more than rumqttd's batch
    // (200), which used to cut the retained list short.
    let server = Server::start().await;
    let admin = ([127, 0, 0, 1], server.local_port).into();
    let records: Vec<_> = (0..600)
        .map(|i| {
            let id = format!("listed-{i}");
            (
                format!("dps/enrollments/{id}"),
                symmetric_enrollment(&id, &new_key()),
            )
        })
        .collect();
    edgedps_device::admin::write_all(admin, &records)
        .await
        .unwrap();
    let mut operator = server.operator().await;
    let key = operator.enroll("listed-registered").await;
    register(&server.device("listed-registered", sas(&key)), None)
        .await
        .unwrap();

    let enrollments = |n: usize| -> Vec<String> {
        let mut topics: Vec<String> = (0..n)
            .map(|i| format!("dps/enrollments/listed-{i}"))
            .collect();
        topics.push("dps/enrollments/listed-registered".into());
        topics
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("dps/enrollments/#", enrollments(600)),
        (
            "dps/enrollments/listed-7",
            vec!["dps/enrollments/listed-7".into()],
        ),
        (
            "+/+/listed-registered",
            vec![
                "dps/enrollments/listed-registered".into(),
                "dps/registrations/listed-registered".into(),
            ],
        ),
        (
            "dps/registrations/+",
            vec!["dps/registrations/listed-registered".into()],
        ),
        ("dps/hubs/#", vec!["dps/hubs/hub-a.example.net".into()]),
        ("dps/registrations/LISTED-REGISTERED", vec![]),
        ("$share/ops/dps/#", vec![]),
        ("dps/events/#", vec![]),
    ];
    for (n, (filter, expected)) in cases.into_iter().enumerate() {
        let options = MqttOptions::new(format!("lister-{n}"), "127.0.0.1", server.local_port);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(700), eventloop.poll())
                .await
            {
                Err(_) => break,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    assert!(p.retain, "{filter}: {} arrived without RETAIN", p.topic);
                    seen.push(p.topic);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{filter}: {e}"),
            }
        }
        let mut expected = expected;
        expected.sort();
        seen.sort();
        assert_eq!(seen.len(), expected.len(), "{filter}: count");
        assert_eq!(seen, expected, "{filter}");
    }
}

/// Writes during a long reading of the records: whatever the interleaving of the pages
/// read from the store and the live changes, the last message of each record a
/// subscriber gets is the record's state once the writes are done (what a new
/// subscriber reads), and a deleted record's last message is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_reading_records_while_they_change_ends_with_their_current_state() {
    use rumqttc::{Event, MqttOptions, Packet, QoS};
    use std::collections::BTreeMap;
    let server = Server::start().await;
    let admin = ([127, 0, 0, 1], server.local_port).into();
    let body = |i: usize, key: &str| symmetric_enrollment(&format!("churn-{i}"), key);
    let first: Vec<_> = (0..600)
        .map(|i| (format!("dps/enrollments/churn-{i}"), body(i, &new_key())))
        .collect();
    edgedps_device::admin::write_all(admin, &first)
        .await
        .unwrap();

    /// Every record message of `eventloop` until it has been quiet for `quiet`: the
    /// last payload per topic, an empty one removing it.
    async fn last_per_topic(
        eventloop: &mut rumqttc::EventLoop,
        quiet: std::time::Duration,
    ) -> BTreeMap<String, Value> {
        let mut last = BTreeMap::new();
        loop {
            match tokio::time::timeout(quiet, eventloop.poll()).await {
                Err(_) => return last,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if p.payload.is_empty() {
                        last.remove(&p.topic);
                    } else {
                        last.insert(p.topic, serde_json::from_slice(&p.payload).unwrap());
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{e}"),
            }
        }
    }

    let options = MqttOptions::new("churn-watcher", "127.0.0.1", server.local_port);
    let (watcher, mut watching) = subscribed(options, "dps/enrollments/#", QoS::AtMostOnce).await;
    let watched = tokio::spawn(async move {
        let last = last_per_topic(&mut watching, std::time::Duration::from_secs(2)).await;
        (watcher, last)
    });
    // While the watcher reads: delete a hundred, rewrite a hundred, add fifty.
    let mut operator = server.operator().await;
    for i in (0..600).step_by(6) {
        let result = operator
            .write(&format!("dps/enrollments/churn-{i}"), b"")
            .await;
        assert_eq!(result["ok"], true, "{result}");
    }
    let rewrites: Vec<_> = (1..600)
        .step_by(6)
        .chain(600..650)
        .map(|i| (format!("dps/enrollments/churn-{i}"), body(i, &new_key())))
        .collect();
    edgedps_device::admin::write_all(admin, &rewrites)
        .await
        .unwrap();
    let (_watcher, seen) = watched.await.unwrap();

    let options = MqttOptions::new("churn-reader", "127.0.0.1", server.local_port);
    let (_reader, mut reading) = subscribed(options, "dps/enrollments/#", QoS::AtMostOnce).await;
    let current = last_per_topic(&mut reading, std::time::Duration::from_millis(700)).await;
    assert_eq!(current.len(), 550, "600 - 100 deleted + 50 new");
    assert_eq!(seen.len(), current.len());
    for (topic, record) in &current {
        assert_eq!(seen.get(topic), Some(record), "{topic}");
    }
}

/// A record that changes is published live to the subscriptions that are there, with
/// RETAIN 0 as for any live message; a deleted one as an empty message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_record_reaches_subscribers_live() {
    use rumqttc::{Event, MqttOptions, Packet, QoS};
    let server = Server::start().await;
    let mut operator = server.operator().await;
    // A record there before the subscription: once it has arrived (retained), the
    // subscription's reading of the store is over, and what follows is live.
    operator.enroll("live-0").await;
    let options = MqttOptions::new("live-lister", "127.0.0.1", server.local_port);
    let (_client, mut eventloop) = subscribed(options, "dps/enrollments/#", QoS::AtMostOnce).await;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                assert!(p.retain && p.topic == "dps/enrollments/live-0", "{p:?}");
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("the stored record was not read: {other:?}"),
        }
    }
    operator.enroll("live-1").await;
    operator.write("dps/enrollments/live-1", b"").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(std::time::Duration::from_secs(5), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => seen.push(p),
            Ok(Ok(_)) => {}
            other => panic!("live record missing after {seen:?}: {other:?}"),
        }
    }
    assert_eq!(seen[0].topic, "dps/enrollments/live-1");
    assert!(!seen[0].retain);
    let body: Value = serde_json::from_slice(&seen[0].payload).unwrap();
    assert_eq!(body["registrationId"], "live-1");
    assert_eq!(seen[1].topic, "dps/enrollments/live-1");
    assert!(seen[1].payload.is_empty(), "a delete is an empty message");
}

/// Writes through `operator` and returns the result and the audit event that follows it.
async fn audited(operator: &mut Operator, topic: &str, body: &[u8]) -> (Value, Value) {
    let result = operator.write(topic, body).await;
    let event_topic = topic.replacen("dps/", "dps/events/admin/", 1);
    let (topic, payload) = operator
        .next_publish("dps/events/admin/")
        .await
        .expect("an audit event follows every result");
    assert_eq!(topic, event_topic);
    let event: Value = serde_json::from_slice(&payload).expect("event is JSON");
    assert!(event["operator"]
        .as_str()
        .is_some_and(|o| o.starts_with("operator-")));
    assert!(event["timestampUtc"].is_string(), "{event}");
    (result, event)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_write_and_retirement_is_an_audit_event() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/events/admin/#").await;
    let key = new_key();
    let body = |value: Value| serde_json::to_vec(&value).unwrap();

    let (result, event) = audited(
        &mut operator,
        "dps/enrollments/audited",
        &body(symmetric_enrollment("audited", &key)),
    )
    .await;
    assert_eq!(result["ok"], true);
    assert_eq!(event["kind"], "enrollments");
    assert_eq!(event["id"], "audited");
    assert_eq!(event["operation"], "write");
    assert_eq!(event["outcome"], "created");
    assert_eq!(event["provisioningStatus"], "enabled");
    assert_eq!(event["etag"], result["etag"]);
    assert!(event.get("retirement").is_none(), "{event}");

    // Disabling retires the device; enabling again does not.
    let mut disabled = symmetric_enrollment("audited", &key);
    disabled["provisioningStatus"] = json!("disabled");
    let (_, event) = audited(&mut operator, "dps/enrollments/audited", &body(disabled)).await;
    assert_eq!(event["outcome"], "updated");
    assert_eq!(event["retirement"], "disabled");
    let (_, event) = audited(
        &mut operator,
        "dps/enrollments/audited",
        &body(symmetric_enrollment("audited", &key)),
    )
    .await;
    assert_eq!(event["outcome"], "updated");
    assert!(event.get("retirement").is_none(), "{event}");

    // Blocking one certificate of a group: a disabled individual enrollment for it.
    let group_ca = &pki().device_root;
    audited(
        &mut operator,
        "dps/enrollment-groups/fleet",
        &body(x509_group("fleet", &group_ca.pem)),
    )
    .await;
    let mut block = x509_enrollment("stolen", &group_ca.device("stolen").cert_pem);
    block["provisioningStatus"] = json!("disabled");
    let (_, event) = audited(&mut operator, "dps/enrollments/stolen", &body(block)).await;
    assert_eq!(event["outcome"], "created");
    assert_eq!(event["retirement"], "disabled");
    assert_eq!(event["provisioningStatus"], "disabled");

    // Deregistration.
    let outcome = register(&server.device("audited", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
    let (_, event) = audited(&mut operator, "dps/registrations/audited", b"").await;
    assert_eq!(event["kind"], "registrations");
    assert_eq!(event["operation"], "delete");
    assert_eq!(event["outcome"], "deleted");
    assert_eq!(event["retirement"], "deregistered");

    // A rejected write names the reason and quotes no value, not even a misplaced key.
    let mut misplaced = symmetric_enrollment("audited", &key);
    misplaced["iotHubs"] = json!(key);
    let (result, event) = audited(&mut operator, "dps/enrollments/audited", &body(misplaced)).await;
    assert_eq!(result["ok"], false);
    assert_eq!(event["outcome"], "rejected");
    assert_eq!(event["errorCode"], 400);
    assert_eq!(event["message"], result["message"]);
    let message = event["message"].as_str().unwrap_or_default();
    assert!(message.contains("expected a sequence"), "{event}");
    assert!(!event.to_string().contains(&key), "{event}");
    assert!(!result.to_string().contains(&key), "{result}");

    // Hubs: linked, unlinked.
    let (_, event) = audited(
        &mut operator,
        "dps/hubs/hub-z.example.net",
        &body(json!({"allocationWeight": 3})),
    )
    .await;
    assert_eq!(event["outcome"], "created");
    let (_, event) = audited(&mut operator, "dps/hubs/hub-z.example.net", b"").await;
    assert_eq!(event["retirement"], "unlinked");

    // Deleting: the enrollment, the group; deleting what is not there is rejected.
    let (_, event) = audited(&mut operator, "dps/enrollments/audited", b"").await;
    assert_eq!(event["outcome"], "deleted");
    assert_eq!(event["retirement"], "deleted");
    let (_, event) = audited(&mut operator, "dps/enrollment-groups/fleet", b"").await;
    assert_eq!(event["kind"], "enrollment-groups");
    assert_eq!(event["retirement"], "deleted");
    let (_, event) = audited(&mut operator, "dps/enrollments/audited", b"").await;
    assert_eq!(event["outcome"], "rejected");
    assert_eq!(event["errorCode"], 404);
}

//! CBOR bodies (PROTOCOL C): a register body that starts with a CBOR map, or an MQTT 5
//! content type `application/cbor`, is answered in CBOR with the same field names; so are
//! operator writes. Retained records and events stay JSON.

use std::time::Duration;

use edgedps_tests::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cbor_register_is_answered_in_cbor() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("cbor-dev").await;
    let (client, mut eventloop) = server.listening("cbor-dev", &key).await;
    let body = cbor(&json!({"registrationId": "cbor-dev", "payload": {"model": "m1", "n": 3}}));
    let Answer {
        status,
        body: answer,
        ..
    } = ask(
        &client,
        &mut eventloop,
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        body,
    )
    .await;
    assert_eq!(status, 200);
    let answer = from_cbor(&answer);
    assert_eq!(answer["status"], "assigned", "{answer}");
    assert_eq!(
        answer["registrationState"]["assignedHub"],
        "hub-a.example.net"
    );
    assert_eq!(answer["registrationState"]["registrationId"], "cbor-dev");
    assert!(answer["operationId"].is_string());

    // The same device in JSON gets JSON, with the same assignment (idempotent).
    let Answer { body: again, .. } = ask(
        &client,
        &mut eventloop,
        "$dps/registrations/PUT/iotdps-register/?$rid=2",
        br#"{"registrationId":"cbor-dev","payload":{"model":"m1","n":3}}"#.to_vec(),
    )
    .await;
    let again: Value = serde_json::from_slice(&again).expect("JSON for a JSON request");
    assert_eq!(
        again["registrationState"]["etag"],
        answer["registrationState"]["etag"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_then_poll_in_cbor() {
    let server = Server::start_with(|c| c.always_accept_then_poll = true).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("cbor-poller").await;
    let (client, mut eventloop) = server.listening("cbor-poller", &key).await;
    let Answer {
        status,
        body: accepted,
        ..
    } = ask(
        &client,
        &mut eventloop,
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        cbor(&json!({"registrationId": "cbor-poller"})),
    )
    .await;
    assert_eq!(status, 202);
    let accepted = from_cbor(&accepted);
    assert_eq!(accepted["status"], "assigning");
    let operation = accepted["operationId"].as_str().unwrap().to_owned();
    // The poll has no body: it is answered in the encoding of the register.
    let Answer {
        status, body: done, ..
    } = ask(
        &client,
        &mut eventloop,
        &format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={operation}"
        ),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(from_cbor(&done)["status"], "assigned");

    // A device that reconnects to poll (MQTT 3.1.1: no content type, no body) still
    // gets the operation in CBOR; an unknown operation is a JSON error as usual.
    drop((client, eventloop));
    let (client, mut eventloop) = server.listening("cbor-poller", &key).await;
    let Answer {
        status, body: done, ..
    } = ask(
        &client,
        &mut eventloop,
        &format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3&operationId={operation}"
        ),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(from_cbor(&done)["status"], "assigned");
    let Answer {
        status,
        body: unknown,
        ..
    } = ask(
        &client,
        &mut eventloop,
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=4&operationId=4.none",
        Vec::new(),
    )
    .await;
    assert_eq!(status, 404);
    let unknown: Value = serde_json::from_slice(&unknown).unwrap();
    assert_eq!(unknown["errorCode"], 404201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_content_type_asks_for_cbor_and_gets_it_labelled() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event};

    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("cbor-v5").await;
    let options = server.mqtt5_options("cbor-v5", &key);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .subscribe("$dps/registrations/res/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    // An empty body: only the content type says CBOR.
    let properties = PublishProperties {
        content_type: Some("application/cbor".into()),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "$dps/registrations/PUT/iotdps-register/?$rid=v5",
            QoS::AtLeastOnce,
            false,
            Vec::new(),
            properties,
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("answer in time")
            .expect("connection stays up");
        if let Event::Incoming(Packet::Publish(p)) = event {
            assert_eq!(&p.topic[..], b"$dps/registrations/res/200/?$rid=v5");
            let content_type = p.properties.and_then(|p| p.content_type);
            assert_eq!(content_type.as_deref(), Some("application/cbor"));
            assert_eq!(from_cbor(&p.payload)["status"], "assigned");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_write_in_cbor_and_records_stay_json() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = new_key();
    let result = from_cbor(
        &operator
            .write_raw(
                "dps/enrollments/cbor-enrolled",
                &cbor(&symmetric_enrollment("cbor-enrolled", &key)),
            )
            .await,
    );
    assert_eq!(result["ok"], true, "{result}");
    // The retained record, as a new subscriber sees it.
    operator.subscribe("dps/enrollments/#").await;
    let (topic, record) = operator
        .next_publish("dps/enrollments/")
        .await
        .expect("retained record");
    assert_eq!(topic, "dps/enrollments/cbor-enrolled");
    let record: Value = serde_json::from_slice(&record).expect("records are JSON");
    assert_eq!(record["registrationId"], "cbor-enrolled");
    assert!(record["attestation"]["symmetricKey"]
        .get("primaryKey")
        .is_none());
    // The device enrolled in CBOR provisions.
    let outcome =
        edgedps_device::provision::register(&server.device("cbor-enrolled", sas(&key)), None)
            .await
            .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_cbor_operator_writes_are_rejected_in_cbor() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = new_key();
    let mut wrong_type = symmetric_enrollment("cbor-bad", &key);
    wrong_type["iotHubs"] = json!(key);
    let mut trailing = cbor(&symmetric_enrollment("cbor-bad", &key));
    trailing.push(0x00);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated map", vec![0xa2, 0x61, 0x61]),
        ("reserved additional information", vec![0xa1, 0x1c]),
        (
            "2^64 entries",
            vec![0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("nested too deeply", vec![0xa1; 5_000]),
        ("bytes after the item", trailing),
        ("a key in the wrong field", cbor(&wrong_type)),
        ("integer keys", vec![0xa1, 0x01, 0x02]),
    ];
    for (what, body) in cases {
        let result = from_cbor(&operator.write_raw("dps/enrollments/cbor-bad", &body).await);
        assert_eq!(result["ok"], false, "{what}: {result}");
        assert_eq!(result["errorCode"], 400, "{what}: {result}");
        assert!(!result.to_string().contains(&key), "{what}: {result}");
    }
    // Nothing was stored, and the service still answers.
    let result = operator.write("dps/enrollments/cbor-bad", b"").await;
    assert_eq!(result["errorCode"], 404, "{result}");
}

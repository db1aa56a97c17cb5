//! The IoT Hub device protocol of the local hub (PROTOCOL E) over rumqttc: twins
//! (GET, reported patches and their versions, desired and tag patches from operators),
//! cloud-to-device messages (durable queue, bounds, TTL, at least once) and direct
//! methods (answer, device offline, timeout, unknown request id), and what
//! re-provisioning and retirement do to them.

use std::time::Duration;

use edgedps_tests::hub::*;
use edgedps_tests::*;
use rumqttc::QoS;
use serde_json::{json, Value};

/// Enrolls `id` with `initial_twin` (and the enrollment's other fields from `extra`)
/// and provisions it to the local hub; its key.
async fn enrolled_here(
    server: &Server,
    operator: &mut Operator,
    id: &str,
    initial_twin: Value,
    extra: Value,
) -> String {
    let key = new_key();
    let mut enrollment = symmetric_enrollment(id, &key);
    enrollment["initialTwin"] = initial_twin;
    if let (Some(enrollment), Value::Object(extra)) = (enrollment.as_object_mut(), extra) {
        enrollment.extend(extra);
    }
    operator
        .put(&format!("dps/enrollments/{id}"), enrollment)
        .await;
    assert_eq!(provision(server, id, &key).await, LOCAL);
    key
}

/// A provisioning (DPS) session of `id`, MQTT 3.1.1.
async fn provisioning_session(
    server: &Server,
    id: &str,
    key: &str,
) -> edgedps_tests::live::LiveDevice {
    edgedps_tests::live::LiveDevice::connect(
        server,
        id,
        &sas(key),
        edgedps_tests::live::Protocol::V311,
    )
    .await
    .expect("DPS connect")
}

/// The next desired-properties notification `device` gets, which must be for
/// `version`: its body as sent.
async fn desired_notification(device: &mut HubDevice, version: u64) -> Vec<u8> {
    let note = device
        .next_publish("$iothub/twin/PATCH/properties/desired/")
        .await
        .expect("the device is told");
    assert_eq!(
        note.topic,
        format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
    );
    note.payload.to_vec()
}

/// The `$.mid` of a cloud-to-device message's topic.
fn message_id(topic: &str) -> String {
    let bag = topic.rsplit('/').next().unwrap_or_default();
    bag.split('&')
        .find_map(|pair| pair.strip_prefix("%24.mid="))
        .unwrap_or_else(|| panic!("no message id in {topic}"))
        .to_owned()
}

fn interval(n: u64) -> Value {
    json!({"tags": {"site": "lab"}, "properties": {"desired": {"interval": n}}})
}

/// The retained twin record of `id`, as a new subscriber reads it.
async fn twin_record(server: &Server, id: &str) -> Option<Value> {
    let mut reader = server.operator().await;
    reader.subscribe(&format!("hub/twins/{id}")).await;
    let (_, body) = reader.next_publish(&format!("hub/twins/{id}")).await?;
    (!body.is_empty()).then(|| serde_json::from_slice(&body).expect("JSON record"))
}

#[tokio::test]
async fn the_twin_is_the_enrollments_and_reported_patches_count_versions() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = enrolled_here(&server, &mut operator, "twin-1", interval(30), json!({})).await;
    let mut device = HubDevice::connect(&server, "twin-1", &key).await;
    device.subscribe("$iothub/twin/res/#").await;

    let (status, _, twin) = device.twin("GET", b"").await;
    assert_eq!(status, 200, "{twin}");
    assert_eq!(
        twin,
        json!({"desired": {"interval": 30, "$version": 1}, "reported": {"$version": 1}})
    );

    let (status, version, body) = device
        .twin(
            "PATCH/properties/reported",
            br#"{"fw": "1.0", "net": {"rssi": -70}}"#,
        )
        .await;
    assert_eq!((status, version, body), (204, Some(2), Value::Null));
    let (status, version, _) = device
        .twin(
            "PATCH/properties/reported",
            br#"{"net": null, "battery": 80}"#,
        )
        .await;
    assert_eq!((status, version), (204, Some(3)));
    let (_, _, twin) = device.twin("GET", b"").await;
    assert_eq!(
        twin["reported"],
        json!({"fw": "1.0", "battery": 80, "$version": 3})
    );

    // Bad patches: 400 with IoT Hub's error body and the reason; nothing changes.
    let deep = format!("{}1{}", "{\"a\":".repeat(11), "}".repeat(11));
    let large = format!("{{\"a\": \"{}\"}}", "x".repeat(33 * 1024));
    for (case, body) in [
        ("not an object", b"[1, 2]".to_vec()),
        ("not JSON", b"{\"a\": ".to_vec()),
        ("nested 11 deep", deep.into_bytes()),
        ("over 32 KiB", large.into_bytes()),
        ("a reserved key", br#"{"$version": 9}"#.to_vec()),
    ] {
        let (status, version, error) = device.twin("PATCH/properties/reported", &body).await;
        assert_eq!((status, version), (400, None), "{case}: {error}");
        assert_eq!(error["errorCode"], 400004, "{case}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{case}"
        );
        assert!(error["trackingId"].is_string() && error["timestampUtc"].is_string());
    }
    let (_, _, twin) = device.twin("GET", b"").await;
    assert_eq!(
        twin["reported"]["$version"], 3,
        "refused patches changed nothing"
    );

    // The operator plane's record has the whole twin.
    let record = twin_record(&server, "twin-1").await.expect("twin record");
    assert_eq!(record["deviceId"], "twin-1");
    assert_eq!(record["tags"], json!({"site": "lab"}));
    assert_eq!(record["properties"]["reported"]["fw"], "1.0");
    assert_eq!(record["properties"]["reported"]["$version"], 3);
    assert_eq!(record["properties"]["desired"]["interval"], 30);
}

#[tokio::test]
async fn operators_patch_desired_properties_and_tags_and_devices_are_told() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = enrolled_here(&server, &mut operator, "twin-2", interval(30), json!({})).await;
    let mut device = HubDevice::connect(&server, "twin-2", &key).await;
    device.subscribe("$iothub/twin/res/#").await;
    device
        .subscribe("$iothub/twin/PATCH/properties/desired/#")
        .await;

    let desired = br#"{"interval": 60, "mode": {"eco": true}}"#;
    let result = patch_twin(&mut operator, "twin-2", "desired", desired).await;
    assert_eq!(result, json!({"ok": true, "version": 2}));
    let note = desired_notification(&mut device, 2).await;
    let body: Value = serde_json::from_slice(&note).expect("JSON");
    assert_eq!(
        body,
        json!({"interval": 60, "mode": {"eco": true}, "$version": 2})
    );
    let (_, _, twin) = device.twin("GET", b"").await;
    assert_eq!(
        twin["desired"],
        json!({"interval": 60, "mode": {"eco": true}, "$version": 2})
    );

    // Tags: the record changes, the device hears nothing.
    let result = patch_twin(
        &mut operator,
        "twin-2",
        "tags",
        br#"{"site": null, "floor": 3}"#,
    )
    .await;
    assert_eq!(result["ok"], true);
    let record = twin_record(&server, "twin-2").await.expect("record");
    assert_eq!(record["tags"], json!({"floor": 3}));
    assert_eq!(record["properties"]["desired"]["$version"], 2);

    // Refused: a bad patch, a device the local hub does not serve, the record itself.
    for (device_id, body) in [("twin-2", &b"\"x\""[..]), ("nobody", &b"{\"a\": 1}"[..])] {
        let result = patch_twin(&mut operator, device_id, "desired", body).await;
        assert_eq!(result["ok"], false, "{device_id}: {result}");
        assert!(result["message"].is_string(), "{result}");
    }
    operator.send("hub/twins/twin-2", b"{}").await;
    let record = twin_record(&server, "twin-2").await.expect("record kept");
    assert_eq!(record["properties"]["desired"]["interval"], 60);
    // No notification for the refused patches.
    assert!(device
        .next_publish("$iothub/twin/PATCH/properties/desired/")
        .await
        .is_none());
}

/// The raw retained `topic` as a new subscriber reads it.
async fn retained_raw(server: &Server, topic: &str) -> String {
    let mut reader = server.operator().await;
    reader.subscribe(topic).await;
    let (_, body) = reader.next_publish(topic).await.expect("retained record");
    String::from_utf8(body).expect("UTF-8")
}

#[tokio::test]
async fn twin_documents_put_version_last_as_iot_hub_writes_them() {
    // Clients that read a section until they meet `$version` (the Embedded C SDK's twin
    // sample) see every property only when `$version` comes last: checked on the bytes.
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let initial = json!({"tags": {"site": "lab"},
        "properties": {"desired": {"device_count": 100, "zone": "b", "$version": 1}}});
    let key = enrolled_here(&server, &mut operator, "order-1", initial, json!({})).await;
    // The registration record's initial twin, as written.
    let record = retained_raw(&server, "dps/registrations/order-1").await;
    assert!(
        record.contains(
            r#""initialTwin":{"properties":{"desired":{"device_count":100,"zone":"b","$version":1}},"tags":{"site":"lab"}}"#
        ),
        "{record}"
    );

    let mut device = HubDevice::connect(&server, "order-1", &key).await;
    device.subscribe("$iothub/twin/res/#").await;
    device
        .subscribe("$iothub/twin/PATCH/properties/desired/#")
        .await;
    let (status, _, body) = device.twin_raw("GET", b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"desired":{"device_count":100,"zone":"b","$version":1},"reported":{"$version":1}}"#
    );

    // A reported patch: the answer carries the version in its topic; the GET and the
    // record show it last.
    let (status, version, _) = device
        .twin_raw(
            "PATCH/properties/reported",
            br#"{"fw": "1.0", "net": {"rssi": -70}}"#,
        )
        .await;
    assert_eq!((status, version), (204, Some(2)));
    let (_, _, body) = device.twin_raw("GET", b"").await;
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"desired":{"device_count":100,"zone":"b","$version":1},"reported":{"fw":"1.0","net":{"rssi":-70},"$version":2}}"#
    );

    // Three desired patches from an operator: each notification ends with `$version`.
    for (n, (patch, notification)) in [
        (
            r#"{"device_count": 101}"#,
            r#"{"device_count":101,"$version":2}"#,
        ),
        (
            r#"{"zone": null, "mode": {"eco": true}}"#,
            r#"{"mode":{"eco":true},"zone":null,"$version":3}"#,
        ),
        (
            r#"{"a": [1, {"b": 2}], "z": "last"}"#,
            r#"{"a":[1,{"b":2}],"z":"last","$version":4}"#,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let result = patch_twin(&mut operator, "order-1", "desired", patch.as_bytes()).await;
        assert_eq!(result["ok"], true, "{result}");
        let note = desired_notification(&mut device, n as u64 + 2).await;
        assert_eq!(std::str::from_utf8(&note).unwrap(), notification);
    }
    let (_, _, body) = device.twin_raw("GET", b"").await;
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"desired":{"a":[1,{"b":2}],"device_count":101,"mode":{"eco":true},"z":"last","$version":4},"reported":{"fw":"1.0","net":{"rssi":-70},"$version":2}}"#
    );
    // The operator plane's record, the same way.
    assert_eq!(
        retained_raw(&server, "hub/twins/order-1").await,
        r#"{"deviceId":"order-1","properties":{"desired":{"a":[1,{"b":2}],"device_count":101,"mode":{"eco":true},"z":"last","$version":4},"reported":{"fw":"1.0","net":{"rssi":-70},"$version":2}},"tags":{"site":"lab"}}"#
    );
}

#[tokio::test]
async fn unknown_iothub_topics_and_oversized_telemetry_close_the_session_and_dps_sessions_have_no_twin(
) {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = enrolled_here(&server, &mut operator, "twin-3", interval(1), json!({})).await;
    let mut device = HubDevice::connect(&server, "twin-3", &key).await;
    device
        .client
        .publish(
            "$iothub/unknown/GET/?$rid=1",
            QoS::AtMostOnce,
            false,
            b"".to_vec(),
        )
        .await
        .expect("publish");
    assert!(
        device.closed().await,
        "an unknown $iothub topic closes the session"
    );

    // Telemetry over the packet limit (256 KiB by default) closes the session too.
    let mut device = HubDevice::connect(&server, "twin-3", &key).await;
    device
        .client
        .publish(
            "devices/twin-3/messages/events/",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; 300 * 1024],
        )
        .await
        .expect("publish");
    assert!(
        device.closed().await,
        "an oversized telemetry message closes the session"
    );

    // A provisioning session of the same device may not use the hub protocol.
    let mut dps = provisioning_session(&server, "twin-3", &key).await;
    let (status, _) = dps.register().await;
    assert_eq!(status, 200);
    assert!(
        !dps.publish_accepted("$iothub/twin/GET/?$rid=1").await,
        "a DPS session asking for a twin is closed"
    );
}

#[tokio::test]
async fn cloud_to_device_messages_wait_for_their_device_and_arrive_at_least_once() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = enrolled_here(&server, &mut operator, "c2d-1", interval(1), json!({})).await;

    // Sent while the device is away.
    for n in 1..=3 {
        let topic = format!("devices/c2d-1/messages/devicebound/n={n}&%24.ct=text%2Fplain");
        operator
            .send(&topic, format!("message {n}").as_bytes())
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Received, not acknowledged: they stay queued.
    let mut device = HubDevice::connect_with(server.devices_port, "c2d-1", &key, true).await;
    assert_eq!(
        device
            .subscribe("devices/c2d-1/messages/devicebound/#")
            .await,
        rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let first = device
        .next_publish("devices/c2d-1/messages/devicebound/")
        .await
        .expect("queued message delivered on subscribe");
    // IoT Hub's system properties first (a message id, the address), then the bag as
    // the operator wrote it.
    let first_id = message_id(&first.topic);
    assert_eq!(
        first.topic,
        format!(
            "devices/c2d-1/messages/devicebound/%24.mid={first_id}\
             &%24.to=%2Fdevices%2Fc2d-1%2Fmessages%2FdeviceBound&n=1&%24.ct=text%2Fplain"
        )
    );
    assert_eq!(&first.payload[..], b"message 1");
    assert_eq!(first.qos, QoS::AtLeastOnce);
    drop(device);

    // The next session gets all three, in order, and acknowledges them.
    let mut device = HubDevice::connect(&server, "c2d-1", &key).await;
    device
        .subscribe("devices/c2d-1/messages/devicebound/#")
        .await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        let message = device
            .next_publish("devices/c2d-1/messages/devicebound/")
            .await
            .unwrap_or_else(|| panic!("message {n} delivered again"));
        assert_eq!(message.payload, format!("message {n}").into_bytes());
        ids.push(message_id(&message.topic));
    }
    // Delivered again under the same id, so that the device can tell; ids differ.
    assert_eq!(ids[0], first_id);
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    // Sent while it is connected: at once.
    operator
        .send("devices/c2d-1/messages/devicebound/", b"live")
        .await;
    let live = device
        .next_publish("devices/c2d-1/messages/devicebound")
        .await
        .expect("live message");
    assert_eq!(&live.payload[..], b"live");
    // Acknowledged: none of them comes again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(device);
    let mut device = HubDevice::connect(&server, "c2d-1", &key).await;
    device
        .subscribe("devices/c2d-1/messages/devicebound/#")
        .await;
    assert!(device
        .next_publish("devices/c2d-1/messages/devicebound")
        .await
        .is_none());
}

#[tokio::test]
async fn a_device_subscribed_with_plus_gets_its_own_messages_and_no_one_else_s() {
    // The Embedded C SDK subscribes `devices/+/messages/devicebound/#`; IoT Hub reads
    // the `+` as the subscribing device.
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key_1 = enrolled_here(&server, &mut operator, "plus-1", interval(1), json!({})).await;
    let key_2 = enrolled_here(&server, &mut operator, "plus-2", interval(1), json!({})).await;
    // Queued while both are away; and one for a device the local hub does not serve,
    // which goes to the router.
    for (device, n) in [("plus-1", 1), ("plus-2", 1), ("plus-1", 2), ("plus-2", 2)] {
        operator
            .send(
                &format!("devices/{device}/messages/devicebound/n={n}"),
                format!("{device} #{n}").as_bytes(),
            )
            .await;
    }
    operator
        .send("devices/stranger/messages/devicebound/", b"stranger")
        .await;

    let mut device = HubDevice::connect(&server, "plus-1", &key_1).await;
    assert_eq!(
        device.subscribe("devices/+/messages/devicebound/#").await,
        rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    for n in 1..=2 {
        let message = device
            .next_publish("devices/")
            .await
            .unwrap_or_else(|| panic!("queued message {n}"));
        assert!(
            message
                .topic
                .starts_with("devices/plus-1/messages/devicebound/%24.mid="),
            "{}",
            message.topic
        );
        assert!(
            message.topic.ends_with(&format!("&n={n}")),
            "{}",
            message.topic
        );
        assert_eq!(message.payload, format!("plus-1 #{n}").into_bytes());
        assert_eq!(message.qos, QoS::AtLeastOnce);
    }
    // Live: another device's message, then its own. Only its own arrives, and it is
    // the next thing the session receives.
    operator
        .send("devices/plus-2/messages/devicebound/n=3", b"plus-2 #3")
        .await;
    operator
        .send("devices/stranger/messages/devicebound/", b"stranger again")
        .await;
    operator
        .send("devices/plus-1/messages/devicebound/n=3", b"plus-1 #3")
        .await;
    let live = device.next_publish("devices/").await.expect("live message");
    assert_eq!(&live.payload[..], b"plus-1 #3", "{}", live.topic);
    assert!(
        !device
            .publish_within(Duration::from_secs(1), "devices/")
            .await
    );
    // Another device's own filter stays refused.
    assert_eq!(
        device
            .subscribe("devices/plus-2/messages/devicebound/#")
            .await,
        rumqttc::SubscribeReasonCode::Failure
    );
    // Unsubscribed, it gets nothing more.
    device
        .client
        .unsubscribe("devices/+/messages/devicebound/#")
        .await
        .expect("unsubscribe");
    assert!(device
        .wait("UNSUBACK", |p| matches!(p, rumqttc::Packet::UnsubAck(_)))
        .await
        .is_some());
    operator
        .send("devices/plus-1/messages/devicebound/n=4", b"plus-1 #4")
        .await;
    assert!(
        !device
            .publish_within(Duration::from_secs(1), "devices/")
            .await
    );
    drop(device);

    // The second device, at QoS 0: its three, none of the first device's.
    let mut device = HubDevice::connect(&server, "plus-2", &key_2).await;
    device
        .client
        .subscribe("devices/+/messages/devicebound/#", QoS::AtMostOnce)
        .await
        .expect("subscribe");
    match device
        .wait("SUBACK", |p| matches!(p, rumqttc::Packet::SubAck(_)))
        .await
    {
        Some(rumqttc::Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)]
        ),
        other => panic!("no SUBACK: {other:?}"),
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let Some(message) = device.next_publish("devices/").await else {
            break;
        };
        assert!(
            message
                .topic
                .starts_with("devices/plus-2/messages/devicebound/"),
            "{}",
            message.topic
        );
        assert_eq!(message.qos, QoS::AtMostOnce);
        got.push(String::from_utf8(message.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["plus-2 #1", "plus-2 #2", "plus-2 #3"]);
    assert!(
        !device
            .publish_within(Duration::from_secs(1), "devices/")
            .await
    );

    // A provisioning session may not use the `+` filter: it is not a hub session.
    let mut dps = provisioning_session(&server, "plus-1", &key_1).await;
    assert!(!dps.subscribe("devices/+/messages/devicebound/#").await);
}

#[tokio::test]
async fn a_full_queue_refuses_and_old_messages_expire() {
    let server = local_hub_server(false, |local| {
        local.max_queued_messages = 2;
        local.message_ttl_seconds = 2;
    })
    .await;
    let mut operator = server.operator().await;
    let key = enrolled_here(&server, &mut operator, "c2d-2", interval(1), json!({})).await;
    let mut watcher = server.operator().await;
    watcher.subscribe("dps/events/acl/#").await;
    for n in 1..=3 {
        operator
            .send(
                "devices/c2d-2/messages/devicebound/",
                format!("{n}").as_bytes(),
            )
            .await;
    }
    let (_, event) = watcher
        .next_publish("dps/events/acl/")
        .await
        .expect("the third message is refused, with an event");
    let event: Value = serde_json::from_slice(&event).expect("JSON");
    assert!(
        event["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("holds 2 messages"),
        "{event}"
    );
    let mut device = HubDevice::connect(&server, "c2d-2", &key).await;
    device
        .subscribe("devices/c2d-2/messages/devicebound/#")
        .await;
    let mut got = Vec::new();
    while let Some(m) = device
        .next_publish("devices/c2d-2/messages/devicebound/")
        .await
    {
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert_eq!(got, ["1", "2"], "the refused third was never queued");
    drop(device);

    // Older than the TTL: dropped undelivered.
    operator
        .send("devices/c2d-2/messages/devicebound/", b"stale")
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut device = HubDevice::connect(&server, "c2d-2", &key).await;
    device
        .subscribe("devices/c2d-2/messages/devicebound/#")
        .await;
    assert!(device
        .next_publish("devices/c2d-2/messages/devicebound/")
        .await
        .is_none());
}

#[tokio::test]
async fn direct_methods_are_answered_refused_offline_and_timed_out() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    operator.subscribe("hub/methods/responses/#").await;
    let key = enrolled_here(&server, &mut operator, "method-1", interval(1), json!({})).await;

    // Not connected: 404 at once.
    let answer = ask_json(
        &mut operator,
        "hub/methods/method-1/call-0",
        br#"{"methodName": "reboot"}"#,
        "hub/methods/responses/call-0",
    )
    .await;
    assert_eq!(answer["status"], 404, "{answer}");

    let mut device = HubDevice::connect(&server, "method-1", &key).await;
    device.subscribe("$iothub/methods/POST/#").await;
    operator
        .send(
            "hub/methods/method-1/call-1",
            br#"{"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 10}"#,
        )
        .await;
    let call = device
        .next_publish("$iothub/methods/POST/")
        .await
        .expect("the call reaches the device");
    let rid = call
        .topic
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .expect("method topic")
        .to_owned();
    assert_eq!(
        serde_json::from_slice::<Value>(&call.payload).unwrap(),
        json!({"delay": 5})
    );
    // An answer to a call nobody made is dropped; the session stays.
    device
        .send("$iothub/methods/res/200/?$rid=bogus", b"{}")
        .await;
    device
        .send(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            br#"{"rebooting": true}"#,
        )
        .await;
    let (topic, answer) = operator
        .next_publish("hub/methods/responses/")
        .await
        .expect("the answer reaches the operator");
    assert_eq!(topic, "hub/methods/responses/call-1");
    assert_eq!(
        serde_json::from_slice::<Value>(&answer).unwrap(),
        json!({"status": 201, "payload": {"rebooting": true}})
    );

    // Bad calls: 400.
    let answer = ask_json(
        &mut operator,
        "hub/methods/method-1/call-2",
        br#"{"methodName": "a/b"}"#,
        "hub/methods/responses/call-2",
    )
    .await;
    assert_eq!(answer["status"], 400);

    // No answer in time: 504.
    let started = std::time::Instant::now();
    operator
        .send(
            "hub/methods/method-1/call-3",
            br#"{"methodName": "slow", "responseTimeoutInSeconds": 5}"#,
        )
        .await;
    assert!(device
        .next_publish("$iothub/methods/POST/slow/")
        .await
        .is_some());
    let answer = loop {
        if let Some((topic, body)) = operator.next_publish("hub/methods/responses/").await {
            assert_eq!(topic, "hub/methods/responses/call-3");
            break serde_json::from_slice::<Value>(&body).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no 504");
    };
    assert_eq!(answer["status"], 504, "{answer}");
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test]
async fn re_provisioning_resets_or_keeps_the_twin_and_retirement_purges_it() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let reset_policy =
        json!({"reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}});
    let reset_key = enrolled_here(
        &server,
        &mut operator,
        "twin-reset",
        interval(1),
        reset_policy.clone(),
    )
    .await;
    let kept_key = enrolled_here(&server, &mut operator, "twin-kept", interval(1), json!({})).await;
    for id in ["twin-reset", "twin-kept"] {
        let result = patch_twin(&mut operator, id, "desired", br#"{"interval": 99}"#).await;
        assert_eq!(result["version"], 2);
    }
    // The enrollments' initial twins change; both devices register again.
    let mut changed = symmetric_enrollment("twin-reset", &reset_key);
    changed["initialTwin"] = interval(7);
    changed["reprovisionPolicy"] = reset_policy["reprovisionPolicy"].clone();
    operator.put("dps/enrollments/twin-reset", changed).await;
    let mut changed = symmetric_enrollment("twin-kept", &kept_key);
    changed["initialTwin"] = interval(7);
    operator.put("dps/enrollments/twin-kept", changed).await;
    provision(&server, "twin-reset", &reset_key).await;
    provision(&server, "twin-kept", &kept_key).await;

    let mut device = HubDevice::connect(&server, "twin-reset", &reset_key).await;
    device.subscribe("$iothub/twin/res/#").await;
    let (_, _, twin) = device.twin("GET", b"").await;
    assert_eq!(
        twin["desired"],
        json!({"interval": 7, "$version": 1}),
        "migrateDeviceData false: reset to the enrollment's"
    );
    let mut device = HubDevice::connect(&server, "twin-kept", &kept_key).await;
    device.subscribe("$iothub/twin/res/#").await;
    let (_, _, twin) = device.twin("GET", b"").await;
    assert_eq!(
        twin["desired"],
        json!({"interval": 99, "$version": 2}),
        "migrateDeviceData true: the device's data stays"
    );

    // Retired: its twin record is cleared and its queue dropped.
    operator
        .send("devices/twin-kept/messages/devicebound/", b"never")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let result = operator.retire("twin-kept", b"{}").await;
    assert_eq!(result["ok"], true, "{result}");
    assert!(device.closed().await, "the hub session is cut");
    assert_eq!(twin_record(&server, "twin-kept").await, None);
    let responder = &server.running.responder;
    assert!(responder
        .queued_messages("twin-kept", None, 10)
        .expect("store")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_and_queued_messages_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (devices_port, local_port) = free_ports();
    let config = "[local_hub]\nhost_name = \"localhost\"\n";
    let mut process = Process::start(dir.path(), devices_port, local_port, config).await;
    let mut operator = Operator::connect(local_port).await;
    let key = new_key();
    let mut enrollment = symmetric_enrollment("survivor", &key);
    enrollment["initialTwin"] = interval(30);
    enrollment["iotHubs"] = json!(["localhost"]);
    operator.put("dps/enrollments/survivor", enrollment).await;
    let auth = DeviceAuth::SymmetricKey { key: key.clone() };
    let outcome =
        edgedps_device::provision::register(&device_config(devices_port, "survivor", auth), None)
            .await
            .expect("provisioned");
    assert_eq!(outcome.body["registrationState"]["assignedHub"], LOCAL);

    let mut device = HubDevice::connect_with(devices_port, "survivor", &key, false).await;
    device.subscribe("$iothub/twin/res/#").await;
    let (status, version, _) = device
        .twin("PATCH/properties/reported", br#"{"fw": "2.0"}"#)
        .await;
    assert_eq!((status, version), (204, Some(2)));
    let result = patch_twin(&mut operator, "survivor", "desired", br#"{"interval": 5}"#).await;
    assert_eq!(result["ok"], true);
    for n in 1..=2 {
        let topic = format!("devices/survivor/messages/devicebound/n={n}");
        operator.send(&topic, format!("kept {n}").as_bytes()).await;
    }
    drop(device);
    drop(operator);

    // Killed at once after the acknowledgements: what was acknowledged is on disk.
    process.kill();
    let _process = Process::start(dir.path(), devices_port, local_port, config).await;
    let mut device = HubDevice::connect_with(devices_port, "survivor", &key, false).await;
    device.subscribe("$iothub/twin/res/#").await;
    let (_, _, twin) = device.twin("GET", b"").await;
    assert_eq!(
        twin,
        json!({"desired": {"interval": 5, "$version": 2}, "reported": {"fw": "2.0", "$version": 2}})
    );
    device
        .subscribe("devices/survivor/messages/devicebound/#")
        .await;
    for n in 1..=2 {
        let message = device
            .next_publish("devices/survivor/messages/devicebound/")
            .await
            .unwrap_or_else(|| panic!("queued message {n} survived"));
        assert!(
            message.topic.ends_with(&format!("&n={n}")),
            "{}",
            message.topic
        );
        assert_eq!(message.payload, format!("kept {n}").into_bytes());
    }
    // The retained twin record is back for operators.
    let mut reader = Operator::connect(local_port).await;
    reader.subscribe("hub/twins/survivor").await;
    let (_, record) = reader
        .next_publish("hub/twins/survivor")
        .await
        .expect("twin record after the restart");
    let record: Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["properties"]["reported"]["fw"], "2.0");
}

#[tokio::test]
async fn twin_requests_beyond_the_device_s_rate_are_answered_429_with_a_retry_hint() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = enrolled_here(&server, &mut operator, "busy-twin", interval(1), json!({})).await;
    let mut device = HubDevice::connect(&server, "busy-twin", &key).await;
    device.subscribe("$iothub/twin/res/#").await;
    // 100 requests in 10 s (RateLimits::twin_requests_per_device) are served.
    for n in 0..100 {
        let (status, _, _) = device.twin("GET", b"").await;
        assert_eq!(status, 200, "request {n}");
    }
    device
        .send(
            "$iothub/twin/PATCH/properties/reported/?$rid=over",
            br#"{"a": 1}"#,
        )
        .await;
    let answer = device
        .next_publish("$iothub/twin/res/")
        .await
        .expect("an answer");
    let retry_after: u32 = answer
        .topic
        .strip_prefix("$iothub/twin/res/429/?$rid=over&retry-after=")
        .unwrap_or_else(|| panic!("not a 429 with a retry hint: {}", answer.topic))
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let body: Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!(body["errorCode"], 429001, "{body}");
    // The refused patch changed nothing.
    let record = twin_record(&server, "busy-twin").await.expect("record");
    assert_eq!(record["properties"]["reported"], json!({"$version": 1}));
}

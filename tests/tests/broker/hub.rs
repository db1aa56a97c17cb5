//! The gateway as the device's hub (PROTOCOL E): the hub CONNECT on the device listener.
//!
//! A device provisioned to the local hub connects to it with an IoT Hub username and a
//! SAS token naming `{host}/devices/{deviceId}`; every other CONNECT that claims the hub
//! is refused with CONNACK 5 (not authorized).

use std::time::{Duration, Instant};

use edgedps_device::provision::register;
use edgedps_tests::hub::*;
use edgedps_tests::live::{LiveDevice, Protocol};
use edgedps_tests::*;
use rumqttc::ConnectReturnCode;
use serde_json::Value;

/// A hub CONNECT of `device_id` to `host` with a token signed by `key`: the refusal, or
/// `None` when accepted.
async fn hub_connack(
    server: &Server,
    host: &str,
    device_id: &str,
    key: &str,
) -> Option<ConnectReturnCode> {
    connack_refusal(
        server.devices_port,
        device_id,
        &hub_username(host, device_id),
        &hub_token(key, host, device_id),
    )
    .await
}

#[tokio::test]
async fn a_device_provisioned_to_the_local_hub_connects_to_it() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("hub-dev-1").await;
    assert_eq!(provision(&server, "hub-dev-1", &key).await, LOCAL);
    let accepted = hub_connack(&server, LOCAL, "hub-dev-1", &key).await;
    assert_eq!(accepted, None, "the hub CONNECT is accepted");
    // Host names are case-insensitive, as DNS names are.
    let upper = hub_connack(&server, "LOCALHOST", "hub-dev-1", &key).await;
    assert_eq!(upper, None);
}

#[tokio::test]
async fn hub_connects_that_are_not_this_devices_own_are_refused() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("hub-dev-2").await;
    let other_key = operator.enroll("hub-dev-3").await;
    assert_eq!(provision(&server, "hub-dev-2", &key).await, LOCAL);
    assert_eq!(provision(&server, "hub-dev-3", &other_key).await, LOCAL);
    let dps_token = edgedps_policies::sas::sign(
        &key,
        ID_SCOPE,
        "hub-dev-2",
        edgedps_responder::unix_now() + 600,
    )
    .expect("token");
    let cases = [
        (
            "another device's own token",
            hub_username(LOCAL, "hub-dev-2"),
            hub_token(&other_key, LOCAL, "hub-dev-3"),
        ),
        (
            "a token signed with another device's key",
            hub_username(LOCAL, "hub-dev-2"),
            hub_token(&other_key, LOCAL, "hub-dev-2"),
        ),
        (
            "a hub this gateway does not serve",
            hub_username("hub-x.example.net", "hub-dev-2"),
            hub_token(&key, "hub-x.example.net", "hub-dev-2"),
        ),
        (
            "the provisioning token",
            hub_username(LOCAL, "hub-dev-2"),
            dps_token,
        ),
        (
            "a username naming another device",
            hub_username(LOCAL, "hub-dev-3"),
            hub_token(&key, LOCAL, "hub-dev-2"),
        ),
    ];
    for (case, username, password) in cases {
        let refused = connack_refusal(server.devices_port, "hub-dev-2", &username, &password).await;
        assert_eq!(refused, Some(ConnectReturnCode::NotAuthorized), "{case}");
    }
}

#[tokio::test]
async fn only_a_device_assigned_here_and_in_service_connects_to_the_local_hub() {
    let server = local_hub_server(true, |_| {}).await;
    let mut operator = server.operator().await;

    // Enrolled, not registered yet.
    let key = operator.enroll("hub-new").await;
    let refused = hub_connack(&server, LOCAL, "hub-new", &key).await;
    assert_eq!(
        refused,
        Some(ConnectReturnCode::NotAuthorized),
        "not registered"
    );

    // Assigned to the cloud hub: hashed allocation over both hubs, so some ids go there.
    let mut cloud_device = None;
    let mut local_device = None;
    for i in 0..40 {
        let id = format!("hub-spread-{i}");
        let key = operator.enroll(&id).await;
        let hub = provision(&server, &id, &key).await;
        if hub == LOCAL {
            local_device.get_or_insert((id, key));
        } else {
            cloud_device.get_or_insert((id, key));
        }
        if cloud_device.is_some() && local_device.is_some() {
            break;
        }
    }
    let (cloud_id, cloud_key) = cloud_device.expect("a device hashed to the cloud hub");
    let refused = hub_connack(&server, LOCAL, &cloud_id, &cloud_key).await;
    assert_eq!(
        refused,
        Some(ConnectReturnCode::NotAuthorized),
        "assigned to another hub"
    );

    // Assigned here, then disabled: out of service, refused; enabled again: accepted.
    let (id, key) = local_device.expect("a device hashed to the local hub");
    let connect = || hub_connack(&server, LOCAL, &id, &key);
    assert_eq!(connect().await, None);
    let topic = edgedps_topics::admin::RecordKind::Enrollment.record_topic(&id);
    let mut enrollment: Value = symmetric_enrollment(&id, &key);
    enrollment["provisioningStatus"] = "disabled".into();
    operator.put(&topic, enrollment.clone()).await;
    assert_eq!(
        connect().await,
        Some(ConnectReturnCode::NotAuthorized),
        "disabled"
    );
    enrollment["provisioningStatus"] = "enabled".into();
    operator.put(&topic, enrollment).await;
    assert_eq!(connect().await, None, "enabled again");
}

/// A hub CONNECT with the client certificate of `auth` and an empty password: the
/// refusal, or `None` when accepted.

#[tokio::test]
async fn an_x509_device_connects_to_the_local_hub_with_its_provisioning_certificate() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let pki = pki();
    operator
        .put(
            "dps/enrollment-groups/hub-roots",
            x509_group("hub-roots", &pki.device_root.pem),
        )
        .await;
    let device = pki.device_intermediate.device("hub-x509-1");
    let auth = x509(&device, &[&pki.device_intermediate]);
    let outcome = register(&server.device("hub-x509-1", auth.clone()), None)
        .await
        .expect("provisions");
    assert_eq!(outcome.assigned_hub(), Some(LOCAL), "{}", outcome.body);
    assert_eq!(
        hub_connect_with_certificate(&server, "hub-x509-1", auth.clone()).await,
        None,
        "its certificate opens the hub"
    );

    // The same certificate claiming another device, and a rogue CA's leaf with its name.
    assert_eq!(
        hub_connect_with_certificate(&server, "hub-x509-2", auth).await,
        Some(ConnectReturnCode::NotAuthorized),
        "CN is not the client id"
    );
    let rogue = pki.rogue_root.device("hub-x509-1");
    assert_eq!(
        hub_connect_with_certificate(&server, "hub-x509-1", x509(&rogue, &[])).await,
        Some(ConnectReturnCode::NotAuthorized),
        "a rogue CA's certificate"
    );
}

#[tokio::test]
async fn a_hub_session_is_closed_when_its_device_is_retired() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("hub-retired").await;
    assert_eq!(provision(&server, "hub-retired", &key).await, LOCAL);

    let HubDevice { mut eventloop, .. } = HubDevice::connect(&server, "hub-retired", &key).await;
    // Live until the retirement.
    let quiet = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    assert!(quiet.is_err(), "the session stays open: {quiet:?}");

    let result = operator.retire("hub-retired", b"{}").await;
    assert_eq!(result["ok"], true, "{result}");
    let retired_at = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
            Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the hub session is still open 1 s after the retirement"),
        }
    }
    assert!(retired_at.elapsed() < Duration::from_secs(1));
    let refused = hub_connack(&server, LOCAL, "hub-retired", &key).await;
    assert_eq!(refused, Some(ConnectReturnCode::NotAuthorized), "retired");
}

#[tokio::test]
async fn a_hub_linked_over_mqtt_as_local_serves_its_devices_until_unlinked() {
    let server = Server::start_with(|config| config.hubs.clear()).await;
    let mut operator = server.operator().await;
    let linked = operator
        .put("dps/hubs/localhost", serde_json::json!({"local": true}))
        .await;
    assert_eq!(linked["ok"], true, "{linked}");
    let key = operator.enroll("hub-linked").await;
    assert_eq!(provision(&server, "hub-linked", &key).await, LOCAL);
    let connect = || hub_connack(&server, LOCAL, "hub-linked", &key);
    assert_eq!(connect().await, None, "served while linked as local");
    let unlinked = operator.write("dps/hubs/localhost", b"").await;
    assert_eq!(unlinked["ok"], true, "{unlinked}");
    assert_eq!(
        connect().await,
        Some(ConnectReturnCode::NotAuthorized),
        "no longer a hub of this gateway"
    );
}

#[tokio::test]
async fn telemetry_from_a_hub_session_reaches_operators_and_only_on_its_own_topics() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("hub-telemetry").await;
    assert_eq!(provision(&server, "hub-telemetry", &key).await, LOCAL);
    let mut watcher = server.operator().await;
    watcher.subscribe("devices/+/messages/events/#").await;

    let HubDevice {
        client,
        mut eventloop,
        ..
    } = HubDevice::connect(&server, "hub-telemetry", &key).await;
    // A property bag as the SDKs send it: URL-encoded, `$.ct` and `$.ce` included.
    let topic =
        "devices/hub-telemetry/messages/events/temp=21&%24.ct=application%2Fjson&%24.ce=utf-8";
    client
        .publish(
            topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            br#"{"t":21}"#.to_vec(),
        )
        .await
        .expect("publish");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no PUBACK for the telemetry: {other:?}"),
        }
    }
    let (received, body) = watcher
        .next_publish("devices/hub-telemetry/messages/events/")
        .await
        .expect("the telemetry reaches the operator");
    assert_eq!(received, topic);
    assert_eq!(body, br#"{"t":21}"#);

    // Another device's telemetry topic: the session is closed, nothing is routed.
    client
        .publish(
            "devices/hub-other/messages/events/",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .await
        .expect("publish");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
            Ok(Err(_)) => break,
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                panic!("a publish on another device's topic was acknowledged")
            }
            Ok(Ok(_)) => {}
            Err(_) => panic!("the session stayed open after publishing as another device"),
        }
    }
    assert_eq!(watcher.next_publish("devices/hub-other/").await, None);
}

#[tokio::test]
async fn a_device_given_its_own_device_id_connects_to_the_hub_under_it() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = new_key();
    let mut enrollment = symmetric_enrollment("reg-custom", &key);
    enrollment["deviceId"] = serde_json::json!("custom-device");
    enrollment["initialTwin"] = serde_json::json!({"properties": {"desired": {"n": 1}}});
    operator.put("dps/enrollments/reg-custom", enrollment).await;
    let mut device = LiveDevice::connect(&server, "reg-custom", &sas(&key), Protocol::V311)
        .await
        .expect("DPS connect");
    let (status, body) = device.register().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["registrationState"]["deviceId"], "custom-device");

    assert_eq!(
        hub_connack(&server, LOCAL, "custom-device", &key).await,
        None
    );
    assert_eq!(
        hub_connack(&server, LOCAL, "reg-custom", &key).await,
        Some(ConnectReturnCode::NotAuthorized),
        "the registration id is not the device id"
    );
    let mut hub = HubDevice::connect(&server, "custom-device", &key).await;
    hub.subscribe("$iothub/twin/res/#").await;
    let (status, _, twin) = hub.twin("GET", b"").await;
    assert_eq!(status, 200);
    assert_eq!(twin["desired"], serde_json::json!({"n": 1, "$version": 1}));
}

#[tokio::test]
async fn a_hub_session_ends_when_its_sas_token_expires() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("hub-expiring").await;
    assert_eq!(provision(&server, "hub-expiring", &key).await, LOCAL);
    let expires = edgedps_responder::unix_now() + 2;
    let token = edgedps_policies::sas::sign_hub(&key, LOCAL, "hub-expiring", expires).unwrap();
    let connected = Instant::now();
    let mut device =
        HubDevice::connect_token(server.devices_port, "hub-expiring", &token, false).await;
    assert!(device.closed().await, "closed once the token expired");
    let lived = connected.elapsed();
    assert!(
        lived >= Duration::from_secs(1) && lived < Duration::from_secs(4),
        "closed after {lived:?}"
    );
    // A new token: connected again.
    assert_eq!(
        hub_connack(&server, LOCAL, "hub-expiring", &key).await,
        None
    );
}

#[tokio::test]
async fn live_hub_sessions_are_cut_by_every_way_out_of_service() {
    let server = local_hub_server(false, |_| {}).await;
    let mut operator = server.operator().await;
    let disabled_key = operator.enroll("hub-cut-disabled").await;
    let deregistered_key = operator.enroll("hub-cut-deregistered").await;
    let deleted_key = operator.enroll("hub-cut-deleted").await;
    for (id, key) in [
        ("hub-cut-disabled", &disabled_key),
        ("hub-cut-deregistered", &deregistered_key),
        ("hub-cut-deleted", &deleted_key),
    ] {
        assert_eq!(provision(&server, id, key).await, LOCAL);
    }
    let mut disabled = HubDevice::connect(&server, "hub-cut-disabled", &disabled_key).await;
    let mut deregistered =
        HubDevice::connect(&server, "hub-cut-deregistered", &deregistered_key).await;
    let mut deleted = HubDevice::connect(&server, "hub-cut-deleted", &deleted_key).await;

    let mut off = symmetric_enrollment("hub-cut-disabled", &disabled_key);
    off["provisioningStatus"] = serde_json::json!("disabled");
    operator.put("dps/enrollments/hub-cut-disabled", off).await;
    assert!(disabled.closed().await, "enrollment disabled");

    let cleared = operator
        .write("dps/registrations/hub-cut-deregistered", b"")
        .await;
    assert_eq!(cleared["ok"], true, "{cleared}");
    assert!(deregistered.closed().await, "registration cleared");

    let gone = operator.write("dps/enrollments/hub-cut-deleted", b"").await;
    assert_eq!(gone["ok"], true, "{gone}");
    assert!(deleted.closed().await, "enrollment deleted");

    for (id, key) in [
        ("hub-cut-disabled", &disabled_key),
        ("hub-cut-deregistered", &deregistered_key),
        ("hub-cut-deleted", &deleted_key),
    ] {
        assert_eq!(
            hub_connack(&server, LOCAL, id, key).await,
            Some(ConnectReturnCode::NotAuthorized),
            "{id} reconnecting"
        );
    }
}

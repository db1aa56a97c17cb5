//! Retirement end to end (PROTOCOL B, "Retirement"; docs/security.md promise 2).
//!
//! For every way of taking a device out of service, against the real listeners, with
//! symmetric-key and X.509 devices, over MQTT 3.1.1 and 5:
//! (a) the live session is closed within 1 s (MQTT 5: DISCONNECT 0x98 first), and the
//!     write's result counts it;
//! (b) on reconnect the device gets no `devices/{id}/#` subscription and its publishes
//!     there are refused (or, when no enrollment accepts it any more, no CONNECT);
//! (c) its register answers `disabled` (or 404, or no CONNECT);
//! (d) undoing the write restores its access;
//! and a bystander (of the same group where the write leaves the group in service)
//! keeps its session and its topics throughout.

use std::time::{Duration, Instant};

use edgedps_tests::live::{Closed, LiveDevice, Protocol};
use edgedps_tests::*;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use serde_json::{json, Value};

/// How the device is enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    SymmetricKey,
    X509,
}

/// The ways of taking a device out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    DisableEnrollment,
    DeleteEnrollment,
    DisableGroup,
    DeleteGroup,
    /// A disabled individual enrollment for one device (or one certificate) of a group.
    BlockInGroup,
    /// The operator clears the registration record.
    Deregister,
    /// `dps/admin/retire/{id}`.
    Retire,
    /// A CRL that revokes the device's certificate.
    Revoke,
}

impl Way {
    /// Whether the device comes through a group (else an individual enrollment).
    fn group_device(self) -> bool {
        !matches!(self, Way::DisableEnrollment | Way::DeleteEnrollment)
    }

    /// Whether the write leaves the device's group in service, so that a bystander of
    /// the same group keeps working.
    fn group_stays(self) -> bool {
        !matches!(self, Way::DisableGroup | Way::DeleteGroup)
    }
}

/// What a reconnecting device meets once it is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconnect {
    /// It connects; its register answers `200 disabled`.
    Disabled,
    /// Nothing accepts its credential any more: CONNACK 5.
    Refused,
    /// It connects without hub rights and may register again (it is still enrolled).
    Unregistered,
}

impl Way {
    fn reconnect(self) -> Reconnect {
        match self {
            Way::DisableEnrollment | Way::DisableGroup | Way::BlockInGroup | Way::Retire => {
                Reconnect::Disabled
            }
            Way::DeleteEnrollment | Way::DeleteGroup | Way::Revoke => Reconnect::Refused,
            Way::Deregister => Reconnect::Unregistered,
        }
    }
}

/// One enrolled device: its id, its credential and what its enrollment looks like.
struct Member {
    id: String,
    auth: DeviceAuth,
    certificate: Option<Identity>,
}

/// The enrollments of one scenario.
struct Scene {
    server: Server,
    operator: Operator,
    credential: Credential,
    group: String,
    group_key: String,
}

impl Scene {
    async fn new(credential: Credential, name: &str) -> Scene {
        let server = Server::start().await;
        let mut operator = server.operator().await;
        let group = format!("{name}-group");
        let group_key = new_key();
        let body = match credential {
            Credential::SymmetricKey => symmetric_group(&group, &group_key),
            Credential::X509 => x509_group(&group, &pki().device_root.pem),
        };
        operator
            .put(&format!("dps/enrollment-groups/{group}"), body)
            .await;
        Scene {
            server,
            operator,
            credential,
            group,
            group_key,
        }
    }

    fn group_body(&self) -> Value {
        match self.credential {
            Credential::SymmetricKey => symmetric_group(&self.group, &self.group_key),
            Credential::X509 => x509_group(&self.group, &pki().device_root.pem),
        }
    }

    /// A device of the group.
    fn group_member(&self, id: &str) -> Member {
        match self.credential {
            Credential::SymmetricKey => Member {
                id: id.into(),
                auth: sas(
                    &edgedps_policies::sas::derive_device_key(&self.group_key, id)
                        .expect("derived key"),
                ),
                certificate: None,
            },
            Credential::X509 => {
                let identity = pki().device_intermediate.device(id);
                Member {
                    id: id.into(),
                    auth: x509(&identity, &[&pki().device_intermediate]),
                    certificate: Some(identity),
                }
            }
        }
    }

    /// A device with an individual enrollment; returns it and its enrollment.
    async fn individual(&mut self, id: &str) -> (Member, Value) {
        let (member, body) = match self.credential {
            Credential::SymmetricKey => {
                let key = new_key();
                let member = Member {
                    id: id.into(),
                    auth: sas(&key),
                    certificate: None,
                };
                (member, symmetric_enrollment(id, &key))
            }
            Credential::X509 => {
                // Self-signed: no group of the scene may admit it.
                let identity = self_signed(id);
                let body = x509_enrollment(id, &identity.cert_pem);
                let member = Member {
                    id: id.into(),
                    auth: x509(&identity, &[]),
                    certificate: Some(identity),
                };
                (member, body)
            }
        };
        self.operator
            .put(&format!("dps/enrollments/{id}"), body.clone())
            .await;
        (member, body)
    }
}

/// Connects, registers, and checks the device has its hub topics.
async fn provisioned(server: &Server, member: &Member, protocol: Protocol) -> LiveDevice {
    let mut device = LiveDevice::connect(server, &member.id, &member.auth, protocol)
        .await
        .unwrap_or_else(|e| panic!("{} connects: {e}", member.id));
    let (status, body) = device.register().await;
    assert_eq!(status, 200, "{}: {body}", member.id);
    assert_eq!(body["status"], "assigned", "{}: {body}", member.id);
    assert!(
        device.subscribe(&format!("devices/{}/#", member.id)).await,
        "{}: hub topics refused while in service",
        member.id
    );
    device
}

/// The device still uses its topics: what it publishes comes back to it.
async fn still_works(device: &mut LiveDevice) {
    let topic = format!("devices/{}/messages/events/", device.registration_id);
    device.publish(&topic, b"ping".to_vec()).await;
    let got = device.receive(Duration::from_secs(5)).await;
    assert_eq!(
        got.map(|(t, _)| t),
        Some(topic),
        "{}: the bystander's own topic stopped working",
        device.registration_id
    );
}

/// What the operator does to take the device out, and the result.
async fn take_out(scene: &mut Scene, way: Way, member: &Member, individual: &Value) -> Value {
    let group_body = scene.group_body();
    let operator = &mut scene.operator;
    match way {
        Way::DisableEnrollment => {
            let mut body = individual.clone();
            body["provisioningStatus"] = json!("disabled");
            operator
                .put(&format!("dps/enrollments/{}", member.id), body)
                .await
        }
        Way::DeleteEnrollment => {
            operator
                .write(&format!("dps/enrollments/{}", member.id), b"")
                .await
        }
        Way::DisableGroup => {
            let mut body = group_body;
            body["provisioningStatus"] = json!("disabled");
            operator
                .put(&format!("dps/enrollment-groups/{}", scene.group), body)
                .await
        }
        Way::DeleteGroup => {
            operator
                .write(&format!("dps/enrollment-groups/{}", scene.group), b"")
                .await
        }
        Way::BlockInGroup => {
            // Azure's way: a disabled individual enrollment with the device's
            // certificate, or with any key for a symmetric-key device.
            let mut body = match &member.certificate {
                Some(identity) => x509_enrollment(&member.id, &identity.cert_pem),
                None => symmetric_enrollment(&member.id, &new_key()),
            };
            body["provisioningStatus"] = json!("disabled");
            operator
                .put(&format!("dps/enrollments/{}", member.id), body)
                .await
        }
        Way::Deregister => {
            operator
                .write(&format!("dps/registrations/{}", member.id), b"")
                .await
        }
        Way::Retire => {
            operator
                .retire(&member.id, br#"{"reason": "stolen"}"#)
                .await
        }
        Way::Revoke => {
            let identity = member.certificate.as_ref().expect("an X.509 device");
            // The intermediate issued the device's certificate; it is not a group's CA,
            // so it travels with its list.
            let body = format!(
                "{}{}",
                pki().device_intermediate.crl(&[identity]),
                pki().device_intermediate.pem
            );
            operator
                .write(&format!("dps/crls/{}", member.id), body.as_bytes())
                .await
        }
    }
}

/// What the operator does to undo it.
async fn restore(scene: &mut Scene, way: Way, member: &Member, individual: &Value) {
    let group_body = scene.group_body();
    let operator = &mut scene.operator;
    match way {
        Way::DisableEnrollment | Way::DeleteEnrollment => {
            operator
                .put(
                    &format!("dps/enrollments/{}", member.id),
                    individual.clone(),
                )
                .await;
        }
        Way::DisableGroup | Way::DeleteGroup => {
            operator
                .put(
                    &format!("dps/enrollment-groups/{}", scene.group),
                    group_body,
                )
                .await;
        }
        Way::BlockInGroup => {
            let result = operator
                .write(&format!("dps/enrollments/{}", member.id), b"")
                .await;
            assert_eq!(result["ok"], true, "{result}");
        }
        Way::Deregister => {}
        Way::Retire => {
            // The blocking enrollment holds the device's own credential: enabling it
            // (the retained record, without keys, published back) restores the device.
            operator
                .subscribe(&format!("dps/enrollments/{}", member.id))
                .await;
            let (_, record) = operator
                .next_publish(&format!("dps/enrollments/{}", member.id))
                .await
                .expect("the retained blocking enrollment");
            let mut record: Value = serde_json::from_slice(&record).expect("JSON");
            assert_eq!(record["provisioningStatus"], "disabled", "{record}");
            record["provisioningStatus"] = json!("enabled");
            operator
                .put(&format!("dps/enrollments/{}", member.id), record)
                .await;
        }
        Way::Revoke => {
            let result = operator
                .write(&format!("dps/crls/{}", member.id), b"")
                .await;
            assert_eq!(result["ok"], true, "{result}");
        }
    }
}

/// Runs one way of taking a device out of service, over both protocols; returns the
/// cut-off latencies seen.
async fn scenario(credential: Credential, way: Way) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for protocol in [Protocol::V311, Protocol::V5] {
        let name = format!(
            "{}-{}-{}",
            format!("{way:?}").to_lowercase(),
            match credential {
                Credential::SymmetricKey => "sas",
                Credential::X509 => "x509",
            },
            match protocol {
                Protocol::V311 => "v4",
                Protocol::V5 => "v5",
            }
        );
        let mut scene = Scene::new(credential, &name).await;
        let target_id = format!("{name}-target");
        let (member, individual) = if way.group_device() {
            (scene.group_member(&target_id), Value::Null)
        } else {
            scene.individual(&target_id).await
        };
        // A bystander of the same group when the group stays in service; of another
        // enrollment otherwise.
        let bystander = if way.group_stays() && way.group_device() {
            scene.group_member(&format!("{name}-bystander"))
        } else {
            scene.individual(&format!("{name}-bystander")).await.0
        };
        let mut watcher = provisioned(&scene.server, &bystander, protocol).await;
        let mut device = provisioned(&scene.server, &member, protocol).await;

        // (a) Out within a second, counted in the result.
        let started = Instant::now();
        let result = take_out(&mut scene, way, &member, &individual).await;
        assert_eq!(result["ok"], true, "{name}: {result}");
        assert_eq!(result["sessionsClosed"], 1, "{name}: {result}");
        let closed = device
            .closed_within(Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("{name}: the live session is still open after 1 s"));
        latencies.push(started.elapsed());
        if protocol == Protocol::V5 {
            assert_eq!(
                closed,
                Closed::Disconnect(DisconnectReasonCode::AdministrativeAction),
                "{name}"
            );
        }
        // The bystander kept its session and its topics.
        assert_eq!(
            watcher.closed_within(Duration::from_millis(100)).await,
            None
        );
        still_works(&mut watcher).await;

        // (b) and (c): no hub rights on reconnect, and the register says why.
        let reconnect =
            LiveDevice::connect(&scene.server, &member.id, &member.auth, protocol).await;
        match way.reconnect() {
            Reconnect::Refused => {
                let refusal = reconnect
                    .err()
                    .unwrap_or_else(|| panic!("{name}: connected"));
                assert!(refusal.contains("NotAuthorized"), "{name}: {refusal}");
            }
            Reconnect::Disabled | Reconnect::Unregistered => {
                let mut again = reconnect.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(
                    !again.subscribe(&format!("devices/{}/#", member.id)).await,
                    "{name}: hub topics granted out of service"
                );
                if way.reconnect() == Reconnect::Disabled {
                    let (status, body) = again.register().await;
                    assert_eq!(
                        (status, &body["status"]),
                        (200, &json!("disabled")),
                        "{name}: {body}"
                    );
                }
                assert!(
                    !again
                        .publish_accepted(&format!("devices/{}/messages/events/", member.id))
                        .await,
                    "{name}: a publish to its hub topics was accepted"
                );
            }
        }

        // (d) Undone, the device is back.
        restore(&mut scene, way, &member, &individual).await;
        let mut back = LiveDevice::connect(&scene.server, &member.id, &member.auth, protocol)
            .await
            .unwrap_or_else(|e| panic!("{name}: not back: {e}"));
        let (status, body) = back.register().await;
        assert_eq!(
            (status, &body["status"]),
            (200, &json!("assigned")),
            "{name}: {body}"
        );
        assert!(
            back.subscribe(&format!("devices/{}/#", member.id)).await,
            "{name}"
        );
        assert!(
            back.publish_accepted(&format!("devices/{}/messages/events/", member.id))
                .await,
            "{name}"
        );
        still_works(&mut watcher).await;
    }
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_individual_enrollment_cuts_its_device() {
    scenario(Credential::SymmetricKey, Way::DisableEnrollment).await;
    scenario(Credential::X509, Way::DisableEnrollment).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_individual_enrollment_cuts_its_device() {
    scenario(Credential::SymmetricKey, Way::DeleteEnrollment).await;
    scenario(Credential::X509, Way::DeleteEnrollment).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_group_cuts_its_devices() {
    scenario(Credential::SymmetricKey, Way::DisableGroup).await;
    scenario(Credential::X509, Way::DisableGroup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_group_cuts_its_devices() {
    scenario(Credential::SymmetricKey, Way::DeleteGroup).await;
    scenario(Credential::X509, Way::DeleteGroup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_one_device_or_certificate_of_a_group_cuts_it_alone() {
    scenario(Credential::SymmetricKey, Way::BlockInGroup).await;
    scenario(Credential::X509, Way::BlockInGroup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_the_registration_record_cuts_the_device() {
    scenario(Credential::SymmetricKey, Way::Deregister).await;
    scenario(Credential::X509, Way::Deregister).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_device_cuts_it_and_enabling_its_block_restores_it() {
    scenario(Credential::SymmetricKey, Way::Retire).await;
    scenario(Credential::X509, Way::Retire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_that_revokes_a_live_certificate_cuts_its_session() {
    let latencies = scenario(Credential::X509, Way::Revoke).await;
    assert!(latencies.iter().all(|l| *l < Duration::from_secs(1)));
}

/// The next message on exactly `topic`, as JSON.
async fn next_json(operator: &mut Operator, topic: &str) -> Value {
    loop {
        let (got, body) = operator
            .next_publish(topic)
            .await
            .unwrap_or_else(|| panic!("nothing on {topic}"));
        if got == topic {
            return serde_json::from_slice(&body).expect("JSON");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_purges_retained_messages_is_audited_and_idempotent() {
    let mut scene = Scene::new(Credential::SymmetricKey, "purge").await;
    let member = scene.group_member("purge-1");
    let bystander = scene.group_member("purge-2");
    let mut watcher = provisioned(&scene.server, &bystander, Protocol::V5).await;
    let mut device = provisioned(&scene.server, &member, Protocol::V311).await;
    // Two retained messages under its topics: one of its own, one an operator left.
    device
        .publish_retained("devices/purge-1/state", b"on".to_vec())
        .await;
    assert!(
        device
            .publish_accepted("devices/purge-1/messages/events/")
            .await
    );
    scene
        .operator
        .client
        .publish(
            "devices/purge-1/config",
            rumqttc::QoS::AtLeastOnce,
            true,
            b"v2".to_vec(),
        )
        .await
        .expect("publish");
    watcher
        .publish_retained("devices/purge-2/state", b"on".to_vec())
        .await;
    assert!(
        watcher
            .publish_accepted("devices/purge-2/messages/events/")
            .await
    );

    let mut auditor = scene.server.operator().await;
    auditor.subscribe("dps/events/admin/retire/#").await;
    auditor.subscribe("dps/registrations/purge-1").await;
    let _ = auditor.next_publish("dps/registrations/purge-1").await;

    let result = scene
        .operator
        .retire("purge-1", br#"{"reason": "stolen from site 4"}"#)
        .await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["sessionsClosed"], 1, "{result}");
    assert_eq!(result["registrationsDeregistered"], 1, "{result}");
    assert_eq!(result["retainedMessagesPurged"], 2, "{result}");
    assert!(device.closed_within(Duration::from_secs(1)).await.is_some());

    let mut event = Value::Null;
    let mut record = Value::Null;
    while event.is_null() || record.is_null() {
        let (topic, body) = auditor
            .next_publish("dps/")
            .await
            .expect("event and record");
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        match topic.as_str() {
            "dps/events/admin/retire/purge-1" => event = body,
            "dps/registrations/purge-1" => record = body,
            _ => {}
        }
    }
    assert_eq!(event["operation"], "retire", "{event}");
    assert_eq!(event["outcome"], "retired", "{event}");
    assert_eq!(event["retirement"], "retired", "{event}");
    assert_eq!(event["reason"], "stolen from site 4", "{event}");
    assert_eq!(event["sessionsClosed"], 1, "{event}");
    assert_eq!(event["retainedMessagesPurged"], 2, "{event}");
    assert!(event["operator"]
        .as_str()
        .unwrap_or_default()
        .starts_with("operator-"));
    assert_eq!(record["status"], "deregistered", "{record}");

    // Nothing is left retained under its topics; the bystander's stays.
    let mut reader = scene.server.operator().await;
    reader.subscribe("devices/purge-1/#").await;
    assert_eq!(reader.next_publish("devices/").await, None);
    reader.subscribe("devices/purge-2/#").await;
    let (topic, _) = reader.next_publish("devices/").await.expect("kept");
    assert_eq!(topic, "devices/purge-2/state");

    // Again: nothing more to do, and it says so.
    let again = scene.operator.retire("purge-1", b"").await;
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["sessionsClosed"], 0, "{again}");
    assert_eq!(again["registrationsDeregistered"], 0, "{again}");
    assert_eq!(again["retainedMessagesPurged"], 0, "{again}");

    // Bad input is refused with a reason and changes nothing.
    let unknown = scene.operator.retire("never-enrolled", b"").await;
    assert_eq!(
        (unknown["ok"].clone(), unknown["errorCode"].clone()),
        (json!(false), json!(404)),
        "{unknown}"
    );
    let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(600));
    for body in [br#"{"why": "typo"}"#.as_slice(), b"[1]", long.as_bytes()] {
        let refused = scene.operator.retire("purge-2", body).await;
        assert_eq!(refused["errorCode"], 400, "{refused}");
    }
    assert_eq!(
        watcher.closed_within(Duration::from_millis(100)).await,
        None
    );
    still_works(&mut watcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_mark_the_registrations_they_attested_deregistered() {
    let mut scene = Scene::new(Credential::SymmetricKey, "marks").await;
    for i in 0..3 {
        let member = scene.group_member(&format!("marks-{i}"));
        provisioned(&scene.server, &member, Protocol::V311).await;
    }
    let (single, _) = scene.individual("marks-single").await;
    provisioned(&scene.server, &single, Protocol::V311).await;
    // A device of another group is not touched.
    let other = scene
        .server
        .register_group_devices(&mut scene.operator, "marks-other", 1)
        .await;
    assert_eq!(other[0].status_word(), Some("assigned"));

    let result = scene
        .operator
        .write("dps/enrollment-groups/marks-group", b"")
        .await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["registrationsDeregistered"], 3, "{result}");
    let result = scene
        .operator
        .write("dps/enrollments/marks-single", b"")
        .await;
    assert_eq!(result["registrationsDeregistered"], 1, "{result}");

    let mut reader = scene.server.operator().await;
    reader.subscribe("dps/registrations/#").await;
    let mut seen = std::collections::BTreeMap::new();
    while let Some((topic, body)) = reader.next_publish("dps/registrations/").await {
        let record: Value = serde_json::from_slice(&body).expect("JSON");
        seen.insert(
            topic,
            record["status"].as_str().unwrap_or_default().to_owned(),
        );
        if seen.len() == 5 {
            break;
        }
    }
    for id in ["marks-0", "marks-1", "marks-2", "marks-single"] {
        assert_eq!(
            seen.get(&format!("dps/registrations/{id}"))
                .map(String::as_str),
            Some("deregistered"),
            "{seen:?}"
        );
    }
    assert_eq!(
        seen.get("dps/registrations/marks-other-0")
            .map(String::as_str),
        Some("assigned"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_attempt_is_an_event() {
    let server = Server::start_with(|c| c.limits.registrations_per_device_per_minute = 1).await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/events/registrations/#").await;
    operator.subscribe("dps/events/acl/#").await;
    let key = operator.enroll("noisy").await;
    let mut device = LiveDevice::connect(&server, "noisy", &sas(&key), Protocol::V311)
        .await
        .expect("connects");
    let expect_refused = |event: &Value, request: &str, code: u32| {
        assert_eq!(event["outcome"], "refused", "{event}");
        assert_eq!(event["request"], request, "{event}");
        assert_eq!(event["errorCode"], code, "{event}");
        assert!(event["message"].is_string(), "{event}");
    };
    // A malformed register body: 400004.
    device
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            b"[1]".to_vec(),
        )
        .await;
    let (answer, _) = device
        .receive(Duration::from_secs(5))
        .await
        .expect("an answer");
    assert!(
        answer.starts_with("$dps/registrations/res/400/"),
        "{answer}"
    );
    let event = next_json(&mut operator, "dps/events/registrations/noisy").await;
    expect_refused(&event, "register", 400004);
    // A second registration within the minute, over a limit of one: 429001.
    assert_eq!(device.register().await.0, 200);
    let event = next_json(&mut operator, "dps/events/registrations/noisy").await;
    assert_eq!(event["outcome"], "assigned", "{event}");
    assert_eq!(device.register().await.0, 429);
    let event = next_json(&mut operator, "dps/events/registrations/noisy").await;
    expect_refused(&event, "register", 429001);
    // A poll for an operation that does not exist: 404201.
    device
        .publish(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=9&operationId=4.nope",
            Vec::new(),
        )
        .await;
    let (answer, _) = device
        .receive(Duration::from_secs(5))
        .await
        .expect("an answer");
    assert!(
        answer.starts_with("$dps/registrations/res/404/"),
        "{answer}"
    );
    let event = next_json(&mut operator, "dps/events/registrations/noisy").await;
    expect_refused(&event, "poll", 404201);
    // A refused subscription, then a publish outside its topics (which closes it).
    assert!(!device.subscribe("devices/someone-else/#").await);
    let event = next_json(&mut operator, "dps/events/acl/noisy").await;
    assert_eq!(
        (&event["action"], &event["topic"], &event["outcome"]),
        (
            &json!("subscribe"),
            &json!("devices/someone-else/#"),
            &json!("refused")
        ),
        "{event}"
    );
    assert!(!device.publish_accepted("devices/someone-else/x").await);
    let event = next_json(&mut operator, "dps/events/acl/noisy").await;
    assert_eq!(
        (&event["action"], &event["topic"]),
        (&json!("publish"), &json!("devices/someone-else/x")),
        "{event}"
    );
    assert!(!String::from_utf8_lossy(&serde_json::to_vec(&event).unwrap()).contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_individual_enrollment_takes_over_from_the_group_and_the_session_reconnects() {
    let mut scene = Scene::new(Credential::SymmetricKey, "takeover").await;
    let member = scene.group_member("takeover-1");
    let mut device = provisioned(&scene.server, &member, Protocol::V5).await;
    // An enabled individual enrollment with a key of its own now decides for the device.
    let own_key = new_key();
    let result = scene
        .operator
        .put(
            "dps/enrollments/takeover-1",
            symmetric_enrollment("takeover-1", &own_key),
        )
        .await;
    assert_eq!(result["sessionsClosed"], 1, "{result}");
    assert_eq!(
        device.closed_within(Duration::from_secs(1)).await,
        Some(Closed::Disconnect(
            DisconnectReasonCode::AdministrativeAction
        ))
    );
    // The group's key no longer admits it; its own key does.
    let refused =
        LiveDevice::connect(&scene.server, "takeover-1", &member.auth, Protocol::V5).await;
    assert!(refused.err().unwrap_or_default().contains("NotAuthorized"));
    let own = Member {
        id: "takeover-1".into(),
        auth: sas(&own_key),
        certificate: None,
    };
    let mut again = provisioned(&scene.server, &own, Protocol::V5).await;
    assert!(
        again
            .publish_accepted("devices/takeover-1/messages/events/")
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_only_sessions_are_cut_too() {
    let mut scene = Scene::new(Credential::X509, "dps-only").await;
    let (single, individual) = scene.individual("dps-only-single").await;
    let member = scene.group_member("dps-only-member");
    // Connected and subscribed to their answers, never registered: no hub rights yet.
    let mut waiting = Vec::new();
    for (who, protocol) in [(&single, Protocol::V311), (&member, Protocol::V5)] {
        let device = LiveDevice::connect(&scene.server, &who.id, &who.auth, protocol)
            .await
            .expect("connects");
        waiting.push(device);
    }
    let mut disabled = individual;
    disabled["provisioningStatus"] = json!("disabled");
    let result = scene
        .operator
        .put("dps/enrollments/dps-only-single", disabled)
        .await;
    assert_eq!(result["sessionsClosed"], 1, "{result}");
    let result = scene.operator.retire("dps-only-member", b"").await;
    assert_eq!(result["sessionsClosed"], 1, "{result}");
    for device in &mut waiting {
        assert!(
            device.closed_within(Duration::from_secs(1)).await.is_some(),
            "{} still connected",
            device.registration_id
        );
    }
}

//! Cloud hubs that know their devices: an assignment to a linked hub with a connection
//! string registers the device's identity and initial twin there through the hub's
//! outbox (IoT Hub's service API, against a fake hub that checks what IoT Hub checks),
//! retirement disables it and re-enabling enables it, and every fault of the hub ends
//! as a recorded state, while the uplink is down as after it comes back and after a
//! restart.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use edgedps::config::HubConfig;
use edgedps_policies::cloud::ConnectionString;
use edgedps_policies::sas::derive_device_key;
use edgedps_tests::iothub::{FakeHub, Fault};
use edgedps_tests::*;
use edgedps_topics::cloud::HubRegistrationMode;
use serde_json::{json, Value};

const CLOUD: &str = "cloud-a.example.net";
const OTHER: &str = "cloud-b.example.net";

/// The test CA the fake hubs' certificates come from, as a trust anchors file.
fn anchors() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let path = dir.path().join("hub-ca.pem");
    if !path.exists() {
        std::fs::write(&path, &pki().server_ca.pem).expect("write anchors");
    }
    path
}

/// Links `hub` in the configuration with its connection string.
fn link(config: &mut edgedps::Config, hub: &FakeHub, mode: HubRegistrationMode) {
    let mut linked = HubConfig::named(&hub.host_name);
    linked.service_address = Some(hub.service_address());
    linked.registration = mode;
    config.hubs.push(linked);
    config.hub_credentials.insert(
        hub.host_name.clone(),
        ConnectionString::parse(&hub.connection_string()).expect("connection string"),
    );
    config.cloud.trust_anchors_file = Some(anchors());
    config.cloud.max_retry_seconds = 1;
    config.cloud.request_timeout_seconds = 1;
    config.cloud.hub_answer_timeout_seconds = 3;
}

async fn server_with(hubs: &[&FakeHub], mode: HubRegistrationMode) -> Server {
    Server::start_with(|config| {
        for hub in hubs {
            link(config, hub, mode);
        }
    })
    .await
}

/// An enrollment of `registration_id` (symmetric key) for `hub`.
fn enrollment_for(registration_id: &str, key: &str, hub: &str) -> Value {
    let mut e = symmetric_enrollment(registration_id, key);
    e["iotHubs"] = json!([hub]);
    e["initialTwin"] =
        json!({"tags": {"site": "plant-7"}, "properties": {"desired": {"interval": 30}}});
    e
}

/// Enrolls `registration_id` (symmetric key) for `hub`; its key.
async fn enroll_at(operator: &mut Operator, registration_id: &str, hub: &str) -> String {
    let key = new_key();
    operator
        .put(
            &format!("dps/enrollments/{registration_id}"),
            enrollment_for(registration_id, &key, hub),
        )
        .await;
    key
}

fn hub_registration(server: &Server, registration_id: &str) -> Value {
    server.record(registration_id)["hubRegistration"].clone()
}

/// Waits until the record's `hubRegistration.state` is `state`; the record's field.
async fn hub_state(server: &Server, registration_id: &str, state: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = hub_registration(server, registration_id);
        if now["state"] == state {
            return now;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{registration_id}: hubRegistration never `{state}`: {now}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assigned(server: &Server, registration_id: &str, key: &str) -> Outcome {
    let outcome =
        edgedps_device::provision::register(&server.device(registration_id, sas(key)), None)
            .await
            .expect("registers");
    assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_device_is_registered_at_its_hub_as_iot_hub_would_hold_it() {
    let hub = FakeHub::start(CLOUD).await;
    let server = server_with(&[&hub], HubRegistrationMode::AfterAnswer).await;
    let mut operator = server.operator().await;
    let pki = pki();

    // A symmetric-key individual enrollment with its own device id.
    let key = new_key();
    let mut e = enrollment_for("cl-sym", &key, CLOUD);
    e["deviceId"] = json!("cl-sym-device");
    operator.put("dps/enrollments/cl-sym", e).await;
    let outcome = assigned(&server, "cl-sym", &key).await;
    assert_eq!(outcome.body["registrationState"]["assignedHub"], CLOUD);
    // The device's answer carries no hub bookkeeping; the record does.
    assert!(
        outcome.body["registrationState"]
            .get("hubRegistration")
            .is_none(),
        "{}",
        outcome.body
    );
    let state = hub_state(&server, "cl-sym", "done", Duration::from_secs(10)).await;
    assert_eq!(state["action"], "register");
    assert_eq!(state["attempts"], 1);
    let identity = hub
        .identity("cl-sym-device")
        .expect("the hub has the device");
    assert_eq!(identity["status"], "enabled");
    assert_eq!(identity["authentication"]["type"], "sas");
    assert_eq!(
        identity["authentication"]["symmetricKey"]["primaryKey"],
        key.as_str()
    );
    let twin = hub.twin("cl-sym-device").expect("twin");
    assert_eq!(twin["tags"], json!({"site": "plant-7"}));
    assert_eq!(twin["properties"]["desired"]["interval"], 30);

    // A group device: its derived key.
    let group_key = new_key();
    let mut group = symmetric_group("cl-group", &group_key);
    group["iotHubs"] = json!([CLOUD]);
    operator.put("dps/enrollment-groups/cl-group", group).await;
    let member_key = derive_device_key(&group_key, "cl-member").unwrap();
    assigned(&server, "cl-member", &member_key).await;
    hub_state(&server, "cl-member", "done", Duration::from_secs(10)).await;
    let identity = hub.identity("cl-member").expect("member at the hub");
    assert_eq!(
        identity["authentication"]["symmetricKey"]["primaryKey"],
        member_key.as_str()
    );

    // X.509 individual: its thumbprint. X.509 group: certificateAuthority.
    let device = pki.device_root.device("cl-x509");
    let mut e = x509_enrollment("cl-x509", &device.cert_pem);
    e["iotHubs"] = json!([CLOUD]);
    operator.put("dps/enrollments/cl-x509", e).await;
    let mut group = x509_group("cl-x509-group", &pki.device_root.pem);
    group["iotHubs"] = json!([CLOUD]);
    operator
        .put("dps/enrollment-groups/cl-x509-group", group)
        .await;
    let member = pki.device_intermediate.device("cl-x509-member");
    for (id, auth) in [
        ("cl-x509", x509(&device, &[])),
        ("cl-x509-member", x509(&member, &[&pki.device_intermediate])),
    ] {
        let outcome = edgedps_device::provision::register(&server.device(id, auth), None)
            .await
            .expect("registers");
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
        hub_state(&server, id, "done", Duration::from_secs(10)).await;
    }
    let identity = hub.identity("cl-x509").expect("x509 device");
    assert_eq!(identity["authentication"]["type"], "selfSigned");
    assert_eq!(
        identity["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        device.thumbprint()
    );
    let identity = hub.identity("cl-x509-member").expect("x509 member");
    assert_eq!(identity["authentication"]["type"], "certificateAuthority");

    // Registering again with nothing changed sends nothing more.
    let before = hub.seen().len();
    assigned(&server, "cl-sym", &key).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.seen().len(), before, "{:#?}", hub.seen());
    // Every request was signed, versioned and typed as the hub wants: none refused.
    assert!(
        hub.seen().iter().all(|s| s.status < 400 || s.status == 409),
        "{:#?}",
        hub.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_down_during_100_registrations_loses_nothing_and_keeps_each_device_s_order() {
    let hub = FakeHub::start(CLOUD).await;
    hub.go_down();
    let server = Server::start_with(|config| {
        link(config, &hub, HubRegistrationMode::AfterAnswer);
        config.http = Some(edgedps::config::HttpConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
        });
    })
    .await;
    let metrics = format!(
        "http://{}/metrics",
        server.running.http_addr.expect("http listener")
    );
    let mut operator = server.operator().await;
    let group_key = new_key();
    let mut group = symmetric_group("up", &group_key);
    group["iotHubs"] = json!([CLOUD]);
    operator.put("dps/enrollment-groups/up", group).await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let id = format!("up-{i}");
        let config = server.device(&id, sas(&derive_device_key(&group_key, &id).unwrap()));
        tasks.push(tokio::spawn(async move {
            edgedps_device::provision::register(&config, None).await
        }));
    }
    for task in tasks {
        let outcome = task.await.unwrap().expect("registers");
        // Answered at once, uplink or not.
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    }
    let answered = started.elapsed();
    // Ten of them retired while the hub is still away: their disable follows their
    // registration.
    for i in 0..10 {
        let result = operator.retire(&format!("up-{i}"), b"").await;
        assert_eq!(result["ok"], true, "{result}");
    }
    let pending = hub_registration(&server, "up-50");
    assert_eq!(pending["state"], "pending", "{pending}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pending = hub_registration(&server, "up-0");
    assert_eq!(pending["action"], "disable", "{pending}");
    let stats = server.running.responder.outbox_stats();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].pending, 110, "{stats:?}");
    let labels = [("hub", CLOUD)];
    let scraped = scrape(&metrics, None).await;
    assert_eq!(
        sample(&scraped, "edgedps_hub_outbox_pending", &labels),
        110.0
    );
    assert!(sample(&scraped, "edgedps_hub_operation_attempts_total", &labels) >= 1.0);
    assert_eq!(
        sample(&scraped, "edgedps_hub_operations_done_total", &labels),
        0.0
    );
    let head = hub_registration(&server, "up-0");
    assert!(head["attempts"].as_u64().unwrap_or_default() == 0, "{head}");

    hub.heal();
    let healed = std::time::Instant::now();
    hub.wait_for(Duration::from_secs(60), "all 100 devices", |h| {
        h.identities().len() == 100
    })
    .await;
    for i in 0..100 {
        let want = if i < 10 { "disabled" } else { "enabled" };
        let id = format!("up-{i}");
        hub.wait_for(Duration::from_secs(30), &format!("{id} {want}"), |h| {
            h.identity(&id).is_some_and(|d| d["status"] == want)
        })
        .await;
        let state = hub_state(&server, &id, "done", Duration::from_secs(10)).await;
        assert_eq!(state["action"], if i < 10 { "disable" } else { "register" });
    }
    let drained = healed.elapsed();
    // In order per device: create, twin, then (for the retired) read and disable.
    let seen = hub.seen();
    for i in 0..10 {
        let id = format!("up-{i}");
        let mine: Vec<String> = seen
            .iter()
            .filter(|s| s.device() == Some(id.as_str()) && s.status == 200)
            .map(|s| {
                format!(
                    "{} {}",
                    s.method,
                    s.path.split('?').next().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            mine,
            [
                format!("PUT /devices/{id}"),
                format!("PUT /twins/{id}"),
                format!("GET /devices/{id}"),
                format!("PUT /devices/{id}")
            ],
            "{id}"
        );
    }
    let stats = server.running.responder.outbox_stats();
    assert_eq!((stats[0].pending, stats[0].failed), (0, 0), "{stats:?}");
    let scraped = scrape(&metrics, None).await;
    assert_eq!(sample(&scraped, "edgedps_hub_outbox_pending", &labels), 0.0);
    assert_eq!(sample(&scraped, "edgedps_hub_outbox_failed", &labels), 0.0);
    assert_eq!(
        sample(&scraped, "edgedps_hub_operations_done_total", &labels),
        110.0
    );
    assert_eq!(
        sample(&scraped, "edgedps_hub_operation_failures_total", &labels),
        0.0
    );
    eprintln!("100 registrations answered in {answered:?} with the hub down; 110 operations drained in {drained:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_re_enabling_and_deregistering_reach_the_hub() {
    let hub = FakeHub::start(CLOUD).await;
    let server = server_with(&[&hub], HubRegistrationMode::AfterAnswer).await;
    let mut operator = server.operator().await;
    let key = enroll_at(&mut operator, "cl-life", CLOUD).await;
    operator.subscribe("dps/events/registrations/cl-life").await;
    assigned(&server, "cl-life", &key).await;
    let status = |want: &'static str| {
        move |h: &FakeHub| h.identity("cl-life").is_some_and(|d| d["status"] == want)
    };
    hub.wait_for(Duration::from_secs(10), "enabled", status("enabled"))
        .await;
    // The event of the change at the hub.
    let mut saw_done = false;
    while let Some((_, payload)) = operator
        .next_publish("dps/events/registrations/cl-life")
        .await
    {
        let event: Value = serde_json::from_slice(&payload).unwrap();
        if event["outcome"] == "hubRegistration" && event["hubRegistration"]["state"] == "done" {
            saw_done = true;
            break;
        }
    }
    assert!(saw_done, "no hubRegistration event");

    let mut disabled = enrollment_for("cl-life", &key, CLOUD);
    disabled["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollments/cl-life", disabled).await;
    hub.wait_for(Duration::from_secs(10), "disabled", status("disabled"))
        .await;
    // Disabling kept the hub's keys: only the status changed.
    let identity = hub.identity("cl-life").unwrap();
    assert_eq!(
        identity["authentication"]["symmetricKey"]["primaryKey"],
        key.as_str()
    );
    let state = hub_state(&server, "cl-life", "done", Duration::from_secs(10)).await;
    assert_eq!(state["action"], "disable");

    operator
        .put(
            "dps/enrollments/cl-life",
            enrollment_for("cl-life", &key, CLOUD),
        )
        .await;
    hub.wait_for(Duration::from_secs(10), "enabled again", status("enabled"))
        .await;
    assert_eq!(
        hub_state(&server, "cl-life", "done", Duration::from_secs(10)).await["action"],
        "enable"
    );

    // Deregistered (the record deleted): out at the hub too.
    assert_eq!(
        operator.write("dps/registrations/cl-life", b"").await["ok"],
        true
    );
    hub.wait_for(
        Duration::from_secs(10),
        "disabled by deregistration",
        status("disabled"),
    )
    .await;
    // Registering again brings it back.
    assigned(&server, "cl-life", &key).await;
    hub.wait_for(
        Duration::from_secs(10),
        "enabled by registering",
        status("enabled"),
    )
    .await;
    // A group disabled: its devices at the hub with it.
    let group_key = new_key();
    let mut group = symmetric_group("cl-fleet", &group_key);
    group["iotHubs"] = json!([CLOUD]);
    operator
        .put("dps/enrollment-groups/cl-fleet", group.clone())
        .await;
    for i in 0..3 {
        let id = format!("cl-fleet-{i}");
        assigned(&server, &id, &derive_device_key(&group_key, &id).unwrap()).await;
    }
    // One device of the group blocked by a disabled individual enrollment: out at the
    // hub; the block deleted: back in.
    let member = "cl-fleet-0";
    let member_status = |want: &'static str| {
        move |h: &FakeHub| h.identity(member).is_some_and(|d| d["status"] == want)
    };
    hub.wait_for(
        Duration::from_secs(10),
        "the member",
        member_status("enabled"),
    )
    .await;
    let mut block = symmetric_enrollment(member, &derive_device_key(&group_key, member).unwrap());
    block["provisioningStatus"] = json!("disabled");
    operator
        .put(&format!("dps/enrollments/{member}"), block)
        .await;
    hub.wait_for(
        Duration::from_secs(10),
        "the blocked member disabled",
        member_status("disabled"),
    )
    .await;
    assert_eq!(
        operator
            .write(&format!("dps/enrollments/{member}"), b"")
            .await["ok"],
        true
    );
    hub.wait_for(
        Duration::from_secs(10),
        "the unblocked member enabled",
        member_status("enabled"),
    )
    .await;
    group["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollment-groups/cl-fleet", group).await;
    hub.wait_for(Duration::from_secs(10), "the fleet disabled", |h| {
        (0..3).all(|i| {
            h.identity(&format!("cl-fleet-{i}"))
                .is_some_and(|d| d["status"] == "disabled")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_of_a_hub_ends_as_a_recorded_state_while_others_keep_working() {
    let hub = FakeHub::start(CLOUD).await;
    let other = FakeHub::start(OTHER).await;
    let server = Server::start_with(|config| {
        link(config, &hub, HubRegistrationMode::AfterAnswer);
        link(config, &other, HubRegistrationMode::AfterAnswer);
        config.local_hub = Some(edgedps::config::LocalHubConfig::named("gateway.local"));
    })
    .await;
    let mut operator = server.operator().await;

    // Faults that pass: each retried until the hub takes the device.
    let passing: Vec<(&str, Fault, &str)> = vec![
        (
            "f-429",
            Fault::hub(429, "ThrottlingException", Some(1)),
            "429: ErrorCode:ThrottlingException",
        ),
        (
            "f-500",
            Fault::hub(500, "ServerError", None),
            "500: ErrorCode:ServerError",
        ),
        ("f-html", Fault::html(200), "text/html"),
        ("f-close", Fault::Close, "closed"),
        ("f-hang", Fault::Hang, "no answer within"),
    ];
    for (id, fault, reason) in passing {
        let key = enroll_at(&mut operator, id, CLOUD).await;
        hub.fail_always(fault);
        assigned(&server, id, &key).await;
        // Pending with the hub's reason, attempted more than once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = hub_registration(&server, id);
            if state["attempts"].as_u64().unwrap_or_default() >= 2 {
                assert_eq!(state["state"], "pending", "{id}: {state}");
                let error = state["lastError"].as_str().unwrap_or_default();
                assert!(error.contains(reason), "{id}: {state}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: never retried: {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Meanwhile another hub and the local hub serve their devices.
        let bystander = format!("{id}-other");
        let other_key = enroll_at(&mut operator, &bystander, OTHER).await;
        assigned(&server, &bystander, &other_key).await;
        hub_state(&server, &bystander, "done", Duration::from_secs(5)).await;
        let local = format!("{id}-local");
        let local_key = new_key();
        operator
            .put(
                &format!("dps/enrollments/{local}"),
                enrollment_for(&local, &local_key, "gateway.local"),
            )
            .await;
        let outcome = assigned(&server, &local, &local_key).await;
        assert_eq!(
            outcome.body["registrationState"]["assignedHub"],
            "gateway.local"
        );
        hub.heal();
        let state = hub_state(&server, id, "done", Duration::from_secs(15)).await;
        assert!(state.get("lastError").is_none(), "{state}");
        assert!(hub.identity(id).is_some(), "{id}");
    }

    // Faults retrying cannot fix: failed, with the hub's reason; the next device passes.
    let failing: Vec<(&str, Fault, &str)> = vec![
        (
            "f-404",
            Fault::hub(404, "DeviceNotFound", None),
            "404: ErrorCode:DeviceNotFound",
        ),
        (
            "f-412",
            Fault::hub(412, "PreconditionFailed", None),
            "412: ErrorCode:PreconditionFailed",
        ),
        ("f-302", Fault::html(302), "302: text/html"),
    ];
    for (id, fault, reason) in failing {
        let key = enroll_at(&mut operator, id, CLOUD).await;
        hub.fail_next([fault]);
        assigned(&server, id, &key).await;
        let state = hub_state(&server, id, "failed", Duration::from_secs(10)).await;
        assert!(
            state["lastError"]
                .as_str()
                .unwrap_or_default()
                .contains(reason),
            "{id}: {state}"
        );
    }
    let next = "f-after";
    let key = enroll_at(&mut operator, next, CLOUD).await;
    assigned(&server, next, &key).await;
    hub_state(&server, next, "done", Duration::from_secs(10)).await;

    // A wrong key (written over the operator plane): 401, failed. The right one and a
    // retry from the operator plane: done.
    operator
        .put(
            &format!("dps/hubs/{CLOUD}"),
            json!({"serviceAddress": hub.service_address(), "connectionString": hub.wrong_connection_string()}),
        )
        .await;
    let key = enroll_at(&mut operator, "f-401", CLOUD).await;
    assigned(&server, "f-401", &key).await;
    let state = hub_state(&server, "f-401", "failed", Duration::from_secs(10)).await;
    assert!(
        state["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("401: ErrorCode:IotHubUnauthorizedAccess"),
        "{state}"
    );
    let shown = outbox(&mut operator, CLOUD, b"").await;
    assert_eq!(shown["failed"], 4, "{shown}");
    assert!(shown["operations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o.get("identity").is_none()));
    operator
        .put(
            &format!("dps/hubs/{CLOUD}"),
            json!({"serviceAddress": hub.service_address(), "connectionString": hub.connection_string()}),
        )
        .await;
    let retried = outbox(&mut operator, CLOUD, br#"{"retry": true}"#).await;
    assert_eq!(retried["retried"], 4, "{retried}");
    for id in ["f-401", "f-404", "f-412", "f-302"] {
        hub_state(&server, id, "done", Duration::from_secs(10)).await;
        assert!(hub.identity(id).is_some(), "{id}");
    }
    let shown = outbox(&mut operator, CLOUD, b"").await;
    assert_eq!(
        (shown["pending"].clone(), shown["failed"].clone()),
        (json!(0), json!(0)),
        "{shown}"
    );
    // Bad requests of the outbox topic are answered, not dropped.
    let bad = outbox(&mut operator, CLOUD, br#"{"retry": "yes"}"#).await;
    assert_eq!(bad["ok"], false, "{bad}");
    let unknown = outbox(&mut operator, "nowhere.example.net", b"").await;
    assert_eq!(unknown["ok"], false, "{unknown}");
}

async fn outbox(operator: &mut Operator, hub: &str, body: &[u8]) -> Value {
    let answer = operator
        .publish_for_result(
            &edgedps_topics::cloud::outbox_topic(hub),
            body,
            &edgedps_topics::cloud::outbox_result_topic(hub),
        )
        .await;
    serde_json::from_slice(&answer).expect("outbox answer is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_before_answer_hub_is_waited_for_and_its_refusal_fails_the_registration() {
    let hub = FakeHub::start(CLOUD).await;
    let server = server_with(&[&hub], HubRegistrationMode::BeforeAnswer).await;
    let mut operator = server.operator().await;
    let key = enroll_at(&mut operator, "ba-1", CLOUD).await;
    assigned(&server, "ba-1", &key).await;
    // Answered only once the hub had it.
    assert!(hub.identity("ba-1").is_some());
    assert_eq!(hub_registration(&server, "ba-1")["state"], "done");

    for (id, fault, reason) in [
        (
            "ba-401",
            Fault::hub(401, "IotHubUnauthorizedAccess", None),
            "401",
        ),
        ("ba-hang", Fault::Hang, "did not take the device within"),
    ] {
        let key = enroll_at(&mut operator, id, CLOUD).await;
        hub.fail_always(fault);
        let outcome = edgedps_device::provision::register(&server.device(id, sas(&key)), None)
            .await
            .expect("answered");
        assert_eq!(
            outcome.status_word(),
            Some("failed"),
            "{id}: {}",
            outcome.body
        );
        let message = outcome.body["registrationState"]["errorMessage"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains(reason) && message.contains(CLOUD),
            "{id}: {}",
            outcome.body
        );
        let record = server
            .running
            .responder
            .registration_record(id)
            .unwrap()
            .unwrap();
        assert_eq!(serde_json::to_value(&record).unwrap()["status"], "failed");
        hub.heal();
        // Registering again once the hub is back: assigned.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assigned(&server, id, &key).await;
        assert!(hub.identity(id).is_some(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_drain_loses_nothing_and_a_restart_resumes_the_outbox() {
    let hub = FakeHub::start(CLOUD).await;
    hub.go_down();
    let dir = tempfile::tempdir().unwrap();
    let extra = hub.config_toml(dir.path(), "max_retry_seconds = 1\n");
    let (devices_port, local_port) = free_ports();
    let mut process = Process::start(dir.path(), devices_port, local_port, &extra).await;
    let mut operator = Operator::connect(local_port).await;
    let mut keys = Vec::new();
    for i in 0..20 {
        let id = format!("rs-{i}");
        let key = enroll_at(&mut operator, &id, CLOUD).await;
        let outcome =
            edgedps_device::provision::register(&device_config(devices_port, &id, sas(&key)), None)
                .await
                .expect("registers");
        assert_eq!(outcome.status_word(), Some("assigned"));
        keys.push(key);
    }
    // The uplink comes back slow; edgedps is killed (SIGKILL) half way through.
    hub.slow_down(Some(Duration::from_millis(50)));
    hub.heal();
    hub.wait_for(Duration::from_secs(30), "some devices", |h| {
        h.identities().len() >= 5
    })
    .await;
    process.kill();
    let at_crash = hub.identities().len();
    assert!(at_crash < 20, "the drain finished before the crash");
    hub.slow_down(None);
    let _process = Process::start(dir.path(), devices_port, local_port, &extra).await;
    hub.wait_for(
        Duration::from_secs(30),
        "the 20 devices after the restart",
        |h| {
            (0..20).all(|i| {
                h.twin(&format!("rs-{i}"))
                    .is_some_and(|t| t["tags"]["site"] == "plant-7")
            })
        },
    )
    .await;
    for (i, key) in keys.iter().enumerate() {
        let identity = hub.identity(&format!("rs-{i}")).unwrap();
        assert_eq!(
            identity["authentication"]["symmetricKey"]["primaryKey"],
            key.as_str()
        );
        assert_eq!(identity["status"], "enabled");
    }
    // At most the operation the crash interrupted is sent again (the hub answers its
    // second create with 409, and edgedps updates instead).
    let creates = hub
        .seen()
        .iter()
        .filter(|s| s.method == "PUT" && s.path.starts_with("/devices/") && s.if_match.is_none())
        .count();
    assert!(
        (20..=21).contains(&creates),
        "{creates} creates: {:#?}",
        hub.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_strings_are_checked_stored_apart_and_never_shown() {
    let hub = FakeHub::start(CLOUD).await;
    let server = Server::start().await;
    let mut operator = server.operator().await;
    // Malformed, another hub's, a device's: refused with the field named, and the
    // key never echoed.
    let key_part = hub
        .connection_string()
        .split_once("SharedAccessKey=")
        .map(|(_, k)| k.to_owned())
        .unwrap();
    for (text, says) in [
        ("HostName=x".to_owned(), "SharedAccessKeyName"),
        (
            hub.connection_string().replace(CLOUD, OTHER),
            "not this hub",
        ),
        (
            format!("HostName={CLOUD};DeviceId=d;SharedAccessKey={key_part}"),
            "device",
        ),
    ] {
        let result = operator
            .write(
                &format!("dps/hubs/{CLOUD}"),
                json!({"connectionString": text}).to_string().as_bytes(),
            )
            .await;
        assert_eq!(result["ok"], false, "{result}");
        let message = result.to_string();
        assert!(
            message.contains("connectionString") && message.contains(says),
            "{message}"
        );
        assert!(!message.contains(&key_part), "{message}");
    }
    for address in ["no-port", "host:0", "host:99999", "bad host:443"] {
        let result = operator
            .write(
                &format!("dps/hubs/{CLOUD}"),
                json!({"serviceAddress": address}).to_string().as_bytes(),
            )
            .await;
        assert_eq!(result["ok"], false, "{address}: {result}");
        assert!(result.to_string().contains("serviceAddress"), "{result}");
    }
    operator
        .put(
            &format!("dps/hubs/{CLOUD}"),
            json!({"connectionString": hub.connection_string()}),
        )
        .await;
    let record = hub_record(&mut operator).await;
    assert_eq!(
        record["credentials"]["sharedAccessKeyName"], "registryReadWrite",
        "{record}"
    );
    assert!(record.get("connectionString").is_none(), "{record}");
    assert!(!record.to_string().contains(&key_part));
    // A write without the string keeps it; the record round-trips; "" removes it.
    let mut again = record.clone();
    again["allocationWeight"] = json!(5);
    operator.put(&format!("dps/hubs/{CLOUD}"), again).await;
    let record = hub_record(&mut operator).await;
    assert_eq!(record["allocationWeight"], 5, "{record}");
    assert!(record["credentials"].is_object(), "{record}");
    operator
        .put(
            &format!("dps/hubs/{CLOUD}"),
            json!({"connectionString": ""}),
        )
        .await;
    let record = hub_record(&mut operator).await;
    assert!(record.get("credentials").is_none(), "{record}");
}

/// The retained hub record, as a new subscriber reads it.
async fn hub_record(operator: &mut Operator) -> Value {
    let topic = format!("dps/hubs/{CLOUD}");
    operator.subscribe(&topic).await;
    let (_, record) = operator.next_publish(&topic).await.expect("record");
    serde_json::from_slice(&record).expect("record is JSON")
}

/// Environment variables for a configuration load.
type Environment = Vec<(String, String)>;

#[test]
fn config_reads_connection_strings_from_files_and_the_environment_and_names_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key();
    let good =
        format!("HostName={CLOUD};SharedAccessKeyName=registryReadWrite;SharedAccessKey={key}\n");
    let file = dir.path().join("cs");
    std::fs::write(&file, &good).unwrap();
    let toml = |extra: &str| {
        let path = dir.path().join("edgedps.toml");
        std::fs::write(
            &path,
            format!("[[hubs]]\nhost_name = \"{CLOUD}\"\n{extra}\n[[hubs]]\nhost_name = \"{OTHER}\"\nregistration = \"before_answer\"\n"),
        )
        .unwrap();
        path
    };
    let path = toml(&format!("connection_string_file = \"{}\"", file.display()));
    let config = edgedps::Config::load_with_env(Some(&path), []).expect("loads");
    assert_eq!(config.hub_credentials[CLOUD].key_name, "registryReadWrite");
    assert_eq!(
        config.hubs[1].registration,
        HubRegistrationMode::BeforeAnswer
    );

    let other = format!("HostName={OTHER};SharedAccessKeyName=p;SharedAccessKey={key}");
    let env = [("EDGEDPS__HUBS__1__CONNECTION_STRING".to_string(), other)];
    let config = edgedps::Config::load_with_env(Some(&toml("")), env).expect("loads");
    assert_eq!(config.hub_credentials[OTHER].key_name, "p");

    let bad: Vec<(Environment, String, &str)> = vec![
        (
            vec![],
            format!(
                "connection_string_file = \"{}\"",
                dir.path().join("missing").display()
            ),
            "hubs.connection_string_file",
        ),
        (
            vec![(
                "EDGEDPS__HUBS__0__CONNECTION_STRING".into(),
                "HostName=x".into(),
            )],
            String::new(),
            "EDGEDPS__HUBS__0__CONNECTION_STRING",
        ),
        (
            vec![(
                "EDGEDPS__HUBS__0__CONNECTION_STRING".into(),
                good.replace(CLOUD, OTHER),
            )],
            String::new(),
            "not this hub",
        ),
        (
            vec![("EDGEDPS__HUBS__7__CONNECTION_STRING".into(), good.clone())],
            String::new(),
            "no [[hubs]] entry 7",
        ),
    ];
    for (env, extra, says) in bad {
        let err = edgedps::Config::load_with_env(Some(&toml(&extra)), env)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(says), "{err}");
        assert!(!err.contains(&key), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_device_s_twin_follows_it_or_is_reset_as_its_policy_says() {
    let (a, b) = (FakeHub::start(CLOUD).await, FakeHub::start(OTHER).await);
    let server = server_with(&[&a, &b], HubRegistrationMode::AfterAnswer).await;
    let mut operator = server.operator().await;
    let key = enroll_at(&mut operator, "mover", CLOUD).await;
    assigned(&server, "mover", &key).await;
    hub_state(&server, "mover", "done", Duration::from_secs(10)).await;
    // At hub A the cloud changes the device's tags; the device is moved to B and its
    // data migrates (the default policy): B gets A's twin, not the enrollment's.
    a.set_tags("mover", json!({"site": "moved-with-me"}));
    let mut moved = enrollment_for("mover", &key, OTHER);
    operator.put("dps/enrollments/mover", moved.clone()).await;
    let outcome = assigned(&server, "mover", &key).await;
    assert_eq!(
        outcome.body["registrationState"]["substatus"],
        "deviceDataMigrated"
    );
    hub_state(&server, "mover", "done", Duration::from_secs(10)).await;
    assert_eq!(
        b.twin("mover").unwrap()["tags"],
        json!({"site": "moved-with-me"})
    );
    assert_eq!(
        b.twin("mover").unwrap()["properties"]["desired"]["interval"],
        30
    );
    // Moved back with its data reset: A gets the enrollment's twin again.
    moved["iotHubs"] = json!([CLOUD]);
    moved["reprovisionPolicy"] = json!({"updateHubAssignment": true, "migrateDeviceData": false});
    operator.put("dps/enrollments/mover", moved).await;
    let outcome = assigned(&server, "mover", &key).await;
    assert_eq!(
        outcome.body["registrationState"]["substatus"],
        "deviceDataReset"
    );
    hub_state(&server, "mover", "done", Duration::from_secs(10)).await;
    assert_eq!(a.twin("mover").unwrap()["tags"], json!({"site": "plant-7"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_an_issued_certificate_is_registered_with_its_thumbprint() {
    let hub = FakeHub::start(CLOUD).await;
    let server = Server::start_with(|config| {
        link(config, &hub, HubRegistrationMode::AfterAnswer);
        config.certificate_authorities = vec![edgedps::config::CertificateAuthorityConfig {
            name: "gateway".into(),
            cert: None,
            key: None,
            validity_days: 30,
        }];
    })
    .await;
    let mut operator = server.operator().await;
    let key = new_key();
    let mut e = enrollment_for("issued-cloud", &key, CLOUD);
    e["clientCertificateIssuancePolicy"] = json!({"certificateAuthorityName": "gateway"});
    operator.put("dps/enrollments/issued-cloud", e).await;
    let mut config = server.device("issued-cloud", sas(&key));
    config.csr = Some(
        edgedps_device::credentials::CertificateRequest::new("issued-cloud")
            .unwrap()
            .csr,
    );
    let outcome = edgedps_device::provision::register(&config, None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    hub_state(&server, "issued-cloud", "done", Duration::from_secs(10)).await;
    let record = server
        .running
        .responder
        .registration_record("issued-cloud")
        .unwrap()
        .unwrap();
    let issued = &record.issued_certificates[0].sha256_thumbprint;
    let identity = hub.identity("issued-cloud").unwrap();
    assert_eq!(identity["authentication"]["type"], "selfSigned");
    assert_eq!(
        identity["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        issued.as_str()
    );
}

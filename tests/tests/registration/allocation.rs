//! Allocation beyond hashing (PROTOCOL A6, C): geoLatency with hubs whose answers are
//! delayed by known amounts and one that cannot be reached; custom allocation by an
//! MQTT allocator (a rumqttc client) and by an HTTPS webhook, each failure a `failed`
//! 400207 with its reason; the `allocation` every record and event carries.

use std::time::Duration;

use edgedps_device::provision::register;
use edgedps_tests::webhook::{Behaviour, Webhook};
use edgedps_tests::*;
use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};

/// A listener that answers every connection's first bytes, after `delay`, with the
/// start of a TLS handshake record (what a hub's ServerHello begins with).
async fn delayed_tls_answer(delay: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut hello = [0u8; 5];
                if tcp.read_exact(&mut hello).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                let _ = tcp.write_all(&[0x16, 0x03, 0x03, 0x00, 0x00]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
        }
    });
    (port, task)
}

/// A port nobody listens on.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Waits until `hub`'s retained record shows a latency for which `check` holds.
async fn hub_latency(operator: &mut Operator, hub: &str, check: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("dps/hubs/{hub}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{hub}'s record never showed the latency expected"
        );
        if let Some((t, body)) = operator.next_publish(&topic).await {
            if t != topic || body.is_empty() {
                continue;
            }
            let record: Value = serde_json::from_slice(&body).expect("hub record");
            if check(&record["latency"]) {
                return record;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_latency_assigns_the_nearest_reachable_hub_and_never_an_unreachable_one() {
    let (near_port, near) = delayed_tls_answer(Duration::ZERO).await;
    let (mid_port, _mid) = delayed_tls_answer(Duration::from_millis(60)).await;
    let (far_port, _far) = delayed_tls_answer(Duration::from_millis(200)).await;
    let down_port = closed_port().await;
    let server = Server::start_with(|config| {
        config.hubs.clear();
        config.allocation.probe_interval_seconds = 1;
        config.allocation.probe_samples = 3;
        config.allocation.probe_timeout_ms = 1000;
    })
    .await;
    let mut operator = server.operator().await;
    operator.subscribe("dps/hubs/#").await;
    for (hub, port) in [
        ("near.example.net", near_port),
        ("mid.example.net", mid_port),
        ("far.example.net", far_port),
        ("down.example.net", down_port),
    ] {
        operator
            .put(
                &format!("dps/hubs/{hub}"),
                json!({"probeAddress": format!("127.0.0.1:{port}")}),
            )
            .await;
    }
    // No hub is dialled until something allocates by geoLatency: the group does.
    let group_key = new_key();
    let mut group = symmetric_group("geo", &group_key);
    group["allocationPolicy"] = json!("geoLatency");
    operator.put("dps/enrollment-groups/geo", group).await;
    // The figures are published on the hubs' records.
    let down = hub_latency(&mut operator, "down.example.net", |l| {
        l["reachable"] == false
    })
    .await;
    assert!(
        down["latency"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect")),
        "{down}"
    );
    hub_latency(&mut operator, "far.example.net", |l| l["reachable"] == true).await;
    let mid = hub_latency(&mut operator, "mid.example.net", |l| l["reachable"] == true).await;
    let mid_us = mid["latency"]["microseconds"]
        .as_u64()
        .expect("mid measured");
    assert!(mid_us >= 60_000, "{mid}");
    hub_latency(&mut operator, "near.example.net", |l| {
        l["reachable"] == true
    })
    .await;

    operator.subscribe("dps/events/registrations/#").await;
    for i in 0..6 {
        let id = format!("geo-{i}");
        let outcome = server.register_member(&group_key, &id, None).await;
        assert_eq!(
            outcome.assigned_hub(),
            Some("near.example.net"),
            "{}",
            outcome.body
        );
        // The answer does not carry the record's allocation.
        assert!(outcome.body["registrationState"]
            .get("allocation")
            .is_none());
        let allocation = &server.record(&id)["allocation"];
        assert_eq!(allocation["policy"], "geoLatency", "{allocation}");
        assert_eq!(allocation["hub"], "near.example.net", "{allocation}");
        let reason = allocation["reason"].as_str().expect("reason");
        assert!(
            reason.starts_with("geoLatency: ") && reason.contains(", next "),
            "{reason}"
        );
    }
    let (_, event) = operator
        .next_publish("dps/events/registrations/geo-")
        .await
        .expect("an event");
    let event: Value = serde_json::from_slice(&event).expect("event");
    assert_eq!(event["allocation"]["policy"], "geoLatency", "{event}");

    // The nearest hub stops answering: once measured so, the next nearest takes the
    // new devices, never the unreachable ones.
    near.abort();
    hub_latency(&mut operator, "near.example.net", |l| {
        l["reachable"] == false
    })
    .await;
    let id = "geo-after";
    let outcome = server.register_member(&group_key, id, None).await;
    assert_eq!(
        outcome.assigned_hub(),
        Some("mid.example.net"),
        "{}",
        outcome.body
    );

    // Only unreachable candidates: no hub, with the reason.
    let mut only_down = symmetric_enrollment("geo-down", &group_key);
    only_down["allocationPolicy"] = json!("geoLatency");
    only_down["iotHubs"] = json!(["down.example.net", "near.example.net"]);
    operator.put("dps/enrollments/geo-down", only_down).await;
    let outcome = register(&server.device("geo-down", sas(&group_key)), None)
        .await
        .expect("answered");
    assert_eq!(outcome.status_word(), Some("failed"), "{}", outcome.body);
    let state = &outcome.body["registrationState"];
    assert_eq!(state["errorCode"], 400208, "{state}");
    assert!(
        state["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("no candidate hub is reachable")),
        "{state}"
    );
}

/// A server with hub-a and hub-b linked, and custom allocation bounded by `timeout_ms`.
async fn two_hubs(timeout_ms: u64, adjust: impl FnOnce(&mut edgedps::Config)) -> Server {
    Server::start_with(|config| {
        config.hubs = vec![
            edgedps::config::HubConfig::named("hub-a.example.net"),
            edgedps::config::HubConfig::named("hub-b.example.net"),
        ];
        config.allocation.custom_timeout_ms = timeout_ms;
        adjust(config);
    })
    .await
}

/// An MQTT allocator: answers every request with `answer(request)`, or not at all when
/// it gives `None`; returns the requests it got.
fn allocator(
    server: &Server,
    name: &str,
    answer: impl Fn(&Value) -> Option<Vec<u8>> + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Value>,
) {
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let port = server.local_port;
    let name = name.to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let mut options = rumqttc::MqttOptions::new(format!("allocator-{name}"), "127.0.0.1", port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = subscribed(
            options,
            &format!("dps/allocators/{name}/requests/+"),
            QoS::AtLeastOnce,
        )
        .await;
        let _ = ready_tx.send(());
        loop {
            let Ok(event) = eventloop.poll().await else {
                return;
            };
            if let Event::Incoming(Packet::Publish(p)) = event {
                let request: Value = serde_json::from_slice(&p.payload).expect("request JSON");
                let _ = seen_tx.send(request.clone());
                let correlation = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
                if let Some(body) = answer(&request) {
                    let topic = format!("dps/allocators/{name}/responses/{correlation}");
                    client
                        .publish(topic, QoS::AtLeastOnce, false, body)
                        .await
                        .expect("answer");
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("allocator subscribed");
    (task, seen_rx)
}

fn custom_group(group_id: &str, key: &str, definition: Value) -> Value {
    let mut group = symmetric_group(group_id, key);
    group["allocationPolicy"] = json!("custom");
    group["customAllocationDefinition"] = definition;
    group["initialTwin"] = json!({"tags": {"from": "enrollment"}});
    group
}

/// The first registration event of `id` with `outcome`, within five seconds.
async fn registration_event(operator: &mut Operator, id: &str, outcome: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {outcome} event for `{id}`"
        );
        let Some((topic, body)) = operator
            .next_publish(&format!("dps/events/registrations/{id}"))
            .await
        else {
            continue;
        };
        let event: Value = serde_json::from_slice(&body).expect("event");
        if topic.ends_with(&format!("/{id}")) && event["outcome"] == outcome {
            return event;
        }
    }
}

fn failed_with(outcome: &Outcome, says: &str) {
    assert_eq!(outcome.status_word(), Some("failed"), "{}", outcome.body);
    let state = &outcome.body["registrationState"];
    assert_eq!(state["errorCode"], 400207, "{state}");
    let message = state["errorMessage"].as_str().unwrap_or_default();
    assert!(message.contains(says), "`{says}` not in: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_allocator_decides_the_hub_twin_and_payload() {
    let server = two_hubs(2000, |_| {}).await;
    let mut operator = server.operator().await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/plant",
            custom_group("plant", &group_key, json!({"mqttAllocator": "plant-7"})),
        )
        .await;
    // Nobody answers for plant-7 yet: failed at once, saying so.
    let outcome = server.register_member(&group_key, "early", None).await;
    failed_with(
        &outcome,
        "no MQTT client is subscribed to dps/allocators/plant-7/requests/#",
    );

    let (_allocator, mut seen) = allocator(&server, "plant-7", |request| {
        let id = request["deviceRuntimeContext"]["registrationId"]
            .as_str()?
            .to_owned();
        let answer = match id.as_str() {
            "unlinked" => json!({"iotHubHostName": "hub-z.example.net"}),
            "garbled" => return Some(b"<html>no</html>".to_vec()),
            "silent" => return None,
            "twin" => {
                json!({"iotHubHostName": "hub-b.example.net", "initialTwin": {"tags": {"from": "allocator"}}})
            }
            _ => json!({
                "iotHubHostName": "hub-b.example.net",
                "payload": {"line": 3, "model": request["deviceRuntimeContext"]["payload"]["model"]},
            }),
        };
        Some(answer.to_string().into_bytes())
    });
    operator.subscribe("dps/events/registrations/#").await;
    let outcome = server
        .register_member(&group_key, "press-1", Some(json!({"model": "m1"})))
        .await;
    assert_eq!(
        outcome.assigned_hub(),
        Some("hub-b.example.net"),
        "{}",
        outcome.body
    );
    let state = &outcome.body["registrationState"];
    assert_eq!(
        state["payload"],
        json!({"line": 3, "model": "m1"}),
        "{state}"
    );
    // The request is Azure's: the group without its keys, the device and its payload,
    // the hubs it may be given.
    let request = seen.recv().await.expect("the allocator was asked");
    let request = if request["deviceRuntimeContext"]["registrationId"] == "press-1" {
        request
    } else {
        seen.recv().await.expect("asked for press-1")
    };
    assert_eq!(request["deviceRuntimeContext"]["registrationId"], "press-1");
    assert_eq!(
        request["deviceRuntimeContext"]["payload"],
        json!({"model": "m1"})
    );
    assert_eq!(request["deviceRuntimeContext"]["symmetricKey"], json!({}));
    assert_eq!(request["enrollmentGroup"]["enrollmentGroupId"], "plant");
    assert_eq!(
        request["linkedHubs"],
        json!(["hub-a.example.net", "hub-b.example.net"])
    );
    assert!(
        !request.to_string().contains(&group_key),
        "a key reached the allocator"
    );
    // Answered in one round trip, its event goes out as any registration's.
    let event = registration_event(&mut operator, "press-1", "assigned").await;
    assert_eq!(event["allocation"]["policy"], "custom", "{event}");
    assert_eq!(event["assignedHub"], "hub-b.example.net", "{event}");
    // The record says who decided.
    let allocation = &server.record("press-1")["allocation"];
    assert_eq!(allocation["policy"], "custom");
    assert_eq!(allocation["hub"], "hub-b.example.net");
    let reason = allocation["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("custom: MQTT allocator `plant-7` answered hub-b.example.net in "),
        "{reason}"
    );

    // The allocator's twin replaces the enrollment's.
    let outcome = server.register_member(&group_key, "twin", None).await;
    assert_eq!(
        outcome.body["registrationState"]["initialTwin"]["tags"]["from"], "allocator",
        "{}",
        outcome.body
    );
    // Every failure is `failed` with 400207 and its reason, and an event.
    failed_with(
        &server.register_member(&group_key, "unlinked", None).await,
        "hub `hub-z.example.net`, which is not one of the linked hubs offered",
    );
    failed_with(
        &server.register_member(&group_key, "garbled", None).await,
        "not an allocation",
    );
    let silent = server.register_member(&group_key, "silent", None).await;
    failed_with(&silent, "did not answer within 2000 ms");
    assert!(silent.polls >= 1, "a late answer is polled for: {silent:?}");
    let event = registration_event(&mut operator, "silent", "failed").await;
    assert_eq!(event["errorCode"], 400207, "{event}");
    assert_eq!(event["allocation"]["policy"], "custom", "{event}");
    // A failed device has no hub record and may try again.
    assert_eq!(server.record("press-1")["status"], "assigned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_allocator_answers_by_poll_while_other_devices_provision_at_full_speed() {
    let server = two_hubs(3000, |config| {
        config.limits.registrations_per_second = 10_000
    })
    .await;
    let mut operator = server.operator().await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/slow",
            custom_group("slow", &group_key, json!({"mqttAllocator": "slow"})),
        )
        .await;
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let (_allocator, _seen) = allocator(&server, "slow", move |_| {
        // Holds every answer until the other devices are done.
        let _ = release_rx
            .lock()
            .map(|rx| rx.recv_timeout(Duration::from_secs(10)));
        Some(
            json!({"iotHubHostName": "hub-a.example.net", "payload": {"slow": true}})
                .to_string()
                .into_bytes(),
        )
    });
    let waiting = {
        let config = server.member(&group_key, "slow-1");
        tokio::spawn(async move { register(&config, None).await })
    };
    // 200 devices of a hashed group meanwhile.
    let outcomes = server
        .register_group_devices(&mut operator, "busy", 200)
        .await;
    assert!(
        outcomes.iter().all(|o| o.status_word() == Some("assigned")),
        "every other device is assigned"
    );
    assert!(
        !waiting.is_finished(),
        "the slow allocation was still waiting"
    );
    release_tx.send(()).expect("release");
    let slow = waiting.await.expect("task").expect("answered");
    assert_eq!(slow.status_word(), Some("assigned"), "{}", slow.body);
    assert!(
        slow.polls >= 1,
        "the register was answered 202 first: {slow:?}"
    );
    assert_eq!(
        slow.body["registrationState"]["payload"],
        json!({"slow": true})
    );
}

/// A server trusting the test CA for webhooks, with hub-a and hub-b.
async fn webhook_server(timeout_ms: u64) -> Server {
    let anchors = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(anchors.path(), &pki().server_ca.pem).expect("anchors");
    let path = anchors.into_temp_path().keep().expect("keep");
    two_hubs(timeout_ms, move |config| {
        config.cloud.trust_anchors_file = Some(path);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_allocates_in_azures_format_and_each_bad_answer_fails_with_its_reason() {
    let server = webhook_server(1500).await;
    let mut operator = server.operator().await;
    let hook = Webhook::start(
        true,
        Behaviour::Assign {
            hub: "hub-b.example.net".into(),
            twin: Some(json!({"properties": {"desired": {"rate": 5}}})),
        },
    )
    .await;
    let group_key = new_key();
    operator
        .put(
            "dps/enrollment-groups/hooked",
            custom_group(
                "hooked",
                &group_key,
                json!({"webhookUrl": hook.url(), "apiVersion": "2021-10-01"}),
            ),
        )
        .await;
    let outcome = server
        .register_member(&group_key, "hooked-1", Some(json!({"site": "north"})))
        .await;
    assert_eq!(
        outcome.assigned_hub(),
        Some("hub-b.example.net"),
        "{}",
        outcome.body
    );
    let state = &outcome.body["registrationState"];
    assert_eq!(
        state["payload"],
        json!({"allocatedBy": "webhook", "echo": {"site": "north"}}),
        "{state}"
    );
    assert_eq!(
        state["initialTwin"]["properties"]["desired"]["rate"], 5,
        "{state}"
    );
    let seen = hook.seen();
    let asked = seen.last().expect("the webhook was called");
    assert_eq!(
        asked.path_and_query,
        "/api/allocate?code=k3y&api-version=2021-10-01"
    );
    assert!(asked
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json")));
    assert_eq!(
        asked.body["deviceRuntimeContext"]["payload"],
        json!({"site": "north"})
    );
    assert_eq!(asked.body["enrollmentGroup"]["enrollmentGroupId"], "hooked");
    let reason = server.record("hooked-1")["allocation"]["reason"].clone();
    assert!(
        reason
            .as_str()
            .is_some_and(|r| r.starts_with("custom: webhook answered hub-b.example.net")),
        "{reason}"
    );

    for (n, (behaviour, says)) in [
        (
            Behaviour::Status(500, "boom".into()),
            "the webhook answered 500: boom",
        ),
        (
            Behaviour::Assign {
                hub: "hub-z.example.net".into(),
                twin: None,
            },
            "not one of the linked hubs offered",
        ),
        (Behaviour::Huge(10 * 1024 * 1024), "larger than 65536 bytes"),
        (
            Behaviour::Redirect,
            "302 (a redirect); redirects are not followed",
        ),
        (Behaviour::Hang, "did not answer within 1500 ms"),
        (
            Behaviour::Status(200, "not json".into()),
            "not an allocation",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        hook.behave(behaviour);
        let outcome = server
            .register_member(&group_key, &format!("bad-{n}"), None)
            .await;
        failed_with(&outcome, says);
        // The operator sees why on the record's event; other devices are unaffected.
        bystander_provisions(&server, &mut operator).await;
    }

    // A webhook that cannot be reached is tried again, then fails.
    let dead = closed_port().await;
    let mut enrollment = symmetric_enrollment("unreachable", &group_key);
    enrollment["allocationPolicy"] = json!("custom");
    enrollment["customAllocationDefinition"] =
        json!({"webhookUrl": format!("https://localhost:{dead}/api")});
    operator
        .put("dps/enrollments/unreachable", enrollment)
        .await;
    let outcome = register(&server.device("unreachable", sas(&group_key)), None)
        .await
        .expect("answered");
    failed_with(&outcome, "cannot connect to the webhook at localhost");
    failed_with(&outcome, "(3 attempts)");

    // Plain HTTP is allowed to loopback, refused elsewhere at the write.
    let plain = Webhook::start(
        false,
        Behaviour::Assign {
            hub: "hub-a.example.net".into(),
            twin: None,
        },
    )
    .await;
    let mut enrollment = symmetric_enrollment("plain", &group_key);
    enrollment["allocationPolicy"] = json!("custom");
    enrollment["customAllocationDefinition"] = json!({"webhookUrl": plain.url()});
    operator
        .put("dps/enrollments/plain", enrollment.clone())
        .await;
    let outcome = register(&server.device("plain", sas(&group_key)), None)
        .await
        .expect("answered");
    assert_eq!(
        outcome.assigned_hub(),
        Some("hub-a.example.net"),
        "{}",
        outcome.body
    );
    assert_eq!(
        plain.seen()[0].body["individualEnrollment"]["registrationId"],
        "plain"
    );
    assert!(!plain.seen()[0].body.to_string().contains(&group_key));
    enrollment["customAllocationDefinition"] =
        json!({"webhookUrl": "http://alloc.example.net/api?code=secret"});
    let refused = operator
        .write(
            "dps/enrollments/plain",
            &serde_json::to_vec(&enrollment).expect("json"),
        )
        .await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("only to a loopback address")),
        "{refused}"
    );
}

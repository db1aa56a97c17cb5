//! The topic ACL end to end: a provisioned device uses `devices/{deviceId}/#` through
//! the router and nothing else; operators use anything.

use std::time::Duration;

use edgedps_device::provision::{connect, exchange, wait_for};
use edgedps_tests::*;
use rumqttc::{Packet, QoS, SubscribeReasonCode};

async fn provisioned(
    server: &Server,
    operator: &mut Operator,
    id: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let key = new_key();
    operator
        .put(
            &format!("dps/enrollments/{id}"),
            symmetric_enrollment(id, &key),
        )
        .await;
    let config = server.device(id, sas(&key));
    let (client, mut eventloop) = connect(&config).await.expect("connects");
    let outcome = exchange(&config, &client, &mut eventloop, None)
        .await
        .expect("registers");
    assert_eq!(outcome.status_word(), Some("assigned"));
    (client, eventloop)
}

async fn suback(
    client: &rumqttc::AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    filter: &str,
) -> SubscribeReasonCode {
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    match wait_for(eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await {
        Ok(Packet::SubAck(ack)) => ack.return_codes[0],
        other => panic!("no SUBACK for {filter}: {other:?}"),
    }
}

/// True when the connection is closed within a second.
async fn closed(eventloop: &mut rumqttc::EventLoop) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return false,
            Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_subscribes_to_its_own_topics_only() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let (client, mut eventloop) = provisioned(&server, &mut operator, "acl-dev-1").await;
    assert_eq!(
        suback(&client, &mut eventloop, "devices/acl-dev-1/#").await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
    for filter in [
        "devices/acl-dev-2/#",
        "devices/+/messages/events",
        "#",
        "dps/#",
        "dps/enrollments/acl-dev-1",
        "$dps/registrations/res/+",
        "$SYS/#",
    ] {
        assert_eq!(
            suback(&client, &mut eventloop, filter).await,
            SubscribeReasonCode::Failure,
            "{filter}"
        );
    }
    bystander_provisions(&server, &mut operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_traffic_flows_through_the_router_both_ways() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let (client, mut eventloop) = provisioned(&server, &mut operator, "acl-flow").await;
    operator
        .subscribe("devices/acl-flow/messages/events/#")
        .await;
    suback(
        &client,
        &mut eventloop,
        "devices/acl-flow/messages/devicebound/#",
    )
    .await;

    client
        .publish(
            "devices/acl-flow/messages/events/temp",
            QoS::AtLeastOnce,
            false,
            "21.5",
        )
        .await
        .unwrap();
    let (topic, payload) = tokio::select! {
        got = operator.next_publish("devices/acl-flow/") => got.expect("operator receives telemetry"),
        _ = async { loop { let _ = eventloop.poll().await; } } => unreachable!(),
    };
    assert_eq!(topic, "devices/acl-flow/messages/events/temp");
    assert_eq!(payload, b"21.5");

    operator
        .client
        .publish(
            "devices/acl-flow/messages/devicebound/cmd",
            QoS::AtMostOnce,
            false,
            "reboot",
        )
        .await
        .unwrap();
    let operator_loop = async {
        loop {
            let _ = operator.eventloop.poll().await;
        }
    };
    let received = tokio::select! {
        p = wait_for(&mut eventloop, "a command", |p| matches!(p, Packet::Publish(p) if p.topic.ends_with("/cmd"))) => p,
        _ = operator_loop => unreachable!(),
    };
    match received {
        Ok(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"reboot"),
        other => panic!("device did not receive its command: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_publishing_outside_its_topics_is_disconnected_and_others_are_unaffected() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    for (i, topic) in [
        "devices/victim/messages/events/",
        "dps/enrollments/attacker-0",
        "dps/registrations/victim",
        "$dps/registrations/PUT/iotdps-unknown/?$rid=1",
        "elsewhere/topic",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("attacker-{i}");
        let (client, mut eventloop) = provisioned(&server, &mut operator, &id).await;
        client
            .publish(topic, QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        assert!(
            closed(&mut eventloop).await,
            "publish to {topic} did not close the session"
        );
    }
    // The operator plane was not touched and another device still provisions.
    let (client, mut eventloop) = provisioned(&server, &mut operator, "bystander").await;
    assert_eq!(
        suback(&client, &mut eventloop, "devices/bystander/#").await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprovisioned_device_may_use_nothing_outside_dps() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("fresh").await;
    let (client, mut eventloop) = connect(&server.device("fresh", sas(&key))).await.unwrap();
    assert_eq!(
        suback(&client, &mut eventloop, "devices/fresh/#").await,
        SubscribeReasonCode::Failure
    );
    // Drain so the event loop is idle, then check the session is still usable for DPS.
    let _ = tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await;
    assert!(matches!(
        suback(&client, &mut eventloop, "$dps/registrations/res/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    ));
    bystander_provisions(&server, &mut operator).await;
}

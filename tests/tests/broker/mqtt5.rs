//! The gateway's MQTT broker for MQTT 5 clients (issue 10): properties passed through,
//! subscription identifiers, message expiry, will delay, Retain Handling and Retain As
//! Published, on full MQTT sessions of the local listener.

use std::time::Duration;

use bytes::Bytes;
use edgedps_tests::*;
use rumqttc::v5::mqttbytes::v5::{
    Filter, LastWill, LastWillProperties, Packet, Publish, PublishProperties, RetainForwardRule,
    SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

async fn client5(
    server: &Server,
    id: &str,
    adjust: impl FnOnce(&mut MqttOptions),
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", server.local_port);
    options.set_keep_alive(Duration::from_secs(30));
    adjust(&mut options);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
        other => panic!("{id}: no CONNACK: {other:?}"),
    }
    (client, eventloop)
}

async fn until(eventloop: &mut EventLoop, what: &str, done: impl Fn(&Packet) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(packet))) if done(&packet) => return,
            Ok(Ok(_)) => {}
            other => panic!("no {what}: {other:?}"),
        }
    }
}

/// Subscribes `client` to `filter` at QoS 1 and waits for the SUBACK.
async fn subscribe1(client: &AsyncClient, eventloop: &mut EventLoop, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    until(eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(..))).await;
}

/// Disconnects `client` and lets its event loop run out.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

async fn publishes_within(eventloop: &mut EventLoop, wait: Duration) -> Vec<Publish> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut received = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return received,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => received.push(p),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_pass_through_with_the_subscription_identifier_and_nothing_of_ours() {
    let server = Server::start().await;
    let (sub, mut sub_loop) = client5(&server, "v5-props-sub", |_| {}).await;
    let properties = SubscribeProperties {
        id: Some(7),
        user_properties: Vec::new(),
    };
    sub.subscribe_with_properties("app/props", QoS::AtLeastOnce, properties)
        .await
        .unwrap();
    until(&mut sub_loop, "SUBACK", |p| matches!(p, Packet::SubAck(..))).await;
    let (publisher, mut pub_loop) = client5(&server, "v5-props-pub", |_| {}).await;
    let sent = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        response_topic: Some("app/reply".into()),
        correlation_data: Some(Bytes::from_static(b"c-1")),
        ..Default::default()
    };
    publisher
        .publish_with_properties("app/props", QoS::AtLeastOnce, false, "hi", sent)
        .await
        .unwrap();
    until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(..))).await;
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let props = got[0].properties.clone().expect("properties");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(props.response_topic.as_deref(), Some("app/reply"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"c-1"[..]));
    assert_eq!(props.subscription_identifiers, vec![7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_is_not_delivered_and_a_late_one_carries_what_is_left() {
    let server = Server::start().await;
    let (publisher, mut pub_loop) = client5(&server, "v5-exp-pub", |_| {}).await;
    for (topic, seconds) in [("app/exp/short", 1), ("app/exp/long", 100)] {
        let properties = PublishProperties {
            message_expiry_interval: Some(seconds),
            ..Default::default()
        };
        publisher
            .publish_with_properties(topic, QoS::AtLeastOnce, true, "x", properties)
            .await
            .unwrap();
        until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(..))).await;
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (sub, mut sub_loop) = client5(&server, "v5-exp-sub", |_| {}).await;
    sub.subscribe("app/exp/#", QoS::AtLeastOnce).await.unwrap();
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(&got[0].topic[..], b"app/exp/long");
    let left = got[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(matches!(left, Some(90..=98)), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_and_retain_as_published_are_honoured() {
    let server = Server::start().await;
    let (publisher, mut pub_loop) = client5(&server, "v5-ret-pub", |_| {}).await;
    publisher
        .publish("app/rh", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(..))).await;
    let (sub, mut sub_loop) = client5(&server, "v5-ret-sub", |_| {}).await;
    let mut never = Filter::new("app/rh", QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    never.preserve_retain = true;
    sub.subscribe_many(vec![never]).await.unwrap();
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert!(
        got.is_empty(),
        "Retain Handling 2 sends no retained message: {got:?}"
    );
    publisher
        .publish("app/rh", QoS::AtLeastOnce, true, "live")
        .await
        .unwrap();
    until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(..))).await;
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].retain,
        "Retain As Published keeps RETAIN on a live delivery"
    );
}

/// The operator plane's records are read from the store for a new subscription
/// (`broker/src/session/records.rs`), with the MQTT 5 rules of retained messages:
/// the Subscription Identifier, Retain Handling 1 and 2, Retain As Published on a
/// live change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_rules_of_retained_messages() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    operator.enroll("v5-record").await;
    let (sub, mut sub_loop) = client5(&server, "v5-records", |_| {}).await;

    let properties = SubscribeProperties {
        id: Some(11),
        user_properties: Vec::new(),
    };
    let mut first = Filter::new("dps/enrollments/+", QoS::AtLeastOnce);
    first.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    first.preserve_retain = true;
    sub.subscribe_many_with_properties(vec![first.clone()], properties)
        .await
        .unwrap();
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].topic, Bytes::from("dps/enrollments/v5-record"));
    assert!(got[0].retain);
    assert_eq!(got[0].qos, QoS::AtMostOnce);
    let ids = got[0]
        .properties
        .as_ref()
        .map(|p| p.subscription_identifiers.clone());
    assert_eq!(ids, Some(vec![11]));

    // Retain Handling 1 on a subscription that exists: nothing again.
    sub.subscribe_many(vec![first]).await.unwrap();
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert!(
        got.is_empty(),
        "Retain Handling 1, existing subscription: {got:?}"
    );

    // Retain Handling 2: never on subscribe; Retain As Published on a live change.
    let mut never = Filter::new("dps/enrollments/#", QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    never.preserve_retain = true;
    sub.subscribe_many(vec![never]).await.unwrap();
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert!(got.is_empty(), "Retain Handling 2: {got:?}");
    operator.enroll("v5-record-2").await;
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    assert!(!got.is_empty(), "the live change");
    for p in &got {
        assert_eq!(p.topic, Bytes::from("dps/enrollments/v5-record-2"));
        assert!(
            p.retain,
            "Retain As Published keeps RETAIN on a live record"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_waits_for_its_delay_and_a_quick_return_cancels_it() {
    let server = Server::start().await;
    let (watcher, mut watch_loop) = client5(&server, "v5-will-watch", |_| {}).await;
    subscribe1(&watcher, &mut watch_loop, "app/will5/#").await;
    let with_will = |topic: &'static str| {
        move |options: &mut MqttOptions| {
            let properties = LastWillProperties {
                delay_interval: Some(2),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            };
            options.set_last_will(LastWill::new(
                topic,
                "gone",
                QoS::AtLeastOnce,
                false,
                Some(properties),
            ));
            options.set_session_expiry_interval(Some(60));
            options.set_clean_start(false);
        }
    };
    // Lost, and not back: the will comes after its delay.
    let (_lost, lost_loop) = client5(&server, "v5-will-lost", with_will("app/will5/lost")).await;
    drop(lost_loop);
    let early = publishes_within(&mut watch_loop, Duration::from_millis(1200)).await;
    assert!(early.is_empty(), "sent before its delay: {early:?}");
    let late = publishes_within(&mut watch_loop, Duration::from_secs(3)).await;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(&late[0].topic[..], b"app/will5/lost");

    // Lost, and back within the delay: no will.
    let (_back, back_loop) = client5(&server, "v5-will-back", with_will("app/will5/back")).await;
    drop(back_loop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_again, _again_loop) = client5(&server, "v5-will-back", with_will("app/will5/back")).await;
    let none = publishes_within(&mut watch_loop, Duration::from_secs(3)).await;
    assert!(
        none.is_empty(),
        "a will after the client came back: {none:?}"
    );
}

/// Writes one MQTT 5 packet (rumqttc's codec) on a raw socket.
async fn write5(stream: &mut tokio::net::TcpStream, packet: Packet) {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    packet.write(&mut out, None).unwrap();
    stream.write_all(&out).await.unwrap();
}

/// Reads one MQTT 5 packet from a raw socket.
async fn read5(stream: &mut tokio::net::TcpStream, buffer: &mut bytes::BytesMut) -> Packet {
    use tokio::io::AsyncReadExt;
    loop {
        match Packet::read(buffer, None) {
            Ok(packet) => return packet,
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("bad packet: {e}"),
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "connection closed");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_publish_by_topic_alias_within_the_maximum_the_connack_gives() {
    use rumqttc::v5::mqttbytes::v5::Connect;
    let server = Server::start().await;
    let (sub, mut sub_loop) = client5(&server, "v5-alias-sub", |_| {}).await;
    subscribe1(&sub, &mut sub_loop, "app/alias").await;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let mut buffer = bytes::BytesMut::new();
    let connect = Connect {
        keep_alive: 30,
        client_id: "v5-alias-pub".into(),
        clean_start: true,
        properties: None,
    };
    write5(&mut stream, Packet::Connect(connect, None, None)).await;
    let Packet::ConnAck(ack) = read5(&mut stream, &mut buffer).await else {
        panic!("no CONNACK");
    };
    let maximum = ack.properties.and_then(|p| p.topic_alias_max);
    assert_eq!(maximum, Some(32));
    let aliased = |topic: &'static str, payload: &'static str, pkid: u16, alias: u16| {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload, None);
        publish.pkid = pkid;
        publish.properties = Some(PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        });
        Packet::Publish(publish)
    };
    // Sets alias 3, then uses it with an empty topic.
    write5(&mut stream, aliased("app/alias", "by name", 1, 3)).await;
    write5(&mut stream, aliased("", "by alias", 2, 3)).await;
    for _ in 0..2 {
        assert!(matches!(
            read5(&mut stream, &mut buffer).await,
            Packet::PubAck(_)
        ));
    }
    let got = publishes_within(&mut sub_loop, Duration::from_secs(1)).await;
    let seen: Vec<(&[u8], &[u8])> = got.iter().map(|p| (&p.topic[..], &p.payload[..])).collect();
    assert_eq!(
        seen,
        vec![
            (&b"app/alias"[..], &b"by name"[..]),
            (&b"app/alias"[..], &b"by alias"[..])
        ]
    );
    // The alias does not reach the subscriber.
    assert!(got.iter().all(|p| p
        .properties
        .as_ref()
        .is_none_or(|props| props.topic_alias.is_none())));
    // An alias never set is a protocol error: the connection closes.
    write5(&mut stream, aliased("", "unknown", 3, 4)).await;
    let mut rest = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_expiry_interval_runs_out() {
    let server = Server::start().await;
    let connect = |expiry: u32| {
        move |options: &mut MqttOptions| {
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(expiry));
        }
    };
    let session_present = |packet: &Packet| match packet {
        Packet::ConnAck(ack) => Some(ack.session_present),
        _ => None,
    };
    for (id, expiry, away, kept) in [("v5-exp-1", 1, 2000, false), ("v5-exp-30", 30, 1200, true)] {
        let (client, mut eventloop) = client5(&server, id, connect(expiry)).await;
        subscribe1(&client, &mut eventloop, "app/expiry").await;
        disconnect(&client, &mut eventloop).await;
        tokio::time::sleep(Duration::from_millis(away)).await;
        let mut options = MqttOptions::new(id, "127.0.0.1", server.local_port);
        connect(expiry)(&mut options);
        let (_client, mut eventloop) = AsyncClient::new(options, 8);
        let present = match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(packet))) => session_present(&packet),
            other => panic!("no CONNACK: {other:?}"),
        };
        assert_eq!(present, Some(kept), "{id} after {away} ms away");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_messages_in_flight_than_the_client_s_receive_maximum() {
    use rumqttc::v5::mqttbytes::v5::Connect;
    use rumqttc::v5::mqttbytes::v5::{ConnectProperties, PubAck, Subscribe};
    let server = Server::start().await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let mut buffer = bytes::BytesMut::new();
    let mut properties = ConnectProperties::new();
    properties.receive_maximum = Some(2);
    let connect = Connect {
        keep_alive: 30,
        client_id: "v5-recv-max".into(),
        clean_start: true,
        properties: Some(properties),
    };
    write5(&mut stream, Packet::Connect(connect, None, None)).await;
    assert!(matches!(
        read5(&mut stream, &mut buffer).await,
        Packet::ConnAck(_)
    ));
    let subscribe = Subscribe::new(Filter::new("app/window", QoS::AtLeastOnce), None);
    write5(&mut stream, Packet::Subscribe(subscribe)).await;
    assert!(matches!(
        read5(&mut stream, &mut buffer).await,
        Packet::SubAck(_)
    ));

    let (publisher, mut pub_loop) = client5(&server, "v5-recv-pub", |_| {}).await;
    let driving = tokio::spawn(async move {
        publishes_within(&mut pub_loop, Duration::from_secs(10)).await;
    });
    for n in 0..5 {
        publisher
            .publish("app/window", QoS::AtLeastOnce, false, n.to_string())
            .await
            .unwrap();
    }
    // Two in flight, and nothing more until one is acknowledged.
    let mut in_flight = Vec::new();
    for _ in 0..2 {
        match read5(&mut stream, &mut buffer).await {
            Packet::Publish(p) => in_flight.push(p),
            other => panic!("{other:?}"),
        }
    }
    use tokio::io::AsyncReadExt;
    let mut more = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(700), stream.read(&mut more)).await;
    assert!(
        early.is_err(),
        "a third message before an acknowledgement: {early:?}"
    );
    write5(
        &mut stream,
        Packet::PubAck(PubAck::new(in_flight[0].pkid, None)),
    )
    .await;
    let Packet::Publish(third) = read5(&mut stream, &mut buffer).await else {
        panic!("no third message");
    };
    assert_eq!(&third.payload[..], b"2");
    assert!(third.pkid != in_flight[1].pkid);
    driving.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_taken_over_is_told_so_with_reason_0x8e() {
    use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
    let server = Server::start().await;
    let (_first, mut first_loop) = client5(&server, "v5-twice", |_| {}).await;
    let (_second, _second_loop) = client5(&server, "v5-twice", |_| {}).await;
    let told = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first_loop.poll().await {
                Ok(_) => {}
                // rumqttc ends its event loop with what the server's DISCONNECT said.
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => return Some(reason_code),
                Err(_) => return None,
            }
        }
    })
    .await;
    assert_eq!(told, Ok(Some(DisconnectReasonCode::SessionTakenOver)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_session_s_queue_keeps_the_properties_and_the_expiry_of_its_messages() {
    let server = Server::start().await;
    let keep = |options: &mut MqttOptions| {
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(60));
    };
    let (away, mut away_loop) = client5(&server, "v5-queue", keep).await;
    subscribe1(&away, &mut away_loop, "app/v5queue").await;
    disconnect(&away, &mut away_loop).await;
    let offline = server.running.offline.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !offline.holds("v5-queue") {
        assert!(tokio::time::Instant::now() < deadline, "never offline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (publisher, mut pub_loop) = client5(&server, "v5-queue-pub", |_| {}).await;
    for (payload, expiry) in [("short", 1), ("long", 60)] {
        let properties = PublishProperties {
            message_expiry_interval: Some(expiry),
            user_properties: vec![("k".into(), payload.into())],
            ..Default::default()
        };
        publisher
            .publish_with_properties("app/v5queue", QoS::AtLeastOnce, false, payload, properties)
            .await
            .unwrap();
        until(&mut pub_loop, "PUBACK", |p| matches!(p, Packet::PubAck(..))).await;
    }
    // The short one expires while the client is away.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_back, mut back_loop) = client5(&server, "v5-queue", keep).await;
    let queued = publishes_within(&mut back_loop, Duration::from_secs(2)).await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(&queued[0].payload[..], b"long");
    let properties = queued[0].properties.clone().unwrap_or_default();
    assert_eq!(
        properties.user_properties,
        vec![("k".into(), "long".into())]
    );
    assert!(
        matches!(properties.message_expiry_interval, Some(55..=58)),
        "{:?}",
        properties.message_expiry_interval
    );
}

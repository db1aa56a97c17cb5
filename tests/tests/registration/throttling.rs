//! Throttling and connection limits end to end: 429 with retry-after, never a crash or
//! a stall, and other devices unaffected.

use std::time::Duration;

use edgedps_device::provision::{connect, exchange, register, wait_for};
use edgedps_tests::*;
use rumqttc::{Packet, QoS};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_poll_within_ten_seconds_gets_429_with_retry_after() {
    let server = Server::start_with(|c| c.always_accept_then_poll = true).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("poller").await;
    let (client, mut eventloop) = server.listening("poller", &key).await;
    let accepted = ask(
        &client,
        &mut eventloop,
        "$dps/registrations/PUT/iotdps-register/?$rid=r",
        Vec::new(),
    )
    .await;
    assert_eq!(accepted.status, 202);
    let body: serde_json::Value = serde_json::from_slice(&accepted.body).unwrap();
    let operation = body["operationId"].as_str().unwrap().to_owned();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let topic = format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=p{i}&operationId={operation}"
        );
        let answer = ask(&client, &mut eventloop, &topic, Vec::new()).await;
        statuses.push((answer.status, answer.retry_after));
    }
    assert!(statuses[..5].iter().all(|(s, _)| *s == 200), "{statuses:?}");
    let (status, retry_after) = statuses[5];
    assert_eq!(status, 429);
    assert!(matches!(retry_after, Some(1..=10)), "{retry_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_rate_limit_throttles_and_every_device_is_assigned_eventually() {
    let server = Server::start_with(|c| c.limits.registrations_per_second = 2).await;
    let mut operator = server.operator().await;
    let mut throttled = 0;
    for outcome in server
        .register_group_devices(&mut operator, "rated", 6)
        .await
    {
        assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
        throttled += outcome.throttled;
    }
    assert!(
        throttled >= 1,
        "six registrations at 2/s were never throttled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_registration_limit_answers_429() {
    let server = Server::start_with(|c| c.limits.registrations_per_device_per_minute = 2).await;
    let mut operator = server.operator().await;
    let key = operator.enroll("eager").await;
    let config = server.device("eager", sas(&key));
    let (client, mut eventloop) = connect(&config).await.unwrap();
    exchange(&config, &client, &mut eventloop, None)
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..2 {
        client
            .publish(
                format!("$dps/registrations/PUT/iotdps-register/?$rid=again{i}"),
                QoS::AtLeastOnce,
                false,
                "",
            )
            .await
            .unwrap();
        let Ok(Packet::Publish(p)) = wait_for(&mut eventloop, "answer", |p| {
            matches!(p, Packet::Publish(_))
        })
        .await
        else {
            panic!("no answer");
        };
        statuses.push(response_status(&p.topic));
    }
    assert_eq!(statuses[0].0, 200);
    assert_eq!(statuses[1].0, 429);
    assert!(matches!(statuses[1].1, Some(1..=60)));
    // Another device is not affected.
    let other_key = operator.enroll("calm").await;
    let outcome = register(&server.device("calm", sas(&other_key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_fast() {
    let server = Server::start_with(|c| {
        c.limits.max_connections = 2;
        c.limits.connect_timeout_ms = 30_000;
    })
    .await;
    let _first = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let _second = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(("127.0.0.1", server.local_port))
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_beyond_the_limit_are_refused() {
    let server = Server::start_with(|c| c.limits.max_subscriptions_per_session = 3).await;
    let mut operator = server.operator().await;
    // The operator client already holds `dps/admin/results/#`.
    let mut codes = Vec::new();
    for filter in ["a/#", "b/#", "c/#", "a/#"] {
        operator
            .client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        match wait_for(&mut operator.eventloop, "SUBACK", |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await
        {
            Ok(Packet::SubAck(ack)) => codes.push(ack.return_codes[0]),
            other => panic!("{other:?}"),
        }
    }
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    assert_eq!(
        codes,
        vec![
            Success(QoS::AtMostOnce),
            Success(QoS::AtMostOnce),
            Failure,
            Success(QoS::AtMostOnce)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_bodies_over_the_limit_are_rejected() {
    let server = Server::start_with(|c| c.limits.max_enrollment_body_size = 2048).await;
    let mut operator = server.operator().await;
    let mut big = symmetric_enrollment("big", &new_key());
    big["initialTwin"] = serde_json::json!({"tags": {"filler": "x".repeat(4096)}});
    let result = operator
        .write("dps/enrollments/big", &serde_json::to_vec(&big).unwrap())
        .await;
    assert_eq!(result["ok"], false);
    assert_eq!(result["errorCode"], 400);
    assert!(result["message"]
        .as_str()
        .unwrap_or_default()
        .contains("max_enrollment_body_size"));
    // A body under the limit is accepted.
    operator.enroll("small").await;
}

/// Opens a TLS connection and sends only its ClientHello: the server then holds a
/// handshake slot for it until the client goes away or the deadline passes.
async fn client_hello_only(port: u16) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let config = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None)
        .expect("client TLS");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = rustls::ClientConnection::new(config, name).expect("client");
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).expect("ClientHello");
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(&hello).await.unwrap();
    tcp
}

/// Did the server start answering (its ServerHello) within `within`?
async fn answered(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_limit_wait_for_a_slot() {
    let server = Server::start_with(|c| c.limits.max_handshakes = 2).await;
    let port = server.devices_port;
    // Two handshakes in progress take both slots.
    let mut first = client_hello_only(port).await;
    let mut second = client_hello_only(port).await;
    assert!(answered(&mut first, Duration::from_secs(5)).await);
    assert!(answered(&mut second, Duration::from_secs(5)).await);
    // The third is queued: no ServerHello while the slots are held.
    let mut third = client_hello_only(port).await;
    assert!(
        !answered(&mut third, Duration::from_millis(1_500)).await,
        "a third handshake ran beside two with limits.max_handshakes = 2"
    );
    // One of the two goes away; the third proceeds at once.
    drop(first);
    assert!(
        answered(&mut third, Duration::from_secs(5)).await,
        "the freed slot was not given to the waiting handshake"
    );
    drop((second, third));

    // The control: with a third slot the same third handshake is answered at once.
    let roomy = Server::start_with(|c| c.limits.max_handshakes = 3).await;
    let held = [
        client_hello_only(roomy.devices_port).await,
        client_hello_only(roomy.devices_port).await,
    ];
    let mut third = client_hello_only(roomy.devices_port).await;
    assert!(answered(&mut third, Duration::from_secs(5)).await);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_take_no_handshake_slot() {
    // One slot; a hundred silent connections. The slot is only taken for a ClientHello.
    let server = Server::start_with(|c| c.limits.max_handshakes = 1).await;
    let mut operator = server.operator().await;
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", server.devices_port))
                .await
                .unwrap(),
        );
    }
    let key = operator.enroll("past-the-silent").await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(5),
        register(&server.device("past-the-silent", sas(&key)), None),
    )
    .await
    .expect("registered well before the handshake deadline (10 s)")
    .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"));
    drop(silent);
}

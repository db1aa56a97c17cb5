//! MQTT over WebSocket (`/$iothub/websocket`, subprotocol `mqtt`) on the HTTPS listener
//! and on a `[listeners.websocket]` of its own: the device listener's sessions,
//! attestation and limits, for provisioning and the local hub; and the refusals of
//! upgrades that are not MQTT over WebSocket.

use std::net::SocketAddr;
use std::time::Duration;

use edgedps_tests::dps_http::DpsHttp;
use edgedps_tests::hub::{hub_token, hub_username, HubDevice, LOCAL};
use edgedps_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

fn listener() -> Option<edgedps::config::HttpsListener> {
    Some(edgedps::config::HttpsListener {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls_cert: None,
        tls_key: None,
    })
}

/// A server whose hubs are `hub-a.example.net` and itself, with the HTTPS listener.
async fn websocket_server() -> (Server, u16) {
    let server = Server::start_with(|config| {
        config.listeners.https = listener();
        config.local_hub = Some(edgedps::config::LocalHubConfig::named(LOCAL));
        config.hubs.clear();
    })
    .await;
    let port = server.running.https_addr.expect("https listener").port();
    (server, port)
}

fn over_websocket(port: u16, id: &str, auth: DeviceAuth) -> DeviceConfig {
    let mut config = device_config(port, id, auth);
    config.websocket = true;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_provision_over_websocket_and_reach_the_local_hub_there() {
    let (server, port) = websocket_server().await;
    let pki = pki();
    let mut operator = server.operator().await;
    let key = operator.enroll("ws-sym-1").await;
    let leaf = pki.device_root.device("ws-x509-1");
    operator
        .put(
            "dps/enrollments/ws-x509-1",
            x509_enrollment("ws-x509-1", &leaf.cert_pem),
        )
        .await;
    operator.subscribe("dps/events/registrations/#").await;

    // A symmetric-key device: register, then its event, as over TCP.
    let config = over_websocket(port, "ws-sym-1", sas(&key));
    let outcome = edgedps_device::provision::register(&config, Some(json!({"site": "ws"})))
        .await
        .expect("registers over WebSocket");
    assert_eq!(outcome.status, 200, "{:?}", outcome.body);
    assert_eq!(outcome.status_word(), Some("assigned"));
    let hub = outcome.body["registrationState"]["assignedHub"]
        .as_str()
        .expect("hub")
        .to_owned();
    assert_eq!(hub, LOCAL);
    let (_, event) = operator
        .next_publish("dps/events/registrations/")
        .await
        .expect("registration event");
    let event: serde_json::Value = serde_json::from_slice(&event).unwrap();
    assert_eq!(event["outcome"], "assigned", "{event}");

    // An X.509 device by its TLS client certificate, through the same upgrade.
    assigned_over_websocket(port, "ws-x509-1", x509(&leaf, &[])).await;

    // The local hub over WebSocket: telemetry reaches an operator, the twin answers.
    operator
        .subscribe("devices/ws-sym-1/messages/events/#")
        .await;
    let token = hub_token(&key, LOCAL, "ws-sym-1");
    let mut device = HubDevice::connect_over(true, port, "ws-sym-1", &token, false).await;
    device
        .send("devices/ws-sym-1/messages/events/", b"{\"t\": 21}")
        .await;
    let (topic, payload) = operator
        .next_publish("devices/ws-sym-1/messages/events/")
        .await
        .expect("telemetry");
    assert!(topic.starts_with("devices/ws-sym-1/"), "{topic}");
    assert_eq!(payload, b"{\"t\": 21}");
    device.subscribe("$iothub/twin/res/#").await;
    let (status, _, twin) = device.twin("GET", b"").await;
    assert_eq!(status, 200, "{twin}");

    // Attestation holds as on the TCP listener: another key is refused at CONNECT, a
    // hub token for another device too.
    let config = over_websocket(port, "ws-sym-1", sas(&new_key()));
    let refused = edgedps_device::provision::register(&config, None).await;
    assert!(refused.is_err(), "a wrong key registered: {refused:?}");
    let other = hub_token(&key, LOCAL, "ws-sym-2");
    let code = websocket_connack(port, "ws-sym-1", &other).await;
    assert_eq!(
        code,
        Some(rumqttc::ConnectReturnCode::NotAuthorized),
        "another device's hub token"
    );

    // Retirement cuts the WebSocket session as it cuts a TCP one.
    let mut disabled = symmetric_enrollment("ws-sym-1", &key);
    disabled["provisioningStatus"] = json!("disabled");
    operator.put("dps/enrollments/ws-sym-1", disabled).await;
    assert!(
        device.closed().await,
        "the disabled device's session closes"
    );
}

/// A hub CONNECT over WebSocket with `token`: the refusal, or `None` when accepted.
async fn websocket_connack(
    port: u16,
    device_id: &str,
    token: &str,
) -> Option<rumqttc::ConnectReturnCode> {
    let mut options = wss_options(port, device_id, "/$iothub/websocket");
    options.set_credentials(hub_username(LOCAL, device_id), token);
    let (_client, mut eventloop) = AsyncClient::new(options, 4);
    match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
        Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => Some(code),
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => None,
        other => panic!("neither accepted nor refused: {other:?}"),
    }
}

fn wss_options(port: u16, client_id: &str, path: &str) -> MqttOptions {
    let tls = edgedps_device::tls::client_config(pki().server_ca.pem.as_bytes(), None)
        .expect("client TLS");
    let mut options =
        edgedps_device::provision::mqtt_options(client_id, "localhost", port, tls, Some(path));
    options.set_max_packet_size(4 << 20, 4 << 20);
    options
}

/// Registers `id` over WebSocket and checks it is assigned.
async fn assigned_over_websocket(port: u16, id: &str, auth: DeviceAuth) {
    let outcome = edgedps_device::provision::register(&over_websocket(port, id, auth), None)
        .await
        .unwrap_or_else(|e| panic!("{id} registers over WebSocket: {e}"));
    assert_eq!(
        outcome.status_word(),
        Some("assigned"),
        "{:?}",
        outcome.body
    );
}

/// A refusal case: its name, method, path and headers, the status and what the message
/// says.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    u16,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_that_are_not_mqtt_over_websocket_are_refused_and_devices_go_on() {
    let (server, port) = websocket_server().await;
    let mut operator = server.operator().await;
    let key = operator.enroll("ws-bad-1").await;

    // Plain HTTP requests on one connection, each refused with what is wrong.
    let mut api = DpsHttp::connect(port, None).await;
    let upgrade = |protocol: Option<&'static str>| {
        let mut headers = vec![
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        if let Some(protocol) = protocol {
            headers.push(("Sec-WebSocket-Protocol", protocol));
        }
        headers
    };
    let cases: Vec<Case> = vec![
        (
            "no subprotocol",
            "GET",
            "/$iothub/websocket",
            upgrade(None),
            400,
            "subprotocol must be mqtt",
        ),
        (
            "another subprotocol",
            "GET",
            "/$iothub/websocket",
            upgrade(Some("chat")),
            400,
            "subprotocol must be mqtt",
        ),
        (
            "another path",
            "GET",
            "/mqtt",
            upgrade(Some("mqtt")),
            404,
            "no such resource",
        ),
        (
            "no upgrade at all",
            "GET",
            "/$iothub/websocket",
            vec![],
            400,
            "Upgrade: websocket",
        ),
        (
            "WebSocket version 8",
            "GET",
            "/$iothub/websocket",
            {
                let mut h = upgrade(Some("mqtt"));
                h[2] = ("Sec-WebSocket-Version", "8");
                h
            },
            426,
            "must be 13",
        ),
        (
            "no key",
            "GET",
            "/$iothub/websocket",
            upgrade(Some("mqtt"))
                .into_iter()
                .filter(|(n, _)| *n != "Sec-WebSocket-Key")
                .collect(),
            400,
            "Sec-WebSocket-Key",
        ),
        (
            "another method",
            "POST",
            "/$iothub/websocket",
            upgrade(Some("mqtt")),
            405,
            "method not allowed",
        ),
    ];
    for (name, method, path, headers, status, says) in cases {
        let answer = api.send(method, path, &headers, b"").await;
        assert_eq!(answer.status, status, "{name}: {answer:?}");
        assert_eq!(
            answer.error_code(),
            Some(u64::from(status) * 1000),
            "{name}: {answer:?}"
        );
        let message = answer.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
    }

    // Plain HTTP, no TLS, on the same port: closed (at most a TLS alert comes back).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        plain
            .write_all(
                b"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
            .await
            .expect("the plain connection is closed");
        assert!(
            read.is_err() || !answer.starts_with(b"HTTP"),
            "plain HTTP was answered: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // rumqttc dialling another path: refused at the upgrade, nothing connects.
    let (_client, mut eventloop) = AsyncClient::new(wss_options(port, "ws-bad-1", "/mqtt"), 4);
    let dialled = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
        .await
        .expect("an answer");
    assert!(
        matches!(&dialled, Err(rumqttc::ConnectionError::Websocket(_))),
        "another path: {dialled:?}"
    );

    // A frame over limits.max_packet_size ends that session; no one else notices.
    let token = edgedps_policies::sas::sign(
        &key,
        ID_SCOPE,
        "ws-bad-1",
        edgedps_responder::unix_now() + 600,
    )
    .unwrap();
    let config = over_websocket(port, "ws-bad-1", sas(&key));
    let mut options = wss_options(port, "ws-bad-1", "/$iothub/websocket");
    options.set_credentials(config.username(), token);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    match eventloop.poll().await {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
        }
        other => panic!("no CONNACK: {other:?}"),
    }
    let limit = edgedps::config::Limits::default().max_packet_size;
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            false,
            vec![b' '; limit + 1024],
        )
        .await
        .unwrap();
    let ended: rumqttc::ConnectionError = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the oversized frame ends the session");
    eprintln!("the oversized frame ended the session: {ended}");
    assigned_over_websocket(port, "ws-bad-1", sas(&key)).await;
    // Over TCP too.
    let outcome = edgedps_device::provision::register(&server.device("ws-bad-1", sas(&key)), None)
        .await
        .expect("TCP registers");
    assert_eq!(outcome.status_word(), Some("assigned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_listener_of_its_own_serves_mqtt_only() {
    let server = Server::start_with(|config| {
        config.listeners.websocket = listener();
    })
    .await;
    let port = server
        .running
        .websocket_addr
        .expect("websocket listener")
        .port();
    assert!(server.running.https_addr.is_none());
    let mut operator = server.operator().await;
    let key = operator.enroll("ws-own-1").await;
    assigned_over_websocket(port, "ws-own-1", sas(&key)).await;
    // The DPS HTTPS API is not there.
    let mut api = DpsHttp::connect(port, None).await;
    let token = edgedps_tests::dps_http::dps_token(&key, "ws-own-1");
    let answer = api
        .register(
            "ws-own-1",
            Some(&token),
            &json!({"registrationId": "ws-own-1"}),
        )
        .await;
    assert_eq!(answer.status, 404, "{answer:?}");
}

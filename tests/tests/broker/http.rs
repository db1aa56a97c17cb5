//! `[http]`: metrics scraped and parsed with a Prometheus text-format parser, counters
//! moving with what devices and operators do; the probes; 404 and 405; and, with
//! `[[operators]]`, basic authentication on everything but the probes.

use edgedps::config::{HttpConfig, OperatorConfig, OperatorRole};
use edgedps_tests::*;

fn with_http(config: &mut edgedps::Config) {
    config.http = Some(HttpConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
    });
}

fn base(server: &Server) -> String {
    format!(
        "http://{}",
        server.running.http_addr.expect("the HTTP listener")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_registrations_refusals_and_writes() {
    let server = Server::start_with(with_http).await;
    let url = format!("{}/metrics", base(&server));
    let answer = http("GET", &url, None).await;
    assert!(
        answer
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        answer.content_type
    );
    let before = scrape(&url, None).await;
    // Every family says what it is.
    for name in [
        "edgedps_registrations",
        "edgedps_connect_refusals",
        "edgedps_sessions",
        "edgedps_tls_handshake_seconds",
        "edgedps_register_seconds",
        "edgedps_store_records",
        "edgedps_store_flush_seconds",
        "edgedps_twin_updates",
    ] {
        assert!(before.docs.contains_key(name), "no HELP for {name}");
    }

    let mut operator = server.operator().await;
    let outcomes = server
        .register_group_devices(&mut operator, "metrics", 3)
        .await;
    assert!(outcomes.iter().all(|o| o.status == 200));
    // A device with a wrong key, refused at CONNECT.
    let config = server.device("metrics-0", sas(&new_key()));
    let token = edgedps_policies::sas::sign(
        &new_key(),
        ID_SCOPE,
        "metrics-0",
        edgedps_responder::unix_now() + 600,
    )
    .expect("token");
    let refused =
        connack_refusal(server.devices_port, "metrics-0", &config.username(), &token).await;
    assert!(refused.is_some(), "{refused:?}");

    // A retirement, and a refused one (nobody of that name).
    assert_eq!(operator.retire("metrics-1", b"").await["ok"], true);
    assert_eq!(operator.retire("nobody-here", b"").await["ok"], false);

    let after = scrape(&url, None).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let assigned = [
        ("request", "register"),
        ("outcome", "assigned"),
        ("attestation", "symmetric_key"),
    ];
    assert_eq!(delta("edgedps_registrations_total", &assigned), 3.0);
    assert_eq!(delta("edgedps_register_seconds_count", &[]), 3.0);
    assert!(delta("edgedps_tls_handshake_seconds_count", &[]) >= 4.0);
    assert_eq!(
        delta(
            "edgedps_connect_refusals_total",
            &[("listener", "devices"), ("reason", "not_authorized")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "edgedps_admin_writes_total",
            &[("kind", "enrollment-groups"), ("outcome", "applied")]
        ),
        1.0
    );
    for outcome in ["applied", "rejected"] {
        let labels = [("kind", "retire"), ("outcome", outcome)];
        assert_eq!(
            delta("edgedps_admin_writes_total", &labels),
            1.0,
            "{outcome}"
        );
    }
    // The store's counts are reused for a few seconds (counting walks the store).
    let deadline = tokio::time::Instant::now() + edgedps::metrics::COUNTS_KEPT * 2;
    loop {
        let now = scrape(&url, None).await;
        let records = sample(&now, "edgedps_store_records", &[("kind", "registrations")]);
        // The retired device's record stays, deregistered.
        if records == 3.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{records} registrations"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(sample(&after, "edgedps_store_flush_seconds_count", &[]) >= 1.0);
    assert!(sample(&after, "edgedps_store_size_bytes", &[]) > 0.0);
    // The operator is connected now: an anonymous admin of the local listener.
    assert_eq!(
        sample(&after, "edgedps_sessions", &[("role", "anonymous")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_and_anything_but_get_on_a_known_path_is_refused() {
    let server = Server::start_with(with_http).await;
    let base = base(&server);
    for (method, path, status) in [
        ("GET", "/healthz", 200),
        ("GET", "/readyz", 200),
        ("GET", "/", 200),
        ("GET", "/overview", 200),
        ("GET", "/page.js", 200),
        ("GET", "/nope", 404),
        ("GET", "/metrics/x", 404),
        ("POST", "/nope", 404),
        ("POST", "/metrics", 405),
        ("PUT", "/", 405),
        ("DELETE", "/healthz", 405),
        ("POST", "/overview", 405),
    ] {
        let answer = http(method, &format!("{base}{path}"), None).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
    }
    let overview: serde_json::Value =
        serde_json::from_str(&http("GET", &format!("{base}/overview"), None).await.body)
            .expect("JSON");
    assert_eq!(overview["enrollments"], 0);
    assert_eq!(overview["hubs"][0]["hostName"], "hub-a.example.net");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_operators_everything_but_the_probes_asks_for_a_password() {
    let password = "the status page's passphrase";
    let server = Server::start_with(|config| {
        with_http(config);
        config.operators = vec![OperatorConfig {
            name: "viewer".into(),
            role: OperatorRole::Reader,
            password_hash: Some(edgedps_policies::password::hash(password.as_bytes()).unwrap()),
            certificate_cn: None,
        }];
    })
    .await;
    let base = base(&server);
    for path in ["/", "/metrics", "/overview", "/events", "/page.js"] {
        let answer = http("GET", &format!("{base}{path}"), None).await;
        assert_eq!(answer.status, 401, "{path}");
    }
    // Two bad tries (a third would be throttled at five from this address).
    for (path, auth) in [
        ("/", ("viewer", "wrong")),
        ("/metrics", ("nobody", password)),
    ] {
        let answer = http("GET", &format!("{base}{path}"), Some(auth)).await;
        assert_eq!(answer.status, 401, "{path} {auth:?}");
    }
    for path in ["/", "/metrics", "/overview"] {
        let answer = http("GET", &format!("{base}{path}"), Some(("viewer", password))).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http("GET", &format!("{base}{path}"), None).await.status,
            200
        );
    }
}

/// Opens `/events` on a connection of its own; the status line of the answer.
async fn follow(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: edgedps\r\n\r\n")
        .await
        .expect("request");
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.expect("answer");
    let status = String::from_utf8_lossy(&head[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    (stream, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_following_the_events_are_bounded() {
    let server = Server::start_with(with_http).await;
    let addr = server.running.http_addr.expect("HTTP");
    let mut open = Vec::new();
    for _ in 0..edgedps::http::MAX_FOLLOWERS {
        let (stream, status) = follow(addr).await;
        assert!(status.contains("200"), "{status}");
        open.push(stream);
    }
    let (_, status) = follow(addr).await;
    assert!(status.contains("503"), "{status}");
    // One page closes: another may follow.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (stream, status) = follow(addr).await;
        if status.contains("200") {
            open.push(stream);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

//! Operators and their roles (`[[operators]]`): passwords on the local listener, client
//! certificates and passwords on the TLS operator listener, anonymous clients only where
//! the config says so, readers that cannot write, bad passwords throttled per address.
//! Each rule is tried from the wrong side.

use std::path::Path;
use std::process::Output;

use edgedps::config::{OperatorConfig, OperatorListener, OperatorRole};
use edgedps_tests::*;
use edgedps_topics::admin::RecordKind;
use serde_json::Value;

const ALICE: &str = "alice's long passphrase";
const BOB: &str = "bob reads and never writes";

fn password_operator(name: &str, role: OperatorRole, password: &str) -> OperatorConfig {
    OperatorConfig {
        name: name.into(),
        role,
        password_hash: Some(edgedps_policies::password::hash(password.as_bytes()).expect("hash")),
        certificate_cn: None,
    }
}

fn certificate_operator(name: &str, role: OperatorRole, cn: &str) -> OperatorConfig {
    OperatorConfig {
        name: name.into(),
        role,
        password_hash: None,
        certificate_cn: Some(cn.into()),
    }
}

/// `edgedps admin` against `port`, with `args` before the command's own.
fn admin(port: u16, options: &[&str], command: &[&str]) -> Output {
    std::process::Command::new(edgedps_binary())
        .arg("admin")
        .args(["--port", &port.to_string()])
        .args(options)
        .args(command)
        .env_remove("EDGEDPS_ADMIN_USERNAME")
        .env_remove("EDGEDPS_ADMIN_PASSWORD")
        .output()
        .expect("edgedps admin runs")
}

fn exit(output: &Output, code: i32, says: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(code), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(says) || stdout.contains(says),
        "`{says}` not in: {stdout}\n{stderr}"
    );
}

/// Is there an enrollment `registration_id`? Asked as alice, on the local listener.
fn enrollment_exists(server: &Server, registration_id: &str) -> bool {
    let alice = ["--username", "alice", "--password", ALICE];
    admin(
        server.local_port,
        &alice,
        &["show", "enrollment", registration_id],
    )
    .status
    .success()
}

/// A server whose local listener takes no anonymous clients: alice (admin) and bob
/// (reader) by password.
async fn alice_and_bob() -> Server {
    Server::start_with(|config| {
        if let Some(local) = config.listeners.local.as_mut() {
            local.anonymous = false;
        }
        config.operators = vec![
            password_operator("alice", OperatorRole::Admin, ALICE),
            password_operator("bob", OperatorRole::Reader, BOB),
        ];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_listener_takes_operators_by_password_and_readers_cannot_write() {
    let server = alice_and_bob().await;
    let port = server.local_port;

    // No credentials: refused on a listener that takes no anonymous clients.
    let anonymous = Operator::connect_with(port, |_| {}).await;
    assert!(
        anonymous
            .as_ref()
            .err()
            .is_some_and(|e| e.contains("NotAuthorized")),
        "{:?}",
        anonymous.err()
    );
    // A wrong password, an unknown name, another operator's password.
    for (name, password) in [("alice", "guess"), ("mallory", ALICE), ("alice", BOB)] {
        let refused = Operator::connect_as(port, name, password).await;
        assert!(
            refused
                .as_ref()
                .err()
                .is_some_and(|e| e.contains("NotAuthorized")),
            "{name}: {:?}",
            refused.err()
        );
    }

    // The admin writes.
    let mut alice = Operator::connect_as(port, "alice", ALICE)
        .await
        .expect("alice connects");
    alice.enroll("by-alice").await;

    // The reader reads the record and watches events...
    let mut bob = Operator::connect_as(port, "bob", BOB)
        .await
        .expect("bob connects");
    let topic = RecordKind::Enrollment.record_topic("by-alice");
    bob.subscribe(&topic).await;
    let (_, record) = bob
        .next_publish(&topic)
        .await
        .expect("bob reads the record");
    let record: Value = serde_json::from_slice(&record).expect("JSON");
    assert_eq!(record["registrationId"], "by-alice");
    // The audit event, watched from another connection: the router orders deliveries
    // within one subscription, not across a session's subscriptions.
    alice.subscribe("dps/events/admin/enrollments/by-bob").await;
    // ...but its write is refused with 403, audited, and nothing is stored.
    let body = symmetric_enrollment("by-bob", &new_key()).to_string();
    let result = bob
        .write(
            &RecordKind::Enrollment.record_topic("by-bob"),
            body.as_bytes(),
        )
        .await;
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["errorCode"], 403, "{result}");
    assert!(
        result["message"].as_str().unwrap_or("").contains("reader"),
        "{result}"
    );
    let (event_topic, event) = alice
        .next_publish("dps/events/admin/enrollments/by-bob")
        .await
        .expect("the refused write is audited");
    let event: Value = serde_json::from_slice(&event).expect("JSON");
    assert_eq!(event["operator"], "bob", "{event_topic}: {event}");
    assert_eq!(event["outcome"], "rejected", "{event}");
    // Deleting, cloud-to-device messages and twin patches are writes too.
    bob.send(&RecordKind::Enrollment.record_topic("by-alice"), b"")
        .await;
    bob.send("hub/twins/by-alice/desired", br#"{"x":1}"#).await;
    assert!(
        !enrollment_exists(&server, "by-bob"),
        "the reader's enrollment was not stored"
    );
    assert!(
        enrollment_exists(&server, "by-alice"),
        "the reader's delete did nothing"
    );

    // The command line: as the reader, refused with the plane's reason (exit 1); as
    // nobody, refused at CONNECT (exit 1); as the admin, done.
    let reader = ["--username", "bob", "--password", BOB];
    let out = admin(
        port,
        &reader,
        &["enroll", "cli-bob", "--symmetric-key", "auto"],
    );
    exit(&out, 1, "403");
    let out = admin(port, &reader, &["list", "enrollments", "--json"]);
    exit(&out, 0, "by-alice");
    let out = admin(port, &[], &["list", "enrollments"]);
    exit(&out, 1, "refused the connection");
    let out = admin(
        port,
        &["--username", "alice"],
        &["enroll", "cli-alice", "--symmetric-key", "auto"],
    );
    exit(&out, 1, "refused the connection");
    let out = std::process::Command::new(edgedps_binary())
        .args(["admin", "--port", &port.to_string()])
        .args(["enroll", "cli-alice", "--symmetric-key", "auto", "--json"])
        .env("EDGEDPS_ADMIN_USERNAME", "alice")
        .env("EDGEDPS_ADMIN_PASSWORD", ALICE)
        .output()
        .expect("runs");
    exit(&out, 0, "\"ok\":true");
    assert!(enrollment_exists(&server, "cli-alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_passwords_are_refused_then_throttled_per_address() {
    let server = Server::start_with(|config| {
        config.operators = vec![password_operator("alice", OperatorRole::Admin, ALICE)];
    })
    .await;
    let port = server.local_port;
    for _ in 0..edgedps::operators::MAX_FAILURES {
        let refused = Operator::connect_as(port, "alice", "guess").await;
        assert!(refused.is_err());
    }
    // Now even the right password is refused from this address, without a check.
    let refused = Operator::connect_as(port, "alice", ALICE).await;
    assert!(
        refused
            .as_ref()
            .err()
            .is_some_and(|e| e.contains("NotAuthorized")),
        "{:?}",
        refused.err()
    );
    // Anonymous clients are not operators by password: the listener still takes them
    // (this one is anonymous).
    assert!(Operator::connect_with(port, |_| {}).await.is_ok());
}

/// Writes the files an operator's command line needs into `dir`.
fn write_identity(
    dir: &Path,
    name: &str,
    identity: &edgedps_tests::pki::Identity,
) -> (String, String) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &identity.cert_pem).expect("cert");
    std::fs::write(&key, &identity.key_pem).expect("key");
    (cert.display().to_string(), key.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_operators_come_over_tls_with_a_certificate_or_a_password() {
    let operator_ca = Ca::root("edgedps test operator CA");
    let files = tempfile::tempdir().expect("tempdir");
    let client_ca = files.path().join("operator-ca.pem");
    std::fs::write(&client_ca, &operator_ca.pem).expect("ca");
    let server_ca = files.path().join("server-ca.pem");
    std::fs::write(&server_ca, &pki().server_ca.pem).expect("server ca");
    let server = Server::start_with(|config| {
        let devices = config.listeners.devices.clone().expect("devices");
        config.listeners.operators = Some(OperatorListener {
            bind: "127.0.0.1:0".parse().expect("addr"),
            tls_cert: devices.tls_cert,
            tls_key: devices.tls_key,
            client_ca: Some(client_ca.clone()),
        });
        config.operators = vec![
            certificate_operator("carol", OperatorRole::Admin, "ops-carol"),
            certificate_operator("robot", OperatorRole::Reader, "ops-robot"),
            password_operator("alice", OperatorRole::Admin, ALICE),
        ];
    })
    .await;
    let port = server
        .running
        .operators_addr
        .expect("operator listener")
        .port();
    let dir = files.path();
    let (carol_cert, carol_key) = write_identity(dir, "carol", &operator_ca.device("ops-carol"));
    let (robot_cert, robot_key) = write_identity(dir, "robot", &operator_ca.device("ops-robot"));
    // The same CN from a CA the listener does not trust.
    let (rogue_cert, rogue_key) =
        write_identity(dir, "rogue", &pki().rogue_root.device("ops-carol"));
    // A CN from the trusted CA that is no operator.
    let (stranger_cert, stranger_key) =
        write_identity(dir, "stranger", &operator_ca.device("ops-stranger"));
    let ca = server_ca.display().to_string();
    let tls = |cert: &str, key: &str| -> Vec<String> {
        [
            "--host",
            "localhost",
            "--ca-file",
            &ca,
            "--cert",
            cert,
            "--key",
            key,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |options: Vec<String>, command: &[&str]| {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        admin(port, &options, command)
    };

    // The admin by certificate writes; the reader by certificate reads and cannot write.
    let out = run(
        tls(&carol_cert, &carol_key),
        &["enroll", "by-carol", "--symmetric-key", "auto", "--json"],
    );
    exit(&out, 0, "\"ok\":true");
    let out = run(
        tls(&robot_cert, &robot_key),
        &["show", "enrollment", "by-carol"],
    );
    exit(&out, 0, "by-carol");
    let out = run(tls(&robot_cert, &robot_key), &["disable", "by-carol"]);
    exit(&out, 1, "403");
    // A certificate the listener does not trust, or one that names no operator.
    let out = run(
        tls(&rogue_cert, &rogue_key),
        &["enroll", "by-rogue", "--symmetric-key", "auto"],
    );
    exit(&out, 1, "");
    let out = run(
        tls(&stranger_cert, &stranger_key),
        &["enroll", "by-stranger", "--symmetric-key", "auto"],
    );
    exit(&out, 1, "refused the connection");
    // A password over TLS, and nothing at all over TLS.
    let plain_tls = ["--host", "localhost", "--ca-file", &ca];
    let mut with_password = plain_tls.to_vec();
    with_password.extend(["--username", "alice", "--password", ALICE]);
    let out = admin(
        port,
        &with_password,
        &["enroll", "by-alice", "--symmetric-key", "auto"],
    );
    exit(&out, 0, "symmetric key");
    let out = admin(port, &plain_tls, &["list", "enrollments"]);
    exit(&out, 1, "refused the connection");
    // Plain MQTT on the TLS port is no way around it.
    assert!(Operator::connect_with(port, |_| {}).await.is_err());
    for id in ["by-rogue", "by-stranger"] {
        assert!(!enrollment_exists(&server, id), "{id}");
    }
    // The local listener of this server takes anonymous admins (the test default): the
    // operator listener never does.
    assert!(Operator::connect(server.local_port)
        .await
        .client
        .try_disconnect()
        .is_ok());
}

#[test]
fn the_cli_refuses_bad_connection_options_before_sending_anything() {
    // --cert without --ca-file; --password without --username; a CA file that is not
    // there.
    for (options, says) in [
        (
            vec!["--cert", "c.pem", "--key", "k.pem"],
            "--cert needs --ca-file",
        ),
        (vec!["--password", "x"], "--password needs --username"),
        (
            vec!["--ca-file", "/nonexistent.pem"],
            "--ca-file /nonexistent.pem",
        ),
    ] {
        let out = admin(1, &options, &["list", "enrollments"]);
        exit(&out, 2, says);
    }
    // hash-password: what it prints is what the configuration takes.
    let mut child = std::process::Command::new(edgedps_binary())
        .args(["admin", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"a long enough passphrase\n")
        .expect("write");
    let out = child.wait_with_output().expect("exits");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).expect("text");
    assert!(edgedps_policies::password::verify(
        b"a long enough passphrase",
        hash.trim()
    ));
    let short = std::process::Command::new(edgedps_binary())
        .args(["admin", "hash-password"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs");
    exit(&short, 2, "shorter than 12");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_operators_an_anonymous_listener_ignores_usernames() {
    // The embedded default's case: applications that always send credentials connect
    // as before, anonymous admins.
    let server = Server::start().await;
    let mut app = Operator::connect_as(server.local_port, "app", "its own password")
        .await
        .expect("an application with a username connects");
    app.enroll("by-an-app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_sees_that_a_hub_has_a_connection_string_never_the_string() {
    let server = alice_and_bob().await;
    let port = server.local_port;
    let mut alice = Operator::connect_as(port, "alice", ALICE)
        .await
        .expect("alice connects");
    let key = new_key();
    let topic = RecordKind::Hub.record_topic("reader-hub.example.net");
    alice
        .put(
            &topic,
            serde_json::json!({"connectionString": format!(
                "HostName=reader-hub.example.net;SharedAccessKeyName=owner;SharedAccessKey={key}"
            )}),
        )
        .await;
    let mut bob = Operator::connect_as(port, "bob", BOB)
        .await
        .expect("bob connects");
    bob.subscribe("dps/#").await;
    let (_, record) = bob.next_publish(&topic).await.expect("bob reads the hub");
    let text = String::from_utf8_lossy(&record).into_owned();
    let record: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        record["credentials"]["sharedAccessKeyName"], "owner",
        "{record}"
    );
    assert!(
        !text.contains(&key) && !text.contains("SharedAccessKey="),
        "{text}"
    );
    // Nor can the reader remove it.
    let refused = bob.write(&topic, br#"{"connectionString": ""}"#).await;
    assert_eq!(refused["ok"], false, "{refused}");
    let (_, record) = {
        let mut again = Operator::connect_as(port, "bob", BOB).await.expect("bob");
        again.subscribe(&topic).await;
        again.next_publish(&topic).await.expect("the record")
    };
    let record: Value = serde_json::from_slice(&record).expect("JSON");
    assert!(
        record["credentials"].is_object(),
        "the reader removed the credentials: {record}"
    );
}

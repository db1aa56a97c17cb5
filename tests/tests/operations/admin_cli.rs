//! `edgedps admin` end to end: the real binary against a server's operator listener,
//! each command once as it succeeds and once as it is refused; exit codes 0, 1
//! (edgedps refused) and 2 (input never sent).

use std::process::Output;

use edgedps_tests::*;
use serde_json::Value;

fn admin(server: &Server, args: &[&str]) -> Output {
    std::process::Command::new(edgedps_binary())
        .arg("admin")
        .args(["--port", &server.local_port.to_string()])
        .args(args)
        .output()
        .expect("edgedps admin runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn refused(output: &Output, code: i32, says: &str) {
    assert_eq!(output.status.code(), Some(code), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(says), "{stderr}");
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).expect("JSON output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_and_groups_are_managed_from_the_command_line() {
    let server = Server::start().await;

    // enroll: a generated key, shown once; the record has none.
    let made = json(&admin(
        &server,
        &["enroll", "cli-1", "--symmetric-key", "auto", "--json"],
    ));
    assert_eq!(made["ok"], true, "{made}");
    let key = made["symmetricKey"]
        .as_str()
        .expect("the key, once")
        .to_owned();
    let shown = json(&admin(&server, &["show", "enrollment", "cli-1"]));
    assert_eq!(shown["registrationId"], "cli-1");
    assert!(!shown.to_string().contains(&key), "no key in the record");
    // The key works: the device provisions.
    let outcome = edgedps_device::register(&server.device("cli-1", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status, 200, "{}", outcome.body);

    // list: a table, and JSON.
    let table = stdout(&admin(&server, &["list", "enrollments"]));
    assert!(table.starts_with("REGISTRATION ID"), "{table}");
    assert!(
        table.contains("cli-1") && table.contains("symmetricKey") && table.contains("enabled"),
        "{table}"
    );
    let registrations = json(&admin(&server, &["list", "registrations", "--json"]));
    assert_eq!(registrations[0]["registrationId"], "cli-1");
    // `registrations list|show` say the same.
    let same = json(&admin(&server, &["registrations", "list", "--json"]));
    assert_eq!(same, registrations);
    let table = stdout(&admin(&server, &["registrations", "list"]));
    assert!(
        table.contains("cli-1") && table.contains("assigned"),
        "{table}"
    );
    let one = json(&admin(&server, &["registrations", "show", "cli-1"]));
    assert_eq!(one["assignedHub"], "hub-a.example.net", "{one}");
    refused(
        &admin(&server, &["registrations", "show", "never-registered"]),
        1,
        "no such record",
    );

    // disable, enable: the stored key is kept.
    stdout(&admin(&server, &["disable", "cli-1"]));
    let shown = json(&admin(&server, &["show", "enrollment", "cli-1"]));
    assert_eq!(shown["provisioningStatus"], "disabled");
    stdout(&admin(&server, &["enable", "cli-1"]));
    let outcome = edgedps_device::register(&server.device("cli-1", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(
        outcome.status, 200,
        "enabled again, same key: {}",
        outcome.body
    );

    // Input that is never sent: exit 2, nothing written.
    let dir = tempfile::tempdir().unwrap();
    let not_json = dir.path().join("bad.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    refused(
        &admin(
            &server,
            &["enroll", "cli-2", "--file", not_json.to_str().unwrap()],
        ),
        2,
        "not JSON",
    );
    refused(
        &admin(&server, &["enroll", "cli-2", "--symmetric-key", "c2hvcnQ="]),
        2,
        "16 to 64 bytes",
    );
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&leaf, &pki().device_root.device("x").cert_pem).unwrap();
    refused(
        &admin(
            &server,
            &["group", "create", "g", "--ca", leaf.to_str().unwrap()],
        ),
        2,
        "not a CA",
    );
    refused(
        &admin(&server, &["show", "enrollment", "cli-2"]),
        1,
        "no such record",
    );

    // group create: a key, and a CA.
    let group = json(&admin(
        &server,
        &[
            "group",
            "create",
            "fleet",
            "--symmetric-key",
            "auto",
            "--json",
        ],
    ));
    assert!(group["symmetricKey"].is_string());
    let root = dir.path().join("root.pem");
    std::fs::write(&root, &pki().device_root.pem).unwrap();
    stdout(&admin(
        &server,
        &[
            "group",
            "create",
            "x509-fleet",
            "--ca",
            root.to_str().unwrap(),
        ],
    ));
    let groups = stdout(&admin(&server, &["list", "groups"]));
    assert!(
        groups.contains("fleet") && groups.contains("x509-fleet") && groups.contains("(2 records)"),
        "{groups}"
    );
    // Refused by edgedps: exit 1 with its reason.
    refused(
        &admin(
            &server,
            &[
                "group",
                "create",
                "issuing",
                "--symmetric-key",
                "auto",
                "--issuance-policy",
                "nope",
            ],
        ),
        1,
        "`nope`",
    );

    // hubs.
    stdout(&admin(
        &server,
        &["hubs", "link", "hub-b.example.net", "--weight", "3"],
    ));
    let hubs = stdout(&admin(&server, &["hubs", "list"]));
    assert!(
        hubs.contains("hub-b.example.net") && hubs.contains('3'),
        "{hubs}"
    );
    stdout(&admin(&server, &["hubs", "unlink", "hub-b.example.net"]));
    refused(
        &admin(&server, &["hubs", "unlink", "hub-a.example.net"]),
        1,
        "configuration file",
    );

    // retire, delete.
    let retired = json(&admin(
        &server,
        &["retire", "cli-1", "--reason", "lost", "--json"],
    ));
    assert_eq!(retired["registrationsDeregistered"], 1, "{retired}");
    let registration = json(&admin(&server, &["show", "registration", "cli-1"]));
    assert_eq!(registration["status"], "deregistered");
    stdout(&admin(&server, &["delete", "group", "fleet"]));
    refused(
        &admin(&server, &["show", "group", "fleet"]),
        1,
        "no such record",
    );

    // Nobody listening: exit 1, said so.
    let nobody = std::process::Command::new(edgedps_binary())
        .args(["admin", "--port", "1", "list", "hubs"])
        .output()
        .unwrap();
    refused(&nobody, 1, "cannot reach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_revocation_lists_and_events_from_the_command_line() {
    use edgedps_tests::hub::{local_hub_server, provision, LOCAL};
    let server = local_hub_server(false, |_| {}).await;

    // watch: the events of a registration, as they come.
    let watcher = std::process::Command::new(edgedps_binary())
        .args([
            "admin",
            "--port",
            &server.local_port.to_string(),
            "watch",
            "--filter",
        ])
        .args(["dps/events/registrations/#", "--count", "1", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let made = json(&admin(
        &server,
        &[
            "enroll",
            "cli-twin",
            "--symmetric-key",
            "auto",
            "--json",
            "--initial-twin",
            r#"{"properties": {"desired": {"interval": 3, "mode": "eco"}}}"#,
        ],
    ));
    let key = made["symmetricKey"].as_str().unwrap().to_owned();
    assert_eq!(provision(&server, "cli-twin", &key).await, LOCAL);
    let watched = watcher.wait_with_output().unwrap();
    let line: Value = serde_json::from_str(stdout(&watched).trim()).expect("one JSON line");
    assert_eq!(line["topic"], "dps/events/registrations/cli-twin");
    assert_eq!(line["message"]["outcome"], "assigned");

    // twin show, set-desired.
    let patched = json(&admin(
        &server,
        &[
            "twin",
            "set-desired",
            "cli-twin",
            r#"{"interval": 9}"#,
            "--json",
        ],
    ));
    assert_eq!(patched["version"], 2, "{patched}");
    let twin = json(&admin(&server, &["twin", "show", "cli-twin"]));
    assert_eq!(twin["properties"]["desired"]["interval"], 9);
    assert_eq!(
        twin["properties"]["desired"]["mode"], "eco",
        "the initial twin given at enroll"
    );
    refused(
        &admin(&server, &["twin", "set-desired", "cli-twin", "[1]"]),
        2,
        "JSON object",
    );
    refused(
        &admin(&server, &["twin", "set-desired", "nobody", "{}"]),
        1,
        "not a device of the local hub",
    );

    // crl add: a list of the device CA, and one that is not a list.
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("ca.crl.pem");
    std::fs::write(&crl, pki().device_root.crl(&[])).unwrap();
    let not_a_list = dir.path().join("nope.pem");
    std::fs::write(&not_a_list, "hello").unwrap();
    // The issuer must be known: a group signed by the CA.
    let root = dir.path().join("root.pem");
    std::fs::write(&root, &pki().device_root.pem).unwrap();
    stdout(&admin(
        &server,
        &[
            "group",
            "create",
            "crl-fleet",
            "--ca",
            root.to_str().unwrap(),
        ],
    ));
    stdout(&admin(
        &server,
        &["crl", "add", "factory", crl.to_str().unwrap()],
    ));
    refused(
        &admin(
            &server,
            &["crl", "add", "broken", not_a_list.to_str().unwrap()],
        ),
        1,
        "refused",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_enrollments_is_imported_with_progress_and_its_refusals_listed() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    // 250 devices as JSON lines: progress at 100, 200 and the end.
    let lines: Vec<String> = (0..250)
        .map(|i| symmetric_enrollment(&format!("import-{i:03}"), &new_key()).to_string())
        .collect();
    let file = write("devices.jsonl", &lines.join("\n"));
    let out = admin(&server, &["import", &file, "--json"]);
    let report = json(&out);
    assert_eq!(report["written"], 250, "{report}");
    let progress = String::from_utf8_lossy(&out.stderr);
    for line in [
        "import: 100/250 written",
        "import: 200/250 written",
        "import: 250/250 written",
    ] {
        assert!(progress.contains(line), "{progress}");
    }
    let listed = json(&admin(&server, &["list", "enrollments", "--json"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(250));

    // An array with one enrollment edgedps refuses: the others are written, the refusal
    // listed with its reason, exit code 1.
    let mut bad = symmetric_enrollment("import-bad", "not base64!");
    bad["registrationId"] = "import-bad".into();
    let array = serde_json::json!([
        symmetric_enrollment("import-a", &new_key()),
        bad,
        symmetric_enrollment("import-b", &new_key()),
    ]);
    let file = write("mixed.json", &array.to_string());
    let out = admin(&server, &["import", &file]);
    refused(&out, 1, "1 of 3 enrollments refused");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("2 of 3 enrolled"), "{table}");
    assert!(table.contains("refused  import-bad  400"), "{table}");
    stdout(&admin(&server, &["show", "enrollment", "import-b"]));

    // Input that is never sent: exit 2, naming the place, nothing written.
    let no_id = write("no-id.jsonl", "{\"attestation\": {}}\n");
    let twice = write(
        "twice.json",
        &serde_json::json!([
            symmetric_enrollment("import-twice", &new_key()),
            symmetric_enrollment("IMPORT-TWICE", &new_key()),
        ])
        .to_string(),
    );
    for (file, says) in [
        (
            write("broken.json", "[{\"registrationId\": "),
            "not a JSON array",
        ),
        (write("broken.jsonl", "{}\nnot json\n"), "line 2: not JSON"),
        (no_id, "line 1: no `registrationId`"),
        (twice, "entry 2: `IMPORT-TWICE` is in the file twice"),
        (write("empty.jsonl", "\n"), "no enrollment"),
    ] {
        refused(&admin(&server, &["import", &file]), 2, says);
    }
    refused(
        &admin(&server, &["show", "enrollment", "import-twice"]),
        1,
        "no such record",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_hub_is_linked_with_its_connection_string_and_its_outbox_shown_and_retried() {
    use edgedps_tests::iothub::{FakeHub, Fault};
    let hub = FakeHub::start("cli-cloud.example.net").await;
    let anchors = tempfile::tempdir().unwrap();
    let anchors_file = anchors.path().join("ca.pem");
    std::fs::write(&anchors_file, &pki().server_ca.pem).unwrap();
    let server = Server::start_with(|config| {
        config.cloud.trust_anchors_file = Some(anchors_file.clone());
        config.cloud.max_retry_seconds = 1;
    })
    .await;
    let secret = anchors.path().join("cs");
    std::fs::write(&secret, format!("{}\n", hub.connection_string())).unwrap();
    let linked = stdout(&admin(
        &server,
        &[
            "hubs",
            "link",
            &hub.host_name,
            "--connection-string-file",
            secret.to_str().unwrap(),
            "--service-address",
            &hub.service_address(),
        ],
    ));
    assert!(linked.starts_with("ok"), "{linked}");
    let listed = stdout(&admin(&server, &["hubs", "list", "--json"]));
    assert!(listed.contains("registryReadWrite"), "{listed}");
    assert!(!listed.contains(hub.key()), "{listed}");

    let mut operator = server.operator().await;
    let key = new_key();
    let mut e = symmetric_enrollment("cli-cloud-1", &key);
    e["iotHubs"] = serde_json::json!([hub.host_name]);
    operator.put("dps/enrollments/cli-cloud-1", e).await;
    hub.fail_next([Fault::hub(404, "DeviceNotFound", None)]);
    let outcome = edgedps_device::register(&server.device("cli-cloud-1", sas(&key)), None)
        .await
        .unwrap();
    assert_eq!(outcome.status_word(), Some("assigned"), "{}", outcome.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let shown = loop {
        let shown = stdout(&admin(&server, &["hubs", "outbox", &hub.host_name]));
        if shown.contains("failed 1") || std::time::Instant::now() > deadline {
            break shown;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        shown.contains("credentials set, pending 0, failed 1"),
        "{shown}"
    );
    assert!(shown.contains("failed register cli-cloud-1"), "{shown}");
    assert!(shown.contains("404: ErrorCode:DeviceNotFound"), "{shown}");
    let retried = json(&admin(
        &server,
        &["hubs", "outbox", &hub.host_name, "--retry", "--json"],
    ));
    assert_eq!(retried["retried"], 1, "{retried}");
    hub.wait_for(
        std::time::Duration::from_secs(10),
        "the retried device",
        |h| h.identity("cli-cloud-1").is_some(),
    )
    .await;
    refused(
        &admin(&server, &["hubs", "outbox", "nowhere.example.net"]),
        1,
        "no linked hub",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_prints_what_a_registration_would_do() {
    let server = Server::start().await;
    let mut operator = server.operator().await;
    let pki = pki();
    operator
        .put(
            "dps/enrollment-groups/fleet",
            x509_group("fleet", &pki.device_root.pem),
        )
        .await;
    let device = pki.device_intermediate.device("van-3");
    let chain = server.dir.path().join("van-3.pem");
    std::fs::write(
        &chain,
        format!("{}{}", device.cert_pem, pki.device_intermediate.pem),
    )
    .expect("chain");
    let chain_arg = chain.display().to_string();
    let text = stdout(&admin(
        &server,
        &["explain", "van-3", "--chain", &chain_arg],
    ));
    assert!(text.starts_with("van-3: group (group:fleet)\n"), "{text}");
    assert!(
        text.contains("would be assigned to hub-a.example.net: hashed: highest score"),
        "{text}"
    );
    assert!(
        text.contains("* group fleet (enabled): accepts the device"),
        "{text}"
    );
    assert!(
        text.contains("* hub-a.example.net  weight 1  score "),
        "{text}"
    );
    let explained = json(&admin(
        &server,
        &["explain", "van-3", "--chain", &chain_arg, "--json"],
    ));
    assert_eq!(
        explained["allocation"]["hub"], "hub-a.example.net",
        "{explained}"
    );
    let text = stdout(&admin(&server, &["explain", "nobody"]));
    assert!(text.starts_with("nobody: unknown\n"), "{text}");
    // A chain that is not one never leaves the command's answer unexplained.
    let junk = server.dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("junk");
    refused(
        &admin(
            &server,
            &["explain", "van-3", "--chain", &junk.display().to_string()],
        ),
        1,
        "certificate chain",
    );
}

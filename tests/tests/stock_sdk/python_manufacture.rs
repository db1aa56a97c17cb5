//! `edgedps manufacture` end to end: a device CA, a batch of 50 X.509 devices and one of
//! symmetric-key devices, each enrolled with `--enroll` over the operator plane, then a
//! device of each batch provisions with the stock Python SDK from nothing but its
//! bundle. A second run into the same directory without `--resume` changes nothing.
//!
//! As `python_sdk.rs`: the real binary on 127.0.0.1:8883 (the SDK's fixed port).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use edgedps_tests::*;
use serde_json::{json, Value};

fn manufacture(args: &[&str]) -> Output {
    std::process::Command::new(edgedps_binary())
        .arg("manufacture")
        .args(args)
        .output()
        .expect("edgedps manufacture runs")
}

fn succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manufactured_batch_is_enrolled_and_its_devices_provision_with_the_stock_sdk() {
    let _port = hold_port_8883().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, local_port) = free_ports();
    let _process = Process::start(dir.path(), 8883, local_port, "").await;
    let trust = dir.path().join("server-ca.pem");
    std::fs::write(&trust, &pki().server_ca.pem).unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let operator = format!("127.0.0.1:{local_port}");

    succeeded(&manufacture(&["ca", "--out", &path("ca")]));
    let batch = [
        "batch",
        "--ca",
        &path("ca"),
        "--count",
        "50",
        "--id-prefix",
        "fab-",
        "--out",
        &path("batch"),
        "--trust",
        &path("server-ca.pem"),
        "--host",
        "localhost",
        "--enroll",
        "--operator",
        &operator,
    ];
    let made = manufacture(&batch);
    succeeded(&made);
    assert!(String::from_utf8_lossy(&made.stderr).contains("manufactured 50/50"));

    let manifest: Vec<Value> =
        serde_json::from_str(&text(&dir.path().join("batch/manifest.json"))).unwrap();
    assert_eq!(manifest.len(), 50);
    assert_eq!(manifest[0]["registrationId"], "fab-00001");
    let csv = text(&dir.path().join("batch/manifest.csv"));
    assert_eq!(csv.lines().count(), 51, "a header and 50 devices");
    assert!(csv.starts_with("registrationId,sha256Thumbprint,serialNumber,notAfter,bundle\n"));
    let first = dir.path().join("batch/fab-00001");
    let thumbprint = edgedps_policies::x509::thumbprint(
        &edgedps_policies::x509::pem_to_der(&text(&first.join("device.pem"))).unwrap(),
    );
    assert_eq!(manifest[0]["sha256Thumbprint"], thumbprint);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(first.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "device keys are the owner's only");
    assert_eq!(
        text(&first.join("device.pem"))
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "the device certificate and the intermediate"
    );

    // Again, without --resume: refused, and no key changed.
    let key_before = text(&first.join("device.key"));
    let again = manufacture(&batch);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    assert_eq!(text(&first.join("device.key")), key_before);

    // A symmetric-key batch: keys derived from the group key.
    let group_key = new_key();
    std::fs::write(dir.path().join("group.key"), &group_key).unwrap();
    succeeded(&manufacture(&[
        "batch",
        "--attestation",
        "symmetric-key",
        "--group-key-file",
        &path("group.key"),
        "--count",
        "3",
        "--id-prefix",
        "fab-sym-",
        "--out",
        &path("symmetric"),
        "--trust",
        &path("server-ca.pem"),
        "--enroll",
        "--operator",
        &operator,
    ]));
    let derived = edgedps_policies::sas::derive_device_key(&group_key, "fab-sym-00002").unwrap();
    let symmetric = dir.path().join("symmetric/fab-sym-00002");
    assert_eq!(text(&symmetric.join("symmetric-key")).trim(), derived);
    // The samples driven by environment variables read the key from device.env, which
    // is then the owner's only.
    let env = text(&symmetric.join("device.env"));
    assert!(
        env.contains(&format!("PROVISIONING_SYMMETRIC_KEY={derived}\n")),
        "{env}"
    );
    assert!(
        env.contains("PROVISIONING_REGISTRATION_ID=fab-sym-00002\n"),
        "{env}"
    );
    let mode = std::fs::metadata(symmetric.join("device.env"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let request = json!({"bundles": [
        path("batch/fab-00001"), path("batch/fab-00050"), path("symmetric/fab-sym-00002"),
    ]});
    let results = run_python("bundle.py", &request, Duration::from_secs(180)).await;
    assert_eq!(results.len(), 3, "{results:?}");
    for result in &results {
        assert!(
            result.get("error").is_none(),
            "{}: {}",
            result["bundle"],
            result["trace"].as_str().unwrap_or_default()
        );
        assert_eq!(result["status"], "assigned", "{result}");
        assert_eq!(result["assignedHub"], "hub-a.example.net", "{result}");
    }
    assert_eq!(results[2]["deviceId"], "fab-sym-00002");
}

//! A small version of the load test: every device is assigned, whatever the speed.

use edgedps_device::loadgen::{prepare, run_devices, Attestation, Extras};
use edgedps_tests::*;

async fn smoke(attestation: Attestation, devices: usize, csr: bool) {
    let server = Server::start_with(|config| {
        config.certificate_authorities = vec![edgedps::config::CertificateAuthorityConfig {
            name: "gateway".into(),
            cert: None,
            key: None,
            validity_days: 30,
        }];
    })
    .await;
    let admin = ([127, 0, 0, 1], server.local_port).into();
    let ca = pki().server_ca.pem.as_bytes();
    let fleet = prepare(
        attestation,
        devices,
        0,
        server.devices_port,
        Some(admin),
        ca,
        Extras {
            csr,
            cloud_hub: false,
            custom: None,
        },
    )
    .await
    .expect("enrollments accepted");
    let report = run_devices("edgedps", fleet, 32, None, None, false).await;
    assert_eq!(
        report.assigned, devices,
        "{attestation:?}: {:?}",
        report.errors
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.total_us.p50 > 0);
    let record = server
        .running
        .responder
        .registration_record("load-r0-0")
        .expect("store")
        .expect("registered");
    assert_eq!(
        record.issued_certificates.len(),
        usize::from(csr),
        "{attestation:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_devices_are_all_assigned() {
    smoke(Attestation::Sas, 200, false).await;
    smoke(Attestation::SasGroup, 100, false).await;
    smoke(Attestation::X509, 100, false).await;
    smoke(Attestation::X509Group, 100, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_ask_for_certificates_are_all_assigned() {
    smoke(Attestation::SasGroup, 100, true).await;
    smoke(Attestation::X509, 50, true).await;
}

/// Runs `edgedps loadgen {args} --json`; its JSON lines, and its whole output.
fn loadgen(args: &[&str]) -> (Vec<serde_json::Value>, String) {
    let output = std::process::Command::new(edgedps_binary())
        .arg("loadgen")
        .args(args)
        .arg("--json")
        .output()
        .expect("edgedps loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    (lines, stdout)
}

#[test]
fn loadgen_command_runs_edgedps_and_the_baseline_and_reports_json() {
    let (lines, stdout) = loadgen(&[
        "--devices",
        "60",
        "--concurrency",
        "8",
        "--attestation",
        "x509-group",
        "--rounds",
        "1",
        "--baseline",
    ]);
    let rounds: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("target").is_some()).collect();
    assert_eq!(rounds.len(), 2, "{stdout}");
    for round in rounds {
        assert_eq!(round["assigned"], 60, "{round}");
        assert!(round["server_cpu_seconds"].as_f64().is_some());
        assert!(
            round["server_rss_kib_after"].as_u64().unwrap_or(0) > 0,
            "{round}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["ratio"]["rate_edgedps_over_baseline"]
                .as_f64()
                .unwrap_or(0.0)
                > 0.0),
        "{stdout}"
    );
}

#[test]
fn loadgen_measures_custom_allocation_by_an_mqtt_allocator_and_a_webhook() {
    for kind in ["mqtt", "webhook"] {
        let (lines, stdout) = loadgen(&[
            "--devices",
            "40",
            "--concurrency",
            "8",
            "--attestation",
            "sas-group",
            "--custom-allocator",
            kind,
        ]);
        let round = lines
            .iter()
            .find(|l| l.get("target").is_some())
            .unwrap_or_else(|| panic!("{kind}: no round: {stdout}"));
        assert_eq!(round["assigned"], 40, "{kind}: {round}");
        // The server's own figures say every assignment went through the allocator.
        assert!(
            stdout.contains("custom allocation latency") && stdout.contains("allocations=40"),
            "{kind}: {stdout}"
        );
    }
}

#[test]
fn cutting_off_a_group_of_hundreds_closes_every_session_within_a_second() {
    // More sessions than one wake batch: the paced closing is exercised.
    let (lines, stdout) = loadgen(&[
        "--devices",
        "400",
        "--concurrency",
        "32",
        "--attestation",
        "x509-group",
        "--cut-off",
    ]);
    let cut = lines
        .iter()
        .find_map(|l| l.get("cut_off").cloned())
        .unwrap_or_else(|| panic!("no cut-off report: {stdout}"));
    assert_eq!(cut["held"], 400, "{cut}");
    assert_eq!(cut["sessions_closed"], 400, "{cut}");
    assert_eq!(cut["closed"], 400, "{cut}");
    let last_ms = cut["closed_ms"]["max"].as_f64().unwrap_or(f64::MAX) / 1000.0;
    assert!(
        last_ms < 1000.0,
        "the last session closed {last_ms} ms after the write"
    );
    // Another group's devices kept registering throughout.
    assert_eq!(cut["bystander_errors"], 0, "{cut}");
    assert!(
        cut["bystander_before_us"]["p50"].as_u64().unwrap_or(0) > 0,
        "{cut}"
    );
}

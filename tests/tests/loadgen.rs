//! A small version of the load test: every device is assigned, whatever the speed.

use edgedps_device::loadgen::{prepare, run_devices, Attestation};
use edgedps_tests::*;

async fn smoke(attestation: Attestation, devices: usize) {
    let server = Server::start().await;
    let admin = ([127, 0, 0, 1], server.local_port).into();
    let ca = pki().server_ca.pem.as_bytes();
    let fleet = prepare(
        attestation,
        devices,
        0,
        server.devices_port,
        Some(admin),
        ca,
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_devices_are_all_assigned() {
    smoke(Attestation::Sas, 200).await;
    smoke(Attestation::SasGroup, 100).await;
    smoke(Attestation::X509, 100).await;
    smoke(Attestation::X509Group, 100).await;
}

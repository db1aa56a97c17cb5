//! The devices of a round: keys or certificates made here, and their enrollments (or
//! their group) written over the operator topics before the round starts.

use base64::Engine;
use std::net::SocketAddr;

use serde_json::json;

use edgedps_topics::admin::RecordKind;

use super::args::Attestation;
use super::run::SimulatedDevice;
use crate::provision::{self, DeviceAuth, DeviceConfig};

/// Makes the devices of a round and enrolls them over the operator topics.
/// What a round carries beyond its devices' attestation.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Every device sends a certificate signing request.
    pub csr: bool,
    /// The linked hub is a cloud hub with a connection string.
    pub cloud_hub: bool,
    /// Every enrollment allocates by `custom` with this `customAllocationDefinition`.
    pub custom: Option<serde_json::Value>,
}

pub async fn prepare(
    attestation: Attestation,
    count: usize,
    round: usize,
    port: u16,
    admin: Option<SocketAddr>,
    server_ca: &[u8],
    extras: Extras,
) -> Result<Vec<SimulatedDevice>, String> {
    let Extras {
        csr,
        cloud_hub,
        custom,
    } = extras;
    let scope = "0ne00000001";
    let mut enrollments: Vec<(String, serde_json::Value)> = Vec::new();
    let mut devices = Vec::with_capacity(count);
    let id = |i: usize| format!("load-r{round}-{i}");
    let shared_sas_tls = crate::tls::client_config(server_ca, None).map_err(|e| e.to_string())?;
    match attestation {
        Attestation::Sas | Attestation::SasGroup => {
            let group_key = crate::credentials::new_symmetric_key()?;
            if attestation == Attestation::SasGroup {
                enrollments.push((
                    RecordKind::EnrollmentGroup.record_topic(&format!("load-r{round}")),
                    json!({"enrollmentGroupId": format!("load-r{round}"),
                        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key}}}),
                ));
            }
            for i in 0..count {
                let key = if attestation == Attestation::SasGroup {
                    edgedps_policies::sas::derive_device_key(&group_key, &id(i))
                        .map_err(|e| e.to_string())?
                } else {
                    let key = crate::credentials::new_symmetric_key()?;
                    enrollments.push((
                        RecordKind::Enrollment.record_topic(&id(i)),
                        json!({"registrationId": id(i),
                            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}}),
                    ));
                    key
                };
                let config = DeviceConfig::new(
                    "localhost",
                    port,
                    scope,
                    &id(i),
                    DeviceAuth::SymmetricKey { key },
                    server_ca.to_vec(),
                );
                devices.push(SimulatedDevice {
                    config,
                    tls: shared_sas_tls.clone(),
                    registrations: 1,
                });
            }
        }
        Attestation::X509 | Attestation::X509Group => {
            let ca = crate::manufacture::SigningCa::new(&format!("load CA r{round}"))
                .map_err(|e| e.to_string())?;
            if attestation == Attestation::X509Group {
                enrollments.push((
                    RecordKind::EnrollmentGroup.record_topic(&format!("load-r{round}")),
                    json!({"enrollmentGroupId": format!("load-r{round}"),
                        "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca.pem()}}}}}),
                ));
            }
            for i in 0..count {
                let leaf = ca.device(&id(i)).map_err(|e| e.to_string())?;
                if attestation == Attestation::X509 {
                    enrollments.push((
                        RecordKind::Enrollment.record_topic(&id(i)),
                        json!({"registrationId": id(i), "attestation": {"type": "x509",
                            "x509": {"clientCertificates": {"primary": {"sha256Thumbprint": leaf.thumbprint}}}}}),
                    ));
                }
                let auth = DeviceAuth::X509 {
                    chain_pem: leaf.cert_pem.into_bytes(),
                    key_pem: leaf.key_pem.into_bytes(),
                };
                let config =
                    DeviceConfig::new("localhost", port, scope, &id(i), auth, server_ca.to_vec());
                let tls = provision::tls_config(&config).map_err(|e| e.to_string())?;
                devices.push(SimulatedDevice {
                    config,
                    tls,
                    registrations: 1,
                });
            }
        }
    }
    if csr {
        // Every device asks for a certificate (made here, before the round) and every
        // enrollment allows it.
        for (_, enrollment) in &mut enrollments {
            enrollment["clientCertificateIssuancePolicy"] =
                json!({"certificateAuthorityName": "gateway"});
        }
        for device in &mut devices {
            let request =
                crate::credentials::CertificateRequest::new(&device.config.registration_id)
                    .map_err(|e| e.to_string())?;
            device.config.csr = Some(request.csr);
        }
    }
    if let Some(definition) = custom {
        for (_, enrollment) in &mut enrollments {
            enrollment["allocationPolicy"] = json!("custom");
            enrollment["customAllocationDefinition"] = definition.clone();
        }
    }
    if let Some(admin) = admin {
        crate::admin::write_all(admin, &enrollments)
            .await
            .map_err(|e| e.to_string())?;
        let mut hub = json!({"allocationWeight": 1});
        if cloud_hub {
            // A cloud hub whose service API refuses connections: every assignment
            // writes an outbox operation, which stays pending (its worker retries the
            // oldest one at most every minute).
            hub["connectionString"] = json!(format!(
                "HostName=hub-a.example.net;SharedAccessKeyName=loadgen;SharedAccessKey={}",
                base64::engine::general_purpose::STANDARD
                    .encode(b"loadgen cloud hub key, not a secret")
            ));
            hub["serviceAddress"] = json!("127.0.0.1:9");
        }
        crate::admin::write_all(
            admin,
            &[(RecordKind::Hub.record_topic("hub-a.example.net"), hub)],
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(devices)
}

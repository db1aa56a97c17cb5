//! Validation of operator writes (PROTOCOL B): what a body must hold before it may touch
//! the store. Values in, a verdict out: [`enrollment`], [`group`] and [`hub`] take the
//! body as parsed, the topic's id and the stored record, and return the record to store
//! (keys an edit left out kept from the stored one) or why it is refused.
//!
//! Messages quote ids and host names, never other values: a value in the wrong field
//! may be a key.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use edgedps_topics::admin::{
    AllocationPolicy, Attestation, AttestationType, CertificatePair, CustomAllocationDefinition,
    Enrollment, EnrollmentGroup, EnrollmentSettings, GroupLimits, LinkedHub,
};
use edgedps_topics::encoding::Encoding;
use edgedps_topics::identity;

use crate::x509;

/// Why a write is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The body or the topic is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// The etag sent is not the stored record's (412).
    #[error("{0}")]
    EtagMismatch(String),
}

fn bad(message: String) -> Invalid {
    Invalid::BadRequest(message)
}

/// An individual enrollment written to `dps/enrollments/{topic_id}`, over `stored`.
pub fn enrollment(
    topic_id: &str,
    mut e: Enrollment,
    stored: Option<&Enrollment>,
) -> Result<Enrollment, Invalid> {
    if !e.registration_id.is(topic_id) {
        return Err(bad(format!(
            "registrationId {} is not the topic's `{topic_id}`",
            shown(e.registration_id.as_str())
        )));
    }
    registration_id(e.registration_id.as_str())?;
    if let Some(device_id) = &e.device_id {
        if !identity::valid_registration_id(device_id) {
            return Err(bad(format!("deviceId {} is not valid", shown(device_id))));
        }
    }
    keep_stored_keys(&mut e.attestation, stored.map(|s| &s.attestation));
    validate_attestation(&e.attestation, false)?;
    if e.attestation.kind == AttestationType::Tpm {
        validate_tpm(e.registration_id.as_str(), &e.attestation)?;
    }
    validate_settings(&e.settings)?;
    check_etag(
        e.settings.etag.as_deref(),
        stored.and_then(|s| s.settings.etag.as_deref()),
    )?;
    Ok(e)
}

/// An enrollment group written to `dps/enrollment-groups/{topic_id}`, over `stored`.
pub fn group(
    topic_id: &str,
    mut g: EnrollmentGroup,
    stored: Option<&EnrollmentGroup>,
) -> Result<EnrollmentGroup, Invalid> {
    if g.enrollment_group_id != topic_id {
        return Err(bad(format!(
            "enrollmentGroupId {} is not the topic's `{topic_id}`",
            shown(&g.enrollment_group_id)
        )));
    }
    registration_id(topic_id)?;
    keep_stored_keys(&mut g.attestation, stored.map(|s| &s.attestation));
    validate_attestation(&g.attestation, true)?;
    validate_settings(&g.settings)?;
    if let Some(limits) = &g.limits {
        validate_limits(limits)?;
    }
    check_etag(
        g.settings.etag.as_deref(),
        stored.and_then(|s| s.settings.etag.as_deref()),
    )?;
    Ok(g)
}

/// A linked hub written to `dps/hubs/{topic_id}`; `stored_etag` is the linked one's.
pub fn hub(
    topic_id: &str,
    mut hub: LinkedHub,
    stored_etag: Option<&str>,
) -> Result<LinkedHub, Invalid> {
    if hub.host_name.is_empty() {
        hub.host_name = topic_id.to_owned();
    }
    if hub.host_name != topic_id {
        return Err(bad(format!(
            "hostName {} is not the topic's `{topic_id}`",
            shown(&hub.host_name)
        )));
    }
    if !valid_host_name(topic_id) {
        return Err(bad(format!("`{topic_id}` is not a host name")));
    }
    if hub.allocation_weight > 1000 {
        return Err(bad("allocationWeight must be 0 to 1000".into()));
    }
    for (name, address) in [
        ("serviceAddress", &hub.service_address),
        ("probeAddress", &hub.probe_address),
    ] {
        if let Some(address) = address {
            if !host_and_port(address) {
                return Err(bad(format!("{name} {} is not host:port", shown(address))));
            }
        }
    }
    // Measured by edgedps, never taken from a write.
    hub.latency = None;
    check_etag(hub.etag.as_deref(), stored_etag)?;
    Ok(hub)
}

/// The name of a record that is not a registration (a revocation list): the same rules.
pub fn record_name(name: &str) -> Result<(), Invalid> {
    registration_id(name)
}

/// The SHA-256 thumbprints of the certificates an X.509 individual enrollment names.
pub fn enrolled_thumbprints(attestation: &Attestation) -> Vec<String> {
    let Some(pair) = attestation
        .x509
        .as_ref()
        .and_then(|x| x.client_certificates.as_ref())
    else {
        return Vec::new();
    };
    [&pair.primary, &pair.secondary]
        .into_iter()
        .flatten()
        .filter_map(|cert| match (&cert.certificate, &cert.sha256_thumbprint) {
            (Some(pem), _) => x509::pem_der(pem).ok().map(|der| x509::thumbprint(&der)),
            (None, Some(print)) => x509::normalize_thumbprint(print).ok(),
            (None, None) => None,
        })
        .collect()
}

/// Reads an operator body in its encoding.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    encoding: Encoding,
) -> Result<T, Invalid> {
    encoding
        .decode(body)
        .map_err(|e| bad(format!("body is not a valid record: {e}")))
}

/// A value from the body as an error may show it: ids and host names are quoted; any
/// other value (it may be a key in the wrong field) is described by its length only.
pub fn shown(value: &str) -> String {
    if identity::valid_registration_id(value) {
        format!("`{value}`")
    } else {
        format!("({} bytes, not a valid id)", value.len())
    }
}

pub fn check_etag(sent: Option<&str>, stored: Option<&str>) -> Result<(), Invalid> {
    match (sent, stored) {
        (None, _) | (Some("*"), _) => Ok(()),
        (Some(sent), Some(stored)) if sent == stored => Ok(()),
        (Some(_), stored) => Err(Invalid::EtagMismatch(format!(
            "the etag sent does not match the stored {}",
            stored.unwrap_or("(none: the record does not exist)")
        ))),
    }
}

fn registration_id(id: &str) -> Result<(), Invalid> {
    if identity::valid_registration_id(id) {
        Ok(())
    } else {
        Err(bad(format!(
            "`{id}` is not a valid id (1-128 of a-z A-Z 0-9 - . _ :)"
        )))
    }
}

/// `host:port` (a host name, an IPv4 address or a bracketed IPv6 one), port not 0.
pub fn host_and_port(address: &str) -> bool {
    address.rsplit_once(':').is_some_and(|(host, port)| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        port.parse::<u16>().is_ok_and(|p| p > 0)
            && (valid_host_name(host) || host.parse::<std::net::IpAddr>().is_ok())
    })
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_settings(settings: &EnrollmentSettings) -> Result<(), Invalid> {
    match settings.allocation_policy {
        Some(AllocationPolicy::Static) if settings.iot_hubs.len() != 1 => {
            return Err(bad(
                "allocationPolicy static needs exactly one hub in iotHubs".into(),
            ))
        }
        Some(AllocationPolicy::Custom) => match &settings.custom_allocation_definition {
            Some(definition) => validate_custom(definition)?,
            None => {
                return Err(bad(
                    "allocationPolicy custom needs customAllocationDefinition with webhookUrl or mqttAllocator".into(),
                ))
            }
        },
        _ if settings.custom_allocation_definition.is_some() => {
            return Err(bad(
                "customAllocationDefinition is used only with allocationPolicy custom".into(),
            ))
        }
        _ => {}
    }
    if let Some(hub) = settings.iot_hubs.iter().find(|h| !valid_host_name(h)) {
        return Err(bad(format!(
            "iotHubs entry {} is not a host name",
            shown(hub)
        )));
    }
    if let Some(twin) = &settings.initial_twin {
        if !twin.is_object() {
            return Err(bad("initialTwin must be a JSON object".into()));
        }
    }
    Ok(())
}

/// Longest `webhookUrl` accepted.
const MAX_WEBHOOK_URL: usize = 2048;

fn validate_custom(definition: &CustomAllocationDefinition) -> Result<(), Invalid> {
    match (&definition.webhook_url, &definition.mqtt_allocator) {
        (Some(url), None) => webhook_url(url).map(|_| ()).map_err(bad),
        (None, Some(name)) => match identity::valid_registration_id(name) {
            true => Ok(()),
            false => Err(bad(format!(
                "mqttAllocator {} is not a valid name (1-128 of a-z A-Z 0-9 - . _ :)",
                shown(name)
            ))),
        },
        (Some(_), Some(_)) => Err(bad(
            "customAllocationDefinition takes webhookUrl or mqttAllocator, not both".into(),
        )),
        (None, None) => Err(bad(
            "customAllocationDefinition needs webhookUrl or mqttAllocator".into(),
        )),
    }
}

/// A custom allocation webhook's URL, as edgedps dials it: `https://`, or `http://`
/// to a loopback address only (a key in the URL is never sent in the clear elsewhere).
/// The reason quotes no part of the URL but its scheme and host: its query may hold the
/// function key.
pub fn webhook_url(url: &str) -> Result<url::Url, String> {
    if url.len() > MAX_WEBHOOK_URL {
        return Err(format!("webhookUrl is longer than {MAX_WEBHOOK_URL} bytes"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("webhookUrl is not a URL: {e}"))?;
    let host = match parsed.host() {
        Some(host) => host,
        None => return Err("webhookUrl has no host".into()),
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("webhookUrl must not carry a user name or password".into());
    }
    let loopback = match &host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if loopback => Ok(parsed),
        "http" => Err(format!(
            "webhookUrl: http:// only to a loopback address, not `{host}`; use https://"
        )),
        other => Err(format!("webhookUrl: scheme `{other}` is not https")),
    }
}

/// Longest `registrationIdPattern`, and the most memory its compiled form may take.
const MAX_PATTERN: usize = 1024;
const MAX_PATTERN_SIZE: usize = 1 << 20;

fn validate_limits(limits: &GroupLimits) -> Result<(), Invalid> {
    if limits.max_devices == Some(0) {
        return Err(bad(
            "limits.maxDevices must be at least 1 (disable the group to admit none)".into(),
        ));
    }
    if let Some(rate) = limits.registrations_per_minute {
        if !(1..=1_000_000).contains(&rate) {
            return Err(bad(
                "limits.registrationsPerMinute must be 1 to 1000000".into()
            ));
        }
    }
    if let Some(pattern) = &limits.registration_id_pattern {
        id_pattern(pattern).map_err(bad)?;
    }
    Ok(())
}

/// A group's `registrationIdPattern`, compiled to match the whole id.
pub fn id_pattern(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > MAX_PATTERN {
        return Err(format!(
            "limits.registrationIdPattern is longer than {MAX_PATTERN} bytes"
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_PATTERN_SIZE)
        .build()
        .map_err(|e| {
            // The regex crate's message spans lines, with a caret under the error.
            let reason = e.to_string().replace('\n', " ");
            format!("limits.registrationIdPattern is not a valid regular expression: {reason}")
        })
}

fn validate_attestation(attestation: &Attestation, group: bool) -> Result<(), Invalid> {
    match attestation.kind {
        AttestationType::SymmetricKey => {
            let keys = attestation
                .symmetric_key
                .as_ref()
                .ok_or_else(|| bad("attestation.symmetricKey is missing".into()))?;
            let primary = keys
                .primary_key
                .as_deref()
                .ok_or_else(|| bad("attestation.symmetricKey.primaryKey is missing".into()))?;
            for (name, key) in [
                ("primaryKey", Some(primary)),
                ("secondaryKey", keys.secondary_key.as_deref()),
            ] {
                if let Some(key) = key {
                    let len = BASE64
                        .decode(key)
                        .map_err(|_| bad(format!("symmetricKey.{name} is not base64")))?
                        .len();
                    if !(16..=64).contains(&len) {
                        return Err(bad(format!(
                            "symmetricKey.{name} must decode to 16 to 64 bytes, not {len}"
                        )));
                    }
                }
            }
            Ok(())
        }
        AttestationType::X509 => {
            let x509 = attestation
                .x509
                .as_ref()
                .ok_or_else(|| bad("attestation.x509 is missing".into()))?;
            let (name, pair) = if group {
                ("signingCertificates", x509.signing_certificates.as_ref())
            } else {
                ("clientCertificates", x509.client_certificates.as_ref())
            };
            let pair = pair.ok_or_else(|| bad(format!("attestation.x509.{name} is missing")))?;
            validate_certificates(name, pair, group)
        }
        AttestationType::Tpm if group => Err(bad(
            "an enrollment group attests by X.509 or symmetric key: TPM attestation is for individual enrollments".into(),
        )),
        // Checked with the registration id it must name (`validate_tpm`).
        AttestationType::Tpm => Ok(()),
    }
}

/// A TPM enrollment: an RSA 2048 endorsement key that names `registration_id` (TPM.md),
/// and a storage root key, when given, that a key can be duplicated to.
fn validate_tpm(registration_id: &str, attestation: &Attestation) -> Result<(), Invalid> {
    let tpm = attestation
        .tpm
        .as_ref()
        .ok_or_else(|| bad("attestation.tpm is missing".into()))?;
    let endorsement_key = tpm
        .endorsement_key
        .as_deref()
        .ok_or_else(|| bad("attestation.tpm.endorsementKey is missing".into()))?;
    crate::tpm::check_enrollment(
        registration_id,
        endorsement_key,
        tpm.storage_root_key.as_deref(),
    )
    .map_err(|e| bad(format!("attestation.tpm: {e}")))?;
    Ok(())
}

fn validate_certificates(name: &str, pair: &CertificatePair, group: bool) -> Result<(), Invalid> {
    let primary = pair
        .primary
        .as_ref()
        .ok_or_else(|| bad(format!("attestation.x509.{name}.primary is missing")))?;
    for (slot, cert) in [
        ("primary", Some(primary)),
        ("secondary", pair.secondary.as_ref()),
    ] {
        let Some(cert) = cert else { continue };
        match (&cert.certificate, &cert.sha256_thumbprint) {
            (Some(pem), None) => {
                let der = x509::pem_to_der(pem)
                    .map_err(|e| bad(format!("x509.{name}.{slot}.certificate: {e}")))?;
                if group {
                    let info = x509::CertificateInfo::read(&der)
                        .map_err(|e| bad(format!("x509.{name}.{slot}: {e}")))?;
                    if !info.is_ca {
                        return Err(bad(format!("x509.{name}.{slot} is not a CA certificate")));
                    }
                }
            }
            (None, Some(print)) if !group => {
                x509::normalize_thumbprint(print)
                    .map_err(|e| bad(format!("x509.{name}.{slot}.sha256Thumbprint: {e}")))?;
            }
            _ => {
                return Err(bad(format!(
                    "x509.{name}.{slot} needs exactly one of certificate{}",
                    if group { "" } else { " or sha256Thumbprint" }
                )))
            }
        }
    }
    Ok(())
}

/// A write that omits the keys of a symmetric-key attestation keeps the stored keys,
/// so the retained (redacted) record can be edited and published back.
fn keep_stored_keys(attestation: &mut Attestation, stored: Option<&Attestation>) {
    let (Some(new), Some(old)) = (
        attestation.symmetric_key.as_mut(),
        stored.and_then(|s| s.symmetric_key.as_ref()),
    ) else {
        return;
    };
    if new.primary_key.is_none() && new.secondary_key.is_none() {
        new.primary_key = old.primary_key.clone();
        new.secondary_key = old.secondary_key.clone();
    }
}

fn redact(attestation: &mut Attestation) {
    if let Some(keys) = attestation.symmetric_key.as_mut() {
        keys.primary_key = None;
        keys.secondary_key = None;
    }
}

pub fn redact_enrollment(mut e: Enrollment) -> Enrollment {
    redact(&mut e.attestation);
    e
}

pub fn redact_group(mut g: EnrollmentGroup) -> EnrollmentGroup {
    redact(&mut g.attestation);
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1tYXRlcmlhbC0wMTIzNDU2Nzg5YWI=";

    fn message_for(body: &str) -> String {
        parse_body::<Enrollment>(body.as_bytes(), Encoding::Json)
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let wrong_type = format!(
            r#"{{"registrationId":"d","attestation":{{"type":"symmetricKey"}},"iotHubs":"{KEY}"}}"#
        );
        let wrong_variant = format!(r#"{{"registrationId":"d","attestation":{{"type":"{KEY}"}}}}"#);
        let escaped = r#"{"registrationId":"d","attestation":{"type":"symmetricKey"},"iotHubs":"a\"b\\c-SECRET"}"#;
        for body in [wrong_type.as_str(), wrong_variant.as_str(), escaped] {
            let message = message_for(body);
            assert!(
                message.starts_with("body is not a valid record"),
                "{message}"
            );
            assert!(!message.contains(KEY), "{message}");
            assert!(!message.contains("SECRET"), "{message}");
            assert!(message.contains("line 1 column"), "{message}");
        }
        let message = message_for(&wrong_type);
        assert!(message.contains("expected a sequence"), "{message}");
        let message = message_for(&wrong_variant);
        assert!(message.contains("expected one of `x509`"), "{message}");
    }

    #[test]
    fn parse_errors_keep_field_names_and_syntax_positions() {
        let message =
            message_for(r#"{"registrationId":"d","attestation":{"type":"x509"},"iotHub":"h"}"#);
        assert!(message.contains("unknown field `iotHub`"), "{message}");
        let message = message_for(r#"{"registrationId":"d","#);
        assert!(message.contains("EOF while parsing"), "{message}");
    }

    fn enrollment_body(value: serde_json::Value) -> Enrollment {
        serde_json::from_value(value).unwrap()
    }

    fn sas_enrollment(id: &str) -> Enrollment {
        enrollment_body(serde_json::json!({"registrationId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY}}}))
    }

    #[test]
    fn an_edit_without_keys_keeps_the_stored_ones_and_a_stale_etag_is_refused() {
        let mut stored = sas_enrollment("dev-1");
        stored.settings.etag = Some("\"v1\"".into());
        let mut edit = enrollment_body(serde_json::json!({"registrationId": "DEV-1",
            "attestation": {"type": "symmetricKey", "symmetricKey": {}}, "etag": "\"v1\""}));
        let accepted = enrollment("dev-1", edit.clone(), Some(&stored)).unwrap();
        let keys = accepted.attestation.symmetric_key.unwrap();
        assert_eq!(keys.primary_key.as_deref(), Some(KEY));
        edit.settings.etag = Some("\"v0\"".into());
        assert!(matches!(
            enrollment("dev-1", edit.clone(), Some(&stored)),
            Err(Invalid::EtagMismatch(_))
        ));
        edit.settings.etag = Some("*".into());
        assert!(enrollment("dev-1", edit, Some(&stored)).is_ok());
    }

    #[test]
    fn an_enrollment_must_match_its_topic_and_hold_usable_keys() {
        let e = sas_enrollment("dev-1");
        let refused = enrollment("dev-2", e, None).unwrap_err().to_string();
        assert!(refused.contains("not the topic's `dev-2`"), "{refused}");
        let short = enrollment_body(serde_json::json!({"registrationId": "dev-1",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}));
        let refused = enrollment("dev-1", short, None).unwrap_err().to_string();
        assert!(refused.contains("16 to 64 bytes"), "{refused}");
    }

    #[test]
    fn a_tpm_enrollment_must_hold_an_endorsement_key_naming_its_registration_id() {
        use base64::Engine;
        let area = crate::tpm::tests::ek_area(&[0xc5; 256]);
        let ek = base64::engine::general_purpose::STANDARD.encode(&area);
        let id = crate::tpm::registration_id(&area);
        let body = |id: &str, tpm: serde_json::Value| {
            enrollment_body(serde_json::json!({"registrationId": id,
                "attestation": {"type": "tpm", "tpm": tpm}}))
        };
        let accepted = enrollment(
            &id,
            body(&id, serde_json::json!({"endorsementKey": ek})),
            None,
        );
        assert!(accepted.is_ok(), "{accepted:?}");
        for (rid, tpm, says) in [
            (
                "dev-1",
                serde_json::json!({"endorsementKey": ek}),
                "not `dev-1`",
            ),
            (
                id.as_str(),
                serde_json::json!({}),
                "endorsementKey is missing",
            ),
            (
                id.as_str(),
                serde_json::json!({"endorsementKey": "AAA"}),
                "attestation.tpm",
            ),
        ] {
            let refused = enrollment(rid, body(rid, tpm), None)
                .unwrap_err()
                .to_string();
            assert!(refused.contains(says), "{refused}");
        }
        let missing = enrollment_body(serde_json::json!({"registrationId": "dev-1",
            "attestation": {"type": "tpm"}}));
        let refused = enrollment("dev-1", missing, None).unwrap_err().to_string();
        assert!(refused.contains("attestation.tpm is missing"), "{refused}");
        let group = serde_json::from_value(serde_json::json!({"enrollmentGroupId": "g",
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
        .unwrap();
        let refused = super::group("g", group, None).unwrap_err().to_string();
        assert!(refused.contains("individual enrollments"), "{refused}");
    }

    #[test]
    fn static_allocation_needs_exactly_one_named_hub() {
        let mut e = sas_enrollment("dev-1");
        e.settings.allocation_policy = Some(AllocationPolicy::Static);
        assert!(enrollment("dev-1", e.clone(), None).is_err());
        e.settings.iot_hubs = vec!["hub-a.example.net".into()];
        assert!(enrollment("dev-1", e.clone(), None).is_ok());
        e.settings.iot_hubs = vec!["not a host".into()];
        assert!(enrollment("dev-1", e, None).is_err());
    }

    #[test]
    fn custom_allocation_needs_one_usable_allocator() {
        let with = |definition: serde_json::Value| {
            let mut e = sas_enrollment("dev-1");
            e.settings.allocation_policy = Some(AllocationPolicy::Custom);
            e.settings.custom_allocation_definition = serde_json::from_value(definition).unwrap();
            enrollment("dev-1", e, None)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for ok in [
            serde_json::json!({"webhookUrl": "https://alloc.example.net/api/a?code=k"}),
            serde_json::json!({"webhookUrl": "http://127.0.0.1:9000/a"}),
            serde_json::json!({"webhookUrl": "http://[::1]:9000/a"}),
            serde_json::json!({"webhookUrl": "http://localhost/a", "apiVersion": "2021-10-01"}),
            serde_json::json!({"mqttAllocator": "plant-7"}),
        ] {
            assert_eq!(with(ok.clone()), Ok(()), "{ok}");
        }
        for (bad, says) in [
            (serde_json::json!(null), "needs customAllocationDefinition"),
            (serde_json::json!({}), "needs webhookUrl or mqttAllocator"),
            (
                serde_json::json!({"webhookUrl": "https://a.example", "mqttAllocator": "x"}),
                "not both",
            ),
            (
                serde_json::json!({"webhookUrl": "http://alloc.example.net/?code=SECRET"}),
                "only to a loopback address",
            ),
            (
                serde_json::json!({"webhookUrl": "ftp://a.example/"}),
                "scheme `ftp`",
            ),
            (serde_json::json!({"webhookUrl": "not a url"}), "not a URL"),
            (
                serde_json::json!({"webhookUrl": "https://u:p@a.example/"}),
                "user name or password",
            ),
            (
                serde_json::json!({"mqttAllocator": "a/b"}),
                "not a valid name",
            ),
        ] {
            let refused = with(bad.clone()).unwrap_err();
            assert!(refused.contains(says), "{bad}: {refused}");
            assert!(!refused.contains("SECRET"), "{refused}");
        }
        // A definition without the custom policy is a mistake worth naming.
        let mut e = sas_enrollment("dev-1");
        e.settings.custom_allocation_definition =
            serde_json::from_value(serde_json::json!({"mqttAllocator": "plant-7"})).unwrap();
        let refused = enrollment("dev-1", e, None).unwrap_err().to_string();
        assert!(
            refused.contains("only with allocationPolicy custom"),
            "{refused}"
        );
    }

    #[test]
    fn group_limits_are_checked_and_a_bad_pattern_is_refused_with_its_reason() {
        let with = |limits: serde_json::Value| {
            let g: EnrollmentGroup = serde_json::from_value(serde_json::json!({
                "enrollmentGroupId": "g",
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY}},
                "limits": limits}))
            .unwrap();
            group("g", g, None).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(
            with(
                serde_json::json!({"maxDevices": 10, "registrationsPerMinute": 60,
                "registrationIdPattern": "sensor-[0-9]+"})
            ),
            Ok(())
        );
        for (bad, says) in [
            (serde_json::json!({"maxDevices": 0}), "at least 1"),
            (
                serde_json::json!({"registrationsPerMinute": 0}),
                "1 to 1000000",
            ),
            (
                serde_json::json!({"registrationIdPattern": "sensor-[0-9"}),
                "not a valid regular expression",
            ),
            (
                serde_json::json!({"registrationIdPattern": "a{1000}{1000}"}),
                "not a valid regular expression",
            ),
        ] {
            let refused = with(bad.clone()).unwrap_err();
            assert!(refused.contains(says), "{bad}: {refused}");
            assert!(!refused.contains('\n'), "{refused}");
        }
        let pattern = id_pattern("sensor-[0-9]+").unwrap();
        assert!(pattern.is_match("sensor-12"));
        assert!(!pattern.is_match("sensor-12x"), "the whole id must match");
        assert!(!pattern.is_match("xsensor-12"));
    }

    #[test]
    fn a_probe_address_is_host_and_port_and_a_written_latency_is_dropped() {
        let hub_body = |value| serde_json::from_value::<LinkedHub>(value).unwrap();
        let accepted = hub(
            "hub-a.example.net",
            hub_body(serde_json::json!({"probeAddress": "127.0.0.1:8883",
                "latency": {"reachable": true, "microseconds": 1, "probeAddress": "x:1",
                    "measuredAtUtc": "t"}})),
            None,
        )
        .unwrap();
        assert_eq!(accepted.probe_address.as_deref(), Some("127.0.0.1:8883"));
        assert_eq!(accepted.latency, None);
        let refused = hub(
            "hub-a.example.net",
            hub_body(serde_json::json!({"probeAddress": "nowhere"})),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("probeAddress"), "{refused}");
    }

    #[test]
    fn a_hub_must_be_a_host_name_with_a_weight_up_to_1000() {
        let hub_body = |value| serde_json::from_value::<LinkedHub>(value).unwrap();
        let named = hub("hub-a.example.net", hub_body(serde_json::json!({})), None).unwrap();
        assert_eq!(named.host_name, "hub-a.example.net");
        assert_eq!(named.allocation_weight, 1);
        assert!(hub("bad_host", hub_body(serde_json::json!({})), None).is_err());
        assert!(hub(
            "hub-a.example.net",
            hub_body(serde_json::json!({"allocationWeight": 1001})),
            None
        )
        .is_err());
        assert!(hub(
            "hub-a.example.net",
            hub_body(serde_json::json!({"hostName": "hub-b.example.net"})),
            None
        )
        .is_err());
    }
}

//! geoLatency's measurements (PROTOCOL A6): in the background, every linked hub's
//! connect latency from this gateway: a TCP connect to its `probeAddress` (default
//! `{hostName}:8883`), a TLS ClientHello, and the first bytes of the hub's answer (its
//! ServerHello); then the connection is dropped. Each round takes a few samples and
//! keeps their median; rounds are smoothed (half the new median, half the old figure).
//! A round in which no sample answered marks the hub unreachable. The figures go to the
//! responder, which republishes the hub's retained record with them.
//!
//! A local hub (the gateway itself) without a `probeAddress` is not dialled: it is
//! reachable at 0 ms. Nothing is dialled at all until something allocates by geoLatency
//! (`Responder::latencies_wanted`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use edgedps_responder::{ProbeTarget, Responder};
use edgedps_topics::admin::HubLatency;

use crate::router::Publisher;

/// How geoLatency measures: from `[allocation]`.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub samples: u32,
    pub timeout: Duration,
}

/// Measures every linked hub now, then every `interval` and whenever the linked hubs
/// change; forever.
pub async fn run(
    responder: Arc<Responder>,
    publisher: Publisher,
    tls: Arc<rustls::ClientConfig>,
    settings: ProbeSettings,
) {
    let changed = responder.linked_hubs_changed();
    let mut smoothed: HashMap<String, u64> = HashMap::new();
    let mut reachable: HashMap<String, bool> = HashMap::new();
    loop {
        if !responder.latencies_wanted() {
            // Nothing allocates by geoLatency: no hub is dialled.
            changed.notified().await;
            continue;
        }
        let targets = responder.probe_targets();
        let mut rounds = tokio::task::JoinSet::new();
        for target in targets.clone() {
            let tls = tls.clone();
            let settings = settings.clone();
            rounds.spawn(async move {
                let measured = round(&target, &tls, &settings).await;
                (target, measured)
            });
        }
        while let Some(done) = rounds.join_next().await {
            let Ok((target, measured)) = done else {
                continue;
            };
            let key = target.host_name.to_ascii_lowercase();
            let latency = match measured {
                Ok(median) => {
                    let figure = match smoothed.get(&key) {
                        Some(old) => (old + median) / 2,
                        None => median,
                    };
                    smoothed.insert(key.clone(), figure);
                    HubLatency {
                        reachable: true,
                        microseconds: Some(figure),
                        probe_address: target.address.clone(),
                        error: None,
                        measured_at_utc: edgedps_responder::timestamp_now(),
                    }
                }
                Err(reason) => HubLatency {
                    reachable: false,
                    microseconds: smoothed.get(&key).copied(),
                    probe_address: target.address.clone(),
                    error: Some(reason),
                    measured_at_utc: edgedps_responder::timestamp_now(),
                },
            };
            let was = reachable.insert(key, latency.reachable);
            if was != Some(latency.reachable) {
                match &latency.error {
                    None => {
                        tracing::info!(hub = %target.host_name, address = %target.address, microseconds = ?latency.microseconds, "hub reachable (geoLatency)")
                    }
                    Some(reason) => {
                        tracing::warn!(hub = %target.host_name, address = %target.address, %reason, "hub unreachable (geoLatency); it is not chosen while so")
                    }
                }
            }
            publisher
                .publish(responder.latency_measured(&target.host_name, latency))
                .await;
        }
        // Hubs unlinked since: forget their figures.
        smoothed.retain(|key, _| {
            targets
                .iter()
                .any(|t| t.host_name.eq_ignore_ascii_case(key))
        });
        reachable.retain(|key, _| {
            targets
                .iter()
                .any(|t| t.host_name.eq_ignore_ascii_case(key))
        });
        let _ = tokio::time::timeout(settings.interval, changed.notified()).await;
    }
}

/// One round: the median of the samples that answered, in microseconds.
async fn round(
    target: &ProbeTarget,
    tls: &Arc<rustls::ClientConfig>,
    settings: &ProbeSettings,
) -> Result<u64, String> {
    if target.is_self {
        return Ok(0);
    }
    let mut samples = Vec::new();
    let mut last_error = String::new();
    for _ in 0..settings.samples {
        let started = Instant::now();
        match tokio::time::timeout(settings.timeout, sample(target, tls)).await {
            Ok(Ok(())) => {
                samples.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
            }
            Ok(Err(reason)) => last_error = reason,
            Err(_) => last_error = format!("no answer within {} ms", settings.timeout.as_millis()),
        }
    }
    if samples.is_empty() {
        return Err(format!("{}: {last_error}", target.address));
    }
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

/// TCP connect, ClientHello, and the first bytes of a TLS answer.
async fn sample(target: &ProbeTarget, tls: &Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut tcp = TcpStream::connect(&target.address)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(target.host_name.clone())
        .map_err(|e| format!("`{}` is not a TLS server name: {e}", target.host_name))?;
    let mut client =
        rustls::ClientConnection::new(tls.clone(), name).map_err(|e| format!("TLS: {e}"))?;
    let mut hello = Vec::new();
    while client.wants_write() {
        client
            .write_tls(&mut hello)
            .map_err(|e| format!("TLS: {e}"))?;
    }
    tcp.write_all(&hello)
        .await
        .map_err(|e| format!("cannot send the ClientHello: {e}"))?;
    let mut first = [0u8; 5];
    tcp.read_exact(&mut first)
        .await
        .map_err(|e| format!("no TLS answer: {e}"))?;
    // A handshake record (the ServerHello) or an alert: a TLS server answered.
    match first[0] {
        0x16 | 0x15 => Ok(()),
        other => Err(format!("not a TLS server (first byte {other:#04x})")),
    }
}

//! A small operator client: writes retained records under `dps/` and waits for the
//! result of each on `dps/admin/results/...` (PROTOCOL B).

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;

use edgedps_topics::admin;

use crate::DeviceError;

/// Writes every record (topic, JSON body) as a retained message and waits until edgedps
/// has accepted each. Large lists go over 8 connections, whose writes share flushes.
pub async fn write_all(addr: SocketAddr, records: &[(String, Value)]) -> Result<(), DeviceError> {
    if records.is_empty() {
        return Ok(());
    }
    let size = records.len().div_ceil(8);
    let mut tasks = Vec::new();
    for (n, chunk) in records.chunks(size).enumerate() {
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(
            async move { write_chunk(addr, n, chunk).await },
        ));
    }
    for task in tasks {
        task.await
            .map_err(|e| DeviceError::Connection(e.to_string()))??;
    }
    Ok(())
}

/// An operator's MQTT client for the listener at `addr`, named `name` (made unique per
/// process), not yet connected: the event loop connects when first polled.
pub fn client(addr: SocketAddr, name: &str, capacity: usize) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(
        format!("{name}-{}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    AsyncClient::new(options, capacity)
}

async fn write_chunk(
    addr: SocketAddr,
    n: usize,
    records: Vec<(String, Value)>,
) -> Result<(), DeviceError> {
    let (client, mut eventloop) = client(addr, &format!("edgedps-admin-{n}"), 256);
    let connection = |e: rumqttc::ClientError| DeviceError::Connection(e.to_string());
    client
        .subscribe(admin::RESULTS_FILTER, QoS::AtLeastOnce)
        .await
        .map_err(connection)?;
    // Results of every operator's writes arrive on the subscription: count our own.
    let mut pending: std::collections::HashSet<String> = records
        .iter()
        .map(|(topic, _)| {
            admin::result_topic_of(topic).ok_or_else(|| DeviceError::WriteRefused {
                topic: topic.clone(),
                message: "not an operator record".into(),
            })
        })
        .collect::<Result<_, _>>()?;
    // Publish once subscribed, from a task, while this one reads the results.
    let publisher = client.clone();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel::<()>();
    let publishing = tokio::spawn(async move {
        if subscribed_rx.await.is_err() {
            return;
        }
        for (topic, body) in records {
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            if publisher
                .publish(topic, QoS::AtLeastOnce, true, bytes)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut subscribed = Some(subscribed_tx);
    while !pending.is_empty() {
        let event = tokio::time::timeout(Duration::from_secs(60), eventloop.poll())
            .await
            .map_err(|_| DeviceError::NoResult(pending.len()))?
            .map_err(|e| DeviceError::Connection(e.to_string()))?;
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
            }
            Event::Incoming(Packet::Publish(p)) if pending.contains(&p.topic) => {
                let result: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                if result.get("ok") != Some(&Value::Bool(true)) {
                    publishing.abort();
                    return Err(DeviceError::WriteRefused {
                        topic: p.topic,
                        message: result
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason")
                            .to_owned(),
                    });
                }
                pending.remove(&p.topic);
            }
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}

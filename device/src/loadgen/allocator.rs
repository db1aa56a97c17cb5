//! `--custom-allocator`: a custom allocator of loadgen's own that answers every request
//! at once with the hub loadgen links (`hub-a.example.net`), so that a run measures what
//! the allocator's round trip costs the server, not the allocator's own work.
//!
//! - `mqtt`: an operator client on the server's local listener, subscribed to
//!   `dps/allocators/loadgen/requests/+`, answering on `.../responses/{id}`.
//! - `webhook`: plain HTTP/1.1 on 127.0.0.1 (edgedps allows HTTP to loopback), one
//!   answer per request, connections kept alive.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::args::CustomAllocator;

/// The answer every allocation gets.
const ANSWER: &str = r#"{"iotHubHostName":"hub-a.example.net"}"#;

/// A running allocator and the `customAllocationDefinition` naming it.
pub struct Running {
    pub definition: Value,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start(kind: CustomAllocator, local_port: u16) -> Result<Running, String> {
    match kind {
        CustomAllocator::Mqtt => mqtt(local_port).await,
        CustomAllocator::Webhook => webhook().await,
    }
}

async fn mqtt(local_port: u16) -> Result<Running, String> {
    let mut options = MqttOptions::new("loadgen-allocator", "127.0.0.1", local_port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    client
        .subscribe("dps/allocators/loadgen/requests/+", QoS::AtMostOnce)
        .await
        .map_err(|e| e.to_string())?;
    crate::provision::wait_for(&mut eventloop, "SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await
        .map_err(|e| format!("the MQTT allocator cannot subscribe: {e}"))?;
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(correlation) = p.topic.rsplit('/').next() else {
                        continue;
                    };
                    let topic = format!("dps/allocators/loadgen/responses/{correlation}");
                    if client
                        .publish(topic, QoS::AtMostOnce, false, ANSWER.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                // The server stopped (or a registration fails with 400207 and the
                // report counts it).
                Err(_) => return,
            }
        }
    });
    Ok(Running {
        definition: json!({"mqttAllocator": "loadgen"}),
        task,
    })
}

async fn webhook() -> Result<Running, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(tcp));
        }
    });
    Ok(Running {
        definition: json!({"webhookUrl": format!("http://127.0.0.1:{port}/allocate")}),
        task,
    })
}

/// Answers the requests of one connection until it closes.
async fn serve(mut tcp: tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut buffer = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        // Headers, then as many body bytes as content-length says.
        let (head_end, length) = loop {
            if let Some(end) = find(&buffer, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, length);
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        while buffer.len() < head_end + length {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..head_end + length);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
            ANSWER.len()
        );
        if tcp.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

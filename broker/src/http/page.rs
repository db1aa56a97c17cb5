//! The status page: counts, linked hubs with their devices, a registration lookup and
//! the last events, rendered on the server (maud escapes every value), then kept live by
//! `page.js`: events from `/events`, counts from `/overview` every few seconds.
//!
//! It shows what a reader may see on the operator plane: counts, registration records
//! and events. Never an enrollment, a key or a token.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use serde_json::{json, Value};

use edgedps_responder::Overview;

use super::HttpState;
use crate::feed::FeedEvent;

/// The fields of an event worth a glance, in this order.
const SUMMARY_FIELDS: [&str; 8] = [
    "outcome",
    "operator",
    "assignedHub",
    "errorCode",
    "reason",
    "message",
    "action",
    "topic",
];

/// `?registration=` of the status page.
#[derive(Debug, serde::Deserialize)]
pub struct Lookup {
    registration: Option<String>,
}

pub async fn status_page(
    State(state): State<Arc<HttpState>>,
    Query(lookup): Query<Lookup>,
) -> Response {
    let overview = match state.overview().await {
        Ok(overview) => overview,
        Err(e) => return failure(&e),
    };
    let registration = lookup
        .registration
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .map(|id| {
            let found = if edgedps_topics::identity::valid_registration_id(&id) {
                state
                    .responder
                    .registration_record(&id)
                    .map_err(|e| e.to_string())
            } else {
                Err(format!("`{id}` is not a registration id"))
            };
            (id, found)
        });
    let events = state.feed.recent();
    let page = render(&state.id_scope, &overview, registration, &events);
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
            ),
        )],
        axum::response::Html(page.into_string()),
    )
        .into_response()
}

fn failure(reason: &str) -> Response {
    tracing::error!(%reason, "status page: the store could not be read");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the store could not be read: {reason}\n"),
    )
        .into_response()
}

type Found = Result<Option<edgedps_topics::registration::RegistrationState>, String>;

fn render(
    id_scope: &str,
    overview: &Overview,
    registration: Option<(String, Found)>,
    events: &[FeedEvent],
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "edgedps status" }
                link rel="stylesheet" href="/page.css";
                script src="/page.js" defer {}
            }
            body {
                header {
                    h1 { "edgedps" }
                    p { "ID scope " code { (id_scope) } " · version " (env!("CARGO_PKG_VERSION")) }
                }
                main {
                    section id="counts" {
                        h2 { "Devices" }
                        table {
                            tbody {
                                (count_row("Enrollments", "count-enrollments", overview.enrollments))
                                (count_row("Enrollment groups", "count-enrollment-groups", overview.enrollment_groups))
                                (count_row("Device sessions connected", "count-live-sessions", overview.live_device_sessions as u64))
                                @for (status, count) in &overview.registrations {
                                    (count_row(&format!("Registrations {status}"), &format!("count-registrations-{status}"), *count))
                                }
                            }
                        }
                    }
                    section id="hubs" {
                        h2 { "Linked hubs" }
                        table {
                            thead { tr { th { "Host name" } th { "Local" } th { "Weight" } th { "Devices" } th { "Registered at the hub" } } }
                            tbody {
                                @for hub in &overview.hubs {
                                    tr data-hub=(hub.host_name) {
                                        td { (hub.host_name) }
                                        td { @if hub.local { "this gateway" } @else { "" } }
                                        td { (hub.allocation_weight) }
                                        td class="devices" { (hub.devices) }
                                        td class="outbox" {
                                            @match &hub.credentials {
                                                Some(policy) => { "by policy " (policy) ": " (hub.outbox_pending) " pending, " (hub.outbox_failed) " failed" }
                                                None => { @if hub.local { "" } @else { "no connection string" } }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        @if overview.hubs.is_empty() { p { "No hub is linked." } }
                    }
                    section id="lookup" {
                        h2 { "Look up a registration" }
                        form method="get" action="/" {
                            input type="text" name="registration" placeholder="registration id"
                                value=(registration.as_ref().map(|(id, _)| id.as_str()).unwrap_or(""));
                            button type="submit" { "Look up" }
                        }
                        @if let Some((id, found)) = &registration {
                            @match found {
                                Ok(Some(record)) => pre id="registration" { (pretty(record)) },
                                Ok(None) => p id="registration-missing" { "No registration " code { (id) } "." },
                                Err(reason) => p id="registration-missing" { (reason) },
                            }
                        }
                    }
                    section id="events-section" {
                        h2 { "Events" }
                        p id="events-state" { "The last " (crate::feed::KEPT) " events, newest first." }
                        ol id="events" {
                            @for event in events.iter().rev() {
                                (event_item(event))
                            }
                        }
                    }
                }
            }
        }
    }
}

fn count_row(label: &str, id: &str, count: u64) -> Markup {
    html! { tr { th { (label) } td id=(id) { (count) } } }
}

fn event_item(event: &FeedEvent) -> Markup {
    let body: Value = serde_json::from_str(&event.body).unwrap_or(Value::Null);
    html! {
        li class="event" data-topic=(event.topic) {
            time { (body["timestampUtc"].as_str().unwrap_or("")) }
            " "
            span class="topic" { (event.topic) }
            " "
            span class="summary" { (summary(&body)) }
        }
    }
}

/// `key=value` of the fields of an event worth a glance.
fn summary(body: &Value) -> String {
    SUMMARY_FIELDS
        .iter()
        .filter_map(|field| {
            let value = &body[*field];
            match value {
                Value::Null => None,
                Value::String(s) => Some(format!("{field}={s}")),
                other => Some(format!("{field}={other}")),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// One event for the page's script: `{"topic", "body"}`, the body as JSON when it is.
pub fn event_json(topic: &str, body: &str) -> String {
    let body: Value = serde_json::from_str(body).unwrap_or_else(|_| Value::from(body));
    json!({"topic": topic, "body": body}).to_string()
}

/// The counts of the page, for its script.
pub async fn overview_json(State(state): State<Arc<HttpState>>) -> Response {
    match state.overview().await {
        Ok(o) => axum::Json(json!({
            "enrollments": o.enrollments,
            "enrollmentGroups": o.enrollment_groups,
            "liveDeviceSessions": o.live_device_sessions,
            "registrations": o.registrations,
            "hubs": o.hubs.iter().map(|h| json!({
                "hostName": h.host_name,
                "local": h.local,
                "allocationWeight": h.allocation_weight,
                "devices": h.devices,
                "credentials": h.credentials.as_ref().map(|policy| json!({"sharedAccessKeyName": policy})),
                "outboxPending": h.outbox_pending,
                "outboxFailed": h.outbox_failed,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => failure(&e),
    }
}

pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("page.js"),
    )
        .into_response()
}

pub async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("page.css"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_summaries_pick_fields() {
        let event = FeedEvent {
            topic: "dps/events/registrations/<b>x</b>".into(),
            body:
                r#"{"outcome":"assigned","assignedHub":"hub-a","timestampUtc":"t","key":"ignored"}"#
                    .into(),
        };
        let page = render("0ne<script>", &Overview::default(), None, &[event]).into_string();
        assert!(!page.contains("<script>x"), "{page}");
        assert!(page.contains("0ne&lt;script&gt;"), "{page}");
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;"), "{page}");
        assert!(
            page.contains("outcome=assigned assignedHub=hub-a"),
            "{page}"
        );
        assert!(!page.contains("ignored"), "{page}");
    }
}

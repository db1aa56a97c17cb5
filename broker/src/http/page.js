// The status page, kept live: events from /events (server-sent events), counts from
// /overview every five seconds. Values go in as text, never as markup.
"use strict";

const KEPT = 100;
const SUMMARY_FIELDS = ["outcome", "operator", "assignedHub", "errorCode", "reason",
  "message", "action", "topic"];

function summary(body) {
  if (typeof body !== "object" || body === null) {
    return String(body);
  }
  return SUMMARY_FIELDS
    .filter((field) => body[field] !== undefined && body[field] !== null)
    .map((field) => `${field}=${typeof body[field] === "string" ? body[field] : JSON.stringify(body[field])}`)
    .join(" ");
}

function eventItem(event) {
  const item = document.createElement("li");
  item.className = "event";
  item.dataset.topic = event.topic;
  const time = document.createElement("time");
  time.textContent = (event.body && event.body.timestampUtc) || "";
  const topic = document.createElement("span");
  topic.className = "topic";
  topic.textContent = event.topic;
  const text = document.createElement("span");
  text.className = "summary";
  text.textContent = summary(event.body);
  item.append(time, " ", topic, " ", text);
  return item;
}

function followEvents() {
  const list = document.getElementById("events");
  const state = document.getElementById("events-state");
  const source = new EventSource("/events");
  source.addEventListener("open", () => {
    state.textContent = `Live: the last ${KEPT} events, newest first.`;
    document.body.dataset.live = "true";
  });
  source.addEventListener("event", (message) => {
    list.prepend(eventItem(JSON.parse(message.data)));
    while (list.children.length > KEPT) {
      list.lastElementChild.remove();
    }
  });
  source.addEventListener("lagged", (message) => {
    state.textContent = `Live, but ${message.data} events were missed: reload for the counts.`;
  });
  source.addEventListener("error", () => {
    state.textContent = "Not live: the connection to edgedps was lost; retrying.";
    document.body.dataset.live = "false";
  });
}

function setCount(id, value) {
  const cell = document.getElementById(id);
  if (cell) {
    cell.textContent = String(value);
  }
}

async function refreshCounts() {
  try {
    const response = await fetch("/overview", { cache: "no-store" });
    if (!response.ok) {
      return;
    }
    const overview = await response.json();
    setCount("count-enrollments", overview.enrollments);
    setCount("count-enrollment-groups", overview.enrollmentGroups);
    setCount("count-live-sessions", overview.liveDeviceSessions);
    for (const [status, count] of Object.entries(overview.registrations)) {
      setCount(`count-registrations-${status}`, count);
    }
    for (const hub of overview.hubs) {
      for (const row of document.querySelectorAll("#hubs tr[data-hub]")) {
        if (row.dataset.hub === hub.hostName) {
          row.querySelector(".devices").textContent = String(hub.devices);
        }
      }
    }
  } catch (_) {
    // The next refresh tries again.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  followEvents();
  setInterval(refreshCounts, 5000);
});

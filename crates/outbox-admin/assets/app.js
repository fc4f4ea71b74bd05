// The outbox dashboard: polls the admin API (relative URLs, so it works under any prefix)
// and renders with DOM calls and textContent only, so no message content is ever parsed as
// HTML.
"use strict";

const POLL_MS = 2000;
const SAMPLES = 90;
const TOKEN_KEY = "outbox-admin-token";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = null;
const samples = [];
let lastDead = null;
let filter = {};
let pages = [null];

class Unauthorized extends Error {}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch("api/" + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    showLogin(token ? "That token was refused." : "");
    throw new Unauthorized();
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) {
      // Not a problem document: keep the status text.
    }
    throw new Error(detail);
  }
  return response.status === 204 ? null : response.json();
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function button(label, ariaLabel, onClick, className) {
  const b = el("button", label, className);
  b.type = "button";
  b.setAttribute("aria-label", ariaLabel);
  b.addEventListener("click", onClick);
  return b;
}

function notice(text, isError) {
  const n = $("notice");
  n.textContent = text;
  n.className = isError ? "notice error" : "notice";
}

function failed(err) {
  if (err instanceof Unauthorized) return;
  $("connection").textContent = "not connected: " + err.message;
}

function showLogin(message) {
  clearInterval(timer);
  timer = null;
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("connection").textContent = "sign in to continue";
  $("token").focus();
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
  if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function fmtCount(n) {
  return Number(n).toLocaleString("en");
}

// --- status and chart ---------------------------------------------------------------

async function refreshStatus() {
  const s = await api("status");
  const now = Date.parse(s.time) / 1000;
  $("count-pending").textContent = fmtCount(s.pending);
  $("count-in_flight").textContent = fmtCount(s.in_flight);
  $("count-delivered").textContent = fmtCount(s.delivered);
  $("count-dead").textContent = fmtCount(s.dead);
  $("count-oldest").textContent = fmtAge(s.oldest_pending_age_seconds);
  const backlog = s.pending + s.in_flight;
  const delivered = s.relay ? s.relay.delivered : null;
  const prev = samples[samples.length - 1];
  let rate = 0;
  if (prev && now > prev.t) {
    rate = delivered !== null && prev.delivered !== null
      ? (delivered - prev.delivered) / (now - prev.t)
      : Math.max(0, prev.backlog - backlog) / (now - prev.t);
  }
  const label = s.relay ? "Delivered/s" : "Backlog drained/s";
  $("rate-label").textContent = label;
  $("rate-caption").textContent = label.toLowerCase();
  $("count-rate").textContent = rate.toFixed(1);
  samples.push({ t: now, backlog, delivered, rate });
  if (samples.length > SAMPLES) samples.shift();
  drawChart();
  renderPaused(s.paused_topics || []);
  if (lastDead !== s.dead) {
    lastDead = s.dead;
    await refreshDead();
  }
}

function drawChart() {
  const w = 600, h = 160, pad = 8;
  const line = (values) => {
    const max = Math.max(1, ...values);
    // The samples so far span the width; once there are SAMPLES, the oldest scroll out.
    const step = samples.length > 1 ? w / (samples.length - 1) : 0;
    const offset = 0;
    return {
      max,
      points: values.map((v, i) =>
        (offset + i * step).toFixed(1) + "," + (h - pad - (v / max) * (h - 2 * pad)).toFixed(1)
      ).join(" "),
    };
  };
  const backlog = line(samples.map((x) => x.backlog));
  const rate = line(samples.map((x) => x.rate));
  $("line-backlog").setAttribute("points", backlog.points);
  $("line-rate").setAttribute("points", rate.points);
  $("max-backlog").textContent = "(max " + fmtCount(backlog.max) + ")";
  $("max-rate").textContent = "(max " + rate.max.toFixed(1) + ")";
}

// --- relays and topics --------------------------------------------------------------

async function refreshRelays() {
  const relays = await api("relays?within=60");
  const body = $("relays");
  body.replaceChildren(...relays.map((r) => {
    const row = el("tr");
    row.append(el("td", r.id, "id"), el("td", r.state.replace("_", " ")),
      el("td", fmtAge(r.age_seconds) + " ago"));
    return row;
  }));
  $("no-relays").hidden = relays.length > 0;
}

function renderPaused(topics) {
  $("paused").replaceChildren(...topics.map((topic) => {
    const item = el("li");
    item.append(el("span", topic), button("Resume", "Resume topic " + topic, () => setPaused(topic, false)));
    return item;
  }));
  $("no-paused").hidden = topics.length > 0;
}

async function setPaused(topic, paused) {
  try {
    await api("topics/" + encodeURIComponent(topic) + (paused ? "/pause" : "/resume"), { method: "POST" });
    notice(paused ? "Topic " + topic + " is paused." : "Topic " + topic + " is delivered again.");
    await refreshStatus();
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(err.message, true);
  }
}

// --- dead letters -------------------------------------------------------------------

function query(after) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(filter)) if (v) params.set(k, v);
  if (after) params.set("after", after);
  params.set("limit", "25");
  return params.toString();
}

async function refreshDead() {
  const after = pages[pages.length - 1];
  const page = await api("dead?" + query(after));
  $("dead").replaceChildren(...page.items.map(deadRow));
  $("no-dead").hidden = page.items.length > 0;
  $("next-page").hidden = !page.next;
  $("next-page").dataset.next = page.next || "";
  $("first-page").hidden = pages.length <= 1;
}

function deadRow(m) {
  const row = el("tr");
  row.dataset.id = m.id;
  const actions = el("td", null, "actions");
  const buttons = el("div", null, "buttons");
  actions.append(buttons);
  buttons.append(
    button("Show", "Show message " + m.id, () => show(m.id)),
    button("Retry", "Retry message " + m.id, () => retryOne(m.id)),
    button("Purge", "Purge message " + m.id, () => purgeOne(m.id), "danger"),
  );
  row.append(el("td", m.id, "id"), el("td", m.topic), el("td", m.type), el("td", m.key || "–"),
    el("td", m.attempts), el("td", m.last_error || "–", "error"), actions);
  return row;
}

async function show(id) {
  try {
    const m = await api("dead/" + id);
    $("detail-title").textContent = "Message " + id;
    $("detail-body").textContent = JSON.stringify(m, null, 2);
    $("detail").hidden = false;
    $("detail-body").focus();
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(err.message, true);
  }
}

async function act(what, run) {
  try {
    notice(await run());
    lastDead = null;
    await refreshStatus();
  } catch (err) {
    if (!(err instanceof Unauthorized)) notice(what + " failed: " + err.message, true);
  }
}

function retryOne(id) {
  return act("Retry", async () => {
    const r = await api("dead/" + id + "/retry", { method: "POST" });
    return "Message " + id + " is pending again." + (r.notes.length ? " " + r.notes.join(" ") : "");
  });
}

function purgeOne(id) {
  if (!confirm("Delete dead message " + id + " for good?")) return;
  return act("Purge", async () => {
    await api("dead/" + id, { method: "DELETE" });
    return "Message " + id + " was purged.";
  });
}

function selection() {
  const body = {};
  for (const [k, v] of Object.entries(filter)) if (v) body[k] = v;
  return Object.keys(body).length ? body : { all: true };
}

// --- wiring -------------------------------------------------------------------------

async function refresh() {
  try {
    await Promise.all([refreshStatus(), refreshRelays()]);
    $("connection").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  } catch (err) {
    failed(err);
  }
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  if (!timer) timer = setInterval(refresh, POLL_MS);
  return refresh();
}

function wire() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      await api("status");
      $("token").value = "";
      await start();
    } catch (err) {
      if (!(err instanceof Unauthorized)) $("login-error").textContent = err.message;
    }
  });
  $("pause-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const topic = $("pause-topic").value.trim();
    if (topic) setPaused(topic, true).then(() => { $("pause-topic").value = ""; });
  });
  $("dead-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    filter = Object.fromEntries(new FormData(event.target).entries());
    pages = [null];
    refreshDead().catch(failed);
  });
  $("next-page").addEventListener("click", () => {
    pages.push($("next-page").dataset.next);
    refreshDead().catch(failed);
  });
  $("first-page").addEventListener("click", () => {
    pages = [null];
    refreshDead().catch(failed);
  });
  $("retry-matching").addEventListener("click", () => {
    const body = selection();
    if (!confirm(body.all ? "Retry every dead letter?" : "Retry every dead letter matching the filter?")) return;
    act("Retry", async () => (await api("dead/retry", { method: "POST", body })).retried + " message(s) pending again.");
  });
  $("purge-matching").addEventListener("click", () => {
    const body = selection();
    if (!confirm(body.all ? "Delete every dead letter for good?" : "Delete every dead letter matching the filter for good?")) return;
    act("Purge", async () => (await api("dead/purge", { method: "POST", body })).purged + " message(s) purged.");
  });
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
}

async function main() {
  wire();
  try {
    const auth = await api("auth");
    if (auth.token_required && !token) showLogin("");
    else await start();
  } catch (err) {
    failed(err);
  }
}

main();

// Realm's dashboard: plain JavaScript served by realm-host, no build step
// and nothing loaded from elsewhere (the CSP allows this origin only).
// Text from the server is put in the page with textContent, never as HTML.
"use strict";

const state = { who: null, timer: null, history: [] };
const HISTORY = 150; // live samples kept for the overview charts (5 min at 2 s)

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  // `svg:NAME` makes an SVG element.
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "onclick" || k === "onsubmit") node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function api(method, path, body) {
  const init = { method, headers: { "x-realm-admin": "1" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    signedOut();
    throw new Error("signed out");
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((data && data.error && data.error.message) || response.statusText);
  return data;
}

function toast(message) {
  const t = $("#toast");
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

const isAdmin = () => state.who && state.who.role === "admin";
const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const ms = (s) => (s === null || s === undefined ? "–" : `${(s * 1000).toFixed(0)} ms`);
const when = (t) => {
  const d = new Date(t * 1000);
  return t && !Number.isNaN(d.getTime()) ? d.toISOString().replace("T", " ").slice(0, 19) : "–";
};
const bytes = (n) => {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};

// ---- charts (SVG, drawn here: no chart library) ----

// Charts stretch to their box (preserveAspectRatio none), so their labels
// are HTML captions above them rather than SVG text.
function lineChart(id, values, label) {
  const w = 600, h = 140, pad = 8;
  const max = Math.max(1e-9, ...values);
  const step = values.length > 1 ? (w - 2 * pad) / (values.length - 1) : 0;
  const points = values.map((v, i) => `${pad + i * step},${h - pad - (v / max) * (h - 2 * pad)}`).join(" ");
  return el("figure", {},
    el("figcaption", { text: `${label} (max ${max < 10 ? max.toFixed(2) : fmt(Math.round(max))})` }),
    el("svg:svg", { class: "chart", id, viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "data-last": values.length ? values[values.length - 1] : 0 },
      el("svg:polyline", { points, "vector-effect": "non-scaling-stroke" })));
}

function barChart(id, bars, label) {
  const w = 600, h = 140, pad = 8;
  const max = Math.max(1, ...bars.map((b) => b.value));
  const width = bars.length ? (w - 2 * pad) / bars.length : 0;
  const total = bars.reduce((a, b) => a + b.value, 0);
  return el("figure", {},
    el("figcaption", { text: `${label} (total ${fmt(total)}, ${bars.length ? `${bars[0].label} to now` : "no data"})` }),
    el("svg:svg", { class: "chart", id, viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", "data-total": total },
      bars.map((b, i) => {
        const bh = (b.value / max) * (h - 2 * pad);
        return el("svg:rect", { x: pad + i * width + 1, y: h - pad - bh, width: Math.max(1, width - 2), height: bh, class: b.bad ? "bad" : null },
          el("svg:title", { text: `${b.label}: ${fmt(b.value)}` }));
      })));
}

// Replaces `page`'s content with the children given (absent ones left out).
function fill(page, ...children) {
  page.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function quotaBar(used, quota) {
  const bar = el("span", { class: "bar" + (quota && used >= quota ? " full" : "") }, el("span"));
  const share = quota ? Math.min(1, used / quota) : 0;
  bar.firstChild.style.width = `${(share * 100).toFixed(1)}%`;
  return bar;
}

// ---- pages ----

async function overview(page) {
  const live = await api("GET", "/admin/api/live");
  const now = Math.floor(Date.now() / 1000);
  const usage = await api("GET", `/admin/api/usage?bucket=minute&from=${now - 3600}`);
  const tokensPerSecond = live.tenants.reduce((a, t) => a + t["tokens-per-second"], 0);
  const inFlight = live.tenants.reduce((a, t) => a + t["in-flight"], 0);
  const p50s = live.tenants.map((t) => t["ttft-p50"]).filter((v) => v !== null);
  state.history.push({ tokensPerSecond, inFlight, ttft: p50s.length ? Math.max(...p50s) : 0 });
  if (state.history.length > HISTORY) state.history.shift();
  const perMinute = new Map();
  for (const r of usage.rows) {
    const m = perMinute.get(r.start) || { tokens: 0, errors: 0 };
    m.tokens += r["prompt-tokens"] + r["completion-tokens"];
    m.errors += r.errors;
    perMinute.set(r.start, m);
  }
  const minutes = [];
  for (let t = Math.floor((now - 3600) / 60) * 60; t <= now; t += 60) minutes.push(t);
  const errorsLastHour = usage.total.errors;
  fill(page, 
    el("h2", { text: "Overview" }),
    el("div", { class: "cards" },
      card("Tokens / s (last minute)", tokensPerSecond.toFixed(2), "ov-tps"),
      card("Requests in flight", fmt(inFlight), "ov-inflight"),
      card("Worst tenant TTFT p50", ms(p50s.length ? Math.max(...p50s) : null), "ov-ttft"),
      card("Errors (last hour)", fmt(errorsLastHour), "ov-errors")),
    el("div", { class: "cards" },
      el("div", {}, lineChart("chart-tps", state.history.map((h) => h.tokensPerSecond), "tokens/s, live")),
      el("div", {}, lineChart("chart-queue", state.history.map((h) => h.inFlight), "queue depth, live")),
      el("div", {}, lineChart("chart-ttft", state.history.map((h) => h.ttft), "TTFT p50 (s), live")),
      el("div", {}, barChart("chart-errors", minutes.map((t) => ({ label: when(t), value: (perMinute.get(t) || {}).errors || 0, bad: true })), "errors per minute"))),
    el("h3", { text: "Tokens per minute, last hour" }),
    barChart("chart-usage", minutes.map((t) => ({ label: when(t), value: (perMinute.get(t) || {}).tokens || 0 })), "tokens"),
    el("h3", { text: "Tenants now" }),
    el("table", { id: "live-tenants" },
      el("tr", {}, ["Tenant", "Tokens/s", "Streams", "In flight", "TTFT p50", "TTFT p99", "Today"].map((h, i) => el("th", { class: i ? "num" : null, text: h }))),
      live.tenants.map((t) => el("tr", {},
        el("td", { text: t.id }),
        el("td", { class: "num", text: t["tokens-per-second"].toFixed(2) }),
        el("td", { class: "num", text: fmt(t.streams) }),
        el("td", { class: "num", text: fmt(t["in-flight"]) }),
        el("td", { class: "num", text: ms(t["ttft-p50"]) }),
        el("td", { class: "num", text: ms(t["ttft-p99"]) }),
        el("td", { class: "num" }, quotaBar(t["used-today"], t["tokens-per-day"]), ` ${fmt(t["used-today"])} / ${t["tokens-per-day"] ? fmt(t["tokens-per-day"]) : "∞"}`)))));
}

function card(label, value, id) {
  return el("div", { class: "card" }, el("div", { class: "value", id, text: value }), el("div", { class: "label", text: label }));
}

async function tenants(page) {
  const { tenants } = await api("GET", "/admin/api/tenants");
  const rows = tenants.map((t) => el("tr", { "data-row": t.id },
    el("td", {}, el("a", { href: `#/tenant/${encodeURIComponent(t.id)}`, "data-tenant": t.id, text: t.id })),
    el("td", {}, el("span", { class: "pill", text: t.source === "config" ? "realm.toml" : "api" })),
    el("td", { text: t.models.join(", ") || "–" }),
    el("td", {}, quotaBar(t["used-today"], t.rate["tokens-per-day"])),
    el("td", { class: "num", text: `${fmt(t["used-today"])} / ${t.rate["tokens-per-day"] ? fmt(t.rate["tokens-per-day"]) : "∞"}` })));
  const form = isAdmin() ? el("form", { class: "inline", id: "create-tenant-form", onsubmit: createTenant },
    el("label", {}, "Id", el("input", { id: "new-tenant-id", required: true, pattern: "[A-Za-z0-9_-]{1,64}" })),
    el("label", {}, "Models (comma-separated)", el("input", { id: "new-tenant-models", placeholder: "small" })),
    el("label", {}, "Tokens per day", el("input", { id: "new-tenant-quota", type: "number", min: "1" })),
    el("button", { id: "create-tenant", type: "submit", text: "Create tenant" })) : el("p", { class: "muted", text: "Read only (viewer)." });
  fill(page, el("h2", { text: "Tenants" }), form,
    el("table", { id: "tenants" },
      el("tr", {}, ["Tenant", "Source", "Models", "Today vs quota", ""].map((h) => el("th", { text: h }))), rows));
}

const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

async function createTenant(event) {
  event.preventDefault();
  const id = $("#new-tenant-id").value.trim();
  const quota = $("#new-tenant-quota").value;
  const body = { id, models: list($("#new-tenant-models").value) };
  if (quota) body.rate = { "tokens-per-day": Number(quota) };
  try {
    await api("POST", "/admin/api/tenants", body);
    toast(`tenant ${id} created`);
    location.hash = `#/tenant/${encodeURIComponent(id)}`;
  } catch (e) { toast(e.message); }
}

async function tenant(page, id) {
  const [t, { keys }] = await Promise.all([
    api("GET", `/admin/api/tenants/${encodeURIComponent(id)}`),
    api("GET", `/admin/api/tenants/${encodeURIComponent(id)}/keys`)]);
  const now = Math.floor(Date.now() / 1000);
  const usage = await api("GET", `/admin/api/usage?tenant=${encodeURIComponent(id)}&bucket=hour&from=${now - 86400}`);
  const perHour = new Map();
  for (const r of usage.rows) perHour.set(r.start, (perHour.get(r.start) || 0) + r["prompt-tokens"] + r["completion-tokens"]);
  const hours = [];
  for (let h = Math.floor((now - 86400) / 3600) * 3600; h <= now; h += 3600) hours.push(h);
  const editable = isAdmin() && t.source === "api";
  const rate = t.rate;
  const field = (label, fid, value, type = "text") => el("label", {}, label,
    el("input", { id: fid, type, value: value === null || value === undefined ? "" : value, disabled: !editable }));
  const keyRows = keys.map((k) => {
    const stateText = k["revoked-at"] ? "revoked" : k["expires-at"] && k["expires-at"] <= now ? "expired" : "in force";
    return el("tr", { "data-key": k.id },
      el("td", { text: k.name }), el("td", { text: k.id }), el("td", { text: k.source }),
      el("td", { text: when(k["created-at"]) }), el("td", { text: when(k["last-used-at"]) }),
      el("td", { text: k["expires-at"] ? when(k["expires-at"]) : "never" }), el("td", { class: "key-state", text: stateText }),
      el("td", {}, isAdmin() && stateText === "in force"
        ? el("button", { class: "danger", "data-revoke": k.id, onclick: () => revokeKey(id, k.id), text: "Revoke" }) : null));
  });
  fill(page, 
    el("h2", {}, `Tenant ${t.id} `, el("span", { class: "pill", text: t.source === "config" ? "realm.toml (read-only here)" : "api" })),
    el("h3", { text: "Usage, last 24 hours (tokens per hour)" }),
    barChart("usage-chart", hours.map((h) => ({ label: when(h), value: perHour.get(h) || 0 })), "tokens"),
    el("p", {}, "Today: ", quotaBar(t["used-today"], rate["tokens-per-day"]), ` ${fmt(t["used-today"])} of ${rate["tokens-per-day"] ? fmt(rate["tokens-per-day"]) : "unlimited"} tokens (prompt + generated)`),
    el("h3", { text: "Keys" }),
    isAdmin() ? el("form", { class: "inline", onsubmit: (e) => createKey(e, id) },
      el("label", {}, "Name", el("input", { id: "new-key-name", required: true, maxlength: "100" })),
      el("label", {}, "Expires in", el("input", { id: "new-key-expires", placeholder: "90d (optional)" })),
      el("button", { id: "create-key", type: "submit", text: "Create key" })) : null,
    el("div", { id: "new-key" }),
    el("table", { id: "keys" },
      el("tr", {}, ["Name", "Id", "Source", "Created", "Last used", "Expires", "State", ""].map((h) => el("th", { text: h }))), keyRows),
    el("h3", { text: "Grants and limits" }),
    el("form", { class: "inline", id: "limits-form", onsubmit: (e) => saveTenant(e, id) },
      field("Models", "f-models", t.models.join(", ")),
      field("Adapters", "f-adapters", t.adapters.join(", ")),
      field("Requests/min", "f-rpm", rate["requests-per-minute"], "number"),
      field("Tokens/min", "f-tpm", rate["tokens-per-minute"], "number"),
      field("Streams", "f-streams", rate["concurrent-streams"], "number"),
      field("Tokens/day", "f-tpd", rate["tokens-per-day"], "number"),
      field("Weight", "f-weight", t.weight, "number"),
      editable ? el("button", { id: "save-tenant", type: "submit", text: "Save" }) : null),
    Object.keys(t.pipelines).length ? el("p", { class: "muted", text: `Pipelines: ${Object.keys(t.pipelines).join(", ")}` }) : null,
    editable ? el("p", {}, el("button", { class: "danger", id: "delete-tenant", onclick: () => deleteTenant(id), text: "Delete tenant" })) : null);
}

async function createKey(event, id) {
  event.preventDefault();
  const body = { name: $("#new-key-name").value.trim() };
  const expires = $("#new-key-expires").value.trim();
  if (expires) body["expires-in"] = expires;
  try {
    const made = await api("POST", `/admin/api/tenants/${encodeURIComponent(id)}/keys`, body);
    await route();
    $("#new-key").replaceChildren(
      el("p", { text: "The new key, shown this once: copy it now." }),
      el("div", { class: "secret", id: "new-key-value", text: made.key }));
  } catch (e) { toast(e.message); }
}

async function revokeKey(id, key) {
  try {
    await api("DELETE", `/admin/api/tenants/${encodeURIComponent(id)}/keys/${encodeURIComponent(key)}`);
    toast("key revoked");
    await route();
  } catch (e) { toast(e.message); }
}

async function saveTenant(event, id) {
  event.preventDefault();
  const num = (fid) => ($(fid).value === "" ? null : Number($(fid).value));
  const body = {
    models: list($("#f-models").value),
    adapters: list($("#f-adapters").value),
    rate: { "requests-per-minute": num("#f-rpm"), "tokens-per-minute": num("#f-tpm"), "concurrent-streams": num("#f-streams"), "tokens-per-day": num("#f-tpd") },
    weight: num("#f-weight") || 1,
  };
  try {
    await api("PATCH", `/admin/api/tenants/${encodeURIComponent(id)}`, body);
    toast("saved: in force now");
    await route();
  } catch (e) { toast(e.message); }
}

async function deleteTenant(id) {
  if (!confirm(`Delete tenant ${id}? Its keys stop working; its usage stays in the ledger.`)) return;
  try {
    await api("DELETE", `/admin/api/tenants/${encodeURIComponent(id)}`);
    location.hash = "#/tenants";
  } catch (e) { toast(e.message); }
}

async function models(page) {
  const live = await api("GET", "/admin/api/live");
  fill(page, el("h2", { text: "Models" }),
    el("table", { id: "models" },
      el("tr", {}, ["Model", "Phase", "Memory", "GPU memory", "Running", "Waiting", "Idle", "Loads"].map((h, i) => el("th", { class: i > 1 ? "num" : null, text: h }))),
      live.models.map((m) => el("tr", {},
        el("td", { text: m.model }), el("td", { text: m.phase }),
        el("td", { class: "num", text: bytes(m.bytes) }), el("td", { class: "num", text: bytes(m.device_bytes) }),
        el("td", { class: "num", text: fmt(m.running) }), el("td", { class: "num", text: fmt(m.waiting) }),
        el("td", { class: "num", text: m.idle_seconds === null ? "busy" : `${m.idle_seconds.toFixed(0)} s` }),
        el("td", { class: "num", text: fmt(m.loads) })))),
    el("p", { class: "muted", text: `Adapters in memory: ${live.adapters.count} (${bytes(live.adapters.bytes)})` }));
}

async function audit(page) {
  const { entries } = await api("GET", "/admin/api/audit?limit=200");
  fill(page, el("h2", { text: "Audit log" }),
    el("table", { id: "audit" },
      el("tr", {}, ["When (UTC)", "Who", "Role", "Action", "Target", "Detail", "From"].map((h) => el("th", { text: h }))),
      entries.map((e) => el("tr", {},
        el("td", { text: when(e.at) }), el("td", { text: e.actor }), el("td", { text: e.role }),
        el("td", { text: e.action }), el("td", { text: e.target }),
        el("td", { class: "muted", text: JSON.stringify(e.detail) }), el("td", { text: e.peer || "–" })))));
}

// ---- routing and session ----

async function route() {
  clearInterval(state.timer);
  const page = $("#page");
  const [, name = "overview", arg] = location.hash.split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name || (name === "tenant" && a.dataset.page === "tenants"));
  const pages = { overview, tenants, models, audit, tenant: (p) => tenant(p, decodeURIComponent(arg || "")) };
  const show = pages[name] || overview;
  try {
    await show(page);
    page.dataset.ready = name;
  } catch (e) {
    if (e.message !== "signed out") toast(e.message);
  }
  if (show === overview || show === models) state.timer = setInterval(() => show(page).catch(() => {}), 2000);
}

function signedOut() {
  state.who = null;
  clearInterval(state.timer);
  $("#nav").hidden = true;
  $("#sign-out").hidden = true;
  $("#page").hidden = true;
  $("#who").textContent = "";
  $("#sign-in-page").hidden = false;
}

async function signedIn(who) {
  state.who = who;
  $("#sign-in-page").hidden = true;
  $("#nav").hidden = false;
  $("#sign-out").hidden = false;
  $("#page").hidden = false;
  $("#who").textContent = `${who.name} (${who.role})`;
  await route();
}

async function start() {
  $("#sign-in-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("#sign-in-error").textContent = "";
    try {
      const response = await fetch("/admin/session", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ key: $("#key-input").value.trim() }),
      });
      const data = await response.json();
      if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
      $("#key-input").value = "";
      await signedIn(data);
    } catch (err) { $("#sign-in-error").textContent = err.message; }
  });
  $("#sign-out").addEventListener("click", async () => {
    await fetch("/admin/session", { method: "DELETE", credentials: "same-origin", headers: { "x-realm-admin": "1" } });
    signedOut();
  });
  window.addEventListener("hashchange", () => { if (state.who) route(); });
  try {
    const response = await fetch("/admin/api/whoami", { credentials: "same-origin" });
    if (response.ok) await signedIn(await response.json());
    else signedOut();
  } catch { signedOut(); }
}

document.addEventListener("DOMContentLoaded", start);

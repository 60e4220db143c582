// Shared helpers of the dashboard's pages. Everything from the store goes into the page as text
// (textContent, never innerHTML), and into Plotly labels through esc(), which turns markup into entities.
"use strict";

const EM = {};

// The pages load plotly.js (1.5 MB) after their own script, so their data is fetched while the browser
// still parses it; drawing waits for this. DOMContentLoaded comes once every deferred script has run.
EM.plotlyReady = function () {
  return window.Plotly ? Promise.resolve() : new Promise((resolve) => {
    document.addEventListener("DOMContentLoaded", () => resolve(), { once: true });
  });
};

EM.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
};

// For Plotly strings (titles, hover text, tick labels), which Plotly reads as a small HTML subset.
EM.esc = function (s) {
  return String(s === null || s === undefined ? "" : s)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
};

EM.fmt = function (v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  const d = digits === undefined ? 4 : digits;
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return Number(v.toFixed(d)).toString();
};

EM.ago = function (iso) {
  if (!iso) return "–";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 60) return Math.max(0, Math.round(s)) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(iso).toLocaleString();
};

EM.api = async function (path, params) {
  const q = new URLSearchParams(params || {}).toString();
  const r = await fetch(path + (q ? "?" + q : ""), { headers: { Accept: "application/json" } });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return r.json();
};

EM.param = function (name) { return new URLSearchParams(location.search).get(name); };
EM.params = function (name) { return new URLSearchParams(location.search).getAll(name); };

EM.studyUrl = (s) => "/study?" + new URLSearchParams({ name: s });
EM.candUrl = (s, n) => "/candidate?" + new URLSearchParams({ study: s, n: n });

EM.badge = (state) => EM.el("span", { class: "badge state-" + state, text: state });

EM.clear = function (node) { while (node.firstChild) node.removeChild(node.firstChild); return node; };

EM.showError = function (where, err) {
  EM.clear(where).appendChild(EM.el("div", { class: "card error-text", text: "Could not load: " + err.message }));
};

// Calls refresh() now (its errors reach the caller), then whenever the study's stamp changes (polled
// every poll_ms; a failed poll greys the live dot and is tried again).
EM.live = async function (study, refresh, dot) {
  const [cfg, first] = await Promise.all([EM.api("/api/config"), EM.api("/api/stamp", { study })]);
  let last = JSON.stringify(first);
  await refresh();
  const tick = async () => {
    try {
      const s = JSON.stringify(await EM.api("/api/stamp", { study }));
      if (s !== last) { last = s; await refresh(); }
      if (dot) dot.className = "live";
    } catch (e) {
      if (dot) dot.className = "live off";
    }
    setTimeout(tick, cfg.poll_ms);
  };
  setTimeout(tick, cfg.poll_ms);
};

// A time axis in seconds, minutes or hours, whichever reads best for a span of `maxS` seconds.
EM.timeUnit = function (maxS) {
  if (maxS < 300) return { div: 1, name: "seconds" };
  if (maxS < 3 * 3600) return { div: 60, name: "minutes" };
  return { div: 3600, name: "hours" };
};

EM.plotConfig = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud"] };

EM.objLabel = (o) => o.name + (o.direction === "maximize" ? " (max ↑)" : " (min ↓)");

EM.download = function (name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type: type || "text/plain" }));
  const a = EM.el("a", { href: url, download: name });
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
};

EM.copyButton = function (getText, label) {
  const b = EM.el("button", { text: label || "Copy" });
  b.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(getText()); b.textContent = "Copied"; }
    catch (e) { b.textContent = "Select and copy (clipboard blocked)"; }
    setTimeout(() => { b.textContent = label || "Copy"; }, 1500);
  });
  return b;
};

EM.header = function (active) {
  const h = EM.el("header", { class: "top" },
    EM.el("a", { class: "brand", href: "/", text: "evomerge" }),
    EM.el("a", { href: "/", text: "Studies" }),
    EM.el("a", { href: "/compare", text: "Compare" }),
    EM.el("a", { href: "/api", text: "API" }),
    EM.el("span", { class: "right", id: "storage" }));
  document.body.prepend(h);
  EM.api("/api/config").then((c) => {
    document.getElementById("storage").textContent = c.storage + (c.read_only ? " · read-only" : "");
  }).catch(() => {});
};

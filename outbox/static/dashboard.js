"use strict";
// Polls the JSON endpoints every 2 s and redraws. Values are written with textContent only
// (never innerHTML), so nothing the server returns is interpreted as markup.
(function () {
  const POLL_MS = 2000;
  const HISTORY = 180; // samples kept for the charts (6 minutes at 2 s)
  const STATUSES = ["pending", "in_flight", "sent", "dead", "expired"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  // The token arrives once in the page URL (?token=); requests carry it as a header.
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const history = [];

  const $ = (id) => document.getElementById(id);

  function setText(id, text) {
    const el = $(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function fmtCount(n) {
    return Number(n).toLocaleString("en-US");
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s === 0) return "0 s";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function fmtRate(r) {
    if (r === 0) return "0/s";
    if (r < 0.1) return r.toFixed(3) + "/s";
    if (r < 10) return r.toFixed(2) + "/s";
    return r.toFixed(0) + "/s";
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    if (isNaN(d.getTime())) return iso;
    const pad = (n) => String(n).padStart(2, "0");
    return (
      d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds())
    );
  }

  function setStatus(state, text) {
    $("status").dataset.state = state;
    setText("status-text", text);
  }

  function cell(tr, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    tr.appendChild(td);
    return td;
  }

  function fillTable(id, rows, columns, emptyText) {
    const tbody = $(id).tBodies[0];
    const fresh = document.createElement("tbody");
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = cell(tr, emptyText);
      td.colSpan = columns;
      fresh.appendChild(tr);
    } else {
      for (const row of rows) fresh.appendChild(row);
    }
    tbody.replaceWith(fresh);
  }

  function renderStats(data) {
    for (const status of STATUSES) setText("count-" + status, fmtCount(data.by_status[status] || 0));
    $("count-dead").closest(".card").classList.toggle("nonzero", (data.by_status.dead || 0) > 0);
    setText("due-now", fmtCount(data.due_now));
    setText("due-now-2", fmtCount(data.due_now));
    setText("retrying", fmtCount(data.retrying));
    setText("lag", fmtSeconds(data.lag_seconds));
    setText("lag-now", fmtSeconds(data.lag_seconds));
    const tp = data.throughput_per_second;
    setText("tp-1m", fmtRate(tp["1m"]));
    setText("tp-5m", fmtRate(tp["5m"]));
    setText("tp-15m", fmtRate(tp["15m"]));
    const lat = data.latency_seconds;
    setText("lat-p50", fmtSeconds(lat.p50));
    setText("lat-p95", fmtSeconds(lat.p95));
    setText("lat-p99", fmtSeconds(lat.p99));
    setText(
      "latency-note",
      "enqueue to publish · last " + Math.round(lat.window_seconds / 60) + " min · " +
        fmtCount(lat.samples) + " events"
    );
    setText("workers-count", fmtCount(data.workers.length));

    const workerRows = data.workers.map((w) => {
      const tr = document.createElement("tr");
      cell(tr, w.worker_id, "mono");
      cell(tr, String(w.pid));
      cell(tr, w.version);
      cell(tr, fmtTime(w.last_beat_at));
      return tr;
    });
    fillTable("workers", workerRows, 4, "No worker seen recently");

    const typeRows = Object.keys(data.by_type).sort().map((name) => {
      const counts = data.by_type[name];
      const tr = document.createElement("tr");
      tr.dataset.type = name;
      cell(tr, name, "mono");
      for (const status of STATUSES) {
        const n = counts[status] || 0;
        const cls = n === 0 ? "zero" : status === "dead" ? "dead-count" : "";
        cell(tr, fmtCount(n), cls);
      }
      return tr;
    });
    fillTable("by-type", typeRows, 6, "No events yet");
  }

  function renderDead(payload, total) {
    const rows = payload.rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.id = String(r.id);
      cell(tr, String(r.id));
      cell(tr, r.event_id, "mono");
      cell(tr, r.type_name, "mono");
      cell(tr, String(r.attempts));
      cell(tr, r.last_error || "–", "error");
      cell(tr, fmtTime(r.finished_at));
      return tr;
    });
    fillTable("dead", rows, 6, "No dead letters");
    const shown = payload.rows.length;
    setText(
      "dead-note",
      (total > shown ? "newest " + shown + " of " + fmtCount(total) : fmtCount(total) + " total") +
        " · metadata only, never payloads"
    );
  }

  // --- charts (inline SVG) ---------------------------------------------------------------

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= value) return m * exp;
    return 10 * exp;
  }

  function drawChart(id, key, cls, fmt) {
    const el = $(id);
    const width = Math.max(el.clientWidth, 200);
    const height = el.clientHeight || 180;
    el.setAttribute("viewBox", "0 0 " + width + " " + height);
    while (el.firstChild) el.removeChild(el.firstChild);
    const pad = { left: 52, right: 10, top: 10, bottom: 22 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    const values = history.map((s) => s[key]);
    const max = niceMax(Math.max(0, ...values));
    const root = svg("g", { class: cls }, el);
    for (let i = 0; i <= 4; i++) {
      const y = pad.top + h - (h * i) / 4;
      svg("line", { class: "grid", x1: pad.left, x2: pad.left + w, y1: y, y2: y }, root);
      const label = svg("text", { class: "axis-label", x: pad.left - 8, y: y + 4, "text-anchor": "end" }, root);
      label.textContent = fmt((max * i) / 4);
    }
    if (history.length < 2) {
      const t = svg("text", { class: "placeholder", x: pad.left + w / 2, y: pad.top + h / 2, "text-anchor": "middle" }, root);
      t.textContent = "collecting samples…";
      return;
    }
    const t0 = history[0].t;
    const span = Math.max(history[history.length - 1].t - t0, 1);
    const x = (t) => pad.left + (w * (t - t0)) / span;
    const y = (v) => pad.top + h - (h * v) / max;
    const points = history.map((s) => x(s.t).toFixed(1) + "," + y(s[key]).toFixed(1));
    const baseY = (pad.top + h).toFixed(1);
    svg("polygon", { class: "area", points: x(t0).toFixed(1) + "," + baseY + " " + points.join(" ") + " " + x(t0 + span).toFixed(1) + "," + baseY }, root);
    svg("polyline", { class: "line", points: points.join(" ") }, root);
    const first = svg("text", { class: "axis-label", x: pad.left, y: height - 4 }, root);
    first.textContent = new Date(t0).toLocaleTimeString("en-GB", { hour12: false });
    const last = svg("text", { class: "axis-label", x: pad.left + w, y: height - 4, "text-anchor": "end" }, root);
    last.textContent = "now";
  }

  function drawCharts() {
    const axis = (v) => String(Number(v.toPrecision(3)));
    drawChart("chart-throughput", "throughput", "throughput", axis);
    drawChart("chart-lag", "lag", "lag", (v) => (v === 0 ? "0" : fmtSeconds(v)));
  }

  // --- polling --------------------------------------------------------------------------

  async function getJSON(path) {
    const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (response.status === 401) throw Object.assign(new Error("unauthorized"), { status: 401 });
    if (!response.ok) throw Object.assign(new Error("HTTP " + response.status), { status: response.status });
    return response.json();
  }

  async function loadInfo() {
    try {
      const info = await getJSON("/api/info");
      setText("info", "pusher-outbox " + info.version + " · " + info.database);
    } catch (_) {
      /* the status pill reports errors */
    }
  }

  async function poll() {
    try {
      const [stats, dead] = await Promise.all([getJSON("/api/stats"), getJSON("/api/dead")]);
      renderStats(stats);
      renderDead(dead, stats.by_status.dead || 0);
      history.push({ t: Date.now(), throughput: stats.throughput_per_second["1m"], lag: stats.lag_seconds });
      if (history.length > HISTORY) history.shift();
      drawCharts();
      setStatus("live", "Live · updated " + new Date().toLocaleTimeString("en-GB", { hour12: false }));
    } catch (err) {
      if (err.status === 401) setStatus("error", "Unauthorized: open the page with ?token=…");
      else if (err.status) setStatus("error", "Server error (" + err.message + "), retrying");
      else setStatus("error", "Connection lost, retrying");
    } finally {
      window.setTimeout(poll, POLL_MS);
    }
  }

  window.addEventListener("resize", drawCharts);
  drawCharts();
  loadInfo();
  poll();
})();

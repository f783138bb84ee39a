// The pharmacists' page: a live list of the pharmacy's pending orders.
//
// 1. GET /me and GET /orders (the pending orders plus each channel's position, read first).
// 2. pusher-js (window.Pusher, the encryption build) authorizes both channels at /pusher/auth
//    with the pharmacist's bearer token; the client kit follows each channel from the position
//    of that list: repeats dropped, gaps filled from /pusher/catchup, events in seq order.
// 3. order.created carries an opaque order id: the details are fetched from GET /orders/{id}.
//    order.details arrives encrypted and pusher-js decrypts it with the channel's shared secret.
//
// Nothing here writes event data or order details to the console.

import { subscribe } from "/kit/pusher-outbox.js";

const TOKEN_KEY = "pharmacy-example.token";
const CATCH_UP_URL = "/pusher/catchup";
const PHARMACY_ID = /^pha_[A-Za-z0-9]{8,64}$/;
const ORDER_ID = /^ord_[A-Za-z0-9]{8,64}$/;
const ACTIVITY_LIMIT = 40;
const PROBE_TIMEOUT_MS = 10_000;

const $ = (id) => document.getElementById(id);

/** @type {Map<string, {order_id: string, patient_name?: string, medication?: string, dosage?: string, quantity?: number, created_at?: string, via: string, arrived: number, fresh: boolean}>} */
const orders = new Map();
/** @type {Map<string, Promise<void>>} */
const fetching = new Map();
/** Delivered seq numbers per channel, in delivery order (tests check them). */
const delivered = {};
let arrivals = 0;
/** order.details events that arrived with their fields (decrypted by pusher-js). */
let decrypted = 0;
let token = null;
let me = null;
let pusher = null;
/** @type {Array<{label: string, sub: any}>} */
const feeds = [];

class ApiError extends Error {
  constructor(status, path) {
    super(`${path} answered HTTP ${status}`);
    this.status = status;
  }
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    cache: "no-store",
  });
  if (!response.ok) throw new ApiError(response.status, path.split("?")[0]);
  return response.json();
}

// --- token -----------------------------------------------------------------------------------

/** The token from `#token=…` (never sent to the server) or `?token=…`, then this tab's storage. */
function readToken() {
  const url = new URL(window.location.href);
  const hash = new URLSearchParams(url.hash.slice(1));
  const fromUrl = hash.get("token") || url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // Keep it out of the address bar, the history and bookmarks.
    url.searchParams.delete("token");
    hash.delete("token");
    const rest = hash.toString();
    window.history.replaceState(null, "", url.pathname + url.search + (rest ? `#${rest}` : ""));
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function showLogin(message) {
  $("login").hidden = false;
  $("dashboard").hidden = true;
  $("connection").hidden = true;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("login-form").onsubmit = (event) => {
    event.preventDefault();
    const value = $("login-token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    window.location.reload();
  };
}

function fatal(message) {
  $("fatal").hidden = false;
  $("fatal").textContent = message;
  $("dashboard").hidden = true;
  setConnection("offline", "Stopped");
}

// --- orders ----------------------------------------------------------------------------------

/** Add or complete an order (keyed by its opaque id: every repeat lands on the same row). */
function upsert(orderId, via, fields) {
  let row = orders.get(orderId);
  if (row === undefined) {
    row = { order_id: orderId, via, arrived: arrivals++, fresh: via !== "snapshot" };
    orders.set(orderId, row);
  }
  if (fields) {
    for (const key of ["patient_name", "medication", "dosage", "quantity", "created_at"]) {
      if (fields[key] !== undefined) row[key] = fields[key];
    }
  }
  scheduleRender();
  return row;
}

function fetchOrder(orderId) {
  if (fetching.has(orderId)) return fetching.get(orderId);
  const pending = api(`/orders/${encodeURIComponent(orderId)}`)
    .then((order) => {
      upsert(orderId, "by-id", order);
    })
    .catch((error) => {
      note("warning", `could not fetch ${orderId} (HTTP ${error.status ?? "?"})`);
    })
    .finally(() => fetching.delete(orderId));
  fetching.set(orderId, pending);
  return pending;
}

/** Reload the list (and each channel's position) from the app: the source of truth. */
async function loadSnapshot() {
  const snapshot = await api("/orders");
  for (const order of snapshot.orders) upsert(order.order_id, "snapshot", order);
  return snapshot.positions;
}

let refreshTimer = null;
/** An erased event names no order: re-read the list shortly (several erased events, one read). */
function scheduleRefresh() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    try {
      await loadSnapshot();
    } catch (error) {
      note("warning", `could not reload the orders (HTTP ${error.status ?? "?"})`);
    }
  }, 300);
}

// --- rendering -------------------------------------------------------------------------------

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderOrders();
  });
}

const VIA_LABELS = {
  encrypted: "Live · encrypted",
  "by-id": "Live · fetched by id",
  "catch-up": "Catch-up",
  snapshot: "On load",
};

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

/** Newest first: by the server's creation time; rows still loading (no time yet) on top. */
function sortedOrders() {
  return [...orders.values()].sort((a, b) => {
    if (!a.created_at || !b.created_at) {
      if (a.created_at) return 1;
      if (b.created_at) return -1;
      return b.arrived - a.arrived;
    }
    if (a.created_at !== b.created_at) return a.created_at < b.created_at ? 1 : -1;
    return b.arrived - a.arrived;
  });
}

function renderOrders() {
  const body = document.querySelector("#orders tbody");
  const fragment = document.createDocumentFragment();
  for (const row of sortedOrders()) {
    const tr = document.createElement("tr");
    tr.dataset.orderId = row.order_id;
    if (row.fresh) {
      tr.className = "fresh";
      row.fresh = false;
    }
    const id = document.createElement("td");
    const code = document.createElement("span");
    code.className = "mono order-id";
    code.textContent = row.order_id;
    code.title = row.order_id;
    id.append(code);
    tr.append(id);
    if (row.patient_name === undefined) {
      tr.append(cell("Loading details…", "loading"), cell(""), cell(""), cell("", "num"));
    } else {
      tr.append(
        cell(row.patient_name, "patient"),
        cell(row.medication ?? "", "medication"),
        cell(row.dosage ?? "", "dosage"),
        cell(String(row.quantity ?? ""), "num"),
      );
    }
    tr.append(cell(row.created_at ? formatTime(row.created_at) : "—", "time"));
    const via = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.via = row.via;
    badge.textContent = VIA_LABELS[row.via] ?? row.via;
    via.append(badge);
    tr.append(via);
    fragment.append(tr);
  }
  body.replaceChildren(fragment);
  $("empty").hidden = orders.size > 0;
  $("stat-pending").textContent = String(orders.size);
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "—";
  return date.toLocaleTimeString([], { hour12: false });
}

let duplicatesNoted = 0;
function renderStats() {
  const total = { live: 0, caughtUp: 0, duplicates: 0 };
  for (const { sub } of feeds) {
    total.live += sub.stats.live;
    total.caughtUp += sub.stats.caughtUp;
    total.duplicates += sub.stats.duplicates;
  }
  if (total.duplicates > duplicatesNoted) {
    const dropped = total.duplicates - duplicatesNoted;
    note("info", `${dropped} repeated event${dropped === 1 ? "" : "s"} dropped (same event id)`);
    duplicatesNoted = total.duplicates;
  }
  $("stat-live").textContent = String(total.live);
  $("stat-caught-up").textContent = String(total.caughtUp);
  $("stat-duplicates").textContent = String(total.duplicates);
  const list = $("channels");
  list.replaceChildren(
    ...feeds.map(({ label, sub }) => {
      const li = document.createElement("li");
      li.dataset.channel = sub.channelName;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = label;
      const state = document.createElement("span");
      state.className = "state";
      state.dataset.state = sub.state;
      state.textContent = `${sub.state} · seq ${sub.position}`;
      const channel = document.createElement("span");
      channel.className = "channel mono";
      channel.textContent = sub.channelName;
      channel.title = sub.channelName;
      li.append(name, state, channel);
      return li;
    }),
  );
  updateConnection();
}

/** Activity lines name events by seq, name and id only: never their data. */
function note(kind, text) {
  const list = $("activity");
  const li = document.createElement("li");
  li.dataset.kind = kind;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  const span = document.createElement("span");
  span.textContent = text;
  li.append(time, span);
  list.prepend(li);
  while (list.children.length > ACTIVITY_LIMIT) list.lastElementChild.remove();
}

// --- connection ------------------------------------------------------------------------------

function setConnection(state, text) {
  const pill = $("connection");
  pill.dataset.state = state;
  $("connection-text").textContent = text;
}

function updateConnection() {
  if (!pusher) return;
  const connected = pusher.connection.state === "connected";
  const states = feeds.map(({ sub }) => sub.state);
  if (!connected) {
    setConnection("offline", pusher.connection.state === "connecting" ? "Reconnecting…" : "Offline");
  } else if (states.includes("syncing") || states.includes("connecting")) {
    setConnection("syncing", "Catching up…");
  } else {
    setConnection("live", "Live");
  }
}

let offline = false;
function goOffline() {
  offline = true;
  pusher.disconnect();
  note("warning", "disconnected (simulated): events published now are missed live");
  updateToggle();
}

function goOnline() {
  offline = false;
  pusher.connect();
  note("info", "reconnecting: the kit will catch up on what was missed");
  updateToggle();
}

function updateToggle() {
  const button = $("toggle-connection");
  button.hidden = false;
  button.textContent = offline ? "Reconnect" : "Simulate offline";
  button.dataset.offline = String(offline);
}

// --- channels --------------------------------------------------------------------------------

function follow(label, channel, afterSeq, onOrderEvent) {
  delivered[channel] = [];
  const sub = subscribe({
    pusher,
    channel,
    afterSeq,
    catchUpUrl: CATCH_UP_URL,
    headers: () => ({ Authorization: `Bearer ${token}` }),
    onEvent: (event) => {
      delivered[channel].push(event.seq);
      const how = event.source === "catch-up" ? "catch-up" : "live";
      note(how === "catch-up" ? "catch-up" : "event", `seq ${event.seq} ${event.event}${event.erased ? " (erased)" : ""} · ${how}`);
      onOrderEvent(event);
    },
    onReset: async (info) => {
      note("catch-up", `${label}: older events are gone; reloading the list`);
      const positions = await loadSnapshot();
      return { afterSeq: positions[info.channel] ?? info.lastSeq };
    },
    onError: (error) => note("warning", error.message),
    onStateChange: () => renderStats(),
  });
  feeds.push({ label, sub });
  return sub;
}

function onOrderCreated(event) {
  if (event.erased) return scheduleRefresh();
  const orderId = event.data && event.data.order_id;
  if (typeof orderId !== "string" || !ORDER_ID.test(orderId)) return;
  const row = upsert(orderId, event.source === "catch-up" ? "catch-up" : "by-id");
  if (row.created_at === undefined) fetchOrder(orderId);
}

function onOrderDetails(event) {
  // Catch-up cannot return these: their payload (PHI) is erased once sent. Re-read the list.
  if (event.erased) return scheduleRefresh();
  const details = event.data || {};
  if (typeof details.order_id !== "string" || !ORDER_ID.test(details.order_id)) return;
  if (event.source === "live" && typeof details.patient_name === "string") decrypted += 1;
  upsert(details.order_id, event.source === "catch-up" ? "catch-up" : "encrypted", details);
}

// --- access check ----------------------------------------------------------------------------

/** Try to follow another pharmacy's channels with this pharmacist's token: both must be refused. */
async function checkAccess(pharmacyId) {
  const list = $("access-result");
  list.replaceChildren();
  list.dataset.result = "checking";
  $("denied-banner").hidden = true;
  if (!PHARMACY_ID.test(pharmacyId)) {
    list.dataset.result = "invalid";
    list.append(resultItem("invalid", "Not a pharmacy id", "Pharmacy ids look like pha_…"));
    return;
  }
  if (pharmacyId === me.pharmacy.pharmacy_id) {
    list.dataset.result = "own";
    list.append(resultItem("own", "That is your own pharmacy", pharmacyId));
    return;
  }
  const channels = [`private-pharmacy-${pharmacyId}`, `private-encrypted-pharmacy-${pharmacyId}`];
  const outcomes = await Promise.all(channels.map((channel) => probe(channel)));
  list.replaceChildren(
    ...outcomes.map(({ channel, outcome, status }) =>
      resultItem(
        outcome,
        outcome === "denied" ? `Access denied (HTTP ${status})` : outcome === "allowed" ? "Allowed" : "No answer",
        channel,
      ),
    ),
  );
  const allDenied = outcomes.every((o) => o.outcome === "denied");
  list.dataset.result = allDenied ? "denied" : "not-denied";
  if (allDenied) {
    const banner = $("denied-banner");
    banner.textContent = `Access denied: this account may not see the orders of pharmacy ${pharmacyId}.`;
    banner.hidden = false;
    note("warning", `access to ${pharmacyId} denied (both channels)`);
  }
}

function probe(channel) {
  return new Promise((resolve) => {
    let sub = null;
    let done = false;
    const finish = (outcome, status) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      // Only after the first turn: close() may not run inside subscribe() itself.
      setTimeout(() => sub && sub.close(), 0);
      resolve({ channel, outcome, status });
    };
    const timer = setTimeout(() => finish("timeout"), PROBE_TIMEOUT_MS);
    sub = subscribe({
      pusher,
      channel,
      catchUpUrl: CATCH_UP_URL,
      headers: () => ({ Authorization: `Bearer ${token}` }),
      onEvent: () => finish("allowed"),
      onError: (error) => {
        if (error.status === 401 || error.status === 403) finish("denied", error.status);
      },
      onStateChange: (state) => {
        if (state === "live") finish("allowed");
      },
    });
  });
}

function resultItem(outcome, title, detail) {
  const li = document.createElement("li");
  li.dataset.outcome = outcome;
  const strong = document.createElement("strong");
  strong.textContent = title;
  const span = document.createElement("span");
  span.className = "mono";
  span.textContent = detail;
  li.append(strong, span);
  return li;
}

// --- start -----------------------------------------------------------------------------------

async function main() {
  token = readToken();
  if (!token) return showLogin();
  try {
    me = await api("/me");
  } catch (error) {
    if (error.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      return showLogin("That token was not accepted. Paste a valid pharmacist token.");
    }
    return fatal(`The app could not be reached (${error.message}).`);
  }
  $("sign-out").hidden = false;
  $("sign-out").onclick = () => {
    sessionStorage.removeItem(TOKEN_KEY);
    window.location.replace("/");
  };
  if (!me.pharmacy) return fatal("This account is not a pharmacist's: it has no list of orders.");
  $("pharmacy-name").textContent = `${me.pharmacy.name} · ${me.pharmacy.pharmacy_id}`;
  document.title = `Pending orders · ${me.pharmacy.name}`;
  $("dashboard").hidden = false;

  if (typeof window.Pusher !== "function") {
    return fatal("pusher-js did not load: run `make install` (npm ci) in the repository.");
  }
  const config = await (await fetch("/pusher/config", { cache: "no-store" })).json();
  const { key, ...options } = config;
  pusher = new window.Pusher(key, {
    ...options,
    channelAuthorization: {
      endpoint: "/pusher/auth",
      transport: "ajax",
      headersProvider: () => ({ Authorization: `Bearer ${token}` }),
    },
  });
  pusher.connection.bind("state_change", () => renderStats());

  const positions = await loadSnapshot();
  renderOrders();
  const { orders: ordersChannel, details: detailsChannel } = me.pharmacy.channels;
  follow("New orders (opaque ids)", ordersChannel, positions[ordersChannel] ?? 0, onOrderCreated);
  follow("Order details (encrypted)", detailsChannel, positions[detailsChannel] ?? 0, onOrderDetails);
  renderStats();
  setInterval(renderStats, 500);

  updateToggle();
  $("toggle-connection").onclick = () => (offline ? goOnline() : goOffline());
  $("access-form").onsubmit = (event) => {
    event.preventDefault();
    checkAccess($("access-pharmacy").value.trim());
  };
  const asked = new URL(window.location.href).searchParams.get("pharmacy");
  if (asked) {
    $("access-pharmacy").value = asked;
    checkAccess(asked);
  }
  note("info", `showing ${orders.size} pending orders; following both channels`);
}

// For the browser tests and curious developers: state, never data.
window.pharmacyPage = {
  get connectionState() {
    return pusher ? pusher.connection.state : "none";
  },
  delivered,
  get decrypted() {
    return decrypted;
  },
  feeds: () => feeds.map(({ sub }) => ({ channel: sub.channelName, state: sub.state, position: sub.position, stats: { ...sub.stats } })),
  orderIds: () => sortedOrders().map((row) => row.order_id),
  goOffline,
  goOnline,
};

main().catch((error) => fatal(`Something went wrong: ${error && error.name ? error.name : "error"}`));

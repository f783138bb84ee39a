/**
 * pusher-outbox client kit: gap-free, duplicate-free, ordered delivery on one pusher-js channel.
 *
 * pusher-outbox gives every event it publishes an envelope `{"id": "evt_…", "seq": n,
 * "data": {...}}` (inside the ciphertext on `private-encrypted-` channels): `id` is stable
 * across re-sends, `seq` numbers the channel's events 1, 2, 3, … in commit order without gaps.
 * Pusher itself delivers at most once to connected clients, and the relay delivers at least once,
 * so a client sees repeats and, after a dropped connection, holes. This module closes both:
 *
 * - repeats (same `id`, or a `seq` already delivered) are dropped;
 * - an event that arrives early (a hole before it) is held back, the application's catch-up
 *   endpoint (`outbox.CatchUp`) is asked for what is missing, and everything is handed to the
 *   application's handler in `seq` order;
 * - after a reconnect (a second `pusher:subscription_succeeded`, or the connection coming back to
 *   `connected`) it asks the catch-up endpoint what happened meanwhile;
 * - when the endpoint answers `reset` (the client's position is older than what the server
 *   keeps), `onReset` lets the application reload its state from its own API.
 *
 * No build step: an ES module with JSDoc types. It never imports pusher-js; pass a `Pusher`
 * instance (from `pusher-js/with-encryption` for encrypted channels). It never writes event data
 * to the console.
 *
 * @module pusher-outbox
 */

const DEFAULT_RETRY_MIN_MS = 500;
const DEFAULT_RETRY_MAX_MS = 30_000;
const DEFAULT_REMEMBER_IDS = 10_000;
/** Early events held back at most; beyond, they are left to the catch-up endpoint. */
const MAX_BUFFERED = 1_000;
const MAX_RESETS_PER_CATCH_UP = 2;
/** Statuses after which asking again cannot help (bad request, not signed in, not allowed). */
const FINAL_STATUSES = new Set([400, 401, 403, 404]);

/**
 * One event handed to the application, in `seq` order, at most once.
 *
 * @typedef {object} OutboxEvent
 * @property {string} channel  The channel name.
 * @property {string} id  Stable event id (`evt_…`): the same for every re-send.
 * @property {number} seq  Position in the channel (1, 2, 3, … in commit order).
 * @property {string} event  Event name, e.g. `order.created`.
 * @property {any} [data]  The fields the server declared (absent when `erased`).
 * @property {boolean} [erased]  The server no longer holds the payload (PHI is erased once sent):
 *   reload the record from the application's API.
 * @property {boolean} [late]  A previously skipped (dead) event that was redriven and published
 *   later; delivered out of order because it was never delivered before.
 * @property {"live" | "catch-up"} source  How it arrived.
 */

/**
 * @typedef {object} OutboxError
 * @property {"subscription" | "catch-up" | "reset" | "malformed" | "handler"} type
 * @property {string} message  A fixed text naming the problem, never event data.
 * @property {number} [status]  HTTP status, when there was one.
 * @property {unknown} [cause]  The underlying error (handler exceptions, network errors).
 */

/**
 * @typedef {object} ResetInfo
 * @property {string} channel
 * @property {number} lastSeq  The channel's newest `seq` when the server answered.
 */

/**
 * @typedef {object} ResetAnswer
 * @property {number} afterSeq  The last `seq` reflected in the state `onReset` reloaded.
 */

/**
 * @typedef {"connecting" | "syncing" | "live" | "offline" | "denied" | "closed"} OutboxState
 */

/**
 * @typedef {object} OutboxStats
 * @property {number} live  Events delivered from the websocket.
 * @property {number} caughtUp  Events delivered from the catch-up endpoint.
 * @property {number} duplicates  Repeats dropped.
 * @property {number} gaps  Holes detected in the live stream.
 * @property {number} catchUps  Catch-up requests made.
 * @property {number} resets  Times the server said the position was too old.
 * @property {number} erased  Events delivered without data (`erased: true`).
 * @property {number} skipped  Dead or expired events moved past (not delivered).
 */

/**
 * @typedef {object} OutboxOptions
 * @property {any} pusher  A connected or connecting `Pusher` instance (pusher-js).
 * @property {string} channel  The channel to follow, e.g. `private-pharmacy-pha_…`.
 * @property {string} catchUpUrl  The application's catch-up endpoint (`GET …?channel=&after_seq=`).
 * @property {(event: OutboxEvent) => void} onEvent  Called once per event, in `seq` order.
 * @property {number} [afterSeq]  The last `seq` already reflected in the application's state
 *   (from its snapshot); 0 (the default) replays what the server still keeps.
 * @property {Record<string, string> | (() => Record<string, string> | Promise<Record<string, string>>)} [headers]
 *   Headers for catch-up requests (e.g. `Authorization`); a function is called per request.
 * @property {(info: ResetInfo) => (ResetAnswer | void | Promise<ResetAnswer | void>)} [onReset]
 *   The server no longer has the events after the client's position: reload the state from the
 *   application's API. Return `{afterSeq}` (the `seq` that reloaded state reflects), or nothing
 *   to continue from `info.lastSeq` (correct when the state is read after this call started).
 * @property {(error: OutboxError) => void} [onError]  Problems; the default warns on the console
 *   with the fixed message only.
 * @property {(state: OutboxState) => void} [onStateChange]
 * @property {typeof fetch} [fetch]  The fetch implementation (default: `globalThis.fetch`).
 * @property {number} [retryMinMs]  First delay before asking the catch-up endpoint again (500).
 * @property {number} [retryMaxMs]  Longest such delay (30000); delays double in between.
 * @property {number} [rememberIds]  How many delivered event ids to remember (10000).
 */

/** An HTTP answer of the catch-up endpoint other than 200. */
export class CatchUpError extends Error {
  /**
   * @param {string} message
   * @param {number} [status]
   */
  constructor(message, status) {
    super(message);
    this.name = "CatchUpError";
    this.status = status;
  }
}

/**
 * Follows one channel: see the module documentation. Create with {@link subscribe} (or `new`
 * then {@link OutboxSubscription#start}); stop with {@link OutboxSubscription#close}.
 */
export class OutboxSubscription {
  /** @param {OutboxOptions} options */
  constructor(options) {
    const o = options || /** @type {OutboxOptions} */ ({});
    if (!o.pusher || typeof o.pusher.subscribe !== "function") {
      throw new TypeError("pusher: pass a Pusher instance from pusher-js");
    }
    if (typeof o.channel !== "string" || o.channel === "") {
      throw new TypeError("channel: pass the channel name");
    }
    if (typeof o.catchUpUrl !== "string" || o.catchUpUrl === "") {
      throw new TypeError("catchUpUrl: pass the URL of the application's catch-up endpoint");
    }
    if (typeof o.onEvent !== "function") {
      throw new TypeError("onEvent: pass a function receiving each event");
    }
    const afterSeq = o.afterSeq ?? 0;
    if (!Number.isSafeInteger(afterSeq) || afterSeq < 0) {
      throw new TypeError("afterSeq: pass a non-negative integer (0 for none)");
    }
    const fetchImpl = o.fetch ?? globalThis.fetch;
    if (typeof fetchImpl !== "function") {
      throw new TypeError("fetch: no fetch implementation; pass options.fetch");
    }
    /** @readonly */
    this.pusher = o.pusher;
    /** @readonly */
    this.channelName = o.channel;
    this._catchUpUrl = o.catchUpUrl;
    this._onEvent = o.onEvent;
    this._headers = o.headers;
    this._onReset = o.onReset;
    this._onError = o.onError ?? defaultOnError;
    this._onStateChange = o.onStateChange;
    /** @type {typeof fetch} */
    this._fetch = (url, init) => fetchImpl.call(globalThis, url, init);
    this._retryMinMs = o.retryMinMs ?? DEFAULT_RETRY_MIN_MS;
    this._retryMaxMs = o.retryMaxMs ?? DEFAULT_RETRY_MAX_MS;
    this._rememberIds = o.rememberIds ?? DEFAULT_REMEMBER_IDS;

    this._position = afterSeq;
    this._knownLastSeq = afterSeq;
    /** @type {Map<number, OutboxEvent>} early live events, by seq */
    this._buffer = new Map();
    /** @type {Set<string>} ids delivered (oldest first, bounded) */
    this._seen = new Set();
    /** @type {Set<string>} ids moved past as dead/expired (a redrive may publish them later) */
    this._skippedIds = new Set();
    this._subscribedOnce = false;
    this._connectedOnce = false;
    this._running = false;
    this._again = false;
    this._retryDelayMs = this._retryMinMs;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this._retryTimer = null;
    this._closed = false;
    this._denied = false;
    /** @type {any} */
    this._channel = null;
    /** @type {OutboxState} */
    this.state = "connecting";
    /** @type {OutboxStats} */
    this.stats = {
      live: 0,
      caughtUp: 0,
      duplicates: 0,
      gaps: 0,
      catchUps: 0,
      resets: 0,
      erased: 0,
      skipped: 0,
    };
    /** @type {Promise<void>} the catch-up running now (or the last one) */
    this._current = Promise.resolve();

    this._onChannelEvent = this._onChannelEvent.bind(this);
    this._onConnectionChange = this._onConnectionChange.bind(this);
  }

  /** The `seq` of the last event delivered (or moved past). */
  get position() {
    return this._position;
  }

  /**
   * Subscribe (through `pusher.subscribe`) and start following the channel.
   * @returns {this}
   */
  start() {
    if (this._channel !== null || this._closed) return this;
    const connection = this.pusher.connection;
    this._connectedOnce = Boolean(connection && connection.state === "connected");
    if (connection && typeof connection.bind === "function") {
      connection.bind("state_change", this._onConnectionChange);
    }
    this._channel = this.pusher.subscribe(this.channelName);
    this._channel.bind_global(this._onChannelEvent);
    if (this._channel.subscribed) this._onSubscribed(); // shared with another subscriber
    return this;
  }

  /** Stop: unbind, unsubscribe, cancel timers. Nothing is delivered afterwards. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._clearRetry();
    this._buffer.clear();
    const connection = this.pusher.connection;
    if (connection && typeof connection.unbind === "function") {
      connection.unbind("state_change", this._onConnectionChange);
    }
    if (this._channel !== null) {
      this._channel.unbind_global(this._onChannelEvent);
      this.pusher.unsubscribe(this.channelName);
    }
    this._setState("closed");
  }

  /**
   * Ask the catch-up endpoint now (also done automatically on gaps and reconnects).
   * @returns {Promise<void>} resolves when no catch-up is running any more
   */
  catchUp() {
    this._requestCatchUp();
    return this.settled();
  }

  /**
   * Resolves once no catch-up is running (a retry may still be scheduled for later).
   * @returns {Promise<void>}
   */
  async settled() {
    for (;;) {
      const current = this._current;
      await current;
      if (current === this._current && !this._running) return;
    }
  }

  // --- pusher-js events -------------------------------------------------------------------

  /**
   * @param {string} eventName
   * @param {any} data
   */
  _onChannelEvent(eventName, data) {
    if (this._closed) return;
    if (eventName === "pusher:subscription_succeeded") {
      this._onSubscribed();
    } else if (eventName === "pusher:subscription_error") {
      this._onSubscriptionError(data);
    } else if (!eventName.startsWith("pusher:") && !eventName.startsWith("pusher_internal:")) {
      this._onLive(eventName, data);
    }
  }

  _onSubscribed() {
    this._subscribedOnce = true;
    this._denied = false;
    // First time: fetch what happened between the application's snapshot and now.
    // Later times (pusher-js resubscribed after a reconnect): what happened while away.
    this._requestCatchUp();
  }

  /** @param {any} error */
  _onSubscriptionError(error) {
    const status = error && typeof error.status === "number" ? error.status : undefined;
    if (status === 401 || status === 403) {
      this._denied = true;
      this._clearRetry();
      this._setState("denied");
    }
    this._report({
      type: "subscription",
      message:
        status === undefined
          ? `could not subscribe to ${this.channelName}`
          : `subscription to ${this.channelName} refused (HTTP ${status})`,
      status,
    });
  }

  /** @param {{previous: string, current: string}} change */
  _onConnectionChange(change) {
    if (this._closed || !change) return;
    if (change.current === "connected") {
      const back = this._connectedOnce && change.previous !== "connected";
      this._connectedOnce = true;
      if (back && this._subscribedOnce) this._requestCatchUp();
      else this._settleState();
    } else if (!this._denied) {
      this._setState(change.current === "connecting" && !this._connectedOnce ? "connecting" : "offline");
    }
  }

  /**
   * @param {string} eventName
   * @param {any} data
   */
  _onLive(eventName, data) {
    let envelope = data;
    if (typeof envelope === "string") {
      try {
        envelope = JSON.parse(envelope);
      } catch {
        envelope = null;
      }
    }
    if (
      !envelope ||
      typeof envelope !== "object" ||
      typeof envelope.id !== "string" ||
      !Number.isSafeInteger(envelope.seq) ||
      envelope.seq < 1
    ) {
      this._report({
        type: "malformed",
        message: `${eventName} on ${this.channelName} has no outbox envelope (id, seq); ignored`,
      });
      return;
    }
    /** @type {OutboxEvent} */
    const event = {
      channel: this.channelName,
      id: envelope.id,
      seq: envelope.seq,
      event: eventName,
      data: envelope.data,
      source: "live",
    };
    this._ingestLive(event);
  }

  /** @param {OutboxEvent} event */
  _ingestLive(event) {
    if (this._seen.has(event.id)) {
      this.stats.duplicates += 1;
      return;
    }
    if (event.seq <= this._position) {
      if (this._skippedIds.has(event.id)) {
        // Moved past as dead/expired, then redriven: never delivered, so deliver it now.
        this._skippedIds.delete(event.id);
        this._handOver({ ...event, late: true });
      } else {
        this.stats.duplicates += 1;
      }
      return;
    }
    if (event.seq > this._knownLastSeq) this._knownLastSeq = event.seq;
    if (event.seq === this._position + 1) {
      this._deliver(event);
      this._drain();
      return;
    }
    if (this._buffer.has(event.seq)) {
      this.stats.duplicates += 1;
      return;
    }
    const hadGap = this._buffer.size > 0;
    if (this._buffer.size < MAX_BUFFERED) this._buffer.set(event.seq, event);
    if (!hadGap) this.stats.gaps += 1;
    this._requestCatchUp();
  }

  // --- delivery ---------------------------------------------------------------------------

  /**
   * Advance the position to `event.seq` and hand the event over (unless it was skipped).
   * @param {OutboxEvent & {skipped?: string}} event
   */
  _deliver(event) {
    this._position = event.seq;
    if (event.seq > this._knownLastSeq) this._knownLastSeq = event.seq;
    this._buffer.delete(event.seq);
    if (event.source === "live") this.stats.live += 1;
    else this.stats.caughtUp += 1;
    if (event.skipped) {
      this.stats.skipped += 1;
      this._remember(this._skippedIds, event.id);
    } else {
      if (event.erased) this.stats.erased += 1;
      const { skipped: _ignored, ...clean } = event;
      this._handOver(clean);
    }
    if (this._position >= this._knownLastSeq && this._buffer.size === 0) {
      this._clearRetry();
      this._retryDelayMs = this._retryMinMs;
    }
  }

  /** @param {OutboxEvent} event */
  _handOver(event) {
    this._remember(this._seen, event.id);
    try {
      this._onEvent(event);
    } catch (cause) {
      // The position has moved on: one failing handler call must not stall the channel.
      this._report({ type: "handler", message: `onEvent threw for ${event.id}`, cause });
    }
  }

  /** Deliver buffered events that are next in line; drop buffered ones already passed. */
  _drain() {
    for (const seq of [...this._buffer.keys()]) {
      if (seq <= this._position) {
        this._buffer.delete(seq);
        this.stats.duplicates += 1;
      }
    }
    let next = this._buffer.get(this._position + 1);
    while (next !== undefined && !this._closed) {
      this._deliver(next);
      next = this._buffer.get(this._position + 1);
    }
  }

  /**
   * @param {Set<string>} set
   * @param {string} id
   */
  _remember(set, id) {
    set.add(id);
    if (set.size > this._rememberIds) {
      const oldest = set.values().next().value;
      if (oldest !== undefined) set.delete(oldest);
    }
  }

  // --- catch-up ---------------------------------------------------------------------------

  _requestCatchUp() {
    if (this._closed || this._denied) return;
    this._clearRetry();
    if (this._running) {
      this._again = true;
      return;
    }
    this._running = true;
    this._setState("syncing");
    this._current = this._runCatchUp();
  }

  async _runCatchUp() {
    let retry = false;
    try {
      let resets = 0;
      do {
        this._again = false;
        const body = await this._fetchCatchUp(this._position);
        if (this._closed) return;
        if (body.last_seq > this._knownLastSeq) this._knownLastSeq = body.last_seq;
        if (body.reset) {
          resets += 1;
          if (resets > MAX_RESETS_PER_CATCH_UP) {
            throw new CatchUpError("catch-up keeps answering reset; onReset's position is too old");
          }
          await this._reset(body.last_seq);
          this._again = true;
          continue;
        }
        const before = this._position;
        const hole = this._applyCatchUp(body.events);
        if (hole) {
          // Rows in the middle were purged: the state can no longer be rebuilt from events.
          resets += 1;
          await this._reset(body.last_seq);
          this._again = true;
          continue;
        }
        this._drain();
        if (this._position > before) this._retryDelayMs = this._retryMinMs;
        // A full page: ask for the next one at once.
        if (!body.complete && body.events.length > 0 && this._position < body.last_seq) {
          this._again = true;
        }
      } while (this._again && !this._closed && !this._denied);
      // Still behind: the rest is not published yet (it will come live) or was lost on the way.
      retry = this._position < this._knownLastSeq || this._buffer.size > 0;
    } catch (error) {
      const status = error instanceof CatchUpError ? error.status : undefined;
      if (status !== undefined && FINAL_STATUSES.has(status)) {
        if (status === 401 || status === 403) {
          this._denied = true;
          this._setState("denied");
        }
      } else {
        retry = true;
      }
      this._report({
        type: "catch-up",
        message:
          error instanceof CatchUpError
            ? `${error.message} (${this.channelName})`
            : `catch-up request failed (${this.channelName})`,
        status,
        cause: error,
      });
    } finally {
      this._running = false;
    }
    if (this._closed || this._denied) return;
    if (this._again) {
      this._requestCatchUp();
      return;
    }
    this._settleState();
    if (retry) this._scheduleRetry();
  }

  /**
   * Deliver the catch-up events that are next in line.
   * @param {any[]} events
   * @returns {boolean} true when the answer skips over seq numbers (a hole the server cannot fill)
   */
  _applyCatchUp(events) {
    for (const item of events) {
      if (this._closed) return false;
      if (!item || typeof item.id !== "string" || !Number.isSafeInteger(item.seq)) {
        this._report({ type: "malformed", message: `catch-up event without id or seq ignored` });
        return false;
      }
      if (item.seq <= this._position) continue; // already delivered live
      if (item.seq !== this._position + 1) return true;
      const buffered = this._buffer.get(item.seq);
      if (buffered !== undefined && buffered.id === item.id) {
        // The live copy has the data even when the server has erased it since (PHI).
        this.stats.duplicates += 1;
        this._deliver(buffered);
        continue;
      }
      /** @type {OutboxEvent & {skipped?: string}} */
      const event = {
        channel: this.channelName,
        id: item.id,
        seq: item.seq,
        event: typeof item.event === "string" ? item.event : "",
        source: "catch-up",
      };
      if (item.skipped) event.skipped = String(item.skipped);
      else if (item.erased) event.erased = true;
      else event.data = item.data;
      if (this._seen.has(item.id)) {
        this._position = item.seq; // same event under an id we delivered: advance only
        this.stats.duplicates += 1;
        continue;
      }
      this._deliver(event);
    }
    return false;
  }

  /** @param {number} lastSeq */
  async _reset(lastSeq) {
    this.stats.resets += 1;
    let position = lastSeq;
    if (typeof this._onReset === "function") {
      try {
        const answer = await this._onReset({ channel: this.channelName, lastSeq });
        // An object, not a bare number: `(info) => list.push(info)` must not move the position.
        const afterSeq = answer && typeof answer === "object" ? answer.afterSeq : undefined;
        if (Number.isSafeInteger(afterSeq) && afterSeq >= 0) position = afterSeq;
      } catch (cause) {
        this._report({ type: "handler", message: "onReset threw", cause });
      }
    } else {
      this._report({
        type: "reset",
        message: `events of ${this.channelName} before seq ${lastSeq} are no longer kept; reload state`,
      });
    }
    this._position = position;
    if (lastSeq > this._knownLastSeq) this._knownLastSeq = lastSeq;
    this._drain();
  }

  /**
   * @param {number} afterSeq
   * @returns {Promise<{events: any[], last_seq: number, complete: boolean, reset: boolean}>}
   */
  async _fetchCatchUp(afterSeq) {
    this.stats.catchUps += 1;
    const extra = typeof this._headers === "function" ? await this._headers() : this._headers;
    const separator = this._catchUpUrl.includes("?") ? "&" : "?";
    const url =
      `${this._catchUpUrl}${separator}channel=${encodeURIComponent(this.channelName)}` +
      `&after_seq=${afterSeq}`;
    const response = await this._fetch(url, {
      method: "GET",
      headers: { Accept: "application/json", ...(extra || {}) },
      credentials: "same-origin",
      cache: "no-store",
    });
    if (!response.ok) {
      throw new CatchUpError(`catch-up answered HTTP ${response.status}`, response.status);
    }
    const body = await response.json();
    if (!body || !Array.isArray(body.events) || !Number.isSafeInteger(body.last_seq)) {
      throw new CatchUpError("catch-up answer is not a catch-up document");
    }
    return body;
  }

  _scheduleRetry() {
    if (this._closed || this._denied || this._retryTimer !== null) return;
    const delay = this._retryDelayMs;
    this._retryDelayMs = Math.min(this._retryMaxMs, this._retryDelayMs * 2);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._requestCatchUp();
    }, delay);
  }

  _clearRetry() {
    if (this._retryTimer !== null) {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
    }
  }

  // --- state and errors -------------------------------------------------------------------

  _settleState() {
    if (this._closed || this._denied) return;
    const connection = this.pusher.connection;
    const connected = !connection || connection.state === undefined || connection.state === "connected";
    if (!connected) this._setState(this._connectedOnce ? "offline" : "connecting");
    else if (!this._subscribedOnce) this._setState("connecting");
    else this._setState("live");
  }

  /** @param {OutboxState} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    if (typeof this._onStateChange === "function") {
      try {
        this._onStateChange(state);
      } catch (cause) {
        this._report({ type: "handler", message: "onStateChange threw", cause });
      }
    }
  }

  /** @param {OutboxError} error */
  _report(error) {
    try {
      this._onError(error);
    } catch {
      // An error reporter that fails has nowhere left to report to.
    }
  }
}

/** @param {OutboxError} error */
function defaultOnError(error) {
  if (globalThis.console && typeof globalThis.console.warn === "function") {
    globalThis.console.warn(`pusher-outbox: ${error.message}`);
  }
}

/**
 * Follow `options.channel` with gap-free, duplicate-free, ordered delivery.
 * @param {OutboxOptions} options
 * @returns {OutboxSubscription}
 */
export function subscribe(options) {
  return new OutboxSubscription(options).start();
}

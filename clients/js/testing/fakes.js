// Test doubles: a pusher-js-shaped Pusher/channel/connection and a catch-up endpoint that answers
// like outbox.CatchUp (events after a position, complete, reset), served through a fake fetch.

export class FakeChannel {
  /** @param {string} name */
  constructor(name) {
    this.name = name;
    this.subscribed = false;
    /** @type {Array<(name: string, data: any) => void>} */
    this.globals = [];
  }

  bind_global(callback) {
    this.globals.push(callback);
  }

  unbind_global(callback) {
    this.globals = this.globals.filter((c) => c !== callback);
  }

  emit(name, data) {
    for (const callback of [...this.globals]) callback(name, data);
  }

  /** What pusher-js emits once the server confirmed the subscription. */
  succeed() {
    this.subscribed = true;
    this.emit("pusher:subscription_succeeded", {});
  }

  /** What pusher-js emits when the auth endpoint refused. */
  refuse(status) {
    this.subscribed = false;
    this.emit("pusher:subscription_error", { type: "AuthError", error: "refused", status });
  }

  /** A live event as pusher-js hands it over (data already JSON-parsed, or decrypted). */
  live(row) {
    this.emit(row.event, { id: row.id, seq: row.seq, data: row.data });
  }
}

export class FakeConnection {
  constructor(state = "connected") {
    this.state = state;
    /** @type {Array<(change: {previous: string, current: string}) => void>} */
    this.handlers = [];
  }

  bind(name, callback) {
    if (name === "state_change") this.handlers.push(callback);
  }

  unbind(name, callback) {
    if (name === "state_change") this.handlers = this.handlers.filter((c) => c !== callback);
  }

  set(state) {
    const previous = this.state;
    this.state = state;
    for (const handler of [...this.handlers]) handler({ previous, current: state });
  }
}

export class FakePusher {
  constructor(state = "connected") {
    this.connection = new FakeConnection(state);
    /** @type {Map<string, FakeChannel>} */
    this.channels = new Map();
    /** @type {string[]} */
    this.unsubscribed = [];
  }

  subscribe(name) {
    let channel = this.channels.get(name);
    if (channel === undefined) {
      channel = new FakeChannel(name);
      this.channels.set(name, channel);
    }
    return channel;
  }

  unsubscribe(name) {
    this.unsubscribed.push(name);
  }

  channel(name) {
    return this.channels.get(name);
  }
}

/** One channel's history on the server, and its catch-up endpoint. */
export class FakeServer {
  constructor({ channel = "private-pharmacy-pha_test", maxEvents = 200 } = {}) {
    this.channel = channel;
    this.maxEvents = maxEvents;
    this.lastSeq = 0;
    /** @type {Array<{id: string, seq: number, event: string, data: any, status: string, erased?: boolean}>} */
    this.rows = [];
    /** @type {Array<{url: string, afterSeq: number, headers: Record<string, string>}>} */
    this.requests = [];
    /** @type {Array<number | Error>} statuses (or errors) to answer before the real answer */
    this.failures = [];
  }

  /** Enqueue and send an event (status sent); returns its row. */
  add(event = "order.created", data = undefined, status = "sent") {
    this.lastSeq += 1;
    const seq = this.lastSeq;
    const row = {
      id: `evt_${String(seq).padStart(4, "0")}`,
      seq,
      event,
      data: data ?? { order_id: `ord_${seq}` },
      status,
    };
    this.rows.push(row);
    return row;
  }

  row(seq) {
    return this.rows.find((r) => r.seq === seq);
  }

  /** Delete rows (retention purge). */
  purge(predicate) {
    this.rows = this.rows.filter((r) => !predicate(r));
  }

  answer(afterSeq) {
    const rows = this.rows
      .filter((r) => r.seq > afterSeq)
      .sort((a, b) => a.seq - b.seq)
      .slice(0, this.maxEvents);
    const events = [];
    let complete = true;
    for (const r of rows) {
      const item = { id: r.id, seq: r.seq, event: r.event };
      if (r.status === "sent") {
        if (r.erased) item.erased = true;
        else item.data = r.data;
      } else if (r.status === "dead" || r.status === "expired") {
        item.skipped = r.status;
      } else {
        complete = false;
        break;
      }
      events.push(item);
    }
    if (complete && rows.length === this.maxEvents) {
      complete = rows[rows.length - 1].seq >= this.lastSeq;
    }
    const first = this.rows.length ? Math.min(...this.rows.map((r) => r.seq)) : null;
    const reset = (first !== null && afterSeq < first - 1) || (first === null && this.lastSeq > afterSeq);
    return { channel: this.channel, after_seq: afterSeq, events, last_seq: this.lastSeq, complete, reset };
  }

  /** A fetch function answering GET <endpoint>?channel=…&after_seq=… */
  get fetch() {
    return async (url, init = {}) => {
      const parsed = new URL(url, "http://app.test");
      const afterSeq = Number(parsed.searchParams.get("after_seq"));
      this.requests.push({ url, afterSeq, headers: { ...(init.headers || {}) } });
      const failure = this.failures.shift();
      if (failure instanceof Error) throw failure;
      if (typeof failure === "number") return response(failure, { error: "failed" });
      if (parsed.searchParams.get("channel") !== this.channel) return response(403, { error: "no" });
      return response(200, this.answer(afterSeq));
    };
  }
}

function response(status, body) {
  return {
    ok: status >= 200 && status < 300,
    status,
    json: async () => JSON.parse(JSON.stringify(body)),
  };
}

/** Let timers and promise callbacks run. */
export function tick(ms = 0) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

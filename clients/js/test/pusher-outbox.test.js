// node --test clients/js/test/
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { OutboxSubscription, subscribe } from "../pusher-outbox.js";
import { FakePusher, FakeServer, tick } from "../testing/fakes.js";

const CATCH_UP_URL = "/pusher/catchup";

/** A subscription on a fake pusher and a fake catch-up endpoint, recording what it delivers. */
function setup({ server = new FakeServer(), pusher = new FakePusher(), ...options } = {}) {
  const delivered = [];
  const errors = [];
  const states = [];
  const sub = subscribe({
    pusher,
    channel: server.channel,
    catchUpUrl: CATCH_UP_URL,
    fetch: server.fetch,
    onEvent: (event) => delivered.push(event),
    onError: (error) => errors.push(error),
    onStateChange: (state) => states.push(state),
    retryMinMs: 5,
    retryMaxMs: 20,
    ...options,
  });
  const channel = pusher.channel(server.channel);
  return { server, pusher, channel, sub, delivered, errors, states };
}

const seqs = (events) => events.map((e) => e.seq);

/** Subscribed and caught up with an empty history. */
async function live(options) {
  const t = setup(options);
  t.channel.succeed();
  await t.sub.settled();
  return t;
}

describe("live delivery", () => {
  test("delivers live events in seq order with their data and source", async () => {
    const t = await live();
    const rows = [t.server.add(), t.server.add("order.details", { order_id: "ord_x", qty: 2 })];

    rows.forEach((row) => t.channel.live(row));

    assert.deepEqual(t.delivered, [
      { channel: t.server.channel, id: "evt_0001", seq: 1, event: "order.created", data: { order_id: "ord_1" }, source: "live" },
      { channel: t.server.channel, id: "evt_0002", seq: 2, event: "order.details", data: { order_id: "ord_x", qty: 2 }, source: "live" },
    ]);
    assert.equal(t.sub.position, 2);
    assert.equal(t.sub.state, "live");
    assert.deepEqual(t.errors, []);
  });

  test("drops a repeated publish of the same event by id", async () => {
    const t = await live();
    const row = t.server.add();

    t.channel.live(row);
    t.channel.live(row); // the relay re-sent it (at-least-once)

    assert.deepEqual(seqs(t.delivered), [1]);
    assert.equal(t.sub.stats.duplicates, 1);
    assert.equal(t.sub.stats.live, 1);
  });

  test("drops a repeat that arrives after later events", async () => {
    const t = await live();
    const [a, b] = [t.server.add(), t.server.add()];

    t.channel.live(a);
    t.channel.live(b);
    t.channel.live(a);

    assert.deepEqual(seqs(t.delivered), [1, 2]);
    assert.equal(t.sub.stats.duplicates, 1);
  });

  test("accepts data that is still a JSON string", async () => {
    const t = await live();
    const row = t.server.add();

    t.channel.emit(row.event, JSON.stringify({ id: row.id, seq: row.seq, data: row.data }));

    assert.deepEqual(t.delivered[0].data, row.data);
  });

  test("ignores pusher's own events and reports events without an envelope, without their data", async () => {
    const t = await live();

    t.channel.emit("pusher:subscription_count", { subscription_count: 2 });
    t.channel.emit("order.created", { patient: "Avery Quillfeather" });

    assert.deepEqual(t.delivered, []);
    assert.equal(t.errors.length, 1);
    assert.equal(t.errors[0].type, "malformed");
    assert.doesNotMatch(t.errors[0].message, /Quillfeather/);
  });

  test("a throwing handler does not stall the channel", async () => {
    const server = new FakeServer();
    const seen = [];
    const t = await live({
      server,
      onEvent: (event) => {
        seen.push(event.seq);
        if (event.seq === 1) throw new Error("app bug");
      },
    });

    t.channel.live(server.add());
    t.channel.live(server.add());

    assert.deepEqual(seen, [1, 2]);
    assert.deepEqual(t.errors.map((e) => e.type), ["handler"]);
  });
});

describe("gaps", () => {
  test("holds back an early event, fetches the hole and delivers everything in order", async () => {
    const t = await live();
    const [a, b, c, d] = [t.server.add(), t.server.add(), t.server.add(), t.server.add()];

    t.channel.live(a);
    t.channel.live(d); // b and c were lost on the way
    assert.deepEqual(seqs(t.delivered), [1]);
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1, 2, 3, 4]);
    assert.deepEqual(t.delivered.map((e) => e.source), ["live", "catch-up", "catch-up", "live"]);
    assert.equal(t.server.requests.at(-1).afterSeq, 1);
    assert.equal(t.sub.stats.gaps, 1);
    t.channel.live(b); // late arrival of a lost one: already delivered
    t.channel.live(c);
    assert.deepEqual(seqs(t.delivered), [1, 2, 3, 4]);
    assert.equal(t.sub.stats.duplicates, 3, "catch-up's copy of 4, then b and c");
  });

  test("reorders events that arrive out of order", async () => {
    const t = await live();
    const rows = [t.server.add(), t.server.add(), t.server.add()];

    t.channel.live(rows[2]);
    t.channel.live(rows[1]);
    t.channel.live(rows[0]);
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1, 2, 3]);
    assert.equal(new Set(t.delivered.map((e) => e.id)).size, 3);
  });

  test("prefers the live copy of a held-back event over the catch-up copy whose data was erased", async () => {
    const t = await live();
    const a = t.server.add("order.details", { order_id: "ord_a", patient: "P" });
    const b = t.server.add("order.details", { order_id: "ord_b", patient: "Q" });
    a.erased = true;
    b.erased = true; // PHI payloads are erased once sent

    t.channel.live(b); // a was lost
    await t.sub.settled();

    assert.deepEqual(t.delivered.map((e) => [e.seq, e.erased ?? false, e.data]), [
      [1, true, undefined],
      [2, false, { order_id: "ord_b", patient: "Q" }],
    ]);
  });

  test("when the missing event is not published yet, asks again until it is", async () => {
    const t = await live();
    const a = t.server.add("order.created", undefined, "in_flight");
    const b = t.server.add();

    t.channel.live(b);
    await t.sub.settled();
    assert.deepEqual(seqs(t.delivered), []);
    a.status = "sent"; // published; its live copy never arrives
    await tick(60);
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1, 2]);
    assert.ok(t.server.requests.length >= 3);
  });
});

describe("reconnects", () => {
  test("a second subscription_succeeded fetches what was published meanwhile", async () => {
    const t = await live();
    t.channel.live(t.server.add());
    t.server.add(); // published while the socket was down: never arrives live
    t.server.add();

    t.channel.succeed(); // pusher-js resubscribed after reconnecting
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1, 2, 3]);
    assert.equal(t.server.requests.at(-1).afterSeq, 1);
  });

  test("the connection coming back to connected fetches what was missed", async () => {
    const t = await live();
    t.pusher.connection.set("unavailable");
    assert.equal(t.sub.state, "offline");
    t.server.add();

    t.pusher.connection.set("connected");
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1]);
    assert.equal(t.sub.state, "live");
    assert.deepEqual(t.states, ["syncing", "live", "offline", "syncing", "live"]);
  });

  test("the first connect and subscribe catch up from the application's position", async () => {
    const server = new FakeServer();
    for (let i = 0; i < 5; i += 1) server.add();
    const pusher = new FakePusher("connecting");
    const t = setup({ server, pusher, afterSeq: 3 });

    pusher.connection.set("connected");
    assert.equal(server.requests.length, 0, "no catch-up before the subscription");
    t.channel.succeed();
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [4, 5]);
    assert.equal(server.requests[0].afterSeq, 3);
  });

  test("an already subscribed channel starts at once", async () => {
    const server = new FakeServer();
    server.add();
    const pusher = new FakePusher();
    pusher.subscribe(server.channel).subscribed = true;

    const t = setup({ server, pusher });
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1]);
  });
});

describe("catch-up answers", () => {
  test("erased events are delivered with erased: true, skipped ones only advance", async () => {
    const server = new FakeServer();
    server.add("order.created", { order_id: "ord_1" });
    server.add("order.details", { order_id: "ord_1" }).erased = true;
    server.add("order.details", { order_id: "ord_2" }, "dead");
    server.add("order.created", { order_id: "ord_3" }, "expired");
    server.add("order.created", { order_id: "ord_4" });

    const t = await live({ server });

    assert.deepEqual(
      t.delivered.map(({ seq, event, erased, data }) => ({ seq, event, erased, data })),
      [
        { seq: 1, event: "order.created", erased: undefined, data: { order_id: "ord_1" } },
        { seq: 2, event: "order.details", erased: true, data: undefined },
        { seq: 5, event: "order.created", erased: undefined, data: { order_id: "ord_4" } },
      ],
    );
    assert.ok(!("data" in t.delivered[1]));
    assert.ok(!("skipped" in t.delivered[0]));
    assert.equal(t.sub.position, 5);
    assert.equal(t.sub.stats.skipped, 2);
  });

  test("a skipped event that is redriven later is delivered once, marked late", async () => {
    const server = new FakeServer();
    const dead = server.add("order.created", { order_id: "ord_1" }, "dead");
    server.add();
    const t = await live({ server });
    assert.deepEqual(seqs(t.delivered), [2]);

    dead.status = "sent";
    t.channel.live(dead); // redriven and published
    t.channel.live(dead);

    assert.deepEqual(t.delivered.map((e) => [e.seq, e.late ?? false]), [[2, false], [1, true]]);
  });

  test("pages through a history longer than one answer", async () => {
    const server = new FakeServer({ maxEvents: 3 });
    for (let i = 0; i < 8; i += 1) server.add();

    const t = await live({ server });

    assert.deepEqual(seqs(t.delivered), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(server.requests.map((r) => r.afterSeq), [0, 3, 6]);
  });

  test("sends the application's headers and the position on every request", async () => {
    let n = 0;
    const t = await live({
      headers: async () => ({ Authorization: `Bearer tok_${++n}` }),
      catchUpUrl: "/pusher/catchup?v=1",
    });
    t.channel.live(t.server.add("order.created"));
    t.channel.live(t.server.add("order.created", { order_id: "ord_z" })); // fine
    t.channel.succeed();
    await t.sub.settled();

    const [first, second] = t.server.requests;
    assert.equal(first.headers.Authorization, "Bearer tok_1");
    assert.equal(second.headers.Authorization, "Bearer tok_2");
    assert.equal(first.headers.Accept, "application/json");
    assert.equal(
      second.url,
      `/pusher/catchup?v=1&channel=${encodeURIComponent(t.server.channel)}&after_seq=2`,
    );
  });

  test("a static headers object works too", async () => {
    const t = await live({ headers: { Authorization: "Bearer tok_static" } });

    assert.equal(t.server.requests[0].headers.Authorization, "Bearer tok_static");
  });
});

describe("reset", () => {
  test("a position older than what the server keeps calls onReset and continues from last_seq", async () => {
    const server = new FakeServer();
    for (let i = 0; i < 6; i += 1) server.add();
    server.purge((r) => r.seq <= 4); // retention removed rows 1-4
    const resets = [];

    const t = await live({ server, onReset: (info) => resets.push(info) });
    t.channel.live(server.add());

    assert.deepEqual(resets, [{ channel: server.channel, lastSeq: 6 }]);
    assert.deepEqual(seqs(t.delivered), [7], "the events of the old position are not replayed");
    assert.equal(t.sub.stats.resets, 1);
  });

  test("onReset may return the position of the state it reloaded as {afterSeq}", async () => {
    const server = new FakeServer();
    for (let i = 0; i < 6; i += 1) server.add();
    server.purge((r) => r.seq <= 2);

    const t = await live({ server, onReset: async () => ({ afterSeq: 4 }) });

    assert.deepEqual(seqs(t.delivered), [5, 6]);
  });

  test("a hole in the middle of the retained history is a reset too", async () => {
    const server = new FakeServer();
    for (let i = 0; i < 5; i += 1) server.add();
    server.purge((r) => r.seq === 3);
    const resets = [];

    const t = await live({ server, onReset: (info) => resets.push(info.lastSeq) });

    assert.deepEqual(seqs(t.delivered), [1, 2]);
    assert.deepEqual(resets, [5]);
    assert.equal(t.sub.position, 5);
  });

  test("without onReset the reset is reported and the subscription continues", async () => {
    const server = new FakeServer();
    server.add();
    server.add();
    server.purge(() => true);

    const t = await live({ server });
    t.channel.live(server.add());

    assert.deepEqual(t.errors.map((e) => e.type), ["reset"]);
    assert.deepEqual(seqs(t.delivered), [3]);
  });
});

describe("failures", () => {
  test("a failed catch-up is retried with backoff until it succeeds", async () => {
    const server = new FakeServer();
    server.add();
    server.failures.push(503, new TypeError("network down"));

    const t = setup({ server });
    t.channel.succeed();
    await tick(80);
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), [1]);
    assert.deepEqual(t.errors.map((e) => [e.type, e.status]), [["catch-up", 503], ["catch-up", undefined]]);
    assert.equal(server.requests.length, 3);
  });

  test("a refused catch-up stops: state denied, no retries", async () => {
    const server = new FakeServer();
    server.failures.push(403);

    const t = setup({ server });
    t.channel.succeed();
    await tick(60);

    assert.equal(t.sub.state, "denied");
    assert.equal(server.requests.length, 1);
    assert.deepEqual(t.errors.map((e) => e.status), [403]);
  });

  test("a refused subscription reports the status and never asks for catch-up", async () => {
    const t = setup();

    t.channel.refuse(403);
    await tick(20);

    assert.equal(t.sub.state, "denied");
    assert.deepEqual(t.errors.map((e) => [e.type, e.status]), [["subscription", 403]]);
    assert.match(t.errors[0].message, /refused \(HTTP 403\)/);
    assert.equal(t.server.requests.length, 0);
  });
});

describe("lifecycle", () => {
  test("close unbinds, unsubscribes and delivers nothing afterwards", async () => {
    const t = await live();
    t.sub.close();

    t.channel.live(t.server.add());
    t.pusher.connection.set("connected");

    assert.deepEqual(t.delivered, []);
    assert.deepEqual(t.pusher.unsubscribed, [t.server.channel]);
    assert.equal(t.channel.globals.length, 0);
    assert.equal(t.pusher.connection.handlers.length, 0);
    assert.equal(t.sub.state, "closed");
  });

  test("rejects missing options with a message naming the option", () => {
    const pusher = new FakePusher();
    const base = { pusher, channel: "private-x", catchUpUrl: CATCH_UP_URL, onEvent() {} };

    assert.throws(() => new OutboxSubscription({ ...base, pusher: undefined }), /pusher/);
    assert.throws(() => new OutboxSubscription({ ...base, channel: "" }), /channel/);
    assert.throws(() => new OutboxSubscription({ ...base, catchUpUrl: undefined }), /catchUpUrl/);
    assert.throws(() => new OutboxSubscription({ ...base, onEvent: null }), /onEvent/);
    assert.throws(() => new OutboxSubscription({ ...base, afterSeq: -1 }), /afterSeq/);
  });

  test("every event is delivered exactly once across live, gaps, repeats and reconnects", async () => {
    const t = await live();
    const lost = new Set([3, 4, 9, 12, 13, 14]);
    for (let i = 1; i <= 20; i += 1) {
      const row = t.server.add();
      if (!lost.has(i)) t.channel.live(row);
      if (i % 5 === 0) t.channel.live(t.server.row(i - 2)); // repeats
      if (i === 10) t.pusher.connection.set("connecting");
      if (i === 11) t.pusher.connection.set("connected");
    }
    await t.sub.settled();
    t.channel.succeed();
    await t.sub.settled();

    assert.deepEqual(seqs(t.delivered), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.equal(new Set(t.delivered.map((e) => e.id)).size, 20);
  });
});

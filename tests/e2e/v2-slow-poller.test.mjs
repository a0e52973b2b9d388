// A socket.io 2 client on long-polling (Engine.IO 3) that stops polling is
// let go by the same bounds as a v4 one (slow-reader.test.mjs): the live
// messages or bytes waiting for it, and the time its queue goes without
// emptying while it keeps its session alive with pings. The room's other
// clients keep receiving, and the let-go client resumes with `since`
// without a gap.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { compareIds, logged, metrics, postMessage, request, waitFor } from './lib/helpers.mjs';
import { V2Client } from './lib/v2-client.mjs';

const TEXT = 'x'.repeat(3900);
const BATCH = 50;
const MOST_POSTS = 4000;
const DROPPED = 'chat_frontend_messages_dropped_total';
// The live messages that may wait for a socket with the default history:
// the bound in packets, which acts only after this many.
const LIVE_BACKLOG = 744;
const BACKLOG_TIMEOUT_MS = 2000;
const LET_GO_MARGIN_MS = 15_000;

/** The packets of an Engine.IO 3 text payload: `<length in UTF-16 units>:<packet>`, repeated. */
function decodePayload(text) {
  const packets = [];
  let at = 0;
  while (at < text.length) {
    const colon = text.indexOf(':', at);
    assert.ok(colon > at, `a length at ${at} of ${JSON.stringify(text.slice(0, 200))}`);
    const length = Number(text.slice(at, colon));
    packets.push(text.slice(colon + 1, colon + 1 + length)); // JavaScript strings count UTF-16 units
    at = colon + 1 + length;
  }
  return packets;
}

/** The ids of the `message` events among Socket.IO packets. */
function messageIds(packets) {
  return packets.filter((p) => p.startsWith('42["message"')).map((p) => JSON.parse(p.slice(2))[1].id);
}

/** An Engine.IO 3 long-polling session spoken by hand: nothing polls or pings unless asked. */
class RawPollingV3 {
  constructor(base) {
    this.base = `${base}/front/socket.io/?EIO=3&transport=polling`;
  }

  /** Opens the session; resolves once Socket.IO's connect has arrived. */
  async open() {
    const res = await request(this.base);
    assert.equal(res.status, 200, res.text);
    const [open, ...rest] = decodePayload(res.text);
    this.sid = JSON.parse(open.slice(1)).sid;
    this.url = `${this.base}&sid=${encodeURIComponent(this.sid)}`;
    const connect = rest.length ? rest : await this.poll();
    assert.ok(connect.includes('40'), `the connect packet: ${JSON.stringify(connect)}`);
  }

  /** Posts `packet`; resolves to the answer's status. */
  async post(packet) {
    const res = await request(this.url, { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body: `${packet.length}:${packet}` });
    return res.status;
  }

  async send(packet) {
    const status = await this.post(packet);
    assert.equal(status, 200, `POST ${packet}`);
  }

  /** One poll: the packets waiting, pongs left out (waits for the next if only pongs came); an error as {status, text}. */
  async poll() {
    const res = await request(this.url, { timeoutMs: 40_000 });
    if (res.status !== 200) return { status: res.status, text: res.text };
    const packets = decodePayload(res.text).filter((p) => p !== '3');
    return packets.length ? packets : this.poll();
  }

  /** Joins `room`, reads the ack and the message `first` posted then. */
  async joinAndRead(room, backend) {
    await this.send(`420${JSON.stringify(['room', room])}`);
    assert.deepEqual(await this.poll(), ['430[{"ok":true}]']);
    const first = await postMessage(backend.url, room, 'before the stall');
    assert.equal(first.status, 201);
    assert.deepEqual(messageIds(await this.poll()), [first.json.id]);
    return first.json.id;
  }
}

/** Pings every 500 ms, as a socket.io 2 client keeping its session alive; returns the stopper. */
function keepPinging(session) {
  const timer = setInterval(() => { session.post('2').catch(() => {}); }, 500);
  return () => clearInterval(timer);
}

/** Posts `count` messages to `room`, `BATCH` at a time; returns their ids in order. */
async function postAll(backend, room, count, text) {
  const ids = [];
  while (ids.length < count) {
    const size = Math.min(BATCH, count - ids.length);
    const batch = Array.from({ length: size }, (_, i) => postMessage(backend.url, room, `${ids.length + i} ${text}`));
    for (const res of await Promise.all(batch)) {
      assert.equal(res.status, 201, res.text);
      ids.push(res.json.id);
    }
  }
  return ids.sort(compareIds);
}

/** A socket.io 2 client in `room` over `transport`, reading. */
async function v2Reader(frontend, room, transport, clients) {
  const client = new V2Client(frontend.url, { transports: [transport], name: `reader ${transport}` });
  clients.push(client);
  await client.connect();
  assert.deepEqual(await client.join(room), { ok: true });
  return client;
}

/** A socket.io 2 client that resumes `room` after `since` has exactly `missed`, once, in order. */
async function resumesWithoutAGap(frontend, room, since, missed, clients) {
  const resumed = new V2Client(frontend.url, { transports: ['polling'], name: 'resumed poller' });
  clients.push(resumed);
  await resumed.connect();
  assert.deepEqual(await resumed.join({ room, since }), { ok: true, replayed: missed.length });
  await waitFor('the resumed client to have the last message', () => resumed.messages.length >= missed.length, { timeoutMs: 60_000 });
  assert.deepEqual(resumed.messages.map((m) => m.id), missed, 'the resumed client: every missed message once, in order');
}

describe('a socket.io 2 client on long-polling that stops polling', () => {
  let topo;
  const clients = [];
  const stoppers = [];

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1 });
  });

  after(async () => {
    for (const stop of stoppers) stop();
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('is let go by the bound in bytes while its gap fits in the history, others keep receiving, and it resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'v2-slow-poller';
    const readers = [await v2Reader(frontend, room, 'websocket', clients), await v2Reader(frontend, room, 'polling', clients)];

    const stalled = new RawPollingV3(frontend.url);
    await stalled.open();
    const first = await stalled.joinAndRead(room, backend);
    // It polls no more, but pings: only the bounds on its queue can let it go.
    stoppers.push(keepPinging(stalled));

    const posted = [first];
    const droppedBefore = (await metrics(frontend.metricsUrl))[DROPPED];
    let dropped = droppedBefore;
    while (dropped === droppedBefore && posted.length < MOST_POSTS) {
      posted.push(...await postAll(backend, room, BATCH, TEXT));
      dropped = (await metrics(frontend.metricsUrl))[DROPPED];
    }
    posted.sort(compareIds);
    t.diagnostic(`let go after ${posted.length} messages; ${DROPPED} ${droppedBefore} -> ${dropped}`);
    assert.ok(dropped > droppedBefore, `the stalled client was let go before ${MOST_POSTS} messages`);
    // Messages of 3.9 KB: the bound in bytes (frontend.max_queued_bytes, 256
    // KiB) acts long before the bound in packets could.
    assert.ok(posted.length < LIVE_BACKLOG, `let go by the bound in bytes, after ${posted.length} messages`);
    const missed = posted.slice(1);
    assert.ok(missed.length <= 1000, `its gap (${missed.length}) fits in the room's history of 1000`);
    const gone = await stalled.poll();
    assert.equal(gone.status, 400, `its session is closed: ${JSON.stringify(gone)}`);

    for (const r of readers) {
      await r.waitForMessage('the last message', (m) => m.id === posted.at(-1), 60_000);
      assert.deepEqual(r.messages.map((m) => m.id), posted, `${r.name}: every message once, in order`);
      assert.deepEqual(r.disconnects, [], `${r.name} stayed`);
    }
    await resumesWithoutAGap(frontend, room, first, missed, clients);
  }));
});

describe('a socket.io 2 client on long-polling that stops polling but pings', () => {
  let topo;
  const clients = [];
  const stoppers = [];

  before(async () => {
    // Only the time bound may act: no bound in bytes within the test.
    topo = await startTopology({
      frontends: 1,
      backends: 1,
      frontendConfig: `backlog_timeout_ms = ${BACKLOG_TIMEOUT_MS}\nmax_queued_bytes = 1073741824\n`,
    });
  });

  after(async () => {
    for (const stop of stoppers) stop();
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('is let go within backlog_timeout, a reader stays, and it resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'v2-ping-no-poll';
    const listener = await v2Reader(frontend, room, 'polling', clients);

    const stalled = new RawPollingV3(frontend.url);
    await stalled.open();
    const first = await stalled.joinAndRead(room, backend);

    // Three messages wait for it; it pings and is answered, but never
    // polls. Timed from their posting, the wait is never longer than the
    // frontend's.
    const waiting = Date.now();
    const missed = await postAll(backend, room, 3, 'waiting');
    const status = await waitFor('its session to be let go (a ping refused)',
      async () => { const s = await stalled.post('2'); return s !== 200 && s; },
      { timeoutMs: BACKLOG_TIMEOUT_MS + LET_GO_MARGIN_MS, intervalMs: 500 });
    const waited = Date.now() - waiting;
    t.diagnostic(`let go ${waited} ms after the messages were first posted (backlog_timeout_ms = ${BACKLOG_TIMEOUT_MS})`);
    assert.equal(status, 400, 'its session is closed');
    assert.ok(waited >= BACKLOG_TIMEOUT_MS, `not before backlog_timeout_ms: ${waited} ms`);

    const posted = [first, ...missed];
    await listener.waitForMessage('the last message', (m) => m.id === posted.at(-1), 30_000);
    assert.deepEqual(listener.messages.map((m) => m.id), posted, 'the reader: every message once, in order');
    assert.deepEqual(listener.disconnects, []);
    await resumesWithoutAGap(frontend, room, first, missed, clients);
  }));
});

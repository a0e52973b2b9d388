// A socket that stops reading: the frontend does not queue for it without
// bound, does not hold up the other sockets of its room, and lets it go
// while what it has not received still fits in the room's history, so that
// once it reconnects and resumes with `since` it misses nothing.
//
// Three bounds let it go: the live messages waiting for it (the room's
// history, less a margin), the bytes waiting for it
// (`frontend.max_queued_bytes`), and the time its queue goes without ever
// being empty (`frontend.backlog_timeout_ms`), which also lets go of a client
// that stops reading but keeps its session alive by answering pings.
// A socket resuming a gap longer than the first bound is sent it as it
// reads, and is not let go for what it was just sent.

import fs from 'node:fs';
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import {
  Client, compareIds, logged, memoryOf, metrics, postMessage, rawSocketIo, request, waitFor,
} from './lib/helpers.mjs';

// Large messages fill the kernel's socket buffers in few messages, so the
// frontend's own queue is what fills next.
const TEXT = 'x'.repeat(3900);
// Three bytes each in UTF-8: a message of 11.7 KB, the most a post may carry
// (4,000 characters, 16 KiB), so the kernel's buffers hold fewer of them.
const WIDE_TEXT = '€'.repeat(3900);
const BATCH = 50;
// Without a bound on the queue the stalled socket would never be let go;
// with it, the frontend lets it go after its queue (744 live messages with
// the default history of 1000) and the kernel's buffers (a few hundred
// messages of this size) are full.
const MOST_POSTS = 4000;
// The live messages that may wait for a socket, with the default history:
// the bound in packets cannot let a socket go before this many wait in the
// frontend, besides what the kernel holds.
const LIVE_BACKLOG = 744;
const DROPPED = 'chat_frontend_messages_dropped_total';
const REPLAYED = 'chat_frontend_messages_replayed_total';
const SOCKETS = 'chat_frontend_sockets';
// A short frontend.backlog_timeout_ms, and the margin allowed beyond it for
// the let-go to be seen (metrics and pongs are looked at every 100-500 ms).
const BACKLOG_TIMEOUT_MS = 2000;
const LET_GO_MARGIN_MS = 15_000;

/** The ids of the `message` events among raw Socket.IO frames. */
function messageIds(frames) {
  return frames.filter((f) => f.startsWith('42["message"')).map((f) => JSON.parse(f.slice(2))[1].id);
}

/** Posts `count` messages of `text` to `room`, `BATCH` at a time; returns their ids in order. */
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

/** Posts to `room` in batches until the frontend counts a drop; returns the ids posted, in order. */
async function postUntilDropped(t, frontend, backend, room, posted, text = TEXT) {
  const before = (await metrics(frontend.metricsUrl))[DROPPED];
  let dropped = before;
  while (dropped === before && posted.length < MOST_POSTS) {
    posted.push(...await postAll(backend, room, BATCH, text));
    dropped = (await metrics(frontend.metricsUrl))[DROPPED];
  }
  posted.sort(compareIds);
  t.diagnostic(`let go after ${posted.length} messages; ${DROPPED} ${before} -> ${dropped}`);
  assert.ok(dropped > before, `the stalled socket was let go before ${MOST_POSTS} messages`);
  return posted;
}

/** A raw Socket.IO websocket client in `room` that has received one message, `first`, and then stops reading. */
async function stalledWebSocket(frontend, backend, room, clients) {
  const stalled = await rawSocketIo(Number(new URL(frontend.url).port));
  clients.push(stalled);
  stalled.send(`420${JSON.stringify(['room', room])}`);
  await stalled.until('the join ack', () => stalled.messages.includes('430[{"ok":true}]'));
  const first = await postMessage(backend.url, room, 'before the stall');
  assert.equal(first.status, 201);
  await stalled.until('the first message', () => messageIds(stalled.messages).length === 1);
  stalled.socket.pause();
  return { stalled, first: first.json.id };
}

/** A reading socket.io-client in `room`. */
async function reader(frontend, room, clients) {
  const client = new Client(frontend.url, { transports: ['websocket'], name: 'reader' });
  clients.push(client);
  await client.connect();
  assert.deepEqual(await client.join(room), { ok: true });
  return client;
}

/** Sends an Engine.IO pong every 500 ms, as a client that keeps its session alive without reading; returns the stopper. */
function keepPonging(send) {
  const timer = setInterval(send, 500);
  return () => clearInterval(timer);
}

/**
 * The stalled websocket client reads again: it gets what was on its way, in
 * order, then sees its connection closed; reconnected and resumed from the
 * last message it got, it has every message of `posted`, once, in order.
 * `refused`: a send to it was refused, so it missed at least that message
 * (let go by the time bound, it may have been sent everything).
 */
async function readsAgainAndResumes(t, frontend, room, stalled, posted, clients, { refused = true } = {}) {
  stalled.socket.resume();
  await stalled.until('the connection to close', () => stalled.ended, 30_000);
  const got = messageIds(stalled.messages);
  assert.deepEqual(got, posted.slice(0, got.length), 'what it got is the start of the room, in order');
  const missed = posted.slice(got.length);
  t.diagnostic(`the stalled client got ${got.length} before it was let go; ${missed.length} to resume`);
  if (refused) assert.ok(missed.length > 0, 'it was let go with messages it had not received');
  assert.ok(missed.length <= 1000, `its gap (${missed.length}) fits in the room's history of 1000`);

  const resumed = new Client(frontend.url, { transports: ['websocket'], name: 'resumed' });
  clients.push(resumed);
  await resumed.connect();
  assert.deepEqual(await resumed.join({ room, since: got.at(-1) }), { ok: true, replayed: missed.length });
  await waitFor('the resumed client to have the last message', () => resumed.messages.length >= missed.length, { timeoutMs: 30_000 });
  assert.deepEqual(resumed.messages.map((m) => m.id), missed, 'the resumed client: every missed message once, in order');
}

/** An Engine.IO long-polling session spoken by hand: nothing polls unless asked. */
class RawPolling {
  constructor(base) {
    this.base = `${base}/front/socket.io/?EIO=4&transport=polling`;
  }

  async open() {
    const res = await request(this.base);
    assert.equal(res.status, 200, res.text);
    this.sid = JSON.parse(res.text.slice(1)).sid;
    this.url = `${this.base}&sid=${encodeURIComponent(this.sid)}`;
    await this.send('40');
    assert.match((await this.poll()).join(), /^40\{/);
  }

  async send(packet) {
    const res = await request(this.url, { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body: packet });
    assert.equal(res.status, 200, res.text);
  }

  /** Sends an unasked pong, as a client that keeps its session alive; resolves to the answer's status. */
  async pong() {
    const res = await request(this.url, { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body: '3' });
    return res.status;
  }

  /**
   * One poll: the packets the server had waiting (or sent within its wait),
   * its pings answered and left out; an error answer as {status, text}.
   */
  async poll() {
    const res = await request(this.url, { timeoutMs: 40_000 });
    if (res.status !== 200) return { status: res.status, text: res.text };
    const packets = res.text.split('\x1e');
    if (packets.includes('2')) await this.send('3');
    const rest = packets.filter((p) => p !== '2');
    return rest.length ? rest : this.poll();
  }
}

const MB = 1024 * 1024;

describe('a socket that stops reading', () => {
  let topo;
  const clients = [];

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1 });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('is let go before its gap outgrows the history, others keep receiving, and it resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'slow-reader';

    const listener = await reader(frontend, room, clients);
    const { stalled, first } = await stalledWebSocket(frontend, backend, room, clients);

    const posted = await postUntilDropped(t, frontend, backend, room, [first]);

    // The reading client of the same room got every message, in order, and stayed.
    await listener.waitForMessage('the last message', (m) => m.id === posted.at(-1), 30_000);
    assert.deepEqual(listener.messages.map((m) => m.id), posted, 'the reader: every message once, in order');
    assert.deepEqual(listener.disconnects, []);

    await readsAgainAndResumes(t, frontend, room, stalled, posted, clients);
  }));

  it('over long-polling, is let go while its gap fits in the history, and resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'slow-poller';

    const stalled = new RawPolling(frontend.url);
    await stalled.open();
    await stalled.send(`420${JSON.stringify(['room', room])}`);
    assert.deepEqual(await stalled.poll(), ['430[{"ok":true}]']);
    const first = await postMessage(backend.url, room, 'before the stall');
    assert.equal(first.status, 201);
    assert.deepEqual(messageIds(await stalled.poll()), [first.json.id]);

    // It polls no more: every message waits in its queue.
    const posted = await postUntilDropped(t, frontend, backend, room, [first.json.id]);
    const missed = posted.slice(1);
    assert.ok(missed.length <= 1000, `its gap (${missed.length}) fits in the room's history of 1000`);
    const gone = await stalled.poll();
    assert.equal(gone.status, 400, `its session is closed: ${JSON.stringify(gone)}`);

    // Reconnected and resumed, it has everything, once, in order.
    const resumed = new Client(frontend.url, { transports: ['polling'], name: 'resumed poller' });
    clients.push(resumed);
    await resumed.connect();
    assert.deepEqual(await resumed.join({ room, since: first.json.id }), { ok: true, replayed: missed.length });
    await waitFor('the resumed client to have the last message', () => resumed.messages.length >= missed.length, { timeoutMs: 60_000 });
    assert.deepEqual(resumed.messages.map((m) => m.id), missed, 'the resumed client: every missed message once, in order');
  }));
});

describe('a resuming socket that reads slowly', () => {
  let topo;

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1 });
  });

  after(async () => {
    await topo?.stop();
  });

  // Small messages missed: what the history sends it is bounded in packets
  // before the bound in bytes could act (950 of them weigh some 70 KB).
  it('over long-polling, is sent what it missed as it reads, more than the live bound, and is not let go for it', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'slow-resume';
    const first = await postMessage(backend.url, room, 'seen');
    assert.equal(first.status, 201);
    // More than the live messages that may wait for a socket: sent to it
    // all at once, they would have it let go by the next live message.
    const missed = await postAll(backend, room, 950, '');
    const before = await metrics(frontend.metricsUrl);

    const poller = new RawPolling(frontend.url);
    await poller.open();
    await poller.send(`420${JSON.stringify(['room', { room, since: first.json.id }])}`);
    // It reads nothing yet; what it missed is being sent.
    await waitFor('the replay to begin', async () => (await metrics(frontend.metricsUrl))[REPLAYED] - before[REPLAYED] >= 300,
      { intervalMs: 20 });
    // Live messages meanwhile, until the frontend has them from Redis:
    // large ones, more together (350 KB) than its queue may hold (256 KiB),
    // so that they too must be sent as it reads.
    const live = await postAll(backend, room, 30, WIDE_TEXT);
    await waitFor('the frontend to receive the live messages', async () =>
      (await metrics(frontend.metricsUrl)).chat_frontend_messages_received_total - before.chat_frontend_messages_received_total >= live.length,
    { intervalMs: 20 });

    // Now it polls, one poll at a time: everything once, in order, then
    // the answer, with its session open throughout.
    const got = [];
    let answer;
    while (answer === undefined || got.length < missed.length + live.length) {
      const packets = await poller.poll();
      assert.ok(Array.isArray(packets), `its session stays open, after ${got.length} messages: ${JSON.stringify(packets)}`);
      got.push(...messageIds(packets));
      const ack = packets.find((p) => p.startsWith('430'));
      if (ack) answer = JSON.parse(ack.slice(3))[0];
    }
    t.diagnostic(`${got.length} messages in order; answer ${JSON.stringify(answer)}`);
    assert.deepEqual(got, [...missed, ...live], 'what it missed, then the live messages, once, in order');
    assert.deepEqual(answer, { ok: true, replayed: missed.length + live.length });
    const after = await metrics(frontend.metricsUrl);
    assert.equal(after[DROPPED] - before[DROPPED], 0, 'no send to it refused');
  }));
});

describe('a socket whose queue would hold more than max_queued_bytes', () => {
  let topo;
  const clients = [];

  before(async () => {
    // Only the bound in bytes may act: no time bound within the test.
    topo = await startTopology({
      frontends: 1,
      backends: 1,
      frontendConfig: 'max_queued_bytes = 65536\nbacklog_timeout_ms = 600000\n',
    });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('is let go once about that many bytes wait, before the bound in packets could act, and resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'slow-reader-bytes';

    const listener = await reader(frontend, room, clients);
    const { stalled, first } = await stalledWebSocket(frontend, backend, room, clients);

    const posted = await postUntilDropped(t, frontend, backend, room, [first], WIDE_TEXT);
    // Let go once the kernel's buffers (the frontend's 256 KiB send buffer,
    // and the client's receive buffer, a few MB over loopback) and 64 KiB are
    // full, where the bound in packets alone waits for 744 messages in the
    // frontend on top of the kernel's.
    assert.ok(posted.length < LIVE_BACKLOG,
      `let go after ${posted.length} messages, before the ${LIVE_BACKLOG} the bound in packets needs`);

    await listener.waitForMessage('the last message', (m) => m.id === posted.at(-1), 30_000);
    assert.deepEqual(listener.messages.map((m) => m.id), posted, 'the reader: every message once, in order');
    assert.deepEqual(listener.disconnects, []);

    await readsAgainAndResumes(t, frontend, room, stalled, posted, clients);
  }));
});

describe('a socket that stops reading but answers pings', () => {
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

  it('over a websocket, is let go within backlog_timeout with nothing more posted; a reader at full speed stays', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'pong-no-read';

    const listener = await reader(frontend, room, clients);
    const { stalled, first } = await stalledWebSocket(frontend, backend, room, clients);
    stoppers.push(keepPonging(() => stalled.send('3')));
    const dropped = (await metrics(frontend.metricsUrl))[DROPPED];

    // 7 MB: more than the kernel's buffers hold, fewer messages than the
    // bound in packets needs (744 live messages), far from the bound in bytes.
    const posted = [first, ...await postAll(backend, room, 600, WIDE_TEXT)];
    const lastPosted = Date.now();
    await waitFor('the stalled socket to be let go (only the reader left)',
      async () => (await metrics(frontend.metricsUrl))[SOCKETS] === 1,
      { timeoutMs: BACKLOG_TIMEOUT_MS + LET_GO_MARGIN_MS, intervalMs: 100 });
    t.diagnostic(`let go ${Date.now() - lastPosted} ms after the last post (backlog_timeout_ms = ${BACKLOG_TIMEOUT_MS})`);
    assert.equal((await metrics(frontend.metricsUrl))[DROPPED], dropped, 'no send was refused: the time bound let it go');

    // The reader took 600 messages of 11.7 KB as fast as they came, and stayed.
    await listener.waitForMessage('the last message', (m) => m.id === posted.at(-1), 30_000);
    assert.deepEqual(listener.messages.map((m) => m.id), posted, 'the reader: every message once, in order');
    assert.deepEqual(listener.disconnects, []);

    await readsAgainAndResumes(t, frontend, room, stalled, posted, clients, { refused: false });
  }));

  it('over long-polling, is let go within backlog_timeout while it polls no more, and resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'pong-no-poll';

    const stalled = new RawPolling(frontend.url);
    await stalled.open();
    await stalled.send(`420${JSON.stringify(['room', room])}`);
    assert.deepEqual(await stalled.poll(), ['430[{"ok":true}]']);
    const first = await postMessage(backend.url, room, 'before the stall');
    assert.equal(first.status, 201);
    assert.deepEqual(messageIds(await stalled.poll()), [first.json.id]);

    // It polls no more but keeps its session alive; three messages wait for
    // it. Its queue cannot have started waiting before they were posted:
    // timed from then, the wait is never longer than the frontend's.
    const waiting = Date.now();
    const missed = await postAll(backend, room, 3, 'waiting');
    const status = await waitFor('its session to be let go (a pong refused)',
      async () => { const s = await stalled.pong(); return s !== 200 && s; },
      { timeoutMs: BACKLOG_TIMEOUT_MS + LET_GO_MARGIN_MS, intervalMs: 500 });
    const waited = Date.now() - waiting;
    t.diagnostic(`let go ${waited} ms after the messages were first posted (backlog_timeout_ms = ${BACKLOG_TIMEOUT_MS})`);
    assert.equal(status, 400, 'its session is closed');
    assert.ok(waited >= BACKLOG_TIMEOUT_MS, `not before backlog_timeout_ms: ${waited} ms`);

    const resumed = new Client(frontend.url, { transports: ['polling'], name: 'resumed poller' });
    clients.push(resumed);
    await resumed.connect();
    assert.deepEqual(await resumed.join({ room, since: first.json.id }), { ok: true, replayed: missed.length });
    await waitFor('the resumed client to have the last message', () => resumed.messages.length >= missed.length, { timeoutMs: 30_000 });
    assert.deepEqual(resumed.messages.map((m) => m.id), missed, 'the resumed client: every missed message once, in order');
  }));
});

describe('200 sockets that resume a full room and stop reading', () => {
  let topo;
  const clients = [];
  const stoppers = [];

  before(async () => {
    // The default bounds: 256 KiB and 5 s.
    topo = await startTopology({ frontends: 1, backends: 1 });
  });

  after(async () => {
    for (const stop of stoppers) stop();
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('cost the frontend less than 100 MB', { timeout: 300_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const port = Number(new URL(frontend.url).port);
    const room = 'full-room';
    const SOCKET_COUNT = 200;

    // A full room, 1,000 messages, each of which a socket resuming with
    // `since: "0-0"` asks for. Messages of 3,000 three-byte characters
    // (9 KB): over loopback the kernel takes a few MB of what is sent to a
    // client that does not read (its receive buffer, and the frontend's send
    // buffer), as much as 1,000 messages of 3 KB, which would then never
    // wait in the frontend at all.
    await postAll(backend, room, 1000, '€'.repeat(3000));
    const start = memoryOf(frontend.pid);
    // Resets VmHWM to the current VmRSS: the peak from here on is this test's.
    fs.writeFileSync(`/proc/${frontend.pid}/clear_refs`, '5');
    const before = await metrics(frontend.metricsUrl);

    // Each from an address of its own (where the helper can), as many
    // clients would be; each asks for the whole room, reads nothing more,
    // and keeps its session alive.
    for (let i = 0; i < SOCKET_COUNT; i += 10) {
      await Promise.all(Array.from({ length: 10 }, async (_, j) => {
        const ws = await rawSocketIo(port, { localAddress: `127.0.0.${2 + i + j}` });
        clients.push(ws);
        ws.send(`420${JSON.stringify(['room', { room, since: '0-0' }])}`);
        ws.socket.pause();
        stoppers.push(keepPonging(() => ws.send('3')));
      }));
    }

    // Each is let go once its queue is full, or has not emptied for
    // backlog_timeout_ms: the frontend held the most for them before.
    const started = Date.now();
    await waitFor('every socket to be let go', async () => (await metrics(frontend.metricsUrl))[SOCKETS] === 0,
      { timeoutMs: 180_000, intervalMs: 200 });
    const end = memoryOf(frontend.pid);
    const after = await metrics(frontend.metricsUrl);
    const growth = end.peak - start.rss;
    t.diagnostic(`${SOCKET_COUNT} sockets let go within ${Date.now() - started} ms; frontend VmRSS ` +
      `${(start.rss / MB).toFixed(1)} MB before, peak ${(end.peak / MB).toFixed(1)} MB (+${(growth / MB).toFixed(1)} MB), ` +
      `${(end.rss / MB).toFixed(1)} MB after; joins refused ${after.chat_frontend_joins_refused_total - before.chat_frontend_joins_refused_total}, ` +
      `sends refused ${after[DROPPED] - before[DROPPED]}`);
    assert.ok(growth < 100 * MB, `${SOCKET_COUNT} sockets cost the frontend ${(growth / MB).toFixed(1)} MB at their peak`);
  }));
});

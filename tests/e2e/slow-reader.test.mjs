// A socket that stops reading: the frontend does not queue for it without
// bound, does not hold up the other sockets of its room, and lets it go
// while what it has not received still fits in the room's history, so that
// once it reconnects and resumes with `since` it misses nothing.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { Client, compareIds, logged, metrics, postMessage, rawSocketIo, request, waitFor } from './lib/helpers.mjs';

// Large messages fill the kernel's socket buffers in few messages, so the
// frontend's own queue is what fills next.
const TEXT = 'x'.repeat(3900);
const BATCH = 50;
// Without a bound on the queue the stalled socket would never be let go;
// with it, the frontend lets it go after its queue (744 live messages with
// the default history of 1000) and the kernel's buffers (a few hundred
// messages of this size) are full.
const MOST_POSTS = 4000;
const DROPPED = 'chat_frontend_messages_dropped_total';

/** The ids of the `message` events among raw Socket.IO frames. */
function messageIds(frames) {
  return frames.filter((f) => f.startsWith('42["message"')).map((f) => JSON.parse(f.slice(2))[1].id);
}

/** Posts to `room` in batches until the frontend counts a drop; returns the ids posted, in order. */
async function postUntilDropped(t, frontend, backend, room, posted) {
  const before = (await metrics(frontend.metricsUrl))[DROPPED];
  let dropped = before;
  while (dropped === before && posted.length < MOST_POSTS) {
    const batch = Array.from({ length: BATCH }, (_, i) => postMessage(backend.url, room, `${posted.length + i} ${TEXT}`));
    for (const res of await Promise.all(batch)) {
      assert.equal(res.status, 201, res.text);
      posted.push(res.json.id);
    }
    dropped = (await metrics(frontend.metricsUrl))[DROPPED];
  }
  posted.sort(compareIds);
  t.diagnostic(`let go after ${posted.length} messages; ${DROPPED} ${before} -> ${dropped}`);
  assert.ok(dropped > before, `the stalled socket was let go before ${MOST_POSTS} messages`);
  return posted;
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
    const port = Number(new URL(frontend.url).port);

    const reader = new Client(frontend.url, { transports: ['websocket'], name: 'reader' });
    clients.push(reader);
    await reader.connect();
    assert.deepEqual(await reader.join(room), { ok: true });

    const stalled = await rawSocketIo(port);
    clients.push(stalled);
    stalled.send(`420${JSON.stringify(['room', room])}`);
    await stalled.until('the join ack', () => stalled.messages.includes('430[{"ok":true}]'));
    const first = await postMessage(backend.url, room, 'before the stall');
    assert.equal(first.status, 201);
    await stalled.until('the first message', () => messageIds(stalled.messages).length === 1);
    stalled.socket.pause();

    const posted = await postUntilDropped(t, frontend, backend, room, [first.json.id]);

    // The reading client of the same room got every message, in order, and stayed.
    await reader.waitForMessage('the last message', (m) => m.id === posted.at(-1), 30_000);
    assert.deepEqual(reader.messages.map((m) => m.id), posted, 'the reader: every message once, in order');
    assert.deepEqual(reader.disconnects, []);

    // The stalled client, reading again, gets what was on its way, in
    // order, then sees its connection closed.
    stalled.socket.resume();
    await stalled.until('the connection to close', () => stalled.ended, 30_000);
    const got = messageIds(stalled.messages);
    assert.deepEqual(got, posted.slice(0, got.length), 'what it got is the start of the room, in order');
    const missed = posted.slice(got.length);
    t.diagnostic(`the stalled client got ${got.length} before it was let go; ${missed.length} to resume`);
    assert.ok(missed.length > 0, 'it was let go with messages it had not received');
    assert.ok(missed.length <= 1000, `its gap (${missed.length}) fits in the room's history of 1000`);

    // Reconnected and resumed, it has everything, once, in order.
    const resumed = new Client(frontend.url, { transports: ['websocket'], name: 'resumed' });
    clients.push(resumed);
    await resumed.connect();
    assert.deepEqual(await resumed.join({ room, since: got.at(-1) }), { ok: true, replayed: missed.length });
    await waitFor('the resumed client to have the last message', () => resumed.messages.length >= missed.length, { timeoutMs: 30_000 });
    assert.deepEqual(resumed.messages.map((m) => m.id), missed, 'the resumed client: every missed message once, in order');
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

// Resuming a room after a disconnection: a client that joins again with
// `since` = the id of the last message it received gets every message it
// missed, in order, then the live ones, none twice, whichever frontend it
// reconnects to and over either transport; also at the seam, with messages
// posted all the time while clients come and go. A `since` in the future
// replays nothing; an invalid one is refused.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import {
  Client, DOMAIN_1, Poster, ResumingClient, deliveryCounts, logged, metrics, postMessage, randomFrom, sleep, testSeed, waitFor,
} from './lib/helpers.mjs';

const SINCE_ERROR = 'since must be a message id such as "1700000000000-0"';

describe('resuming a room with since', () => {
  let topo;
  const clients = [];

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 2 });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  /** A Client connected straight to frontend `index`. */
  const connectTo = async (index, transport, name) => {
    const c = new Client(topo.frontends[index].url, { transports: [transport], name: `${name} on frontend ${index}` });
    clients.push(c);
    return c.connect();
  };

  /** Posts `texts` to `room` through HAProxy; returns the stored messages. */
  const post = async (room, texts) => {
    const stored = [];
    for (const text of texts) {
      const res = await postMessage(topo.url, room, text, { host: DOMAIN_1 });
      assert.equal(res.status, 201, `POST ${text}: ${res.status} ${res.text}`);
      stored.push(res.json);
    }
    return stored;
  };

  const ids = (messages) => messages.map((m) => m.id);

  for (const transport of ['websocket', 'polling']) {
    for (const [where, from, to] of [['the same frontend', 0, 0], ['the other frontend', 0, 1]]) {
      it(`gives a client back exactly what it missed, then live messages (${transport}, back on ${where})`, logged(() => topo, async () => {
        const room = `resume-${transport}-${from}${to}`;
        const first = await connectTo(from, transport, 'first connection');
        assert.deepEqual(await first.join(room), { ok: true });
        const seen = await post(room, ['one', 'two', 'three']);
        await first.waitForMessage('three', (m) => m.id === seen.at(-1).id);
        assert.deepEqual(ids(first.messages), ids(seen));
        const lastSeen = first.messages.at(-1).id;
        first.close();

        const missed = await post(room, ['away 1', 'away 2', 'away 3', 'away 4', 'away 5']);

        const second = await connectTo(to, transport, 'resumed connection');
        assert.deepEqual(await second.join({ room, since: lastSeen }), { ok: true, replayed: missed.length });
        // The replay is sent before the acknowledgement.
        assert.deepEqual(second.messages, missed, 'exactly the missed messages, in order');

        const live = await post(room, ['live 1', 'live 2']);
        await second.waitForMessage('live 2', (m) => m.id === live.at(-1).id);
        assert.deepEqual(second.messages, [...missed, ...live], 'then the live ones, none twice');
        assert.equal(second.transport, transport);
        assert.deepEqual(second.disconnects, []);
      }));
    }
  }

  it('keeps the seam exact under load: 20 clients coming and going on random frontends while messages stream in', { timeout: 120_000 }, logged(() => topo, async (t) => {
    const room = 'resume-seam';
    const CLIENTS = 20;
    // The stream runs at least this long, and on until it has done what the
    // test is about: this many messages, and every client gone and back
    // this many times (a slow machine takes longer, it does not fail).
    const STREAM_MS = 8000;
    const ENOUGH_POSTS = 100;
    const ENOUGH_SOCKETS_EACH = 5;
    // Which frontend, which transport, how long a client stays and is away:
    // drawn, client by client, from one seed, printed, and taken from
    // CHAT_HA_TEST_SEED when set, to replay the choices of a failed run
    // (the timings of the machine itself are not replayed).
    const seed = testSeed();
    t.diagnostic(`seed ${seed} (CHAT_HA_TEST_SEED=${seed} draws the same choices again)`);
    const url = (random) => topo.frontends[Math.floor(random() * topo.frontends.length)].url;
    const transport = (random) => [random() < 0.5 ? 'websocket' : 'polling'];

    const resuming = Array.from({ length: CLIENTS }, (_, i) => new ResumingClient({ room, name: `client ${i}` }));
    clients.push(...resuming);
    resuming.forEach((c, i) => {
      c.random = randomFrom(seed + i);
      c.open(url(c.random), { transports: transport(c.random) });
    });
    await Promise.all(resuming.map((c) => c.waitJoined(1)));
    const replayedBefore = (await Promise.all(topo.frontends.map((f) => metrics(f.metricsUrl))))
      .reduce((n, m) => n + m.chat_frontend_messages_replayed_total, 0);

    // A first message, so that every client has an id to resume from.
    const poster = new Poster(topo.url, room, { host: DOMAIN_1, intervalMs: 5, label: 'seam' });
    assert.equal((await poster.post('start')).status, 201);
    await Promise.all(resuming.map((c) => c.waitForId(poster.acked[0].id)));
    poster.start();
    // Each client: connected for a while, gone for a while, back on a random
    // frontend and transport, resuming from the last message it received.
    // Some leave before their join is even answered.
    let stop = false;
    const churn = resuming.map(async (c) => {
      let joinsAtOpen = 0;
      while (!stop) {
        if (c.random() < 0.8) {
          await c.waitJoined(joinsAtOpen + 1);
          await sleep(50 + c.random() * 400);
        } else {
          await sleep(c.random() * 30);
        }
        c.drop();
        await sleep(c.random() * 200);
        joinsAtOpen = c.joined;
        c.open(url(c.random), { transports: transport(c.random) });
      }
    });
    const enough = async () => {
      await sleep(STREAM_MS);
      await waitFor(() => `${ENOUGH_POSTS} posts acknowledged and every client back ${ENOUGH_SOCKETS_EACH} times ` +
        `(${poster.acked.length} acknowledged; fewest connections ${Math.min(...resuming.map((c) => c.sockets))}; seed ${seed})`,
      () => poster.acked.length >= ENOUGH_POSTS && resuming.every((c) => c.sockets >= ENOUGH_SOCKETS_EACH),
      { timeoutMs: 60_000, intervalMs: 100 });
    };
    try {
      await Promise.race([enough(), ...churn]);
    } finally {
      stop = true;
      await Promise.allSettled(churn);
      await poster.stop();
    }
    await Promise.all(churn);
    await Promise.all(resuming.map((c) => waitFor(() => `${c.name} to be connected and joined (last answer ${JSON.stringify(c.answers.at(-1))}; seed ${seed})`,
      () => c.connected && c.answers.at(-1)?.ok, { timeoutMs: 15_000 })));
    // A last message: once a client has it, it has everything before it.
    const fence = await poster.post('fence');
    assert.equal(fence.status, 201, `the fence message: ${JSON.stringify(poster.failed)}`);
    await Promise.all(resuming.map((c) => c.waitForId(poster.acked.at(-1).id)));

    const report = deliveryCounts('resume seam', poster, resuming);
    const sockets = resuming.reduce((n, c) => n + c.sockets, 0);
    const replayed = (await Promise.all(topo.frontends.map((f) => metrics(f.metricsUrl))))
      .reduce((n, m) => n + m.chat_frontend_messages_replayed_total, 0) - replayedBefore;
    const line = `${report.line}; ${sockets} connections, ${replayed} messages replayed (seed ${seed})`;
    t.diagnostic(line);

    assert.equal(report.failedRequests, 0, `failed requests: ${JSON.stringify(poster.failed.slice(0, 5))}`);
    assert.ok(replayed > 0, 'messages were replayed from Redis');
    for (const c of report.perClient) {
      assert.deepEqual(c.received, report.ackedIds, `${c.name}: every acknowledged message once, in order (lost ${c.lost.length}: ${c.lost.slice(0, 5)})`);
      assert.equal(c.duplicated, 0, `${c.name}: nothing twice`);
      assert.equal(c.outOfOrder, 0, `${c.name}: nothing out of order`);
    }
    assert.equal(report.lost + report.duplicated + report.outOfOrder, 0);
    for (const c of resuming) {
      for (const a of c.answers) assert.ok(a.ok || /history is unavailable/.test(a.error), `${c.name}: join answers ${JSON.stringify(a)}`);
    }
  }));

  it('replays nothing for a since newer than every message, then delivers live messages', logged(() => topo, async () => {
    const room = 'resume-future';
    const [old] = await post(room, ['before']);
    const future = `${Date.now() + 3_600_000}-0`;
    for (const [index, transport] of [[0, 'websocket'], [1, 'polling']]) {
      const c = await connectTo(index, transport, 'future since');
      assert.deepEqual(await c.join({ room, since: future }), { ok: true, replayed: 0 });
      assert.deepEqual(c.messages, []);
      const live = await post(room, [`live via frontend ${index}`]);
      await c.waitForMessage('the live message', (m) => m.id === live[0].id);
      assert.deepEqual(c.messages, live);
      assert.notEqual(c.messages[0].id, old.id);
    }
  }));

  it('replays the whole history for since 0-0', logged(() => topo, async () => {
    const room = 'resume-zero';
    const stored = await post(room, ['a', 'b', 'c']);
    const c = await connectTo(1, 'websocket', 'since 0-0');
    assert.deepEqual(await c.join({ room, since: '0-0' }), { ok: true, replayed: 3 });
    assert.deepEqual(c.messages, stored);
  }));

  // A client away for a few seconds from a busy room misses hundreds of
  // messages. The frontend queues the whole replay on the socket at once, so
  // the socket's send queue must hold a room's whole history.
  for (const transport of ['websocket', 'polling']) {
    it(`replays a backlog of 300 missed messages (${transport})`, logged(() => topo, async () => {
      const room = `resume-backlog-${transport}`;
      const stored = [];
      for (let i = 0; i < 300; i++) {
        const res = await postMessage(topo.backends[i % 2].url, room, `backlog ${i}`);
        assert.equal(res.status, 201, res.text);
        stored.push(res.json);
      }
      const c = await connectTo(1, transport, 'resuming after a long absence');
      assert.deepEqual(await c.join({ room, since: stored[0].id }), { ok: true, replayed: 299 });
      await c.waitForMessage('the last missed message', (m) => m.id === stored.at(-1).id);
      assert.deepEqual(c.messages, stored.slice(1));
      assert.deepEqual(c.disconnects, []);
    }));
  }

  it('refuses an invalid since with ok:false and the reason, and does not join', logged(() => topo, async () => {
    const room = 'resume-invalid';
    for (const [index, transport] of [[0, 'websocket'], [1, 'polling']]) {
      const c = await connectTo(index, transport, 'invalid since');
      for (const since of ['x', '', '1-2-3', '-1-0', '1.5-0', '1700000000000', '18446744073709551616-0', 3, true, ['1-0'], { id: '1-0' }]) {
        assert.deepEqual(await c.join({ room, since }), { ok: false, error: SINCE_ERROR }, `since ${JSON.stringify(since)}`);
      }
      // Not in the room: a message posted now does not reach it; a valid join still works.
      await post(room, ['not for the refused client']);
      assert.deepEqual(await c.join('resume-other'), { ok: true });
      const [other] = await post('resume-other', ['for the other room']);
      await c.waitForMessage('the other room\'s message', (m) => m.id === other.id);
      assert.deepEqual(c.messages, [other]);
      assert.equal(c.socket.connected, true);
    }
  }));
});

// Clients of socket.io 2.x: the official socket.io-client 2.5.0 from npm,
// which speaks Engine.IO protocol 3 and Socket.IO protocol 4, against the
// same cluster as the current client. It connects over websocket and
// long-polling, straight to a frontend and through HAProxy on both demo
// domains; joins with a room name or with {room, since}; receives every
// message of its rooms in order, once; resumes after its frontend is killed
// with no gap; gets what a v4 client in the same room gets, in the same
// order; and meets the same limits (events, rooms, payloads, a client that
// stops reading). Garbage in Engine.IO 3's framing ends only the session
// that sent it. Engine.IO 3's heartbeat is the client's: idle clients that
// ping stay, a silent session is let go. Long-polling clients without
// cookies stay on their instance through HAProxy, by session id.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import {
  Client, DOMAIN_1, DOMAIN_2, Poster, RawWebSocket, ResumingClient, compareIds, deliveryCounts, logged, metrics, postMessage, request,
  waitFor,
} from './lib/helpers.mjs';
import { V2Client, V2ResumingClient } from './lib/v2-client.mjs';

const SLOW_DOWN = { ok: false, error: 'too many events; slow down' };
const SESSION_UNKNOWN = { code: '1', message: 'Session ID unknown' };
// Text whose UTF-16 length differs from its length in characters and in
// bytes: Engine.IO 3's long-polling payloads count UTF-16 code units.
const WIDE_TEXT = 'ünïcødé ✓ 𝕊 😀';

describe('socket.io 2.x clients', () => {
  let topo;
  const closeLater = [];

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 1 });
  });

  after(async () => {
    for (const c of closeLater) c.close();
    await topo?.stop();
  });

  /** A v2 client to `url`, connected, closed after the tests. */
  const v2 = async (url, transport, name) => {
    const c = new V2Client(url, { transports: [transport], name });
    closeLater.push(c);
    return c.connect();
  };

  /** A v4 client (helpers.mjs' Client) to `url`, connected, closed after the tests. */
  const v4 = async (url, transport, name) => {
    const c = new Client(url, { transports: [transport], name: `v4 ${name}` });
    closeLater.push(c);
    return c.connect();
  };

  /** Posts `texts` to `room` through HAProxy, on both domains in turn; returns the stored messages. */
  const post = async (room, texts) => {
    const stored = [];
    for (const [i, text] of texts.entries()) {
      const res = await postMessage(topo.url, room, text, { host: i % 2 ? DOMAIN_2 : DOMAIN_1 });
      assert.equal(res.status, 201, `POST ${text}: ${res.status} ${res.text}`);
      stored.push(res.json);
    }
    return stored;
  };

  // ---- connecting, joining, receiving ------------------------------------

  // Where a client connects: straight to a frontend, or through HAProxy by
  // domain name. The v2 client keeps no cookies: through HAProxy, its polls
  // find their instance by the session id (see the stickiness tests below).
  const routes = () => [
    { where: 'frontend 0', url: topo.frontends[0].url },
    { where: 'frontend 1', url: topo.frontends[1].url },
    { where: `HAProxy as ${DOMAIN_1}`, url: `http://${DOMAIN_1}:${topo.haproxyPort}` },
    { where: `HAProxy as ${DOMAIN_2}`, url: `http://${DOMAIN_2}:${topo.haproxyPort}` },
  ];

  it('connects over each transport, directly and through HAProxy on both domains; joins by name and with since; receives every message of its rooms in order, once', logged(() => topo, async () => {
    let n = 0;
    for (const route of routes()) {
      for (const transport of ['websocket', 'polling']) {
        n += 1;
        const what = `${route.where} over ${transport}`;
        const plainRoom = `v2-plain-${n}`;
        const resumedRoom = `v2-since-${n}`;
        const [seen, ...missed] = await post(resumedRoom, ['seen before', `missed 1 ${WIDE_TEXT}`, 'missed 2']);

        const c = await v2(route.url, transport, what);
        assert.equal(c.transport, transport, `${what}: its only transport`);
        assert.equal(c.engineProtocol, '3', `${what}: Engine.IO 3`);
        assert.deepEqual(await c.join({ room: resumedRoom, since: seen.id }), { ok: true, replayed: 2 }, what);
        // The replay is sent before the acknowledgement.
        assert.deepEqual(c.messages, missed, `${what}: exactly the missed messages, in order`);
        assert.deepEqual(await c.join(plainRoom), { ok: true }, what);

        const live = [];
        for (let i = 0; i < 6; i++) {
          const room = i % 2 ? plainRoom : resumedRoom;
          live.push(...await post(room, [`live ${i} in ${room} ${WIDE_TEXT} ${'x'.repeat(i * 700)}`]));
        }
        const [fence] = await post(plainRoom, ['fence']);
        await c.waitForMessage('the fence', (m) => m.id === fence.id);
        assert.deepEqual(c.messages, [...missed, ...live, fence], `${what}: every message of both rooms, in order, once`);
        assert.deepEqual(c.disconnects, [], `${what}: never disconnected`);
        assert.equal(c.transport, transport, `${what}: still on its transport`);
        c.close();
      }
    }
  }));

  it('upgrades from long-polling to websocket, as socket.io 2 does by default', logged(() => topo, async () => {
    const c = new V2Client(topo.frontends[0].url, { name: 'upgrading' });
    closeLater.push(c);
    await c.connect();
    assert.deepEqual(await c.join('v2-upgrade'), { ok: true });
    await waitFor('the upgrade to websocket', () => c.transport === 'websocket');
    const stored = await post('v2-upgrade', ['after the upgrade', WIDE_TEXT]);
    await c.waitForMessage('the last message', (m) => m.id === stored.at(-1).id);
    assert.deepEqual(c.messages, stored);
    assert.deepEqual(c.disconnects, []);
  }));

  // ---- v2 and v4 side by side --------------------------------------------

  it('gives v2 and v4 clients in one room on one frontend the same messages in the same order', logged(() => topo, async () => {
    const room = 'v2-with-v4';
    const url = topo.frontends[0].url;
    const clients = [];
    for (const transport of ['websocket', 'polling']) {
      clients.push(new V2ResumingClient({ room, name: `v2 ${transport}` }).open(url, { transports: [transport] }));
      clients.push(new ResumingClient({ room, name: `v4 ${transport}` }).open(url, { transports: [transport] }));
    }
    closeLater.push(...clients);
    await Promise.all(clients.map((c) => c.waitJoined(1)));
    const poster = new Poster(topo.url, room, { hosts: [DOMAIN_1, DOMAIN_2], intervalMs: 2, label: `v2 and v4 ${WIDE_TEXT}` }).start();
    await poster.acknowledgedMore(200);
    await poster.stop();
    const [fence] = await post(room, ['fence']);
    poster.acked.push(fence);
    await Promise.all(clients.map((c) => c.waitForId(fence.id)));
    const counts = deliveryCounts('v2 and v4 in one room', poster, clients);
    assert.equal(counts.lost + counts.duplicated + counts.outOfOrder + counts.unacknowledgedDelivered, 0, counts.line);
    for (const c of counts.perClient) assert.deepEqual(c.received, counts.ackedIds, `${c.name}: every message, in posted order`);
    for (const c of clients) assert.deepEqual(c.disconnects, [], `${c.name} never disconnected`);
  }));

  // ---- resuming -----------------------------------------------------------

  for (const transport of ['websocket', 'polling']) {
    it(`resumes through HAProxy after its frontend is killed (${transport}): nothing lost, nothing twice`, { timeout: 60_000 }, logged(() => topo, async () => {
      const room = `v2-resume-${transport}`;
      const socketCounts = async () => Promise.all(topo.frontends.map(async (f) => (await f.status()).connections));
      const before = await socketCounts();
      const c = new V2ResumingClient({ room, name: 'v2 resuming' })
        .open(`http://${DOMAIN_1}:${topo.haproxyPort}`, { transports: [transport], reconnection: true });
      closeLater.push(c);
      await c.waitJoined(1);
      const now = await waitFor('the client counted by a frontend', async () => {
        const counts = await socketCounts();
        return counts.some((k, i) => k > before[i]) ? counts : null;
      });
      const victim = topo.frontends[now.findIndex((k, i) => k > before[i])];

      const poster = new Poster(topo.url, room, { host: DOMAIN_2, intervalMs: 10, label: 'resume' }).start();
      try {
        await poster.acknowledgedMore(30);
        await victim.stop({ signal: 'SIGKILL' });
        await c.waitJoined(2, 30_000);
        await poster.acknowledgedMore(30);
        await victim.start();
      } finally {
        await poster.stop();
      }
      const [fence] = await post(room, ['fence']);
      poster.acked.push(fence);
      await c.waitForId(fence.id);
      const counts = deliveryCounts('v2 resumed after its frontend was killed', poster, [c]);
      assert.equal(counts.failedRequests, 0, counts.line);
      assert.equal(counts.lost + counts.duplicated + counts.outOfOrder + counts.unacknowledgedDelivered, 0, counts.line);
      assert.deepEqual(counts.perClient[0].received, counts.ackedIds, counts.line);
      assert.ok(c.answers.slice(1).every((a) => a.ok && a.replayed >= 0), `resumed with since: ${JSON.stringify(c.answers)}`);
    }));
  }

  // ---- the heartbeat ----------------------------------------------------------

  // Engine.IO 3 reverses 4's heartbeat: the client pings every interval (25
  // s), the server answers, and closes a session silent for interval +
  // timeout (45 s). The bounds below are the protocol's, with a margin for
  // a loaded machine on the late side only.
  const PING_INTERVAL_MS = 25_000;
  const SILENT_SESSION_CLOSED_MS = 45_000;
  it('keeps idle v2 clients past their pings, and lets go of a silent session within interval + timeout', { timeout: 90_000 }, logged(() => topo, async () => {
    const room = 'v2-idle';
    const idle = [await v2(topo.frontends[0].url, 'websocket', 'idle'), await v2(topo.frontends[0].url, 'polling', 'idle')];
    for (const c of idle) assert.deepEqual(await c.join(room), { ok: true });
    // A client that vanished: its session stays open, and it never pings.
    const silent = await RawWebSocket.open(topo.frontends[0].port, '/front/socket.io/?EIO=3&transport=websocket');
    closeLater.push(silent);
    const openedAt = Date.now();
    await silent.until('the open and connect packets', () => silent.messages.includes('40'));
    await silent.until('the server to close the silent session', () => silent.ended, SILENT_SESSION_CLOSED_MS + 15_000);
    const closedAfterMs = Date.now() - openedAt;
    assert.ok(closedAfterMs >= SILENT_SESSION_CLOSED_MS - 1000, `closed after ${closedAfterMs} ms, not before interval + timeout`);
    assert.ok(closedAfterMs <= SILENT_SESSION_CLOSED_MS + 10_000, `closed after ${closedAfterMs} ms, soon after interval + timeout`);
    assert.deepEqual(silent.messages.filter((m) => m.startsWith('2')), [], 'the server never pinged it');
    // Idle all that time, the other clients pinged and were answered, and
    // are still there.
    assert.ok(closedAfterMs > PING_INTERVAL_MS);
    const [fence] = await post(room, ['after the idle time']);
    for (const c of idle) {
      await c.waitForMessage('the fence', (m) => m.id === fence.id);
      assert.ok(c.pongs >= 1, `${c.name}: its pings answered (${c.pongs} pongs)`);
      assert.deepEqual(c.disconnects, [], `${c.name} never disconnected`);
      assert.equal(c.connectCount, 1, `${c.name} on its first connection`);
    }
  }));

  // ---- garbage in Engine.IO 3's framing ------------------------------------

  describe('garbage in Engine.IO 3 framing', () => {
    const WATCH_ROOM = 'v2-watch';
    const watchers = [];
    let frontend;
    let posted = 0;

    before(async () => {
      frontend = topo.frontends[0];
      watchers.push(await v2(frontend.url, 'websocket', 'watcher'), await v2(frontend.url, 'polling', 'watcher'),
        await v4(frontend.url, 'websocket', 'watcher'));
      for (const w of watchers) assert.deepEqual(await w.join(WATCH_ROOM), { ok: true });
    });

    /** The other clients of the room on the same frontend keep receiving, on their first connection. */
    const othersKeepReceiving = async (what) => {
      posted += 1;
      const [stored] = await post(WATCH_ROOM, [`after ${what} (${posted})`]);
      for (const w of watchers) {
        await w.waitForMessage(`the message posted after ${what}`, (m) => m.id === stored.id);
        assert.equal(w.messages.length, posted, `${w.name}: every message once`);
        assert.equal(w.connectCount, 1, `${w.name} still on its first connection`);
        assert.deepEqual(w.disconnects, [], `${w.name} never disconnected`);
      }
    };

    const polling = (sid) => `${frontend.url}/front/socket.io/?EIO=3&transport=polling${sid ? `&sid=${sid}` : ''}`;

    /** Opens an Engine.IO 3 long-polling session (connected to the default namespace at once); returns its sid. */
    const openPollingSession = async () => {
      const open = await request(polling());
      assert.equal(open.status, 200, open.text);
      const framed = /^(\d+):(0\{.*?\})/.exec(open.text);
      assert.ok(framed, `a length-prefixed open packet: ${open.text}`);
      assert.equal(Number(framed[1]), framed[2].length, 'the prefix is the packet\'s length');
      const { sid } = JSON.parse(framed[2].slice(1));
      const next = open.text.slice(framed[0].length) || (await request(polling(sid))).text;
      assert.match(next, /^2:40$/, 'the namespace connection, length-prefixed');
      return sid;
    };

    const pollingCases = [
      // [what, body]
      ['a payload without a length prefix ("42[\\"room\\",\\"a\\"]")', '42["room","a"]'],
      ['a length that is not a number ("x:40")', 'x:40'],
      ['a length longer than the payload ("99:42[")', '99:42['],
      ['a message packet that is not Socket.IO ("5:4{{{{")', '5:4{{{{'],
      ['an unknown packet type ("1:7")', '1:7'],
    ];
    for (const [what, body] of pollingCases) {
      it(`ends a long-polling session that sends ${what}, and only it`, logged(() => topo, async () => {
        const sid = await openPollingSession();
        const res = await request(polling(sid), { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body });
        assert.ok([200, 400].includes(res.status), `POST: ${res.status} ${res.text}`);
        const next = await request(polling(sid), { timeoutMs: 5000 });
        assert.equal(next.status, 400, `the session is gone: ${next.status} ${next.text}`);
        assert.deepEqual(next.json, SESSION_UNKNOWN);
        await othersKeepReceiving(`a v3 polling session sent ${what}`);
      }));
    }

    const wsCases = [
      ['an empty binary frame (no packet type)', (ws) => ws.sendFrame(0x2, Buffer.alloc(0))],
      ['an unknown packet type ("7")', (ws) => ws.send('7')],
      ['a truncated event ("42[")', (ws) => ws.send('42[')],
      ['an empty text frame (no packet type)', (ws) => ws.send('')],
    ];
    for (const [what, abuse] of wsCases) {
      it(`closes a v3 websocket that sends ${what}, and only it`, logged(() => topo, async () => {
        const ws = await RawWebSocket.open(frontend.port, '/front/socket.io/?EIO=3&transport=websocket');
        await ws.until('the open and connect packets', () => ws.messages.some((m) => m.startsWith('0{')) && ws.messages.includes('40'));
        abuse(ws);
        await ws.until('the server to close the connection', () => ws.ended);
        await othersKeepReceiving(`a v3 websocket sent ${what}`);
      }));
    }
  });

  // ---- limits -------------------------------------------------------------

  describe('limits, as for v4 clients', () => {
    const abuser = (transport) => v2(topo.frontends[0].url, transport, `abusive ${transport}`);

    /** Emits `count` room events at once; resolves to their answers, 'no answer' for none within 3 s. */
    const flood = async (c, count) => {
      const answers = await Promise.all(Array.from({ length: count }, (_, i) => new Promise((resolve) => {
        const timer = setTimeout(() => resolve('no answer'), 3000);
        c.socket.emit('room', `v2-flood-${i % 5}`, (answer) => { clearTimeout(timer); resolve(answer); });
      })));
      return answers;
    };

    for (const transport of ['websocket', 'polling']) {
      it(`refuses a flood of 500 room events over ${transport}, then disconnects the socket`, logged(() => topo, async () => {
        const c = await abuser(transport);
        const answers = await flood(c, 500);
        assert.deepEqual(answers.slice(0, 20), Array(20).fill({ ok: true }), 'the burst is answered');
        assert.deepEqual(answers.slice(20, 70), Array(50).fill(SLOW_DOWN), 'then 50 refusals');
        assert.deepEqual(answers.slice(70), Array(430).fill('no answer'), 'then nothing');
        await waitFor('the disconnect', () => c.disconnects.length > 0);
        assert.deepEqual(c.disconnects, ['io server disconnect']);
      }));

      it(`refuses a 17th room over ${transport} and keeps the socket`, logged(() => topo, async () => {
        const c = await abuser(transport);
        for (let i = 0; i < 16; i++) assert.deepEqual(await c.join(`v2-room-${i}`), { ok: true });
        assert.deepEqual(await c.join('v2-room-16'), { ok: false, error: 'a socket may be in at most 16 rooms' });
        assert.equal(c.socket.connected, true);
      }));
    }

    it('closes a websocket client that sends an event over 4 KiB, unanswered', logged(() => topo, async () => {
      const c = await abuser('websocket');
      let answered = false;
      c.socket.emit('room', 'x'.repeat(5000), () => { answered = true; });
      await waitFor('the client to be disconnected', () => c.disconnects.length > 0);
      assert.deepEqual(c.disconnects, ['transport close']);
      assert.equal(answered, false);
    }));

    it('answers a 5 KB event over long-polling and ends a client whose payload is over 32 KiB', logged(() => topo, async () => {
      const c = await abuser('polling');
      const ack = await c.join('x'.repeat(5000));
      assert.equal(ack.ok, false);
      assert.match(ack.error, /^room must be/);
      c.socket.emit('room', 'x'.repeat(40_000));
      await waitFor('the client to be disconnected', () => c.disconnects.length > 0);
      assert.deepEqual(c.disconnects, ['transport error']);
    }));
  });
});

// Long-polling clients that keep no cookies, through HAProxy with several
// frontends: HAProxy's cookie never comes back, so their polls must find
// their instance by the session id they carry (etc/haproxy/chat-ha.cfg).
describe('clients without cookies through HAProxy', () => {
  let topo;
  const closeLater = [];

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 1 });
  });

  after(async () => {
    for (const c of closeLater) c.close();
    await topo?.stop();
  });

  const post = async (room, texts) => {
    const stored = [];
    for (const text of texts) {
      const res = await postMessage(topo.url, room, text, { host: DOMAIN_2 });
      assert.equal(res.status, 201, `POST ${text}: ${res.status} ${res.text}`);
      stored.push(res.json);
    }
    return stored;
  };

  it('keeps long-polling clients without cookies (v2, and v4 without withCredentials) on their instance through HAProxy', logged(() => topo, async () => {
    const room = 'v2-no-cookies';
    const url = `http://${DOMAIN_1}:${topo.haproxyPort}`;
    const socketCounts = async () => Promise.all(topo.frontends.map(async (f) => (await f.status()).connections));
    const before = await socketCounts();
    assert.deepEqual(before, [0, 0], 'no client yet');
    const clients = [];
    // Four of each, one at a time, in turns (v2 v4 v4 v2 ...): new clients
    // still go round-robin, so each kind has clients on both instances.
    for (let i = 0; i < 4; i++) {
      const kinds = [['v2', () => new V2Client(url, { transports: ['polling'], name: `no cookies ${i}` })],
        ['v4', () => new Client(url, { transports: ['polling'], name: `v4 no cookies ${i}`, withCredentials: false })]];
      for (const [kind, make] of i % 2 ? kinds.reverse() : kinds) {
        const previous = await socketCounts();
        const c = make();
        closeLater.push(c);
        await c.connect();
        const counts = await waitFor(() => `the frontends to count ${c.name}`, async () => {
          const now = await socketCounts();
          return now[0] + now[1] === clients.length + 1 ? now : null;
        });
        c.frontend = counts.findIndex((k, j) => k > previous[j]);
        c.kind = kind;
        clients.push(c);
      }
    }
    for (const kind of ['v2', 'v4']) {
      assert.deepEqual([...new Set(clients.filter((c) => c.kind === kind).map((c) => c.frontend))].sort(), [0, 1],
        `${kind} clients on both instances: ${JSON.stringify(clients.map((c) => [c.name, c.frontend]))}`);
    }
    for (const c of clients.filter((x) => x.kind === 'v4')) assert.equal(c.stickyCookie, undefined, `${c.name} keeps no cookie`);
    for (const c of clients) assert.deepEqual(await c.join(room), { ok: true }, c.name);
    // Many polls each: every message is one more answered poll and a new one.
    const stored = [];
    for (let i = 0; i < 20; i++) {
      stored.push(...await post(room, [`no cookies ${i}`]));
      await Promise.all(clients.map((c) => c.waitForMessage(`message ${i}`, (m) => m.id === stored.at(-1).id)));
    }
    for (const c of clients) {
      assert.deepEqual(c.messages, stored, `${c.name}: every message, in order, once`);
      assert.deepEqual(c.disconnects, [], `${c.name}: the session never failed`);
      assert.equal(c.connectCount, 1, `${c.name}: on its first connection`);
      assert.equal(c.transport, 'polling');
    }
    const after = await socketCounts();
    assert.deepEqual(after.map((k, j) => k - before[j]), [0, 1].map((j) => clients.filter((c) => c.frontend === j).length),
      'each instance still holds the clients it took');
  }));
});

// A socket.io 2 websocket client that stops reading is let go as a v4 one
// is (slow-reader.test.mjs): here by the bound in bytes, 64 KiB, with
// messages of 3.9 KB; the other clients of the room keep receiving, and it
// resumes with since without a gap.
describe('a socket.io 2 client that stops reading', () => {
  let topo;
  const closeLater = [];
  const BATCH = 50;
  const MOST_POSTS = 4000;
  const TEXT = 'x'.repeat(3900);

  before(async () => {
    topo = await startTopology({
      frontends: 1,
      backends: 1,
      frontendConfig: 'max_queued_bytes = 65536\nbacklog_timeout_ms = 600000\n',
    });
  });

  after(async () => {
    for (const c of closeLater) c.close();
    await topo?.stop();
  });

  const messageIds = (frames) => frames.filter((f) => f.startsWith('42["message"')).map((f) => JSON.parse(f.slice(2))[1].id);

  it('is let go, others keep receiving, and it resumes without a gap', { timeout: 180_000 }, logged(() => topo, async (t) => {
    const [frontend] = topo.frontends;
    const [backend] = topo.backends;
    const room = 'v2-slow-reader';
    const reader = new V2Client(frontend.url, { transports: ['websocket'], name: 'reader' });
    closeLater.push(reader);
    await reader.connect();
    assert.deepEqual(await reader.join(room), { ok: true });

    const stalled = await RawWebSocket.open(frontend.port, '/front/socket.io/?EIO=3&transport=websocket');
    closeLater.push(stalled);
    await stalled.until('the open and connect packets', () => stalled.messages.includes('40'));
    stalled.send(`420${JSON.stringify(['room', room])}`);
    await stalled.until('the join ack', () => stalled.messages.includes('430[{"ok":true}]'));
    const first = await postMessage(backend.url, room, 'before the stall');
    assert.equal(first.status, 201);
    await stalled.until('the first message', () => messageIds(stalled.messages).length === 1);
    stalled.socket.pause();

    const posted = [first.json.id];
    const droppedBefore = (await metrics(frontend.metricsUrl)).chat_frontend_messages_dropped_total;
    let dropped = droppedBefore;
    while (dropped === droppedBefore && posted.length < MOST_POSTS) {
      const batch = await Promise.all(Array.from({ length: BATCH }, (_, i) => postMessage(backend.url, room, `${posted.length + i} ${TEXT}`)));
      for (const res of batch) {
        assert.equal(res.status, 201, res.text);
        posted.push(res.json.id);
      }
      dropped = (await metrics(frontend.metricsUrl)).chat_frontend_messages_dropped_total;
    }
    posted.sort(compareIds);
    t.diagnostic(`let go after ${posted.length} messages`);
    assert.ok(dropped > droppedBefore, `the stalled socket was let go before ${MOST_POSTS} messages`);

    await reader.waitForMessage('the last message', (m) => m.id === posted.at(-1), 30_000);
    assert.deepEqual(reader.messages.map((m) => m.id), posted, 'the reader: every message once, in order');
    assert.deepEqual(reader.disconnects, []);

    stalled.socket.resume();
    await stalled.until('the connection to close', () => stalled.ended, 30_000);
    const got = messageIds(stalled.messages);
    assert.deepEqual(got, posted.slice(0, got.length), 'what it got is the start of the room, in order');
    const missed = posted.slice(got.length);
    assert.ok(missed.length > 0 && missed.length <= 1000, `let go with ${missed.length} messages missed, within the history of 1000`);

    const resumed = new V2Client(frontend.url, { transports: ['websocket'], name: 'resumed' });
    closeLater.push(resumed);
    await resumed.connect();
    assert.deepEqual(await resumed.join({ room, since: got.at(-1) }), { ok: true, replayed: missed.length });
    await waitFor('the resumed client to have the last message', () => resumed.messages.length >= missed.length, { timeoutMs: 30_000 });
    assert.deepEqual(resumed.messages.map((m) => m.id), missed, 'the resumed client: every missed message once, in order');
  }));
});

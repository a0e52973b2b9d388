// Delivery through the whole cluster: websocket and long-polling clients on
// both demo domains, in two rooms, spread over both frontends by HAProxy;
// messages posted through either domain, through HAProxy's round-robin and
// directly to each backend, reach exactly the sockets of their room, in
// order, once each; the history returns them in the same order.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { Client, DOMAIN_1, DOMAIN_2, compareIds, logged, postMessage, request, waitFor } from './lib/helpers.mjs';

const ROOM_A = 'delivery-a';
const ROOM_B = 'delivery.B_2';

describe('delivery across domains, transports, frontends and backends', () => {
  let topo;
  const clients = [];
  const posted = { [ROOM_A]: [], [ROOM_B]: [] };

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 2 });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('connects websocket and polling clients through both domains, spread over both frontends', logged(() => topo, async () => {
    const socketCounts = async () => (await Promise.all(topo.frontends.map((f) => f.status()))).map((s) => s.connections);
    let counts = await socketCounts();
    assert.deepEqual(counts, [0, 0]);
    // One at a time, so that the frontend each lands on can be seen (its
    // socket count goes up). HAProxy's round-robin alternates; this order
    // puts every domain, transport and room on both frontends.
    const order = [];
    for (const room of [ROOM_A, ROOM_B]) {
      order.push([DOMAIN_1, 'polling', room], [DOMAIN_2, 'polling', room], [DOMAIN_2, 'websocket', room], [DOMAIN_1, 'websocket', room]);
    }
    for (const [domain, transport, room] of order) {
      const client = new Client(`http://${domain}:${topo.haproxyPort}`, { transports: [transport], name: `${domain} ${room}` });
      client.room = room;
      client.wanted = transport;
      clients.push(client);
      await client.connect();
      const previous = counts;
      let now = counts;
      counts = await waitFor(() => `the frontends to count ${clients.length} sockets (they count ${now})`, async () => {
        now = await socketCounts();
        return now.reduce((a, b) => a + b, 0) === clients.length ? now : null;
      });
      client.frontend = counts.findIndex((n, i) => n > previous[i]);
    }
    const acks = await Promise.all(clients.map((c) => c.join(c.room)));
    assert.deepEqual(acks, clients.map(() => ({ ok: true })));

    for (const c of clients) assert.equal(c.transport, c.wanted, `${c.name} uses its only transport`);
    // Long-polling clients hold HAProxy's cookie naming their frontend.
    for (const c of clients.filter((x) => x.wanted === 'polling')) {
      assert.equal(c.stickyCookie, `front${c.frontend}`, `${c.name}: sticky cookie names the frontend holding its socket`);
    }
    // Each transport, each room and each domain has clients on both frontends.
    const landed = (pick) => {
      const groups = {};
      for (const c of clients) (groups[pick(c)] ??= new Set()).add(c.frontend);
      return Object.fromEntries(Object.entries(groups).map(([k, v]) => [k, [...v].sort()]));
    };
    assert.deepEqual(landed((c) => c.wanted), { polling: [0, 1], websocket: [0, 1] });
    assert.deepEqual(landed((c) => c.room), { [ROOM_A]: [0, 1], [ROOM_B]: [0, 1] });
    assert.deepEqual(landed((c) => c.name.split(' ')[0]), { [DOMAIN_1]: [0, 1], [DOMAIN_2]: [0, 1] });
  }));

  it('delivers messages posted through either domain and either backend to exactly their room, in order, once each', logged(() => topo, async () => {
    const backSessions = async () => Object.fromEntries((await topo.haproxy.serverStates())
      .filter((s) => s.backend === 'chat_back').map((s) => [s.server, s.sessions]));
    const sessionsBefore = await backSessions();

    // Where each message goes in: HAProxy with each domain (round-robin over
    // the backends), and each backend's own port. Rooms alternate.
    const routes = [
      { base: topo.url, host: DOMAIN_1 },
      { base: topo.url, host: DOMAIN_2 },
      { base: topo.url, host: DOMAIN_1 },
      { base: topo.url, host: DOMAIN_2 },
      { base: topo.backends[0].url },
      { base: topo.backends[1].url },
    ];
    let n = 0;
    for (let round = 0; round < 2; round++) {
      for (const route of routes) {
        for (const room of [ROOM_A, ROOM_B]) {
          n += 1;
          const text = `message ${n} for ${room} via ${route.host ?? route.base} — ünïcødé ✓`;
          const res = await postMessage(route.base, room, text, { host: route.host });
          assert.equal(res.status, 201, `POST via ${route.host ?? route.base}: ${res.status} ${res.text}`);
          const stored = res.json;
          assert.deepEqual(Object.keys(stored).sort(), ['id', 'message', 'room', 'ts']);
          assert.equal(stored.room, room);
          assert.equal(stored.message, text);
          assert.match(stored.id, /^\d+-\d+$/);
          assert.equal(stored.ts, Number(stored.id.split('-')[0]));
          posted[room].push(stored);
        }
      }
    }

    // HAProxy sent some of them to each backend.
    const sessionsAfter = await backSessions();
    for (const server of Object.keys(sessionsBefore)) {
      assert.ok(sessionsAfter[server] > sessionsBefore[server],
        `HAProxy sent no request to ${server}: before ${JSON.stringify(sessionsBefore)}, after ${JSON.stringify(sessionsAfter)}`);
    }

    // A last message per room: once a client has it, it has everything
    // posted before it to that room (delivery is in the room's order).
    for (const room of [ROOM_A, ROOM_B]) {
      const res = await postMessage(topo.url, room, `fence ${room}`, { host: DOMAIN_1 });
      assert.equal(res.status, 201, res.text);
      posted[room].push(res.json);
    }
    await Promise.all(clients.map((c) => c.waitForMessage(`fence ${c.room}`, (m) => m.message === `fence ${c.room}`)));

    for (const c of clients) {
      assert.deepEqual(c.messages, posted[c.room], `${c.name} received exactly the messages of ${c.room}, in order`);
    }
    // Ids increase within a room.
    for (const room of [ROOM_A, ROOM_B]) {
      const ids = posted[room].map((m) => m.id.split('-').map(Number));
      for (let i = 1; i < ids.length; i++) {
        assert.ok(ids[i][0] > ids[i - 1][0] || (ids[i][0] === ids[i - 1][0] && ids[i][1] > ids[i - 1][1]), `ids in order: ${posted[room].map((m) => m.id)}`);
      }
    }
    for (const c of clients) assert.deepEqual(c.disconnects, [], `${c.name} was never disconnected`);
  }));

  it('delivers bursts and messages of every frame size intact, in order, also to a socket in both rooms', logged(() => topo, async () => {
    // A socket in both rooms gets each room's messages in the room's order,
    // the two rooms interleaved as they reached its frontend.
    const both = new Client(`http://${DOMAIN_1}:${topo.haproxyPort}`, { transports: ['websocket'], name: 'both rooms' });
    try {
      await both.connect();
      assert.deepEqual(await both.join(ROOM_A), { ok: true });
      assert.deepEqual(await both.join(ROOM_B), { ok: true });
      // Websocket frames under 126 bytes and over (the longest message:
      // 4000 two-byte characters), each alone.
      const sent = [];
      for (const text of ['a', 'é'.repeat(4000)]) {
        const res = await postMessage(topo.url, ROOM_A, text, { host: DOMAIN_1 });
        assert.equal(res.status, 201, res.text);
        sent.push(res.json);
      }
      // A burst over both rooms, posted at once: a frontend reads several
      // of them from Redis at a time and sends each socket its part together
      // (up to 64 messages in one write).
      const burst = await Promise.all(Array.from({ length: 200 }, (_, i) =>
        postMessage(topo.backends[i % 2].url, i % 3 === 0 ? ROOM_B : ROOM_A, `burst ${i}`)));
      for (const res of burst) assert.equal(res.status, 201, res.text);
      sent.push(...burst.map((res) => res.json).sort((a, b) => compareIds(a.id, b.id)));
      for (const m of sent) posted[m.room].push(m);

      const last = (room) => posted[room].at(-1);
      await Promise.all(clients.map((c) => c.waitForMessage(last(c.room).message, (m) => m.id === last(c.room).id)));
      for (const room of [ROOM_A, ROOM_B]) {
        await both.waitForMessage(last(room).message, (m) => m.room === room && m.id === last(room).id);
      }
      for (const c of clients) {
        assert.deepEqual(c.messages, posted[c.room], `${c.name} received exactly the messages of ${c.room}, in order`);
      }
      for (const room of [ROOM_A, ROOM_B]) {
        assert.deepEqual(both.messages.filter((m) => m.room === room), sent.filter((m) => m.room === room),
          `the socket in both rooms received every message of ${room} once, in order`);
      }
      assert.equal(both.messages.length, sent.length, 'and nothing else');
    } finally {
      both.close();
    }
  }));

  it('returns the history of each room in order, through either domain and from each backend', logged(() => topo, async () => {
    for (const room of [ROOM_A, ROOM_B]) {
      const q = `/back/messages?room=${encodeURIComponent(room)}&limit=200`;
      for (const [base, host] of [[topo.url, DOMAIN_1], [topo.url, DOMAIN_2], [topo.backends[0].url], [topo.backends[1].url]]) {
        const res = await request(base + q, { host });
        assert.equal(res.status, 200, res.text);
        assert.deepEqual(res.json, { room, messages: posted[room] });
      }
      // limit: the newest ones, still oldest first.
      const last2 = await request(`${topo.url}/back/messages?room=${encodeURIComponent(room)}&limit=2`, { host: DOMAIN_2 });
      assert.equal(last2.status, 200, last2.text);
      assert.deepEqual(last2.json, { room, messages: posted[room].slice(-2) });
    }
    // Without limit: up to 50.
    const many = 'delivery-many';
    const stored = [];
    for (let i = 0; i < 55; i++) {
      const res = await postMessage(topo.backends[i % 2].url, many, `m${i}`);
      assert.equal(res.status, 201, res.text);
      stored.push(res.json);
    }
    const dflt = await request(`${topo.url}/back/messages?room=${many}`, { host: DOMAIN_1 });
    assert.equal(dflt.status, 200, dflt.text);
    assert.deepEqual(dflt.json, { room: many, messages: stored.slice(-50) });
    // A room nobody posted to has an empty history.
    const empty = await request(`${topo.url}/back/messages?room=nobody-here`, { host: DOMAIN_1 });
    assert.equal(empty.status, 200, empty.text);
    assert.deepEqual(empty.json, { room: 'nobody-here', messages: [] });
  }));

  it('keeps every client connected on its transport, with no other message received', logged(() => topo, async () => {
    // A last message per room, after everything the tests posted (to other
    // rooms too): once a client has it, any other message for it would have
    // come before it.
    for (const room of [ROOM_A, ROOM_B]) {
      const res = await postMessage(topo.url, room, `last fence ${room}`, { host: DOMAIN_2 });
      assert.equal(res.status, 201, res.text);
      posted[room].push(res.json);
    }
    await Promise.all(clients.map((c) => c.waitForMessage(`last fence ${c.room}`, (m) => m.id === posted[c.room].at(-1).id)));
    await waitFor('both frontends to count every socket', async () => {
      const statuses = await Promise.all(topo.frontends.map((f) => f.status()));
      return statuses.reduce((n, s) => n + s.connections, 0) === clients.length;
    });
    for (const c of clients) {
      assert.equal(c.socket.connected, true, `${c.name} connected`);
      assert.equal(c.connectCount, 1, `${c.name} connected once`);
      assert.equal(c.transport, c.wanted, `${c.name} still on ${c.wanted}`);
      assert.deepEqual(c.messages, posted[c.room], `${c.name}: nothing more arrived`);
    }
  }));
});

// Redis stopped and restarted under connected clients: while it is down,
// posting fails with 503 (never 201), both tiers say they are degraded and
// stay in HAProxy's rotation, and the frontends keep every socket; once it is
// back, the same sockets get messages again, and the history kept from
// before the outage is still there.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { Client, DOMAIN_1, DOMAIN_2, logged, postMessage, request, waitFor } from './lib/helpers.mjs';

const ROOM = 'outage';
const UNAVAILABLE = 'message store unavailable, try again';

describe('Redis stopped and restarted', () => {
  let topo;
  const clients = [];
  const delivered = [];

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 2 });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  const statuses = () => Promise.all([...topo.frontends, ...topo.backends].map((d) => d.status()));
  const proxiedStatus = (p, host) => request(topo.url + p, { host }).then((r) => {
    assert.equal(r.status, 200, `${p} through HAProxy: ${r.status} ${r.text}`);
    return r.json;
  });

  it('delivers to clients on both frontends before the outage', logged(() => topo, async () => {
    for (const transport of ['websocket', 'polling']) {
      for (const domain of [DOMAIN_1, DOMAIN_2]) {
        const c = new Client(`http://${domain}:${topo.haproxyPort}`, { transports: [transport], name: domain });
        clients.push(c);
        await c.connect();
        assert.deepEqual(await c.join(ROOM), { ok: true });
        c.pings = 0;
        c.socket.io.engine.on('ping', () => { c.pings += 1; });
      }
    }
    const counts = (await Promise.all(topo.frontends.map((f) => f.status()))).map((s) => s.connections);
    assert.ok(counts.every((n) => n > 0), `sockets on both frontends: ${counts}`);

    const res = await postMessage(topo.url, ROOM, 'before the outage', { host: DOMAIN_1 });
    assert.equal(res.status, 201, res.text);
    delivered.push(res.json);
    await Promise.all(clients.map((c) => c.waitForMessage('the first message', (m) => m.id === res.json.id)));
  }));

  it('while Redis is down: 503 for every post, degraded status, sockets kept', logged(() => topo, async () => {
    await topo.redis.stop();
    assert.equal(topo.redis.running, false);

    await waitFor('every frontend and backend status to say degraded, Redis down', async () => {
      const all = await statuses();
      return all.every((s) => s.status === 'degraded' && s.redis === 'down');
    }, { timeoutMs: 15_000 });
    for (const [p, host] of [['/front/status', DOMAIN_1], ['/back/status', DOMAIN_2]]) {
      const s = await proxiedStatus(p, host);
      assert.equal(s.status, 'degraded', `${p}: ${JSON.stringify(s)}`);
      assert.equal(s.redis, 'down');
    }

    // Posting fails, promptly, with the backend's own JSON error: through
    // HAProxy (both domains, so both backends) and at each backend.
    const attempts = [
      [topo.url, DOMAIN_1], [topo.url, DOMAIN_2], [topo.url, DOMAIN_1], [topo.url, DOMAIN_2],
      [topo.backends[0].url], [topo.backends[1].url],
    ];
    for (const [base, host] of attempts) {
      const res = await request(`${base}/back/message`, {
        method: 'POST', host, headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ room: ROOM, message: 'during the outage' }),
        timeoutMs: 5000,
      });
      assert.equal(res.status, 503, `POST via ${host ?? base}: ${res.status} ${res.text}`);
      assert.deepEqual(res.json, { error: UNAVAILABLE });
    }
    const history = await request(`${topo.url}/back/messages?room=${ROOM}`, { host: DOMAIN_1, timeoutMs: 5000 });
    assert.equal(history.status, 503, history.text);
    assert.deepEqual(history.json, { error: UNAVAILABLE });

    // Both tiers stay in rotation: their status answers 200.
    const servers = await topo.haproxy.serverStates();
    for (const s of servers) assert.equal(s.status, 'UP', `${s.backend}/${s.server} in rotation: ${JSON.stringify(servers)}`);

    // The sockets stay through at least one heartbeat without Redis, and a
    // client may still join rooms (that needs no Redis).
    const pingsBefore = clients.map((c) => c.pings);
    await waitFor('a Socket.IO heartbeat to every client while Redis is down',
      () => clients.every((c, i) => c.pings > pingsBefore[i]), { timeoutMs: 40_000, intervalMs: 200 });
    assert.deepEqual(await clients[0].join('outage-side-room'), { ok: true });
    for (const c of clients) {
      assert.equal(c.socket.connected, true, `${c.name} still connected`);
      assert.deepEqual(c.disconnects, [], `${c.name} was not disconnected`);
    }
    const all = await statuses();
    assert.equal(all.slice(0, 2).reduce((n, s) => n + s.connections, 0), clients.length, `frontends keep every socket: ${JSON.stringify(all)}`);
    assert.equal(topo.frontends.every((f) => f.running) && topo.backends.every((b) => b.running), true, 'no daemon exited');
  }));

  it('after Redis is back: status ok, delivery to the same sockets, history kept', logged(() => topo, async () => {
    await topo.redis.start();
    await waitFor('every frontend and backend status to say ok, Redis up', async () => {
      const all = await statuses();
      return all.every((s) => s.status === 'ok' && s.redis === 'up');
    }, { timeoutMs: 20_000 });

    for (const [i, route] of [[topo.url, DOMAIN_2], [topo.backends[0].url], [topo.backends[1].url], [topo.url, DOMAIN_1]].entries()) {
      const [base, host] = route;
      const res = await postMessage(base, ROOM, `after the outage ${i}`, { host });
      assert.equal(res.status, 201, `POST via ${host ?? base}: ${res.status} ${res.text}`);
      delivered.push(res.json);
    }
    const last = delivered.at(-1);
    await Promise.all(clients.map((c) => c.waitForMessage('the last message', (m) => m.id === last.id, 15_000)));
    for (const c of clients) {
      assert.deepEqual(c.messages, delivered, `${c.name}: every acknowledged message once, in order, nothing from the outage`);
      assert.equal(c.connectCount, 1, `${c.name} never reconnected`);
      assert.deepEqual(c.disconnects, []);
    }

    // Redis kept what it had acknowledged before the restart.
    const history = await request(`${topo.url}/back/messages?room=${ROOM}`, { host: DOMAIN_2 });
    assert.equal(history.status, 200, history.text);
    assert.deepEqual(history.json, { room: ROOM, messages: delivered });
    for (const [p, host] of [['/front/status', DOMAIN_1], ['/back/status', DOMAIN_2]]) {
      const s = await proxiedStatus(p, host);
      assert.equal(s.status, 'ok', `${p}: ${JSON.stringify(s)}`);
    }
  }));
});

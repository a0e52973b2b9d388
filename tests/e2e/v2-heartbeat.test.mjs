// The heartbeat as configured (frontend.ping_interval_ms, ping_timeout_ms),
// for socket.io 2.x clients (Engine.IO 3: the client pings, the server
// answers) and current ones (Engine.IO 4: the server pings), on a cluster
// set to a 1 s interval and a 1 s timeout. Clients learn the interval at
// the handshake; an idle client stays connected across many heartbeats
// through HAProxy, over both transports; a client whose network vanishes
// (no data, no close) is let go by the frontend within interval + timeout,
// as its operator sees it: the connections of /front/status drop.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { Client, DOMAIN_1, logged, postMessage, request, waitFor } from './lib/helpers.mjs';
import { V2Client } from './lib/v2-client.mjs';
import { startBlackhole } from './lib/blackhole.mjs';

const PING_INTERVAL_MS = 1000;
const PING_TIMEOUT_MS = 1000;
// Heartbeats an idle client must see answered.
const HEARTBEATS = 10;
// Beyond interval + timeout: the time a loaded machine may take to run the
// frontend's timer and answer /front/status.
const LATE_MARGIN_MS = 3000;
// What the frontend answers a request for a session it no longer holds.
const SESSION_UNKNOWN = { code: '1', message: 'Session ID unknown' };

/** A client of `protocol` ('v2', 'v4') to `url` over `transport`, counting its heartbeats. */
function heartbeatClient(protocol, url, transport, name) {
  const c = protocol === 'v2'
    ? new V2Client(url, { transports: [transport], name })
    : new Client(url, { transports: [transport], name: `v4 ${name}` });
  // Answered heartbeats: Engine.IO 3's client counts the pongs to its pings
  // (V2Client.pongs); Engine.IO 4's the pings it answers.
  c.pings = 0;
  if (protocol === 'v4') c.socket.io.on('ping', () => { c.pings += 1; });
  c.heartbeats = () => (protocol === 'v2' ? c.pongs : c.pings);
  // What the handshake told the client (engine.io-client 3 keeps it in
  // public fields, 6 in private ones).
  c.handshakeHeartbeat = () => {
    const engine = c.socket.io.engine;
    return protocol === 'v2'
      ? { interval: engine.pingInterval, timeout: engine.pingTimeout }
      : { interval: engine._pingInterval, timeout: engine._pingTimeout };
  };
  return c;
}

describe('the heartbeat, configured to 1 s + 1 s', () => {
  let topo;
  const closeLater = [];

  before(async () => {
    topo = await startTopology({
      frontends: 1,
      backends: 1,
      frontendConfig: `ping_interval_ms = ${PING_INTERVAL_MS}\nping_timeout_ms = ${PING_TIMEOUT_MS}\n`,
    });
  });

  after(async () => {
    for (const c of closeLater) await c.close();
    await topo?.stop();
  });

  const connections = async () => (await topo.frontends[0].status()).connections;

  it(`keeps idle v2 and v4 clients through HAProxy, over both transports, across ${HEARTBEATS} heartbeats`, { timeout: 60_000 }, logged(() => topo, async (t) => {
    const room = 'heartbeat-idle';
    const url = `http://${DOMAIN_1}:${topo.haproxyPort}`;
    const clients = [];
    for (const protocol of ['v2', 'v4']) {
      for (const transport of ['websocket', 'polling']) {
        const c = heartbeatClient(protocol, url, transport, 'idle');
        closeLater.push(c);
        clients.push(c);
      }
    }
    for (const c of clients) {
      await c.connect();
      assert.ok((await c.join(room)).ok, `${c.name} joined`);
      assert.deepEqual(c.handshakeHeartbeat(), { interval: PING_INTERVAL_MS, timeout: PING_TIMEOUT_MS },
        `${c.name}: the heartbeat the handshake gave`);
    }
    await waitFor(() => `${HEARTBEATS} heartbeats for every client (${clients.map((c) => `${c.name}: ${c.heartbeats()}`).join(', ')})`,
      () => clients.every((c) => c.heartbeats() >= HEARTBEATS),
      { timeoutMs: 40_000, intervalMs: 100 });
    const posted = await postMessage(topo.url, room, 'after the heartbeats', { host: DOMAIN_1 });
    assert.equal(posted.status, 201, posted.text);
    for (const c of clients) {
      await c.waitForMessage('the message posted after the heartbeats', (m) => m.id === posted.json.id);
      assert.deepEqual(c.disconnects, [], `${c.name} never disconnected`);
      assert.equal(c.connectCount, 1, `${c.name} on its first connection`);
      t.diagnostic(`${c.name}: ${c.heartbeats()} heartbeats answered, 0 disconnects`);
    }
  }));

  for (const protocol of ['v2', 'v4']) {
    for (const transport of ['websocket', 'polling']) {
      it(`lets go of a ${protocol} client over ${transport} whose network vanished, within interval + timeout`, { timeout: 60_000 }, logged(() => topo, async (t) => {
        const [frontend] = topo.frontends;
        const room = `heartbeat-vanish-${protocol}-${transport}`;
        // A bystander in the room, connected straight to the frontend.
        const bystander = heartbeatClient(protocol, frontend.url, transport, 'bystander');
        closeLater.push(bystander);
        await bystander.connect();
        assert.ok((await bystander.join(room)).ok);

        const network = await startBlackhole(frontend.port);
        closeLater.push(network);
        const lost = heartbeatClient(protocol, network.url, transport, 'vanishing');
        closeLater.push(lost);
        await lost.connect();
        assert.ok((await lost.join(room)).ok);
        // One heartbeat through the relay, so that the session is past its
        // handshake and kept alive by the heartbeat alone.
        await waitFor(`${lost.name}: a heartbeat`, () => lost.heartbeats() >= 1, { timeoutMs: 10_000, intervalMs: 20 });
        const sid = lost.socket.io.engine.id;
        const before = await connections();

        network.vanish();
        const vanishedAt = Date.now();
        const deadlineMs = PING_INTERVAL_MS + PING_TIMEOUT_MS + LATE_MARGIN_MS;
        await waitFor(() => `/front/status to count one connection less than ${before} (${deadlineMs} ms)`,
          async () => (await connections()) === before - 1, { timeoutMs: deadlineMs, intervalMs: 50 });
        const noticedAfterMs = Date.now() - vanishedAt;
        t.diagnostic(`${protocol} ${transport}: let go ${noticedAfterMs} ms after its network vanished`);
        // Never before the timeout: the server waited for the heartbeat, it
        // did not hear of the loss some other way.
        assert.ok(noticedAfterMs >= PING_TIMEOUT_MS - 100, `let go after ${noticedAfterMs} ms, not before the timeout`);
        // The connection the frontend let go of is the vanished client's:
        // its session is unknown now (a live one would be answered
        // otherwise), and its websocket was closed by the frontend.
        const eio = protocol === 'v2' ? 3 : 4;
        const probe = await request(`${frontend.url}/front/socket.io/?EIO=${eio}&transport=polling&sid=${sid}`, { timeoutMs: 5000 });
        assert.equal(probe.status, 400, `session ${sid}: ${probe.status} ${probe.text}`);
        assert.deepEqual(probe.json, SESSION_UNKNOWN);
        if (transport === 'websocket') {
          await waitFor('the frontend to close the websocket', () => network.openUpstream().length === 0, { timeoutMs: 5_000 });
        }

        // The bystander kept its session and still receives.
        const posted = await postMessage(topo.backends[0].url, room, 'after the loss');
        assert.equal(posted.status, 201, posted.text);
        await bystander.waitForMessage('the message posted after the loss', (m) => m.id === posted.json.id);
        assert.deepEqual(bystander.disconnects, [], `${bystander.name} never disconnected`);
        assert.deepEqual(lost.messages.filter((m) => m.id === posted.json.id), [], 'nothing reached the vanished client');
      }));
    }
  }
});

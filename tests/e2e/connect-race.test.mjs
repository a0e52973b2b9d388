// The connect race: clients that emit `room` the instant `connect` fires,
// hundreds at once, on a frontend running a multi-threaded runtime. Every
// join must be acknowledged ok, and every socket must then receive the
// room's messages.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { io } from 'socket.io-client';

import { startTopology } from './lib/topology.mjs';
import { DOMAIN_1, logged, postMessage, waitFor, within } from './lib/helpers.mjs';

const CLIENTS = 330;
const ROOM = 'race';
// Each client's transports: the default (polling, then upgrade), websocket
// only, polling only.
const TRANSPORTS = [undefined, ['websocket'], ['polling']];

describe('clients joining the instant they connect', () => {
  let topo;
  let agent;
  const sockets = [];

  before(async () => {
    // Frontend 0 runs 2 runtime threads; the clients connect to it directly.
    topo = await startTopology({ frontends: 2, backends: 2, frontendThreads: [2, 1] });
    agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
  });

  after(async () => {
    for (const s of sockets) s.close();
    agent?.destroy();
    await topo?.stop();
  });

  it(`acknowledges every join of ${CLIENTS} clients and delivers to all of them`, logged(() => topo, async () => {
    const frontend = topo.frontends[0];
    const acks = [];
    const received = new Map(); // socket index -> messages
    const failures = [];
    for (let i = 0; i < CLIENTS; i++) {
      const socket = io(frontend.url, {
        path: '/front/socket.io',
        transports: TRANSPORTS[i % TRANSPORTS.length],
        agent,
        reconnection: false,
        forceNew: true,
        timeout: 20_000,
      });
      sockets.push(socket);
      received.set(i, []);
      socket.on('message', (m) => received.get(i).push(m));
      socket.on('connect_error', (e) => failures.push(`client ${i}: connect_error ${e.message}`));
      socket.on('disconnect', (reason) => failures.push(`client ${i}: disconnected (${reason})`));
      acks.push(new Promise((resolve) => {
        // No await between connect and emit: the join races the server's
        // own handling of the new socket.
        socket.once('connect', () => {
          socket.timeout(20_000).emit('room', ROOM, (err, answer) => resolve(err ? { timeout: err.message } : answer));
        });
      }));
    }
    const answers = await within(60_000, () => `${CLIENTS} join acknowledgements (failures so far: ${failures.slice(0, 5)})`, Promise.all(acks));
    const bad = answers.map((a, i) => [i, a]).filter(([, a]) => !(a && a.ok === true));
    assert.deepEqual(bad, [], `joins not acknowledged ok: ${JSON.stringify(bad.slice(0, 10))}`);
    assert.deepEqual(failures, []);

    await waitFor(`frontend 0 to count ${CLIENTS} sockets`, async () => (await frontend.status()).connections === CLIENTS, { timeoutMs: 20_000 });

    const res = await postMessage(topo.url, ROOM, 'to everyone in the race', { host: DOMAIN_1 });
    assert.equal(res.status, 201, res.text);
    await waitFor(`every one of ${CLIENTS} clients to receive the message`, () => [...received.values()].every((m) => m.length >= 1), { timeoutMs: 30_000, intervalMs: 100 })
      .catch((e) => {
        const missing = [...received.entries()].filter(([, m]) => m.length === 0).map(([i]) => i);
        e.message += `; ${missing.length} did not: ${missing.slice(0, 20)}`;
        throw e;
      });
    for (const [i, messages] of received) {
      assert.deepEqual(messages, [res.json], `client ${i} received the message once`);
    }
    assert.deepEqual(failures, []);
  }));
});

#!/usr/bin/env node
// The idle drill: socket.io 2.x clients (socket.io-client 2.5.0, Engine.IO
// 3) that do nothing but keep their heartbeat stay connected through
// HAProxy for ten minutes, one over websocket and one over long-polling,
// with the heartbeat as packaged (the client pings every 25 s, the server
// answers). It passes once each client has had 24 pings answered (24 x 25
// s = 10 minutes) without a disconnect, and a message posted then reaches
// both; it fails at the first disconnect.
//
// It runs beside the other e2e tests, in a process and a cluster of its
// own: `make test-e2e` starts it first and waits for it last, so its ten
// minutes pass while the other files run.
//
//   node tests/e2e/idle-drill.mjs [--pings 24]
//
// Prints what it saw per client (connected for N s, pings answered,
// disconnects) and exits 0 when it passed, 1 when it failed.

import { parseArgs } from 'node:util';

import { startTopology } from './lib/topology.mjs';
import { DOMAIN_1, postMessage, waitFor } from './lib/helpers.mjs';
import { V2Client } from './lib/v2-client.mjs';

// The packaged frontend.ping_interval_ms: the clients ping this often.
const PING_INTERVAL_MS = 25_000;
const ROOM = 'idle-drill';

const { values: options } = parseArgs({ options: { pings: { type: 'string', default: '24' } } });
const PINGS = Number(options.pings);
if (!Number.isInteger(PINGS) || PINGS < 1) {
  console.error('usage: node tests/e2e/idle-drill.mjs [--pings N] (N >= 1)');
  process.exit(2);
}

const say = (line) => console.log(`idle drill: ${line}`);

/** Fails as soon as a client disconnected; true once every client had `pings` pongs. */
function pingsAnswered(clients, pings) {
  for (const c of clients) {
    if (c.disconnects.length > 0) throw new Error(`${c.name} disconnected (${c.disconnects.join(', ')}) after ${c.pongs} pings answered`);
  }
  return clients.every((c) => c.pongs >= pings);
}

/** Waits for `pings` answered pings of every client, failing at once on a disconnect. */
async function idle(clients, pings) {
  let failure = null;
  await waitFor(() => `${pings} pings answered (${clients.map((c) => `${c.name}: ${c.pongs}`).join(', ')})`, () => {
    try {
      return pingsAnswered(clients, pings);
    } catch (e) {
      failure = e;
      return true; // stop waiting: the drill has failed
    }
  }, { timeoutMs: (pings + 2) * PING_INTERVAL_MS, intervalMs: 500 });
  if (failure) throw failure;
}

async function drill() {
  say(`${PINGS} pings of 25 s (${(PINGS * PING_INTERVAL_MS) / 1000} s) by a websocket and a long-polling socket.io 2 client through HAProxy`);
  // Two frontends: the long-polling client, which keeps no cookies, must
  // be kept on its instance by HAProxy for the whole time.
  const topo = await startTopology({ frontends: 2, backends: 1 });
  const clients = [];
  let passed = false;
  try {
    const url = `http://${DOMAIN_1}:${topo.haproxyPort}`;
    for (const transport of ['websocket', 'polling']) {
      const c = new V2Client(url, { transports: [transport], name: 'idle through HAProxy' });
      clients.push(c);
      await c.connect();
      const answer = await c.join(ROOM);
      if (!answer?.ok) throw new Error(`${c.name}: join answered ${JSON.stringify(answer)}`);
      c.connectedAt = Date.now();
    }
    await idle(clients, PINGS);
    const posted = await postMessage(topo.url, ROOM, 'the idle drill is over', { host: DOMAIN_1 });
    if (posted.status !== 201) throw new Error(`POST after the idle time: ${posted.status} ${posted.text}`);
    for (const c of clients) await c.waitForMessage('the message posted after the idle time', (m) => m.id === posted.json.id);
    passed = clients.every((c) => c.disconnects.length === 0 && c.connectCount === 1);
  } catch (e) {
    topo.keepLogs();
    say(`FAILED: ${e.message}`);
    say(`logs in ${topo.logDir}:\n${topo.logs()}`);
  } finally {
    for (const c of clients) {
      const seconds = c.connectedAt ? Math.round((Date.now() - c.connectedAt) / 1000) : 0;
      say(`${c.name}: connected for ${seconds} s, ${c.pongs} pings answered, ` +
        `disconnects ${c.disconnects.length}${c.disconnects.length ? ` (${c.disconnects.join(', ')})` : ''}, ` +
        `connections ${c.connectCount}, messages received ${c.messages.length}`);
      c.close();
    }
    await topo.stop();
  }
  say(passed ? 'passed' : 'FAILED');
  return passed;
}

process.exitCode = (await drill()) ? 0 : 1;

// `systemctl stop chat-frontend@0.socket chat-frontend@0.service` on front1
// (stopping only the service would let its socket start it again) while
// messages are posted all the time: the instance drains, its clients
// reconnect through HAProxy to the instances still running (polling clients
// too, whose sticky cookie named the stopped one) and, resuming with the
// last id they saw, keep receiving: every acknowledged message once, in
// order, for every client.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  DOMAIN_1, DOMAIN_2, FRONT_INSTANCES, Spreader, frontConnections, frontStatus, postStream, ssh,
  waitFor, waitForServers,
} from './lib/rig.mjs';

const INST = FRONT_INSTANCES.find((f) => f.server === 'front1-0');
const UNIT = `chat-frontend@${INST.instance}`;
const ROOM = `system-stop-${Date.now()}`;

describe(`systemctl stop ${UNIT}.socket ${UNIT}.service on ${INST.host}`, () => {
  const spread = new Spreader(ROOM, { reconnect: true });
  let clients = [];
  let poster;

  after(async () => {
    await poster?.stop();
    spread.close();
    await ssh(INST.host, `sudo systemctl start ${UNIT}`).catch(() => {});
    await waitForServers({ [INST.server]: 'UP' }).catch(() => {});
  });

  it('moves its clients to the other instances, which keep delivering', async () => {
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));
    // Clients of both transports and domains on every instance, among them
    // a polling and a websocket client on the one to stop.
    for (const transport of ['polling', 'websocket']) {
      for (const [i, f] of FRONT_INSTANCES.entries()) {
        const have = (c) => c.transports[0] === transport && c.server === f.server;
        if (!spread.clients.some(have)) {
          await spread.until({ domain: i % 2 ? DOMAIN_2 : DOMAIN_1, transports: [transport] }, have, `on ${f.server}`);
        }
      }
    }
    clients = spread.clients;
    const moved = clients.filter((c) => c.server === INST.server);
    console.log(`# ${clients.length} clients: ${spread.landing()}`);
    assert.deepEqual([...new Set(moved.map((c) => c.transports[0]))].sort(), ['polling', 'websocket']);

    poster = postStream(ROOM, { intervalMs: 50 });
    await poster.acknowledgedMore(20);
    await ssh(INST.host, `sudo systemctl stop ${UNIT}.socket ${UNIT}.service`);
    const state = await ssh(INST.host, `systemctl is-active ${UNIT}.socket ${UNIT}.service || true`);
    assert.deepEqual(state.trim().split('\n'), ['inactive', 'inactive'], 'socket and service stay stopped');
    assert.equal(await frontStatus(INST), null, `${INST.ip}:${INST.port} no longer answers`);

    // Its clients are now held by the other instances.
    const counts = await waitFor(`the ${clients.length} sockets on the 3 instances left`, async () => {
      const now = await frontConnections();
      const total = Object.entries(now).filter(([k]) => k !== INST.server).reduce((a, [, v]) => a + (v ?? 0), 0);
      return total >= clients.length && clients.every((c) => c.socket.connected) ? now : null;
    }, { timeoutMs: 15_000, intervalMs: 100 });
    assert.equal(counts[INST.server], null);
    console.log(`# disconnects of the clients of ${INST.server}: ${moved.map((c) => `${c.name}: ${c.disconnects}`).join('; ')}`);
    for (const c of moved) {
      assert.ok(c.connectCount >= 2, `${c.name} reconnected (${c.disconnects})`);
      if (c.transports[0] === 'polling') {
        assert.notEqual(c.stickyCookie, INST.server, `${c.name}: HAProxy gave it another instance's cookie`);
      }
    }
    for (const c of clients.filter((x) => x.server !== INST.server)) {
      assert.equal(c.connectCount, 1, `${c.name} on ${c.server} kept its connection`);
    }

    await poster.acknowledgedMore(30); // posting on, to the clients' new instances
    await poster.stop();
    assert.deepEqual(poster.failed, [], 'every POST answered 201');
    const ids = poster.acked.map((m) => m.id);
    await Promise.all(clients.map((c) => c.waitForIds(ids, 15_000)));
    for (const c of clients) {
      assert.deepEqual(c.messages.map((m) => m.id), ids, `${c.name}: every message, in order`);
      assert.deepEqual(c.duplicates, [], `${c.name}: no duplicate`);
    }
    await waitForServers({ [INST.server]: 'DOWN' });
  });
});

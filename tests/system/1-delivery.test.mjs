// Delivery across hosts, through the load balancer: websocket and
// long-polling clients on both demo domains, spread by HAProxy over the 4
// frontend instances of front1 and front2 (where each landed is read from
// the instances' /front/status, straight from the host); messages posted
// through either domain, stored by the backends of back1 and back2, reach
// every client once, in order.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  DOMAIN_1, DOMAIN_2, FRONT_INSTANCES, Spreader, frontConnections, lbServers, post,
} from './lib/rig.mjs';

const ROOM = `system-delivery-${Date.now()}`;

describe('delivery across hosts through the load balancer', () => {
  const spread = new Spreader(ROOM);
  let clients = [];

  after(() => spread.close());

  it('spreads polling and websocket clients of both domains over both frontend hosts', async () => {
    // Every domain and transport on both hosts; polling clients on every
    // instance (each host runs several).
    for (const transport of ['polling', 'websocket']) {
      for (const domain of [DOMAIN_1, DOMAIN_2]) {
        for (const host of ['front1', 'front2']) {
          const spec = { domain, transports: [transport] };
          const have = (c) => c.domain === domain && c.transports[0] === transport && c.host === host;
          if (!spread.clients.some(have)) await spread.until(spec, have, `on ${host}`);
        }
      }
      if (transport === 'polling') {
        for (const f of FRONT_INSTANCES) {
          const have = (c) => c.transports[0] === 'polling' && c.server === f.server;
          if (!spread.clients.some(have)) await spread.until({ domain: DOMAIN_1, transports: ['polling'] }, have, `on ${f.server}`);
        }
      }
    }
    clients = spread.clients;
    const landing = spread.landing();
    console.log(`# ${clients.length} clients: ${landing}`);
    for (const c of clients) assert.ok(c.server, `${c.name}: its frontend instance was found (${landing})`);
    for (const c of clients) assert.equal(c.transport, c.transports[0], `${c.name} uses its only transport`);
    // Long-polling requests stick to the instance holding the session.
    for (const c of clients.filter((x) => x.transports[0] === 'polling')) {
      assert.equal(c.stickyCookie, c.server, `${c.name}: HAProxy's cookie names its instance`);
    }
    const counts = await frontConnections();
    assert.ok(Object.values(counts).reduce((a, b) => a + b, 0) >= clients.length, JSON.stringify(counts));
  });

  it('delivers messages posted through either domain to every client on every host, once, in order', async () => {
    const before = await lbServers();
    const posted = [];
    for (let i = 0; i < 20; i++) {
      const domain = i % 2 ? DOMAIN_2 : DOMAIN_1;
      const res = await post(ROOM, `message ${i} via ${domain}`, domain);
      assert.equal(res.status, 201, `POST ${i} via ${domain}: ${res.status} ${res.text}`);
      posted.push(res.json);
    }
    const ids = posted.map((m) => m.id);
    await Promise.all(clients.map((c) => c.waitForIds(ids)));
    for (const c of clients) {
      assert.deepEqual(c.messages.map((m) => m.id), ids, `${c.name} on ${c.server}: every message, in order`);
      assert.deepEqual(c.messages.map((m) => m.message), posted.map((m) => m.message));
      assert.deepEqual(c.duplicates, [], `${c.name}: no duplicate`);
      assert.equal(c.connectCount, 1, `${c.name}: one connection throughout`);
    }
    // The posts were spread over both backend hosts' instances.
    const after = await lbServers();
    const served = after.filter((s) => s.backend === 'chat_back')
      .map((s) => [s.server, s.stot - (before.find((b) => b.server === s.server)?.stot ?? 0)]);
    for (const host of ['back1', 'back2']) {
      const n = served.filter(([server]) => server.startsWith(`${host}-`)).reduce((a, [, k]) => a + k, 0);
      assert.ok(n > 0, `${host} served some of the posts (${JSON.stringify(served)})`);
    }
  });
});

// The write window (frontend.write_window_us) through HAProxy: messages that
// arrive within the window after a delivery wait and go out together, and
// websocket and long-polling clients still get every message once, in order.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { Client, DOMAIN_1, DOMAIN_2, Poster, compareIds, logged, waitFor } from './lib/helpers.mjs';

const ROOM = 'write-window';

describe('a frontend with a 20 ms write window', () => {
  let topo;
  const clients = [];

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1, frontendConfig: 'write_window_us = 20000\n' });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  it('delivers a stream to websocket and long-polling clients once each, in order', logged(() => topo, async () => {
    for (const [domain, transport] of [[DOMAIN_1, 'websocket'], [DOMAIN_2, 'polling'], [DOMAIN_1, 'polling'], [DOMAIN_2, 'websocket']]) {
      const client = new Client(`http://${domain}:${topo.haproxyPort}`, { transports: [transport] });
      clients.push(client);
      await client.connect();
      assert.deepEqual(await client.join(ROOM), { ok: true });
    }
    // Four posts at a time: many arrive within a window of each other.
    const poster = new Poster(topo.url, ROOM, { hosts: [DOMAIN_1, DOMAIN_2], intervalMs: 1, concurrency: 4, label: 'windowed' }).start();
    await poster.acknowledgedMore(300);
    await poster.stop();
    assert.deepEqual(poster.failed, []);
    const ids = poster.acked.map((m) => m.id).sort(compareIds);
    for (const client of clients) {
      await waitFor(() => `${client.name} to receive ${ids.at(-1)} (it has ${client.messages.length} of ${ids.length})`,
        () => client.messages.some((m) => m.id === ids.at(-1)), { timeoutMs: 15_000 });
      assert.deepEqual(client.messages.map((m) => m.id), ids, `${client.name}: every message once, in order`);
      assert.deepEqual(client.disconnects, [], `${client.name} stayed`);
    }
  }));
});

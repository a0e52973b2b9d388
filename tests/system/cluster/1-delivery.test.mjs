// Delivery across shards through the floating address: one room on each of
// the cluster's three shards, in each a websocket and a long-polling client
// on each demo domain; messages posted through either domain reach every
// client of the room once, in order, and are stored where the cluster keeps
// the room (its stream on the primary that owns its slot).

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  DOMAIN_1, DOMAIN_2, RigClient, post, redisCli, roomKey, roomsPerShard, waitForWholeCluster,
} from '../lib/rig.mjs';

describe('delivery on every shard of the cluster through the load balancer', () => {
  const clients = [];
  after(() => { for (const c of clients) c.close(); });

  it('delivers posts of either domain to the clients of both, once, in order, for a room on each shard', async () => {
    const nodes = await waitForWholeCluster(30_000);
    const { names, shardOf } = roomsPerShard(nodes, `system-cluster-delivery-${Date.now()}`, 1);
    assert.equal(names.length, 3);
    const rooms = names.map((room) => ({
      room,
      shard: shardOf.get(room),
      clients: [DOMAIN_1, DOMAIN_2].flatMap((domain) => ['websocket', 'polling'].map((transport) => {
        const c = new RigClient(domain, room, { transports: [transport], name: `${room} ${domain} [${transport}]` });
        clients.push(c);
        return c;
      })),
    }));
    await Promise.all(clients.map((c) => c.ready()));

    for (const { room, shard, clients: inRoom } of rooms) {
      const posted = [];
      for (let i = 0; i < 10; i++) {
        const domain = i % 2 ? DOMAIN_2 : DOMAIN_1;
        const res = await post(room, `message ${i} via ${domain}`, domain);
        assert.equal(res.status, 201, `POST ${i} to ${room} (on ${shard.host.name}) via ${domain}: ${res.status} ${res.text}`);
        posted.push(res.json);
      }
      const ids = posted.map((m) => m.id);
      await Promise.all(inRoom.map((c) => c.waitForIds(ids)));
      for (const c of inRoom) {
        assert.deepEqual(c.messages.map((m) => m.id), ids, `${c.name}: every message, in order`);
        assert.deepEqual(c.messages.map((m) => m.message), posted.map((m) => m.message));
        assert.deepEqual(c.duplicates, [], `${c.name}: no duplicate`);
      }
      // Stored on the shard that owns the room's slot.
      const [length] = await redisCli(shard.host, `xlen "${roomKey(room)}"`);
      assert.equal(Number(length), 10, `${roomKey(room)} on ${shard.host.name}`);
      console.log(`# ${room}: slot of ${roomKey(room)} on ${shard.host.name}, 10 posts delivered to ${inRoom.length} clients`);
    }
  });
});

// Drill on the cluster layout: a primary's machine powered off (lxc-stop -k:
// no shutdown, as a power cut) under load: 200 clients through the floating
// address in 12 rooms, four on each of the three shards, half over websocket
// and half over long-polling, and more than 100 posts/s, each retried with
// its Idempotency-Key until acknowledged (tests/system/lib/rig.mjs, Load).
//
// The cluster promotes the failed primary's replica. With one replica per
// shard and redis.min_replicas_acked = 1, the promoted node has no replica
// of its own until the powered-off machine returns: posts to that shard's
// rooms get 503 (and are retried) until then. The drill powers the machine
// on once the failover is seen; it rejoins as the new primary's replica, and
// the shard takes posts again.
//
// Target: 0 acknowledged messages lost, 0 duplicated; posts to rooms of the
// other two shards never fail; no frontend loses Redis (the silent node holds
// up the delivery of its own rooms only). Printed: the failover time (replica
// promoted) and when the failed shard takes posts again.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, FRONT_HOSTS, FRONT_INSTANCES, INSTANCES, Load, REDIS_HOSTS, assertNothingLost, clusterNodes, getFromLb, livePrimaries,
  powerOff, powerOn, roomsPerShard, ssh, waitFor, waitForServers, waitForWholeCluster,
} from '../lib/rig.mjs';

describe('drill: a Redis Cluster primary\'s machine powered off under load', () => {
  let load;
  let off = null;
  // The tries to the other shards' rooms that failed (null: the drill did not get that far).
  let otherShardFailures = null;
  let faultAt;

  after(async () => {
    load?.close();
    if (off) await powerOn(off.name).catch(() => {});
  });

  it('promotes its replica: 0 acknowledged lost, 0 duplicated, every post acknowledged; the machine rejoins as a replica', { timeout: 420_000 }, async (t) => {
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));
    const nodes = await waitForWholeCluster(60_000);
    // The primary on the first seed machine (the daemons list redis1 first):
    // the node a client reaches first when it has no slot to go by.
    const victim = livePrimaries(nodes).sort((a, b) => REDIS_HOSTS.indexOf(a.host) - REDIS_HOSTS.indexOf(b.host))[0];
    const replica = nodes.find((n) => n.primary === victim.id);
    const { names, shardOf } = roomsPerShard(nodes, `system-cluster-drill-${Date.now()}`, 4);
    const onVictim = (room) => shardOf.get(room).id === victim.id;
    const victimRooms = names.filter(onVictim);
    const otherRooms = names.filter((room) => !onVictim(room));
    t.diagnostic(`${victim.host.name} primary of ${victimRooms.length} rooms' shard (replica on ${replica.host.name}); `
      + `${otherRooms.length} rooms on the other shards`);

    // Posts may wait for the machine to come back: retried for minutes.
    load = await new Load('system-cluster-drill', { names, attempts: 1500 }).start();
    await load.acknowledgedMore(300);
    const ackedIn = (rooms) => load.rooms.filter((r) => rooms.includes(r.name)).reduce((n, r) => n + r.poster.acked.length, 0);

    faultAt = Date.now();
    await powerOff(victim.host.name);
    off = victim.host;
    t.diagnostic(`${victim.host.name} (${victim.ip}) powered off at ${new Date(faultAt).toISOString()}`);

    // The replica promoted, as it says itself.
    await waitFor(`${replica.host.name} to be promoted`, async () => {
      const me = (await clusterNodes(replica.host).catch(() => null))?.find((n) => n.id === replica.id);
      return me?.flags.includes('master') && me.slots.length ? me : null;
    }, { timeoutMs: 30_000, intervalMs: 100 });
    const failoverMs = Date.now() - faultAt;
    t.diagnostic(`${replica.host.name} promoted ${failoverMs} ms after the power-off`);

    // The other shards take posts all along.
    const othersBefore = ackedIn(otherRooms);
    await waitFor('200 more posts acknowledged in the other shards\' rooms', () => ackedIn(otherRooms) >= othersBefore + 200,
      { timeoutMs: 60_000, intervalMs: 20 });

    // Back on: it rejoins as the promoted node's replica; the cluster is whole again.
    const powerOnAt = Date.now();
    await powerOn(victim.host.name);
    off = null;
    const whole = await waitForWholeCluster(120_000);
    const rejoined = whole.find((n) => n.id === victim.id);
    assert.equal(rejoined.primary, replica.id, `${victim.host.name} replicates ${replica.host.name}`);
    t.diagnostic(`${victim.host.name} powered on ${powerOnAt - faultAt} ms after the power-off, replica of ${replica.host.name} `
      + `${Date.now() - faultAt} ms after it`);

    // The failed shard's rooms take posts again.
    const victimBefore = ackedIn(victimRooms);
    await waitFor('100 more posts acknowledged in the failed shard\'s rooms', () => ackedIn(victimRooms) >= victimBefore + 100,
      { timeoutMs: 60_000, intervalMs: 20 });
    const victimOutage = load.outage(faultAt, onVictim);
    const otherOutage = load.outage(faultAt, (room) => !onVictim(room));
    t.diagnostic(`failed shard: posts back ${victimOutage.backAfterMs} ms after the power-off `
      + `(${victimOutage.backAfterMs - (powerOnAt - faultAt)} ms after the power-on), ${victimOutage.failedTries} failed tries, retried`);
    t.diagnostic(`other shards: ${otherOutage.failedTries} failed tries`);

    // What the operator sees on each instance: ok, Redis up.
    const urls = [...FRONT_INSTANCES.map((f) => `http://${f.ip}:${f.port}/front/status`),
      ...BACK_HOSTS.flatMap((h) => Array.from({ length: INSTANCES }, (_, n) => `http://${h.ip}:${9200 + n}/back/status`))];
    await waitFor('every instance to report ok, Redis up', async () => (await getFromLb(urls))
      .every(({ code, body }) => code === 200 && /"status":"ok"/.test(body) && /"redis":"up"/.test(body)),
    { timeoutMs: 30_000, intervalMs: 500 });

    const report = await load.finish('Redis Cluster primary powered off', faultAt);
    t.diagnostic(report.line);
    t.diagnostic(`by transport: ${JSON.stringify(report.byTransport)}`);
    for (const [room, lost] of Object.entries(report.lostByRoom)) {
      t.diagnostic(`${room} (${onVictim(room) ? 'the failed shard' : 'another shard'}): ${lost} deliveries lost`);
    }
    assertNothingLost(report);

    // The frontends never lost Redis: the silent node held up only its own
    // rooms, which waited for it (or its replica) while the others were delivered.
    for (const host of FRONT_HOSTS) {
      const journal = await ssh(host.name, `sudo journalctl -q --no-pager -u 'chat-frontend@*' `
        + `--since=@${Math.floor(faultAt / 1000)} -t chat-frontend -o cat`);
      const lines = journal.split('\n');
      const silent = lines.filter((l) => l.includes('did not answer')).length;
      t.diagnostic(`${host.name}: ${silent} instances found ${victim.host.name} silent and held up its rooms only`);
      assert.deepEqual(lines.filter((l) => l.includes('lost Redis, delivery')), [], `${host.name}'s frontends never lost Redis`);
    }
    otherShardFailures = load.rooms.filter((r) => !onVictim(r.name)).flatMap((r) => r.poster.tries).filter((x) => x.status !== 201);
  });

  it('never fails a post to a room of the other shards', () => {
    assert.ok(otherShardFailures, 'the drill ran to its end');
    const when = otherShardFailures.map((x) => x.endedAt - faultAt);
    const statuses = {};
    for (const x of otherShardFailures) statuses[x.status] = (statuses[x.status] ?? 0) + 1;
    assert.equal(otherShardFailures.length, 0, `failed tries ${JSON.stringify(statuses)}, `
      + `${Math.min(...when)} to ${Math.max(...when)} ms after the power-off`);
  });
});

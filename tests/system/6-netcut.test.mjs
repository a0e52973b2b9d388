// The network between front1 and Redis cut for 10 s (blackhole routes to
// the Redis hosts, Sentinels included, inside front1; the box has iproute2,
// no iptables or nft)
// while messages are posted all the time and clients of both transports are
// connected to every frontend instance. During the cut front1's instances
// report `degraded` (their feed notices within a few seconds) and keep their
// sockets; posts keep succeeding (the backends still reach Redis); front2
// delivers on. Once healed, front1 follows the feed on from its cursor:
// every client has every acknowledged message once, in order.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  FRONT_INSTANCES, REDIS_HOSTS, Spreader, deliveryCounts, frontStatus, postStream, sleep, spreadOverAll, ssh,
  waitFor, waitForServers,
} from './lib/rig.mjs';

const HOST = 'front1';
const CUT_MS = 10_000;
const ROUTES = REDIS_HOSTS.map((r) => `blackhole ${r.ip}/32`);
const addRoutes = () => ROUTES.map((r) => `sudo ip route add ${r}`).join(' && ');
const deleteRoutes = () => ROUTES.map((r) => `sudo ip route del ${r} 2>/dev/null`).join('; ');
const REDIS = REDIS_HOSTS.map((r) => r.name).join(', ');
const ROOM = `system-netcut-${Date.now()}`;
const CUT = FRONT_INSTANCES.filter((f) => f.host === HOST);
const OTHERS = FRONT_INSTANCES.filter((f) => f.host !== HOST);

/** {server: status} of `instances` (null: not answering). */
async function statuses(instances) {
  const all = await Promise.all(instances.map(frontStatus));
  return Object.fromEntries(instances.map((f, i) => [f.server, all[i]?.status ?? null]));
}

describe(`the network between ${HOST} and Redis (${REDIS}) cut for ${CUT_MS / 1000} s`, () => {
  const spread = new Spreader(ROOM, { reconnect: true });
  let poster;
  let cut = false;

  after(async () => {
    if (cut) await ssh(HOST, `${deleteRoutes()}; true`).catch(() => {});
    await poster?.stop();
    spread.close();
  });

  it(`${HOST} degraded meanwhile, no failed post; after healing nothing lost or repeated`, { timeout: 180_000 }, async (t) => {
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));
    await ssh(HOST, `${deleteRoutes()}; true`); // a previous run's, if it failed
    assert.deepEqual(Object.values(await statuses(FRONT_INSTANCES)), FRONT_INSTANCES.map(() => 'ok'), 'every frontend ok first');

    // Clients of both transports and domains on every instance.
    await spreadOverAll(spread);
    const clients = spread.clients;
    t.diagnostic(`${clients.length} clients: ${spread.landing()}`);
    const cutOff = clients.filter((c) => c.host === HOST);
    assert.deepEqual([...new Set(cutOff.map((c) => c.transports[0]))].sort(), ['polling', 'websocket']);

    poster = postStream(ROOM, { intervalMs: 20 });
    await poster.acknowledgedMore(50);
    const since = (await ssh(HOST, 'date +%s.%N')).trim();
    await ssh(HOST, addRoutes());
    cut = true;
    const cutAt = Date.now();
    const ackedAtCut = poster.acked.length;
    t.diagnostic(`cut at ${new Date(cutAt).toISOString()}: ${(await ssh(HOST, 'ip route show type blackhole')).trim().replace(/\n/g, '; ')}`);

    // front1's instances notice; front2's do not.
    const degraded = await waitFor(`${HOST}'s instances to report degraded`, async () => {
      const s = await statuses(CUT);
      return Object.values(s).every((v) => v === 'degraded') ? s : null;
    }, { timeoutMs: CUT_MS - 1000, intervalMs: 200 });
    const noticedMs = Date.now() - cutAt;
    t.diagnostic(`${JSON.stringify(degraded)} ${noticedMs} ms after the cut`);
    const redisOf = await Promise.all(CUT.map(frontStatus));
    for (const s of redisOf) assert.equal(s?.redis, 'down', `${JSON.stringify(s)}: redis down`);
    assert.deepEqual(Object.values(await statuses(OTHERS)), OTHERS.map(() => 'ok'), 'the other host stays ok');

    // Heal after CUT_MS: the cut's length is the drill's, not a wait for
    // something to happen.
    await sleep(Math.max(0, CUT_MS - (Date.now() - cutAt)));
    assert.deepEqual(Object.values(await statuses(CUT)), CUT.map(() => 'degraded'), `${HOST} still degraded at the end of the cut`);
    const ackedInCut = poster.acked.length - ackedAtCut;
    const failedInCut = poster.failed.length;
    const heldOn1 = Math.max(...cutOff.map((c) => c.messages.length));
    await ssh(HOST, `${deleteRoutes()}; ip route show type blackhole`);
    cut = false;
    const healAt = Date.now();
    t.diagnostic(`healed after ${healAt - cutAt} ms: ${ackedInCut} posts acknowledged during the cut (${failedInCut} failed); `
      + `${HOST}'s clients held at most ${heldOn1} of ${poster.acked.length} then`);

    const ok = await waitFor(`${HOST}'s instances to report ok again`, async () => {
      const s = await statuses(CUT);
      return Object.values(s).every((v) => v === 'ok') ? s : null;
    }, { timeoutMs: 30_000, intervalMs: 200 });
    t.diagnostic(`${JSON.stringify(ok)} ${Date.now() - healAt} ms after healing`);
    await poster.acknowledgedMore(75); // posting on
    await poster.stop();

    // Every acknowledged message once, in order, for every client.
    const ids = poster.acked.map((m) => m.id);
    await Promise.all(clients.map((c) => c.waitForIds(ids, 20_000).catch(() => {})));
    const report = deliveryCounts('network cut', poster, clients);
    t.diagnostic(report.line);
    for (const [i, c] of report.perClient.entries()) {
      const cl = clients[i];
      t.diagnostic(`  ${c.name} on ${cl.server}: received ${c.received.length}, lost ${c.lost.length}${c.lost.length ? ` (${c.lost[0]} .. ${c.lost.at(-1)})` : ''}, `
        + `duplicated ${c.duplicated}${c.duplicated ? ` ${cl.duplicates.slice(0, 3)}` : ''}, connections ${cl.connectCount}, disconnects ${JSON.stringify(cl.disconnects)}, joins ${JSON.stringify(cl.joins)}`);
    }
    if (poster.failed.length) t.diagnostic(`failures: ${JSON.stringify(poster.failed.slice(0, 10))}`);
    assert.deepEqual(poster.failed, [], 'every POST answered 201');
    assert.ok(ackedInCut > 50, `posts acknowledged during the cut (${ackedInCut})`);
    for (const c of report.perClient) {
      assert.deepEqual(c.received, report.ackedIds, `${c.name}: every acknowledged message once, in order (lost ${c.lost.length}: ${c.lost.slice(0, 5)})`);
      assert.equal(c.duplicated, 0, `${c.name}: nothing twice`);
      assert.equal(c.outOfOrder, 0, `${c.name}: nothing out of order`);
    }
    assert.equal(report.lost, 0);
    assert.equal(report.duplicated, 0);
    for (const c of clients) {
      assert.equal(c.connectCount, 1, `${c.name} on ${c.server} kept its connection (${c.disconnects})`);
    }

    // What the operator sees: delivery of the frontend's rooms paused, then
    // followed again (each room from where it paused: the clients above
    // missed nothing).
    for (const f of CUT) {
      const log = await ssh(HOST, `sudo journalctl -q --no-pager -u chat-frontend@${f.instance} --since=@${since} -o cat`);
      const lost = log.match(/lost Redis, delivery of ([0-9]+) rooms paused/);
      const resumed = log.match(/following ([0-9]+) rooms on Redis/);
      t.diagnostic(`${f.server}: ${lost?.[0]} / ${resumed?.[0]}`);
      assert.ok(lost, `${f.server} journal: lost Redis\n${log}`);
      assert.ok(resumed, `${f.server} journal: following its rooms again\n${log}`);
      assert.equal(resumed[1], lost[1], `${f.server} follows again the rooms it paused`);
    }
  });
});

// Drills on the Redis side, each under load: 200 clients through the
// floating address in 10 rooms, half over websocket and half over
// long-polling, and more than 100 posts/s, each retried with its
// Idempotency-Key until acknowledged (tests/system/lib/rig.mjs, Load).
//
// Drill: the Redis primary powered off (lxc-stop -k: no shutdown, as a
// power cut). The Sentinels
// promote a replica, the daemons follow it, and posting resumes; every
// client has every acknowledged message once, in order. The old primary,
// powered on again, rejoins as a replica of the new one.
//
// Target: 0 acknowledged messages lost, 0 duplicated, posting back within 5 s.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, FRONT_INSTANCES, Load, REDIS_HOSTS, assertNothingLost, frontStatus, powerOff, powerOn, redisRole, sentinelPrimary, ssh,
  waitFor, waitForServers,
} from './lib/rig.mjs';

const POSTING_BACK_MS = 5000;

describe('drill: the Redis primary powered off under load', () => {
  let load;
  let off = null;

  after(async () => {
    load?.close();
    if (off) await powerOn(off.name).catch(() => {});
  });

  it('promotes a replica: 0 acknowledged lost, 0 duplicated, posting back within 5 s; the old primary rejoins as a replica', { timeout: 300_000 }, async (t) => {
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));
    const primary = await sentinelPrimary(REDIS_HOSTS[1]);
    assert.ok(primary.name, `a Sentinel names a primary (${primary.ip})`);
    const survivors = REDIS_HOSTS.filter((r) => r.name !== primary.name);

    load = await new Load('system-drill-redis').start();
    await load.acknowledgedMore(300);
    
    const faultAt = Date.now();
    await powerOff(primary.name);
    off = primary;
    t.diagnostic(`${primary.name} (${primary.ip}) powered off at ${new Date(faultAt).toISOString()}`);

    const promoted = await waitFor('the Sentinels to promote a replica', async () => {
      const named = await sentinelPrimary(survivors[0]);
      return named.ip !== primary.ip ? named : null;
    }, { timeoutMs: 30_000, intervalMs: 200 });
    t.diagnostic(`${promoted.name} promoted ${Date.now() - faultAt} ms after the power-off`);

    // Posting goes on: well past the failover.
    await load.acknowledgedMore(500, 60_000);
    const outage = load.outage(faultAt);
    t.diagnostic(`posting back ${outage.backAfterMs} ms after the power-off (${outage.failedTries} failed tries, retried)`);

    // What the operator sees on each frontend: ok, on the new primary.
    for (const f of FRONT_INSTANCES) {
      const status = await waitFor(`${f.server} to report ok`, async () => {
        const s = await frontStatus(f);
        return s?.status === 'ok' ? s : null;
      }, { timeoutMs: 20_000, intervalMs: 200 });
      assert.equal(status.redis, 'up');
    }

    // The old primary comes back as a replica of the new one.
    await powerOn(primary.name);
    off = null;
    const role = await waitFor(`${primary.name} to replicate ${promoted.name}`, async () => {
      const r = await redisRole(primary).catch(() => null);
      return r?.[0] === 'slave' && r[1] === promoted.ip && r[3] === 'connected' ? r : null;
    }, { timeoutMs: 60_000, intervalMs: 500 });
    t.diagnostic(`${primary.name} back: ${role.join(' ')}`);
    await load.acknowledgedMore(200, 60_000);

    const report = await load.finish('Redis primary powered off', faultAt);
    t.diagnostic(report.line);
    t.diagnostic(`by transport: ${JSON.stringify(report.byTransport)}`);
    assertNothingLost(report);
    assert.ok(outage.backAfterMs <= POSTING_BACK_MS, `posting back within ${POSTING_BACK_MS} ms (${outage.backAfterMs})`);
  });
});

// Drill: the Redis primary cut off from the other Redis machines and from
// back2, but not from back1 (blackhole routes inside the primary: what it
// sends them is dropped, so no connection to them works). The Sentinels
// that see the others promote a replica. back1 still reaches the old
// primary, whose writes no replica acknowledges: its posts get 503, never a
// 201 for a message the new primary will never have, until it follows the
// new primary. Once the network heals, the old primary rejoins as a
// replica, and nothing acknowledged is lost.
describe('drill: the Redis primary cut off from its replicas and one backend under load', () => {
  let load;
  let cut = null;
  const routes = (primary) => [...REDIS_HOSTS.filter((r) => r.name !== primary.name), BACK_HOSTS[1]].map((h) => `blackhole ${h.ip}/32`);
  const heal = (primary) => ssh(primary.name, `${routes(primary).map((r) => `sudo ip route del ${r} 2>/dev/null`).join('; ')}; true`);

  after(async () => {
    load?.close();
    if (cut) await heal(cut).catch(() => {});
  });

  it('back1 gets 503 while it writes to the old primary; 0 acknowledged lost once healed', { timeout: 300_000 }, async (t) => {
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));
    const primary = await sentinelPrimary(REDIS_HOSTS[1]);
    assert.ok(primary.name, `a Sentinel names a primary (${primary.ip})`);
    const survivors = REDIS_HOSTS.filter((r) => r.name !== primary.name);
    const back1 = BACK_HOSTS[0];

    load = await new Load('system-drill-split').start();
    await load.acknowledgedMore(300);
    const since = (await ssh(back1.name, 'date +%s.%N')).trim();
    const faultAt = Date.now();
    await ssh(primary.name, routes(primary).map((r) => `sudo ip route add ${r}`).join(' && '));
    cut = primary;
    t.diagnostic(`${primary.name} cut off from ${survivors.map((r) => r.name).join(', ')} and ${BACK_HOSTS[1].name} at ${new Date(faultAt).toISOString()}`);

    const promoted = await waitFor('the Sentinels to promote a replica', async () => {
      const named = await sentinelPrimary(survivors[0]);
      return named.ip !== primary.ip ? named : null;
    }, { timeoutMs: 30_000, intervalMs: 200 });
    t.diagnostic(`${promoted.name} promoted ${Date.now() - faultAt} ms after the cut`);
    await load.acknowledgedMore(500, 60_000);
    const outage = load.outage(faultAt);
    t.diagnostic(`posting back ${outage.backAfterMs} ms after the cut (${outage.failedTries} failed tries, retried)`);

    // What back1 did meanwhile, from its journal: 503s, then the new primary.
    const log = await ssh(back1.name, `sudo journalctl -q --no-pager -u 'chat-backend@*' --since=@${since} -o short-unix`);
    const at = (re) => {
      const line = log.split('\n').find((l) => re.test(l));
      return line ? Math.round(Number(line.split(' ')[0]) * 1000) - faultAt : null;
    };
    const first503 = at(/answering 503/);
    const followed = at(new RegExp(`following new Redis primary ${promoted.ip.replace(/\./g, '\\.')}:6379`));
    t.diagnostic(`${back1.name}: first 503 ${first503} ms after the cut, following ${promoted.name} ${followed} ms after it`);
    assert.ok(followed !== null, `${back1.name} follows ${promoted.name}:\n${log.slice(-3000)}`);

    await heal(primary);
    cut = null;
    const role = await waitFor(`${primary.name} to replicate ${promoted.name}`, async () => {
      const r = await redisRole(primary).catch(() => null);
      return r?.[0] === 'slave' && r[1] === promoted.ip && r[3] === 'connected' ? r : null;
    }, { timeoutMs: 60_000, intervalMs: 500 });
    t.diagnostic(`healed: ${primary.name} ${role.join(' ')}`);
    await load.acknowledgedMore(200, 60_000);

    const report = await load.finish('Redis primary cut off', faultAt);
    t.diagnostic(report.line);
    t.diagnostic(`by transport: ${JSON.stringify(report.byTransport)}`);
    assertNothingLost(report);
  });
});

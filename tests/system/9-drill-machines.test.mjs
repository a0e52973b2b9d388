// Drills: a load balancer, a frontend host and a backend host powered off
// in turn (lxc-stop -k: no shutdown, as a power cut), each under load: 200
// clients through the floating address, half over websocket and half over
// long-polling, and more than 100 posts/s, each retried with its
// Idempotency-Key until acknowledged.
//
// - The load balancer holding the floating address: the other one takes the
//   address (target: within 3 s); every client reconnects through it and
//   resumes with `since`.
// - A frontend host: its clients reconnect through HAProxy to the other
//   host's instances and resume.
// - A backend host: posts in flight fail and are retried; HAProxy sends the
//   rest to the other host.
//
// Target for each: 0 acknowledged messages lost, 0 duplicated. Each machine
// is powered on again at the end, and the rig is whole for what follows.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, FRONT_HOSTS, FRONT_INSTANCES, LB, LB_MACHINES, Load, assertNothingLost, currentLb, floatingAddressHolder,
  powerOff, powerOn, request, useLb, waitFor, waitForServers,
} from './lib/rig.mjs';

const TAKEOVER_MS = 3000;
const ALL_UP = () => Object.fromEntries([...FRONT_INSTANCES.map((f) => f.server),
  ...BACK_HOSTS.flatMap((h, i) => [`back${i + 1}-0`, `back${i + 1}-1`])].map((s) => [s, 'UP']));

/** Does the floating address answer HAProxy's health now? */
async function floatingAddressAnswers() {
  try {
    return (await request(`http://${LB}/haproxy-health`, { timeoutMs: 500 })).status === 200;
  } catch {
    return false;
  }
}

describe('drills: machines powered off under load', () => {
  let load;
  const off = new Set();

  after(async () => {
    load?.close();
    for (const name of off) await powerOn(name).catch(() => {});
  });

  it('the load balancer holding the floating address: the other takes it within 3 s; 0 lost, 0 duplicated', { timeout: 300_000 }, async (t) => {
    await waitForServers(ALL_UP());
    const holder = await floatingAddressHolder();
    assert.ok(holder, `a load balancer holds ${LB}`);
    const other = LB_MACHINES.find((m) => m.name !== holder).name;
    load = await new Load('system-drill-lb').start();
    await load.acknowledgedMore(300);

    const faultAt = Date.now();
    await powerOff(holder);
    off.add(holder);
    useLb(other);
    await waitFor(`${LB} to answer again`, floatingAddressAnswers, { timeoutMs: 30_000, intervalMs: 50 });
    const takeoverMs = Date.now() - faultAt;
    assert.equal(await floatingAddressHolder(), other, `${other} holds ${LB}`);
    t.diagnostic(`${holder} powered off; ${other} answers on ${LB} ${takeoverMs} ms later`);

    await load.acknowledgedMore(500, 60_000);
    const outage = load.outage(faultAt);
    t.diagnostic(`posting back ${outage.backAfterMs} ms after the power-off (${outage.failedTries} failed tries, retried)`);
    const report = await load.finish('load balancer powered off', faultAt);
    t.diagnostic(report.line);
    t.diagnostic(`by transport: ${JSON.stringify(report.byTransport)}`);
    assertNothingLost(report);
    assert.ok(takeoverMs <= TAKEOVER_MS, `the other load balancer answers within ${TAKEOVER_MS} ms (${takeoverMs})`);

    // Back on, it does not take the address back (nopreempt): clients are
    // not cut a second time.
    await powerOn(holder);
    off.delete(holder);
    await waitForServers(ALL_UP(), 60_000);
    useLb(holder);
    await waitForServers(ALL_UP(), 60_000);
    useLb(other);
    assert.equal(await floatingAddressHolder(), other, `${other} keeps ${LB}`);
  });

  for (const [kind, host] of [['frontend', FRONT_HOSTS[1].name], ['backend', BACK_HOSTS[1].name]]) {
    it(`a ${kind} host (${host}): 0 lost, 0 duplicated; only posts in flight fail, and are retried`, { timeout: 300_000 }, async (t) => {
      await waitForServers(ALL_UP());
      load = await new Load(`system-drill-${host}`).start();
      await load.acknowledgedMore(300);

      const faultAt = Date.now();
      await powerOff(host);
      off.add(host);
      const down = Object.fromEntries(Object.keys(ALL_UP()).filter((s) => s.startsWith(`${host}-`)).map((s) => [s, 'DOWN']));
      await waitForServers(down, 30_000);
      t.diagnostic(`${host} powered off; HAProxy on ${await currentLb()} took its instances out ${Date.now() - faultAt} ms later`);

      await load.acknowledgedMore(500, 60_000);
      const outage = load.outage(faultAt);
      t.diagnostic(`posting: ${outage.failedTries} failed tries, retried; back ${outage.backAfterMs} ms after the power-off`);
      const report = await load.finish(`${kind} host powered off`, faultAt);
      t.diagnostic(report.line);
    t.diagnostic(`by transport: ${JSON.stringify(report.byTransport)}`);
      assertNothingLost(report);

      await powerOn(host);
      off.delete(host);
      await waitForServers(ALL_UP(), 60_000);
    });
  }
});

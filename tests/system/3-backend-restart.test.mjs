// `systemctl restart chat-backend@0` on back1 during a steady stream of
// POSTs through the load balancer (both domains, round-robin over the 4
// backend instances of back1 and back2): no request fails, and a client in
// the room receives every acknowledged message once, in order. On a failure,
// HAProxy's log lines for the failed requests are printed.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { DOMAIN_1, RigClient, currentLb, postStream, ssh, waitForServers } from './lib/rig.mjs';

const HOST = 'back1';
const UNIT = 'chat-backend@0.service';
const ROOM = `system-restart-${Date.now()}`;

describe(`systemctl restart ${UNIT} on ${HOST} under a stream of POSTs`, () => {
  let client;
  let poster;

  after(async () => {
    await poster?.stop();
    client?.close();
  });

  it('loses no request and no message', async () => {
    await waitForServers({ 'back1-0': 'UP', 'back1-1': 'UP', 'back2-0': 'UP', 'back2-1': 'UP' });
    client = await new RigClient(DOMAIN_1, ROOM, { transports: ['websocket'] }).ready();
    const since = (await ssh(await currentLb(), 'date +%s.%N')).trim();
    const before = (await ssh(HOST, `systemctl show -P MainPID ${UNIT}`)).trim();

    // 4 posters, each with one request in flight at a time, 20 ms apart:
    // posting before the restart, during it, and on (round-robin over the 4
    // instances: about a quarter of the posts after it reach the restarted
    // one).
    poster = postStream(ROOM, { intervalMs: 20, concurrency: 4 });
    await poster.acknowledgedMore(60);
    const sentBefore = poster.sent;
    const t0 = Date.now();
    await ssh(HOST, `sudo systemctl restart ${UNIT}`);
    const restartMs = Date.now() - t0;
    await poster.acknowledgedMore(80);
    await poster.stop();

    const afterPid = (await ssh(HOST, `systemctl show -P MainPID ${UNIT}; systemctl is-active ${UNIT}`)).trim().split('\n');
    assert.notEqual(afterPid[0], before, 'a new process');
    assert.equal(afterPid[1], 'active');
    const total = poster.acked.length + poster.failed.length;
    console.log(`# ${total} POSTs (${poster.sent - sentBefore} from the restart on; the restart command took ${restartMs} ms), ${poster.failed.length} failed`);
    if (poster.failed.length) {
      const log = await ssh(await currentLb(), `sudo journalctl -q --no-pager -u haproxy --since=@${since} -o cat | grep -v ' 201 ' | tail -20`);
      console.log(`# failures: ${JSON.stringify(poster.failed.slice(0, 10))}\n# HAProxy log (not 201):\n${log.replace(/^/gm, '#   ')}`);
    }
    assert.deepEqual(poster.failed, [], 'every POST answered 201');

    const ids = poster.acked.map((m) => m.id);
    await client.waitForIds(ids, 15_000);
    assert.deepEqual(client.duplicates, []);
    assert.deepEqual(client.outOfOrder, []);
    assert.equal(client.messages.length, ids.length);
  });
});

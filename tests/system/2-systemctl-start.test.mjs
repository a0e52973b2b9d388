// An administrator on a frontend host: `systemctl stop` then `systemctl
// start chat-frontend@1` on front2 (starting the service brings its socket
// up too); the instance comes back into HAProxy's rotation and serves clients
// through the load balancer; `journalctl -u chat-frontend@1` shows its lines,
// each with its syslog priority.

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  DOMAIN_2, FRONT_INSTANCES, Spreader, frontStatus, post, ssh, waitFor, waitForServers,
} from './lib/rig.mjs';

const INST = FRONT_INSTANCES.find((f) => f.server === 'front2-1');
const UNIT = `chat-frontend@${INST.instance}`;
const ROOM = `system-start-${Date.now()}`;

describe(`systemctl start ${UNIT} on ${INST.host}`, () => {
  const spread = new Spreader(ROOM);
  let startedAt;

  after(async () => {
    spread.close();
    // Leave the instance running for the next tests, whatever happened.
    await ssh(INST.host, `sudo systemctl start ${UNIT}`).catch(() => {});
  });

  it('stops the instance and its socket: the port closes, HAProxy marks it DOWN', async () => {
    await ssh(INST.host, `sudo systemctl stop ${UNIT}.socket ${UNIT}.service`);
    const state = await ssh(INST.host, `systemctl is-active ${UNIT}.socket ${UNIT}.service || true`);
    assert.deepEqual(state.trim().split('\n'), ['inactive', 'inactive']);
    assert.equal(await frontStatus(INST), null, `${INST.ip}:${INST.port} no longer answers`);
    await waitForServers({ [INST.server]: 'DOWN' });
  });

  it(`systemctl start ${UNIT} starts it, socket included; HAProxy marks it UP`, async () => {
    // The journal's clock is the machines' (the host's): from here on.
    startedAt = (await ssh(INST.host, 'date +%s.%N')).trim();
    await ssh(INST.host, `sudo systemctl start ${UNIT}`);
    const state = await ssh(INST.host, `systemctl is-active ${UNIT}.socket ${UNIT}.service`);
    assert.deepEqual(state.trim().split('\n'), ['active', 'active']);
    // It answers at once; it reaches Redis once it has asked the Sentinels
    // which server is the primary.
    const status = await waitFor(`${INST.ip}:${INST.port}/front/status to say Redis is up`, async () => {
      const s = await frontStatus(INST);
      return s?.redis === 'up' ? s : null;
    });
    assert.equal(status.instance, INST.instance);
    assert.equal(status.status, 'ok');
    await waitForServers({ [INST.server]: 'UP' });
  });

  it('serves clients through the load balancer', async () => {
    // Round-robin over the 4 instances: new polling clients until one lands on it.
    const mine = await spread.until({ domain: DOMAIN_2, transports: ['polling'] }, (c) => c.server === INST.server, `on ${INST.server}`);
    assert.equal(mine.stickyCookie, INST.server, 'its sticky cookie names the instance');
    assert.ok((await frontStatus(INST)).connections >= 1);
    const res = await post(ROOM, 'to the restarted instance', DOMAIN_2);
    assert.equal(res.status, 201, res.text);
    await Promise.all(spread.clients.map((c) => c.waitForIds([res.json.id])));
    assert.deepEqual(mine.messages.map((m) => m.message), ['to the restarted instance']);
  });

  it(`journalctl -u ${UNIT} shows the new instance's lines with their priorities`, async () => {
    const out = await ssh(INST.host,
      `sudo journalctl -q --no-pager -u ${UNIT} --since=@${startedAt} -o json --output-fields=PRIORITY,SYSLOG_IDENTIFIER,MESSAGE,_SYSTEMD_UNIT`);
    const entries = out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
    const daemon = entries.filter((e) => e.SYSLOG_IDENTIFIER === 'chat-frontend');
    assert.ok(daemon.length > 0, `chat-frontend lines in the journal since the start: ${out}`);
    for (const e of daemon) {
      assert.match(String(e.PRIORITY), /^[0-7]$/, `a priority on ${JSON.stringify(e)}`);
      assert.equal(e._SYSTEMD_UNIT, `${UNIT}.service`);
    }
    // A filter by priority works: `-p info` has the daemon's lines, nothing at warning or worse.
    const info = await ssh(INST.host, `sudo journalctl -q --no-pager -u ${UNIT} --since=@${startedAt} -p info -t chat-frontend -o cat`);
    assert.ok(info.trim().split('\n').length >= 1, info);
    const warnings = await ssh(INST.host, `sudo journalctl -q --no-pager -u ${UNIT} --since=@${startedAt} -p warning -t chat-frontend -o cat`);
    assert.equal(warnings.trim(), '', 'no warning or error since the start');
    // The unit's own start line, from systemd.
    assert.ok(entries.some((e) => /^Started /.test(e.MESSAGE ?? '')), 'systemd logged the start');
  });
});

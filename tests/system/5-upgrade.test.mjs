// A package upgrade of chat-frontend on front1 under load: a newer build
// (the installed .deb repacked here with a bumped version, put under
// target/rig/, which the machines see at /vagrant/target/rig/) installed
// with apt while messages are posted all the time and clients of both
// transports are connected to every frontend instance. The postinst restarts
// the instances one at a time, each draining first: their clients reconnect
// and resume with `since`. No request fails, and every client receives every
// acknowledged message once, in order; the new version is installed and its
// instances run (new processes).

import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import {
  FRONT_INSTANCES, Spreader, deliveryCounts, postStream, spreadOverAll, ssh, waitForServers,
} from './lib/rig.mjs';

const run = promisify(execFile);
const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const HOST = 'front1';
const PACKAGE = 'chat-frontend';
const ROOM = `system-upgrade-${Date.now()}`;
// tests/rig/up.sh copies the packages the machines install to target/rig/pkgs.
const PKGS = path.join(REPO, 'target/rig/pkgs');
const DRILL = path.join(REPO, 'target/rig/drill');

/** The active chat-frontend@N.service units of HOST: {unit: MainPID}. */
async function instancePids() {
  const out = await ssh(HOST, `for u in $(systemctl list-units --plain --no-legend --state=active '${PACKAGE}@*.service' | cut -d' ' -f1); do echo "$u $(systemctl show -P MainPID "$u")"; done`);
  return Object.fromEntries(out.trim().split('\n').filter(Boolean).map((l) => l.split(' ')));
}

/**
 * Repacks `deb` with Version `version` into DRILL (dpkg-deb -R, edit
 * DEBIAN/control, dpkg-deb -b); resolves to the new file's path.
 */
async function repack(deb, version) {
  fs.mkdirSync(DRILL, { recursive: true });
  const tree = fs.mkdtempSync(path.join(DRILL, 'tree-'));
  try {
    await run('dpkg-deb', ['-R', deb, tree]);
    const control = path.join(tree, 'DEBIAN/control');
    const text = fs.readFileSync(control, 'utf8');
    assert.match(text, /^Version: .*$/m);
    fs.writeFileSync(control, text.replace(/^Version: .*$/m, `Version: ${version}`));
    const out = path.join(DRILL, `${PACKAGE}_${version}_amd64.deb`);
    await run('dpkg-deb', ['--root-owner-group', '-b', tree, out], { maxBuffer: 16 << 20 });
    return out;
  } finally {
    fs.rmSync(tree, { recursive: true, force: true });
  }
}

describe(`apt-get install of a newer ${PACKAGE} on ${HOST} under a stream of POSTs`, () => {
  const spread = new Spreader(ROOM, { reconnect: true });
  let poster;
  let newDeb;

  after(async () => {
    await poster?.stop();
    spread.close();
    if (newDeb) fs.rmSync(newDeb, { force: true });
  });

  it('restarts its instances one at a time: no failed request, nothing lost or repeated', { timeout: 240_000 }, async (t) => {
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));

    // The newer build: the installed one with a higher version.
    const installed = (await ssh(HOST, `dpkg-query -W -f='\${Version}' ${PACKAGE}`)).trim();
    const debs = fs.readdirSync(PKGS).filter((f) => f.startsWith(`${PACKAGE}_`) && f.endsWith('.deb'));
    assert.equal(debs.length, 1, `one ${PACKAGE} .deb in ${PKGS}: ${debs}`);
    const base = (await run('dpkg-deb', ['-f', path.join(PKGS, debs[0]), 'Version'])).stdout.trim();
    const version = `${base}+drill${Math.floor(Date.now() / 1000)}`;
    await run('dpkg', ['--compare-versions', version, 'gt', installed]); // rejects if not newer
    newDeb = await repack(path.join(PKGS, debs[0]), version);
    const inMachine = `/vagrant/${path.relative(REPO, newDeb)}`;
    t.diagnostic(`${PACKAGE} ${installed} installed on ${HOST}; upgrading to ${version} (${inMachine})`);

    // Clients of both transports and domains on every instance.
    await spreadOverAll(spread);
    const clients = spread.clients;
    t.diagnostic(`${clients.length} clients: ${spread.landing()}`);
    const upgraded = clients.filter((c) => c.host === HOST);
    assert.deepEqual([...new Set(upgraded.map((c) => c.transports[0]))].sort(), ['polling', 'websocket']);

    const before = await instancePids();
    assert.equal(Object.keys(before).length, FRONT_INSTANCES.filter((f) => f.host === HOST).length,
      `every instance of ${HOST} active: ${JSON.stringify(before)}`);

    poster = postStream(ROOM, { intervalMs: 20 });
    await poster.acknowledgedMore(50);
    const t0 = Date.now();
    const apt = await ssh(HOST, 'sudo env DEBIAN_FRONTEND=noninteractive apt-get -o Dir::Etc::SourceList=/dev/null '
      + `-o Dir::Etc::SourceParts=/dev/null -o APT::Sandbox::User=root install -y -q ${inMachine} 2>&1`,
    { timeoutMs: 180_000 });
    const aptMs = Date.now() - t0;
    t.diagnostic(`apt-get install took ${aptMs} ms:\n${apt.trim().split("\n").filter((l) => !l.startsWith("(Reading")).slice(-5).map((l) => `  ${l}`).join('\n')}`);
    await poster.acknowledgedMore(75); // posting on, to the restarted instances
    await poster.stop();

    // The new version, its instances running as new processes.
    assert.equal((await ssh(HOST, `dpkg-query -W -f='\${Version} \${db:Status-Abbrev}' ${PACKAGE}`)).trim(), `${version} ii`);
    const afterPids = await instancePids();
    assert.deepEqual(Object.keys(afterPids).sort(), Object.keys(before).sort(), 'the same instances active');
    for (const [unit, pid] of Object.entries(afterPids)) {
      assert.notEqual(pid, before[unit], `${unit} restarted (MainPID ${before[unit]} -> ${pid})`);
      assert.notEqual(pid, '0', `${unit} runs`);
    }
    t.diagnostic(`MainPIDs ${JSON.stringify(before)} -> ${JSON.stringify(afterPids)}`);

    // Every acknowledged message once, in order, for every client.
    const ids = poster.acked.map((m) => m.id);
    await Promise.all(clients.map((c) => c.waitForIds(ids, 20_000).catch(() => {})));
    const report = deliveryCounts('upgrade', poster, clients);
    t.diagnostic(report.line);
    t.diagnostic(`disconnects on ${HOST}: ${upgraded.map((c) => `${c.name} (${c.server}): ${c.disconnects}`).join('; ')}`);
    if (poster.failed.length) t.diagnostic(`failures: ${JSON.stringify(poster.failed.slice(0, 10))}`);
    assert.deepEqual(poster.failed, [], 'every POST answered 201');
    for (const c of report.perClient) {
      assert.deepEqual(c.received, report.ackedIds, `${c.name}: every acknowledged message once, in order (lost ${c.lost.length}: ${c.lost.slice(0, 5)})`);
      assert.equal(c.duplicated, 0, `${c.name}: nothing twice`);
      assert.equal(c.outOfOrder, 0, `${c.name}: nothing out of order`);
    }
    assert.equal(report.lost, 0);
    assert.equal(report.duplicated, 0);
    for (const c of upgraded) assert.ok(c.connectCount >= 2, `${c.name} on ${c.server} reconnected (${c.disconnects})`);
    for (const c of clients.filter((x) => x.host !== HOST)) {
      assert.equal(c.connectCount, 1, `${c.name} on ${c.server} kept its connection`);
    }
    await waitForServers(Object.fromEntries(FRONT_INSTANCES.map((f) => [f.server, 'UP'])));
  });
});

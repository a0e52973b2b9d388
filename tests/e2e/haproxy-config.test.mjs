// The packaged HAProxy configuration, checked by HAProxy itself: alone (with
// the global section a host provides), after Debian's own haproxy.cfg, and as
// the topology rewrites it for a test cluster.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { DOMAINS_LST, HAPROXY_CFG, INTERNAL_LST, ORIGINS_LST, REPO, haproxyConfig, haproxyGlobal } from './lib/topology.mjs';

const DEBIAN_CFG = '/etc/haproxy/haproxy.cfg';

/** Runs `haproxy -c` on the files; returns {status, output}. */
function check(...files) {
  const result = spawnSync('haproxy', ['-c', ...files.flatMap((f) => ['-f', f])], { encoding: 'utf8' });
  if (result.error) throw result.error;
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

/** The entries of a pattern file: its lines without comments and blank lines. */
function entries(file) {
  return fs.readFileSync(file, 'utf8').split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
}

/** The server lines of one backend section: [[name, address], ...]. */
function servers(text, backend) {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => l.trim() === `backend ${backend}`);
  assert.ok(start >= 0, `backend ${backend} in ${HAPROXY_CFG}`);
  const result = [];
  for (const line of lines.slice(start + 1)) {
    if (/^[^\s#]/.test(line)) break;
    const words = line.trim().split(/\s+/);
    if (words[0] === 'server') result.push([words[1], words[2]]);
  }
  return result;
}

describe('etc/haproxy/chat-ha.cfg', () => {
  let tmp;
  let cfg;
  let globalCfg;
  const packaged = fs.readFileSync(HAPROXY_CFG, 'utf8');

  before(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-ha-haproxy-check-'));
    // As packaged, except that the lists are the repository's copies.
    const lists = { domains: DOMAINS_LST, origins: ORIGINS_LST, internal: INTERNAL_LST };
    cfg = path.join(tmp, 'chat-ha.cfg');
    fs.writeFileSync(cfg, packaged.replace(/(-f\s+)\/etc\/haproxy\/chat-ha-(domains|origins|internal)\.lst/g, (_, f, list) => `${f}${lists[list]}`));
    globalCfg = path.join(tmp, 'global.cfg');
    fs.writeFileSync(globalCfg, haproxyGlobal({ statsSocket: path.join(tmp, 'stats.sock') }));
  });

  after(() => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('reads its domains from chat-ha-domains.lst, which lists the four served names', () => {
    assert.match(packaged, /-f\s+\S*\/chat-ha-domains\.lst/);
    const domains = fs.readFileSync(DOMAINS_LST, 'utf8').split('\n').filter((l) => l.trim() !== '');
    assert.deepEqual(domains, ['localhost', '127.0.0.1', 'www.node-services-1.com', 'www.node-services-2.com']);
  });

  it('reads the allowed origins from chat-ha-origins.lst: http:// and https:// of every served name', () => {
    assert.match(packaged, /-f\s+\/etc\/haproxy\/chat-ha-origins\.lst/);
    const expected = entries(DOMAINS_LST).flatMap((d) => [`http://${d}`, `https://${d}`]);
    assert.deepEqual(entries(ORIGINS_LST), expected);
  });

  it('reads the internal networks from chat-ha-internal.lst, which holds loopback only', () => {
    assert.match(packaged, /src\s+-f\s+\/etc\/haproxy\/chat-ha-internal\.lst/);
    assert.deepEqual(entries(INTERNAL_LST), ['127.0.0.0/8', '::1']);
    assert.doesNotMatch(packaged, /\b(10\.0\.0\.0\/8|172\.16\.0\.0\/12|192\.168\.0\.0\/16)\b/, 'no private range is trusted in the file itself');
  });

  it('is packaged in chat-haproxy with its three lists', () => {
    const install = fs.readFileSync(path.join(REPO, 'debian', 'chat-haproxy.install'), 'utf8');
    for (const file of ['chat-ha.cfg', 'chat-ha-domains.lst', 'chat-ha-origins.lst', 'chat-ha-internal.lst']) {
      assert.match(install, new RegExp(`^etc/haproxy/${file.replace(/\./g, '\\.')} etc/haproxy/$`, 'm'), file);
    }
  });

  it('has one frontend and the backends chat_front and chat_back, with a server per instance 0..15', () => {
    const sections = packaged.split('\n').filter((l) => /^[^\s#]/.test(l)).map((l) => l.trim());
    assert.equal(sections.filter((s) => s.startsWith('frontend ')).length, 1, `sections: ${sections}`);
    assert.ok(sections.includes('backend chat_front'), `sections: ${sections}`);
    assert.ok(sections.includes('backend chat_back'), `sections: ${sections}`);
    const ports = (base) => Array.from({ length: 16 }, (_, n) => `127.0.0.1:${base + n}`);
    assert.deepEqual(servers(packaged, 'chat_front').map(([, a]) => a), ports(9100));
    assert.deepEqual(servers(packaged, 'chat_back').map(([, a]) => a), ports(9200));
  });

  it('is valid for haproxy -c, without a warning, with a global section', () => {
    const { status, output } = check(globalCfg, cfg);
    assert.equal(status, 0, output);
    assert.match(output, /Configuration file is valid/);
    assert.doesNotMatch(output, /\[(WARNING|ALERT)\]/, output);
  });

  it('is valid after Debian\'s haproxy.cfg, without a warning', () => {
    assert.ok(fs.existsSync(DEBIAN_CFG), `${DEBIAN_CFG}, from Debian's haproxy package, is needed for this test`);
    const { status, output } = check(DEBIAN_CFG, cfg);
    assert.equal(status, 0, output);
    assert.doesNotMatch(output, /\[(WARNING|ALERT)\]/, output);
  });

  it('is valid as the test topology rewrites it (listening port, one server per instance)', () => {
    const rewritten = haproxyConfig({ port: 18080, frontendPorts: [18100, 18101, 18102], backendPorts: [18200] });
    assert.deepEqual(servers(rewritten, 'chat_front'), [['front0', '127.0.0.1:18100'], ['front1', '127.0.0.1:18101'], ['front2', '127.0.0.1:18102']]);
    assert.deepEqual(servers(rewritten, 'chat_back'), [['back0', '127.0.0.1:18200']]);
    assert.match(rewritten, /cookie front2/);
    const file = path.join(tmp, 'rewritten.cfg');
    fs.writeFileSync(file, rewritten);
    const { status, output } = check(globalCfg, file);
    assert.equal(status, 0, output);
    assert.doesNotMatch(output, /\[(WARNING|ALERT)\]/, output);
  });
});

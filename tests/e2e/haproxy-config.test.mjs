// The packaged HAProxy configuration, checked by HAProxy itself: alone (with
// the global section a host provides), after Debian's own haproxy.cfg, and as
// the topology rewrites it for a test cluster; and its servers, which
// chat-ha-servers adds from chat-ha-servers.lst: one per instance that
// chat-ha-generator starts, on any count or set of CPUs.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { DOMAINS_LST, HAPROXY_CFG, INTERNAL_LST, ORIGINS_LST, REPO, haproxyConfig, haproxyGlobal } from './lib/topology.mjs';

const DEBIAN_CFG = '/etc/haproxy/haproxy.cfg';
const SERVERS_LST = path.join(REPO, 'etc', 'haproxy', 'chat-ha-servers.lst');
const CHAT_HA_SERVERS = path.join(REPO, 'debian', 'haproxy-dropin', 'chat-ha-servers');
const DROPIN = path.join(REPO, 'debian', 'haproxy-dropin', 'chat-ha.conf');
const GENERATOR = path.join(REPO, 'systemd', 'chat-ha-generator');
// Variables that choose the CPUs both scripts count; the tests set their own.
const CPU_VARS = ['CHAT_HA_CPUS', 'CHAT_HA_NPROC'];

/** Runs `haproxy -c` on the files; returns {status, output}. */
function check(...files) {
  const result = spawnSync('haproxy', ['-c', ...files.flatMap((f) => ['-f', f])], { encoding: 'utf8' });
  if (result.error) throw result.error;
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

/** The lines of section `name` (e.g. 'backend chat_front') of `text`, trimmed, without comments and blank lines. */
function section(text, name) {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => l.trim() === name);
  assert.ok(start >= 0, `${name} in ${HAPROXY_CFG}`);
  const end = lines.findIndex((l, i) => i > start && /^[^\s#]/.test(l));
  return lines.slice(start + 1, end < 0 ? undefined : end).map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
}

/** The entries of a pattern file: its lines without comments and blank lines. */
function entries(file) {
  return fs.readFileSync(file, 'utf8').split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
}

/** The server lines of one backend section: [[name, address, options], ...]. */
function servers(text, backend) {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => l.trim() === `backend ${backend}`);
  assert.ok(start >= 0, `backend ${backend} in ${HAPROXY_CFG}`);
  const result = [];
  for (const line of lines.slice(start + 1)) {
    if (/^[^\s#]/.test(line)) break;
    const words = line.trim().split(/\s+/);
    if (words[0] === 'server') result.push([words[1], words[2], words.slice(3).join(' ')]);
  }
  return result;
}

/** The environment without the variables that choose CPUs, plus `extra`. */
function cpuEnv(extra = {}) {
  const env = { ...process.env, ...extra };
  for (const name of CPU_VARS) if (!(name in extra)) delete env[name];
  return env;
}

/**
 * Runs chat-ha-servers LIST CONFIG OUTPUT with the CPU variables of `env`;
 * returns {status, stdout, stderr}.
 */
function chatHaServers(list, config, output, env = {}) {
  const result = spawnSync('sh', [CHAT_HA_SERVERS, list, config, output], { encoding: 'utf8', env: cpuEnv(env) });
  if (result.error) throw result.error;
  return result;
}

/** The [name, address, options] a list line of INSTANCES expands to. */
function expected(host, address, firstPort, instances, { cookie }) {
  return Array.from({ length: instances }, (_, n) => {
    const name = `${host}-${n}`;
    return [name, `${address}:${firstPort + n}`, cookie ? `check cookie ${name}` : 'check'];
  });
}

/**
 * Runs systemd/chat-ha-generator as systemd would, with daemons that print
 * the packaged configuration's network, and returns the address each of
 * its instances listens on: {frontend: ['127.0.0.1:9100', ...], backend: [...]}.
 */
function generatorInstances(tmp, env) {
  const bin = path.join(tmp, 'bin');
  const out = fs.mkdtempSync(path.join(tmp, 'generated-'));
  fs.mkdirSync(bin, { recursive: true });
  for (const [daemon, port] of [['frontend', 9100], ['backend', 9200]]) {
    fs.writeFileSync(path.join(bin, `chat-${daemon}`),
      `#!/bin/sh\nprintf 'address 127.0.0.1\\nport ${port}\\nallow 127.0.0.0/8 ::1/128\\n'\n`, { mode: 0o755 });
  }
  const result = spawnSync('dash', [GENERATOR, out], {
    encoding: 'utf8', env: cpuEnv({ ...env, CHAT_HA_BIN_DIR: bin, CHAT_HA_UNIT_DIRS: path.join(tmp, 'no-units') }),
  });
  if (result.error) throw result.error;
  assert.equal(result.status, 0, result.stderr);
  const listening = {};
  for (const daemon of ['frontend', 'backend']) {
    listening[daemon] = [];
    for (let n = 0; ; n++) {
      const dropin = path.join(out, `chat-${daemon}@${n}.socket.d`, '50-chat-ha-listen.conf');
      if (!fs.existsSync(dropin)) break;
      listening[daemon].push(fs.readFileSync(dropin, 'utf8').match(/^ListenStream=(.*)$/m)[1]);
    }
  }
  return listening;
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

  it('is packaged in chat-haproxy with its four lists and chat-ha-servers', () => {
    const install = fs.readFileSync(path.join(REPO, 'debian', 'chat-haproxy.install'), 'utf8');
    for (const file of ['chat-ha.cfg', 'chat-ha-domains.lst', 'chat-ha-origins.lst', 'chat-ha-internal.lst', 'chat-ha-servers.lst']) {
      assert.match(install, new RegExp(`^etc/haproxy/${file.replace(/\./g, '\\.')} etc/haproxy/$`, 'm'), file);
    }
    assert.match(install, /^debian\/haproxy-dropin\/chat-ha-servers usr\/lib\/chat-haproxy\/$/m);
    assert.ok(fs.statSync(CHAT_HA_SERVERS).mode & 0o111, `${CHAT_HA_SERVERS} is executable`);
  });

  it('has one frontend and the backends chat_front and chat_back, with no server line of their own', () => {
    const sections = packaged.split('\n').filter((l) => /^[^\s#]/.test(l)).map((l) => l.trim());
    assert.equal(sections.filter((s) => s.startsWith('frontend ')).length, 1, `sections: ${sections}`);
    assert.ok(sections.includes('backend chat_front'), `sections: ${sections}`);
    assert.ok(sections.includes('backend chat_back'), `sections: ${sections}`);
    assert.deepEqual(servers(packaged, 'chat_front'), []);
    assert.deepEqual(servers(packaged, 'chat_back'), []);
  });

  it('keeps a long-polling client on its instance by cookie, or by session id where it keeps no cookie; new clients round-robin', () => {
    // What v2-clients.test.mjs shows working end to end, kept here as the
    // lines that do it, so that an edit of the section sees what it must keep.
    const lines = section(packaged, 'backend chat_front');
    const has = (re, what) => assert.ok(lines.some((l) => re.test(l)), `backend chat_front: ${what}`);
    has(/^balance roundrobin$/, 'new clients round-robin (not by source address)');
    has(/^cookie chat_front insert indirect nocache httponly$/, 'the sticky cookie, inserted');
    has(/^stick-table type string len \d+ size \S+ expire \S+$/, 'a table of session ids');
    has(/^stick store-response "res\.body,field\(4,'\\"'\)" if \{ var\(txn\.polling_open\) -m bool \} \{ status 200 \}$/,
      'the session id of a long-polling handshake\'s answer, stored');
    has(/^stick match url_param\(sid\) if has_sid !has_cookie$/, 'a request with a sid and no cookie routed by it');
    has(/^option redispatch 1$/, 'redispatch, on every retry');
    has(/^retry-on conn-failure empty-response$/, 'retry-on');
    has(/^http-check send meth GET uri \/front\/status /, 'the health check');
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
    assert.deepEqual(servers(rewritten, 'chat_front'), [
      ['front0', '127.0.0.1:18100', 'check cookie front0'],
      ['front1', '127.0.0.1:18101', 'check cookie front1'],
      ['front2', '127.0.0.1:18102', 'check cookie front2'],
    ]);
    assert.deepEqual(servers(rewritten, 'chat_back'), [['back0', '127.0.0.1:18200', 'check']]);
    const file = path.join(tmp, 'rewritten.cfg');
    fs.writeFileSync(file, rewritten);
    const { status, output } = check(globalCfg, file);
    assert.equal(status, 0, output);
    assert.doesNotMatch(output, /\[(WARNING|ALERT)\]/, output);
  });
});

describe('chat-ha-servers: a server per instance, as chat-ha-servers.lst lists them', () => {
  let tmp;
  let cfg;
  let globalCfg;

  before(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-ha-servers-check-'));
    const lists = { domains: DOMAINS_LST, origins: ORIGINS_LST, internal: INTERNAL_LST };
    cfg = path.join(tmp, 'chat-ha.cfg');
    fs.writeFileSync(cfg, fs.readFileSync(HAPROXY_CFG, 'utf8')
      .replace(/(-f\s+)\/etc\/haproxy\/chat-ha-(domains|origins|internal)\.lst/g, (_, f, list) => `${f}${lists[list]}`));
    globalCfg = path.join(tmp, 'global.cfg');
    fs.writeFileSync(globalCfg, haproxyGlobal({ statsSocket: path.join(tmp, 'stats.sock') }));
  });

  after(() => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** Writes a list file of these lines; returns its path. */
  const list = (name, lines) => {
    const file = path.join(tmp, name);
    fs.writeFileSync(file, lines.map((l) => `${l}\n`).join(''));
    return file;
  };

  it('is run by haproxy.service before HAProxy starts and on every reload, and HAProxy loads what it writes', () => {
    const dropin = fs.readFileSync(DROPIN, 'utf8');
    const values = (key) => dropin.split('\n').filter((l) => l.startsWith(`${key}=`)).map((l) => l.slice(key.length + 1));
    const written = '/run/chat-haproxy/chat-ha.cfg';
    const run = `/usr/lib/chat-haproxy/chat-ha-servers /etc/haproxy/chat-ha-servers.lst /etc/haproxy/chat-ha.cfg ${written}`;
    assert.deepEqual(values('RuntimeDirectory'), ['chat-haproxy']);
    assert.deepEqual(values('ExecStartPre'), [run]);
    assert.deepEqual(values('ExecStart'), ['', `/usr/sbin/haproxy -Ws -f $CONFIG -f ${written} -p $PIDFILE $EXTRAOPTS`]);
    assert.deepEqual(values('ExecReload'), ['', run, `/usr/sbin/haproxy -Ws -f $CONFIG -f ${written} -c -q $EXTRAOPTS`, '/bin/kill -USR2 $MAINPID']);
  });

  it('ships a list of this host\'s instances, as many as it has CPUs', () => {
    assert.deepEqual(entries(SERVERS_LST).map((l) => l.split(/\s+/)), [
      ['chat-frontend', 'local', '127.0.0.1:9100', 'auto'],
      ['chat-backend', 'local', '127.0.0.1:9200', 'auto'],
    ]);
  });

  it('with 64 CPUs: 64 servers in each backend, instance N on port 9100+N / 9200+N; valid for haproxy -c, without a warning', () => {
    const out = path.join(tmp, 'cpus-64.cfg');
    const result = chatHaServers(SERVERS_LST, cfg, out, { CHAT_HA_NPROC: '64' });
    assert.equal(result.status, 0, result.stderr);
    assert.equal(result.stderr, '');
    const text = fs.readFileSync(out, 'utf8');
    assert.deepEqual(servers(text, 'chat_front'), expected('local', '127.0.0.1', 9100, 64, { cookie: true }));
    assert.deepEqual(servers(text, 'chat_back'), expected('local', '127.0.0.1', 9200, 64, { cookie: false }));
    // Everything else as packaged.
    assert.equal(text.split('\n').filter((l) => !/^\s+(server |# The instances of )/.test(l)).join('\n'), fs.readFileSync(cfg, 'utf8'));
    for (const files of [[globalCfg, out], [DEBIAN_CFG, out]]) {
      const { status, output } = check(...files);
      assert.equal(status, 0, output);
      assert.doesNotMatch(output, /\[(WARNING|ALERT)\]/, output);
    }
  });

  it('lists exactly the instances chat-ha-generator starts, on 64 CPUs, on CPUs 0,2,5-7, on 128 and on this machine', () => {
    for (const env of [{ CHAT_HA_NPROC: '64' }, { CHAT_HA_CPUS: '0,2,5-7' }, { CHAT_HA_NPROC: '128' }, {}]) {
      const instances = generatorInstances(tmp, env);
      const result = chatHaServers(SERVERS_LST, cfg, '-', env);
      assert.equal(result.status, 0, result.stderr);
      const label = JSON.stringify(env);
      assert.deepEqual(servers(result.stdout, 'chat_front').map(([, a]) => a), instances.frontend, label);
      assert.deepEqual(servers(result.stdout, 'chat_back').map(([, a]) => a), instances.backend, label);
    }
    // The three simulated sets, seen from both sides: 64, 5 and (at most) 100.
    assert.equal(generatorInstances(tmp, { CHAT_HA_CPUS: '0,2,5-7' }).frontend.length, 5);
    assert.equal(generatorInstances(tmp, { CHAT_HA_NPROC: '128' }).backend.length, 100);
  });

  it('several hosts: servers named HOST-N in the order of the list, after a server line of the file itself; valid for haproxy -c', () => {
    const hosts = list('hosts.lst', [
      '# the chat hosts',
      'chat-frontend  web1  10.0.0.11:9100  2   # two CPUs',
      'chat-frontend  web2  [fd00::12]:9300 3',
      'chat-backend   api1  10.0.0.21:9200  1',
      'chat-backend   spare api.example.invalid:8000',
      '',
    ]);
    const own = path.join(tmp, 'own-server.cfg');
    fs.writeFileSync(own, fs.readFileSync(cfg, 'utf8').replace(/^(backend chat_back\n(?:.*\n)*?    default-server .*\n)/m, '$1    server old 10.0.0.99:9200 check backup\n'));
    const out = path.join(tmp, 'hosts.cfg');
    const result = chatHaServers(hosts, own, out);
    assert.equal(result.status, 0, result.stderr);
    const text = fs.readFileSync(out, 'utf8');
    assert.deepEqual(servers(text, 'chat_front'), [
      ...expected('web1', '10.0.0.11', 9100, 2, { cookie: true }),
      ...expected('web2', '[fd00::12]', 9300, 3, { cookie: true }),
    ]);
    assert.deepEqual(servers(text, 'chat_back'), [
      ['old', '10.0.0.99:9200', 'check backup'],
      ...expected('api1', '10.0.0.21', 9200, 1, { cookie: false }),
      ['spare', 'api.example.invalid:8000', 'check'],
    ]);
    // A name HAProxy cannot resolve would stop it: check with an address.
    const resolvable = path.join(tmp, 'hosts-resolvable.cfg');
    fs.writeFileSync(resolvable, text.replace('api.example.invalid:8000', '127.0.0.1:8000'));
    const { status, output } = check(globalCfg, resolvable);
    assert.equal(status, 0, output);
    assert.doesNotMatch(output, /\[(WARNING|ALERT)\]/, output);
  });

  it('a bad list: nothing written, the file and line of the fault on stderr, status 1', () => {
    const out = path.join(tmp, 'kept.cfg');
    const cases = [
      ['chat-frontend web1 10.0.0.11', /:2: "10\.0\.0\.11" is not ADDRESS:PORT/],
      ['chat-frontend web1 10.0.0.11:9100 0', /:2: "0" is neither a number of instances/],
      ['chat-frontend web1 10.0.0.11:65535 2', /:2: 2 instances from port 65535 run past 65535/],
      ['frontend web1 10.0.0.11:9100 2', /:2: "frontend" is neither chat-frontend nor chat-backend/],
      ['chat-backend a;b 10.0.0.11:9100', /:2: the name "a;b" has characters/],
      ['chat-backend local 10.0.0.11:9199', /:2: a second chat-backend named local/],
    ];
    for (const [line, why] of cases) {
      fs.writeFileSync(out, 'as before\n');
      const bad = list('bad.lst', ['chat-backend local 127.0.0.1:9199', line]);
      const result = chatHaServers(bad, cfg, out, { CHAT_HA_NPROC: '4' });
      assert.equal(result.status, 1, line);
      assert.match(result.stderr, why, line);
      assert.equal(fs.readFileSync(out, 'utf8'), 'as before\n', line);
    }
    const result = chatHaServers(SERVERS_LST, cfg, out, { CHAT_HA_NPROC: 'many' });
    assert.equal(result.status, 1);
    assert.match(result.stderr, /cannot count the CPUs of this host for "auto": give a number/);
  });

  it('a configuration without backend chat_front: nothing written, status 1', () => {
    const out = path.join(tmp, 'kept-too.cfg');
    fs.writeFileSync(out, 'as before\n');
    const noFront = path.join(tmp, 'no-front.cfg');
    fs.writeFileSync(noFront, fs.readFileSync(cfg, 'utf8').replace(/^backend chat_front$/m, 'backend chat_elsewhere'));
    const result = chatHaServers(SERVERS_LST, noFront, out, { CHAT_HA_NPROC: '2' });
    assert.equal(result.status, 1);
    assert.match(result.stderr, /has no backend chat_front/);
    assert.equal(fs.readFileSync(out, 'utf8'), 'as before\n');
  });
});

// The rig is the topology the Vagrantfile describes: each machine has the
// packages of its role and runs what they start; Redis (chat-redis) is
// bound to its rig address with AOF on and protected mode on on each redis
// machine, redis1 the primary and the others its replicas, and every
// Sentinel names redis1; HAProxy on lb1 and lb2 has one server per instance
// per host, all UP, and one of them holds the floating address; every instance
// found the primary through the Sentinels and logged in as the rig's
// chat-ha user.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, DOMAIN_1, FRONT_HOSTS, FRONT_INSTANCES, INSTANCES, LB, LB_MACHINES, LB_URL, REDIS, REDIS_HOSTS,
  SENTINEL_MASTER, SENTINEL_PORT, getFromLb, lbServers, redisCli, redisRole, request, ssh,
} from './lib/rig.mjs';

const installed = (name) => ssh(name, "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' 'chat-*' haproxy keepalived 'redis-*' 2>/dev/null | awk '$2 == \"ii\" {print $1}' | sort");

describe('the rig', () => {
  it('installs the packages of each role, and only those', async () => {
    const expect = {
      lb1: ['chat-haproxy', 'chat-keepalived', 'haproxy', 'keepalived'],
      lb2: ['chat-haproxy', 'chat-keepalived', 'haproxy', 'keepalived'],
      front1: ['chat-frontend', 'chat-ha-common'],
      front2: ['chat-frontend', 'chat-ha-common'],
      back1: ['chat-backend', 'chat-ha-common'],
      back2: ['chat-backend', 'chat-ha-common'],
      redis1: ['chat-redis', 'redis-sentinel', 'redis-server', 'redis-tools'],
      redis2: ['chat-redis', 'redis-sentinel', 'redis-server', 'redis-tools'],
      redis3: ['chat-redis', 'redis-sentinel', 'redis-server', 'redis-tools'],
    };
    const got = Object.fromEntries(await Promise.all(Object.keys(expect).map(async (m) => [m, (await installed(m)).trim().split('\n').filter(Boolean)])));
    assert.deepEqual(got, expect);
  });

  it(`runs ${INSTANCES} instances on each frontend and backend host, pointed at the Sentinels`, async () => {
    for (const [hosts, daemon] of [[FRONT_HOSTS, 'frontend'], [BACK_HOSTS, 'backend']]) {
      for (const h of hosts) {
        const units = await ssh(h.name, `systemctl list-units --plain --no-legend --state=active 'chat-${daemon}@*' | cut -d' ' -f1; grep -E '^(url|sentinels|sentinel_master) ' /etc/chat-ha/chat-ha.toml`);
        const want = Array.from({ length: INSTANCES }, (_, n) => [`chat-${daemon}@${n}.service`, `chat-${daemon}@${n}.socket`]).flat().sort();
        const lines = units.trim().split('\n');
        assert.deepEqual(lines.filter((l) => l.startsWith('chat-')).sort(), want, `${h.name}: ${units}`);
        const sentinels = REDIS_HOSTS.map((r) => `"redis://${r.ip}:${SENTINEL_PORT}"`).join(', ');
        assert.ok(lines.includes(`sentinels = [${sentinels}]`), `${h.name}: redis.sentinels names every Sentinel: ${units}`);
        assert.ok(lines.includes(`sentinel_master = "${SENTINEL_MASTER}"`), `${h.name}: ${units}`);
        assert.ok(!lines.some((l) => l.startsWith('url ')), `${h.name}: no redis.url: ${units}`);
        // Asked from a load balancer, the only machines the instances admit.
        const ports = Array.from({ length: INSTANCES }, (_, n) => (daemon === 'frontend' ? 9100 : 9200) + n);
        const answers = await getFromLb(ports.map((port) => `http://${h.ip}:${port}/${daemon.replace('end', '')}/status`));
        for (const [n, { code, body }] of answers.entries()) {
          assert.equal(code, 200, `${h.ip}:${ports[n]}`);
          const status = JSON.parse(body);
          assert.equal(status.redis, 'up', `${h.ip}:${ports[n]} reached Redis`);
          assert.equal(status.status, 'ok', `${h.ip}:${ports[n]}: ${body}`);
          assert.equal(status.instance, n);
        }
      }
    }
  });

  for (const r of REDIS_HOSTS) {
    it(`runs Redis on ${r.name} bound to its rig address, AOF on, protected mode on, no eviction, writes only with a replica`, async () => {
      const out = (await redisCli(r, 'config get bind appendonly protected-mode maxmemory-policy min-replicas-to-write')).join('\n');
      const v = Object.fromEntries(out.trim().split('\n').reduce((pairs, line, i, all) => (i % 2 ? pairs : [...pairs, [line, all[i + 1]]]), []));
      assert.ok(v.bind.split(' ').includes(r.ip), `bind: ${v.bind}`);
      assert.equal(v.appendonly, 'yes', 'appendonly');
      assert.equal(v['protected-mode'], 'yes', 'protected-mode');
      assert.equal(v['maxmemory-policy'], 'noeviction', 'maxmemory-policy');
      assert.equal(v['min-replicas-to-write'], '1', 'min-replicas-to-write');
    });
  }

  it('runs redis1 as the primary with redis2 and redis3 replicating it, and every Sentinel names it', async () => {
    const role = await redisRole(REDIS_HOSTS[0]);
    assert.equal(role[0], 'master', role.join(' '));
    const replicas = role.filter((l) => REDIS_HOSTS.some((r) => r.ip === l)).sort();
    assert.deepEqual(replicas, REDIS_HOSTS.slice(1).map((r) => r.ip), `replicas: ${role.join(' ')}`);
    for (const r of REDIS_HOSTS) {
      const named = await redisCli(r, `sentinel get-master-addr-by-name ${SENTINEL_MASTER}`, { sentinel: true });
      assert.deepEqual(named, [REDIS, '6379'], `Sentinel on ${r.name}`);
      const quorum = (await redisCli(r, `sentinel ckquorum ${SENTINEL_MASTER}`, { sentinel: true })).join(' ');
      assert.match(quorum, /^OK 3 usable Sentinels/, `Sentinel on ${r.name}`);
    }
  });

  it('lets nobody in anonymously: replicas log in as replica, Sentinels as sentinel, the Sentinels want a password', async () => {
    // CLIENT LIST on the primary: who is connected, as which user.
    const clients = await redisCli(REDIS_HOSTS[0], 'client list');
    const as = (user) => clients.filter((c) => c.includes(` user=${user} `));
    assert.equal(as('replica').filter((c) => / flags=S /.test(c)).length, 2, clients.join('\n'));
    assert.ok(as('sentinel').length >= 3, clients.join('\n'));
    assert.equal(as('admin').filter((c) => / flags=S /.test(c)).length, 0, 'no replica logs in as admin');
    for (const r of REDIS_HOSTS) {
      const anonymous = await ssh(r.name, `redis-cli -h ${r.ip} -p ${SENTINEL_PORT} ping`);
      assert.match(anonymous, /NOAUTH/, `Sentinel on ${r.name}, anonymous PING`);
    }
  });

  it('runs keepalived and HAProxy on both load balancers, one of them holding the floating address', async () => {
    const holders = [];
    for (const m of LB_MACHINES) {
      const out = await ssh(m.name, 'systemctl is-active keepalived haproxy; ip -o -4 addr show dev eth1 | awk \'{print $4}\'');
      const lines = out.trim().split('\n');
      assert.deepEqual(lines.slice(0, 2), ['active', 'active'], `${m.name}: ${out}`);
      if (lines.includes(`${LB}/24`)) holders.push(m.name);
      // Confined by chat-keepalived's drop-in as the chat-ha units are.
      const security = await ssh(m.name, 'sudo systemd-analyze security --no-pager keepalived.service | tail -1');
      const exposure = Number(/exposure level for keepalived\.service: ([0-9.]+)/.exec(security)?.[1]);
      assert.ok(exposure <= 2.0, `${m.name}: ${security}`);
    }
    assert.equal(holders.length, 1, `one load balancer holds ${LB}: ${holders}`);
  });

  for (const m of LB_MACHINES) it(`has HAProxy on ${m.name} send to every instance of every host, all UP`, async () => {
    const servers = await lbServers(m.name);
    const front = servers.filter((s) => s.backend === 'chat_front');
    const back = servers.filter((s) => s.backend === 'chat_back');
    assert.deepEqual(front.map((s) => s.server), FRONT_INSTANCES.map((f) => f.server));
    assert.deepEqual(back.map((s) => s.server), ['back1-0', 'back1-1', 'back2-0', 'back2-1']);
    for (const s of servers) assert.equal(s.status, 'UP', `${s.backend}/${s.server}`);
    const page = await request(`${LB_URL}/front/lobby`, { host: DOMAIN_1 });
    assert.equal(page.status, 200);
    assert.match(page.text, /<title>/);
    const unknown = await request(`${LB_URL}/front/lobby`, { host: 'www.example.invalid' });
    assert.equal(unknown.status, 421);
    // HAProxy's own health, for monitoring, on its own address.
    assert.equal((await ssh(m.name, `curl -s -o /dev/null -w '%{http_code}' http://${m.ip}/haproxy-health`)).trim(), '200');
  });
});

// The rig is the topology the Vagrantfile describes: each machine has the
// packages of its role and runs what they start; Redis (chat-redis) is
// bound to its rig address with AOF on and protected mode on; HAProxy on lb
// has one server per instance per host, all UP; every instance reached
// Redis, logged in as the rig's chat-ha user.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, DOMAIN_1, FRONT_HOSTS, FRONT_INSTANCES, INSTANCES, LB_URL, REDIS, getFromLb, lbServers, request, ssh,
} from './lib/rig.mjs';

const installed = (name) => ssh(name, "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' 'chat-*' haproxy redis-server 2>/dev/null | awk '$2 == \"ii\" {print $1}' | sort");

describe('the rig', () => {
  it('installs the packages of each role, and only those', async () => {
    const expect = {
      lb: ['chat-haproxy', 'haproxy'],
      front1: ['chat-frontend', 'chat-ha-common'],
      front2: ['chat-frontend', 'chat-ha-common'],
      back1: ['chat-backend', 'chat-ha-common'],
      back2: ['chat-backend', 'chat-ha-common'],
      redis: ['chat-redis', 'redis-server'],
    };
    const got = Object.fromEntries(await Promise.all(Object.keys(expect).map(async (m) => [m, (await installed(m)).trim().split('\n').filter(Boolean)])));
    assert.deepEqual(got, expect);
  });

  it(`runs ${INSTANCES} instances on each frontend and backend host, pointed at Redis`, async () => {
    for (const [hosts, daemon] of [[FRONT_HOSTS, 'frontend'], [BACK_HOSTS, 'backend']]) {
      for (const h of hosts) {
        const units = await ssh(h.name, `systemctl list-units --plain --no-legend --state=active 'chat-${daemon}@*' | cut -d' ' -f1; grep '^url' /etc/chat-ha/chat-ha.toml`);
        const want = Array.from({ length: INSTANCES }, (_, n) => [`chat-${daemon}@${n}.service`, `chat-${daemon}@${n}.socket`]).flat().sort();
        const lines = units.trim().split('\n');
        assert.deepEqual(lines.filter((l) => l.startsWith('chat-')).sort(), want, `${h.name}: ${units}`);
        assert.ok(lines.includes(`url = "redis://${REDIS}:6379/0"`), `${h.name}: redis.url names ${REDIS}: ${units}`);
        // Asked from lb, the one machine the instances admit.
        const ports = Array.from({ length: INSTANCES }, (_, n) => (daemon === 'frontend' ? 9100 : 9200) + n);
        const answers = await getFromLb(ports.map((port) => `http://${h.ip}:${port}/${daemon.replace('end', '')}/status`));
        for (const [n, { code, body }] of answers.entries()) {
          assert.equal(code, 200, `${h.ip}:${ports[n]}`);
          const status = JSON.parse(body);
          assert.equal(status.redis, 'up', `${h.ip}:${ports[n]} reached Redis`);
          assert.equal(status.instance, n);
        }
      }
    }
  });

  it('runs Redis bound to its rig address, AOF on, protected mode on, no eviction', async () => {
    const out = await ssh('redis', 'for k in bind appendonly protected-mode maxmemory-policy; do '
      + `sudo sh -c 'redis-cli --no-auth-warning --user admin --pass "$(cat /etc/redis/admin-password)" -h ${REDIS} config get '$k; done`);
    const v = out.trim().split('\n');
    assert.ok(v[1].split(' ').includes(REDIS), `bind: ${v[1]}`);
    assert.equal(v[3], 'yes', 'appendonly');
    assert.equal(v[5], 'yes', 'protected-mode');
    assert.equal(v[7], 'noeviction', 'maxmemory-policy');
  });

  it('has HAProxy send to every instance of every host, all UP', async () => {
    const servers = await lbServers();
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
  });
});

// The rig is the topology the Vagrantfile describes: each machine has the
// packages of its role and runs what they start; Redis is bound to its rig
// address with AOF on; HAProxy on lb has one server per instance per host,
// all UP; every instance reached Redis.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, DOMAIN_1, FRONT_HOSTS, FRONT_INSTANCES, INSTANCES, LB_URL, REDIS, lbServers, request, ssh,
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
      redis: ['redis-server'],
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
        for (let n = 0; n < INSTANCES; n++) {
          const port = (daemon === 'frontend' ? 9100 : 9200) + n;
          const res = await request(`http://${h.ip}:${port}/${daemon.replace('end', '')}/status`, { timeoutMs: 2000 });
          assert.equal(res.status, 200, `${h.ip}:${port}`);
          assert.equal(res.json.redis, 'up', `${h.ip}:${port} reached Redis`);
          assert.equal(res.json.instance, n);
        }
      }
    }
  });

  it('runs Redis bound to its rig address, AOF on', async () => {
    const out = await ssh('redis', `for k in bind appendonly protected-mode; do redis-cli -h ${REDIS} config get $k; done`);
    const v = out.trim().split('\n');
    assert.ok(v[1].split(' ').includes(REDIS), `bind: ${v[1]}`);
    assert.equal(v[3], 'yes', 'appendonly');
    assert.equal(v[5], 'no', 'protected-mode');
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

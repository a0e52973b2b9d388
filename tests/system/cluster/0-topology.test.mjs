// The rig's cluster layout (CHAT_HA_RIG_REDIS=cluster): redis1..redis6 run
// chat-redis with cluster mode on, bound to their rig address, and are one
// Redis Cluster of three primaries, each with a replica on another machine,
// the replicas logged in to their primary as the user replica; no Sentinel.
// Every frontend and backend instance names the six nodes as seeds, wants a
// replica's acknowledgement per post, reached the cluster as the rig's
// chat-ha user, and was refused nothing (no NOPERM, no ACL denial).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACK_HOSTS, CLUSTER_SLOTS, DOMAIN_1, FRONT_HOSTS, INSTANCES, REDIS_HOSTS, REDIS_LAYOUT, clusterInfo, clusterNodes, getFromLb,
  livePrimaries, post, redisCli, roomKey, roomSlot, roomsPerShard, ssh, waitForWholeCluster,
} from '../lib/rig.mjs';

const installed = (name) => ssh(name, "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' 'chat-*' haproxy keepalived 'redis-*' 2>/dev/null | awk '$2 == \"ii\" {print $1}' | sort");

describe('the rig with a Redis Cluster', () => {
  it('is the cluster layout (CHAT_HA_RIG_REDIS=cluster): six redis machines', () => {
    assert.equal(REDIS_LAYOUT, 'cluster', 'run with CHAT_HA_RIG_REDIS=cluster');
    assert.equal(REDIS_HOSTS.length, 6);
  });

  it('installs chat-redis and Redis on each redis machine, no Sentinel', async () => {
    const got = await Promise.all(REDIS_HOSTS.map(async (r) => (await installed(r.name)).trim().split('\n').filter(Boolean)));
    for (const [i, r] of REDIS_HOSTS.entries()) {
      assert.deepEqual(got[i], ['chat-redis', 'redis-server', 'redis-tools'], r.name);
    }
  });

  for (const r of REDIS_HOSTS) {
    it(`runs Redis on ${r.name} in cluster mode, bound to its rig address, AOF on, protected mode on, no eviction, writes only with a replica`, async () => {
      const out = await redisCli(r, 'config get bind appendonly protected-mode maxmemory-policy min-replicas-to-write cluster-enabled cluster-require-full-coverage cluster-announce-ip');
      const v = Object.fromEntries(out.reduce((pairs, line, i, all) => (i % 2 ? pairs : [...pairs, [line, all[i + 1]]]), []));
      assert.ok(v.bind.split(' ').includes(r.ip), `bind: ${v.bind}`);
      assert.equal(v.appendonly, 'yes', 'appendonly');
      assert.equal(v['protected-mode'], 'yes', 'protected-mode');
      assert.equal(v['maxmemory-policy'], 'noeviction', 'maxmemory-policy');
      assert.equal(v['min-replicas-to-write'], '1', 'min-replicas-to-write');
      assert.equal(v['cluster-enabled'], 'yes', 'cluster-enabled');
      assert.equal(v['cluster-require-full-coverage'], 'no', 'cluster-require-full-coverage');
      assert.equal(v['cluster-announce-ip'], r.ip, 'cluster-announce-ip');
      const anonymous = await ssh(r.name, `redis-cli -h ${r.ip} ping`);
      assert.match(anonymous, /NOAUTH/, `${r.name}: anonymous PING`);
    });
  }

  it('is one cluster, ok on every node: 3 primaries serving every slot, 3 replicas, none on its primary\'s machine', async () => {
    const nodes = await waitForWholeCluster(30_000);
    for (const r of REDIS_HOSTS) {
      const info = await clusterInfo(r);
      assert.equal(info.cluster_state, 'ok', `${r.name}: ${JSON.stringify(info)}`);
      assert.equal(info.cluster_known_nodes, '6', r.name);
      assert.equal(info.cluster_size, '3', r.name);
    }
    assert.equal(nodes.length, 6);
    assert.deepEqual(nodes.map((n) => n.host?.name).sort(), REDIS_HOSTS.map((r) => r.name), 'one node per redis machine, at its rig address');
    const primaries = livePrimaries(nodes);
    assert.equal(primaries.length, 3, JSON.stringify(nodes));
    const served = primaries.flatMap((p) => p.slots).reduce((n, [a, b]) => n + b - a + 1, 0);
    assert.equal(served, CLUSTER_SLOTS, 'every slot served');
    const replicas = nodes.filter((n) => n.flags.includes('slave'));
    assert.equal(replicas.length, 3);
    for (const p of primaries) {
      const mine = replicas.filter((n) => n.primary === p.id);
      assert.equal(mine.length, 1, `${p.host.name}: one replica`);
      assert.notEqual(mine[0].host.name, p.host.name, `${p.host.name}'s replica on another machine`);
      // The replica logged in to its primary as the user replica, not admin.
      const clients = await redisCli(p.host, 'client list');
      const replicating = clients.filter((c) => / flags=S /.test(c));
      assert.equal(replicating.length, 1, `${p.host.name}: ${clients.join('\n')}`);
      assert.match(replicating[0], / user=replica /, `${p.host.name}: ${replicating[0]}`);
    }
    // The rig computes a room's slot as Redis does.
    for (const room of ['lobby', 'system-cluster-a', 'system-cluster-b']) {
      const [slot] = await redisCli(REDIS_HOSTS[0], `cluster keyslot "${roomKey(room)}"`);
      assert.equal(Number(slot), roomSlot(room), room);
    }
  });

  it(`runs ${INSTANCES} instances on each frontend and backend host, pointed at the cluster, Redis up`, async () => {
    const seeds = REDIS_HOSTS.map((r) => `"redis://${r.ip}:6379"`).join(', ');
    for (const [hosts, daemon] of [[FRONT_HOSTS, 'frontend'], [BACK_HOSTS, 'backend']]) {
      for (const h of hosts) {
        const out = await ssh(h.name, `systemctl list-units --plain --no-legend --state=active 'chat-${daemon}@*' | cut -d' ' -f1; grep -E '^(url|sentinels|sentinel_master|cluster|min_replicas_acked) ' /etc/chat-ha/chat-ha.toml`);
        const lines = out.trim().split('\n');
        const want = Array.from({ length: INSTANCES }, (_, n) => [`chat-${daemon}@${n}.service`, `chat-${daemon}@${n}.socket`]).flat().sort();
        assert.deepEqual(lines.filter((l) => l.startsWith('chat-')).sort(), want, `${h.name}: ${out}`);
        assert.deepEqual(lines.filter((l) => !l.startsWith('chat-')).sort(), [`cluster = [${seeds}]`, 'min_replicas_acked = 1'],
          `${h.name}: redis.cluster names the six nodes, no url, no Sentinels: ${out}`);
        const ports = Array.from({ length: INSTANCES }, (_, n) => (daemon === 'frontend' ? 9100 : 9200) + n);
        const answers = await getFromLb(ports.map((port) => `http://${h.ip}:${port}/${daemon.replace('end', '')}/status`));
        for (const [n, { code, body }] of answers.entries()) {
          assert.equal(code, 200, `${h.ip}:${ports[n]}`);
          const status = JSON.parse(body);
          assert.equal(status.redis, 'up', `${h.ip}:${ports[n]} reached Redis: ${body}`);
          assert.equal(status.status, 'ok', `${h.ip}:${ports[n]}: ${body}`);
          assert.equal(status.instance, n);
        }
      }
    }
  });

  it('lets the daemons in as chat-ha, and refuses them nothing (no NOPERM, no ACL denial)', async () => {
    // The daemons connect to a node when they first need it: a post to a
    // room on each shard has the backends reach every primary.
    const nodes = await waitForWholeCluster(30_000);
    const { names } = roomsPerShard(nodes, `system-cluster-acl-${Date.now()}`, 1);
    for (const room of names) {
      const res = await post(room, 'as chat-ha', DOMAIN_1);
      assert.equal(res.status, 201, `POST to ${room}: ${res.status} ${res.text}`);
    }
    const primaries = livePrimaries(await clusterNodes(REDIS_HOSTS[0]));
    for (const p of primaries) {
      const clients = await redisCli(p.host, 'client list');
      assert.ok(clients.some((c) => / user=chat-ha /.test(c)), `${p.host.name}: the daemons' connections as chat-ha: ${clients.join('\n')}`);
    }
    for (const r of REDIS_HOSTS) {
      const denied = (await redisCli(r, 'acl log')).filter(Boolean);
      assert.deepEqual(denied, [], `${r.name}: ACL LOG`);
    }
    for (const h of [...FRONT_HOSTS, ...BACK_HOSTS]) {
      const noperm = await ssh(h.name, "sudo journalctl -q --no-pager -u 'chat-*' -o cat | grep -c NOPERM || true");
      assert.equal(noperm.trim(), '0', `${h.name}: NOPERM in the daemons' journal`);
    }
  });
});

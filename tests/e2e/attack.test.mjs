// The replay amplification attack of the security review: attackers that
// each ask, on connection after connection, for the whole history of every
// full room and read none of it. Redis must live on with bounded memory,
// and a bystander's posts must be answered and delivered throughout.
//
// The same run measures CPU and latency (printed here); `make bench-attack`
// reports those figures against their targets.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { PACKAGED_LIMITS, startTopology } from './lib/topology.mjs';
import { describe as figuresLine, replayAttack } from './lib/attack.mjs';
import { logged } from './lib/helpers.mjs';

const GIB = 1024;

describe('20 clients replaying whole histories and reading nothing', () => {
  let topo;

  before(async () => {
    // Every limit as packaged: they are part of the defence.
    topo = await startTopology({ frontends: 2, backends: 2, ...PACKAGED_LIMITS });
  });

  after(async () => {
    await topo?.stop();
  });

  it('leave Redis alive under 2 GiB, and the bystander posts and receives everything', logged(() => topo, async (t) => {
    const seconds = 30;
    const figures = await replayAttack(topo, { attackers: 20, rooms: 8, perRoom: 1100, bytes: 3000, seconds });
    t.diagnostic(figuresLine(figures));
    assert.ok(figures.attackerConnections > 100, `the attack ran: ${figuresLine(figures)}`);
    assert.ok(figures.redisAlive, 'Redis answers');
    assert.ok(figures.redisPeakMiB < 2 * GIB, `Redis peaked at ${figures.redisPeakMiB} MiB`);
    const { counts } = figures;
    assert.equal(counts.failedRequests, 0, counts.line);
    // The bystander posts 4 times a second, each post once the last is
    // answered: how fast it is served is `make bench-attack`'s to measure
    // against its targets; here, that it was served all along, at least
    // once a second on average whatever the machine's load.
    assert.ok(counts.acknowledged >= seconds, counts.line);
    assert.equal(counts.delivered, counts.acknowledged, counts.line);
    assert.equal(counts.duplicated + counts.outOfOrder + counts.lost, 0, counts.line);
  }));
});

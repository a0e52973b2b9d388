// `make bench-attack`: the replay amplification attack (tests/e2e/lib/attack.mjs)
// against a local topology of release binaries with HAProxy's limits as
// packaged, and its figures against their targets: Redis alive and under
// 2 GiB, Redis below half a core, the bystander's posts answered with p99
// under 50 ms, and every one of them delivered. Prints one JSON line on
// stdout and a summary on stderr; exits 1 when a target is missed.
//
// Options: --attackers N (20), --seconds N (30), --frontends N (2),
// --backends N (2).

import { parseArgs } from 'node:util';

import { describe, replayAttack } from '../tests/e2e/lib/attack.mjs';
import { PACKAGED_LIMITS, startTopology } from '../tests/e2e/lib/topology.mjs';

const { values: options } = parseArgs({
  options: {
    attackers: { type: 'string', default: '20' },
    seconds: { type: 'string', default: '30' },
    frontends: { type: 'string', default: '2' },
    backends: { type: 'string', default: '2' },
  },
});

const topo = await startTopology({
  frontends: Number(options.frontends),
  backends: Number(options.backends),
  ...PACKAGED_LIMITS,
});
let figures;
try {
  figures = await replayAttack(topo, { attackers: Number(options.attackers), seconds: Number(options.seconds) });
} finally {
  await topo.stop();
}

const { counts } = figures;
const targets = [
  ['Redis alive', figures.redisAlive],
  ['Redis under 2 GiB', figures.redisPeakMiB < 2048],
  ['Redis below half a core', figures.redisCpuCores < 0.5],
  ['bystander posts p99 under 50 ms', figures.postP99Ms < 50],
  ['every bystander post answered 201 and delivered once, in order',
    counts.failedRequests === 0 && counts.delivered === counts.acknowledged
      && counts.lost + counts.duplicated + counts.outOfOrder === 0],
];
const { perClient, ackedIds, ...summary } = counts;
console.log(JSON.stringify({ ...figures, counts: summary }));
console.error(describe(figures));
for (const [target, met] of targets) console.error(`${met ? 'met    ' : 'MISSED '} ${target}`);
process.exitCode = targets.every(([, met]) => met) ? 0 : 1;

// The replay amplification attack of the security review, run against a
// topology, and what a normal user sees meanwhile.
//
// Rooms are filled with long histories first. Then each attacker, from an
// address of its own, over and over: connects through HAProxy, asks to
// resume every full room from the very beginning (`since: "0-0"`), stops
// reading, drops the connection after a moment, and starts again. Meanwhile
// a bystander posts through HAProxy at a steady pace and receives its own
// messages on a socket. Before the bounds on replays, 20 such attackers took
// Redis from a few MB to 3 GB in two seconds, and on to the OOM killer.
//
// Used by tests/e2e/attack.test.mjs (what must hold) and by
// `make bench-attack` (the figures, against their targets).

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

import {
  DOMAIN_1, Poster, RawWebSocket, ResumingClient, deliveryCounts, memoryOf, metrics, postMessage, sleep,
} from './helpers.mjs';

const TICKS_PER_SECOND = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/** CPU time process `pid` has used, user and system, in seconds. */
export function cpuSecondsOf(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND;
}

/**
 * Fills `rooms` rooms (`full-0` …) with `perRoom` messages of `bytes` bytes,
 * posted straight to the backends, many at once.
 */
export async function fillRooms(topo, { rooms, perRoom, bytes }) {
  const text = 'h'.repeat(bytes);
  const names = Array.from({ length: rooms }, (_, r) => `full-${r}`);
  let next = 0;
  const total = rooms * perRoom;
  const worker = async () => {
    for (let i = next++; i < total; i = next++) {
      const backend = topo.backends[i % topo.backends.length];
      const res = await postMessage(backend.url, names[i % rooms], `${i} ${text}`);
      if (res.status !== 201) throw new Error(`filling the rooms: ${res.status} ${res.text}`);
    }
  };
  await Promise.all(Array.from({ length: 32 }, worker));
  return names;
}

/**
 * One attacker: from `localAddress`, until `stop()` is true, open a socket
 * through HAProxy, resume every room of `rooms` from the start, stop
 * reading, and drop the connection after `holdMs`. Counts what happened.
 */
async function attacker(topo, localAddress, rooms, { holdMs, stop }) {
  const tally = { connections: 0, refused: 0 };
  const joins = rooms.map((room) => `42["room",${JSON.stringify({ room, since: '0-0' })}]`);
  while (!stop()) {
    let ws;
    try {
      ws = await RawWebSocket.open(topo.haproxyPort, '/front/socket.io/?EIO=4&transport=websocket',
        { host: DOMAIN_1, localAddress });
      await ws.until('the Engine.IO open packet', () => ws.messages.some((m) => m.startsWith('0{')));
      ws.send('40');
      await ws.until('the Socket.IO connect packet', () => ws.messages.some((m) => m.startsWith('40{')));
    } catch {
      // Refused (HAProxy's limits answer 429) or cut: try again shortly.
      tally.refused += 1;
      ws?.close();
      await sleep(50);
      continue;
    }
    tally.connections += 1;
    for (const join of joins) ws.send(join);
    ws.socket.pause();
    await sleep(holdMs);
    ws.close();
  }
  return tally;
}

/** Samples `sample()` every `everyMs` until `stop()`; resolves to the samples. */
async function sampling(sample, everyMs, stop) {
  const samples = [];
  while (!stop()) {
    samples.push(sample());
    await sleep(everyMs);
  }
  return samples;
}

/** The `p`th percentile of `values` (0 < p ≤ 100). */
function percentile(values, p) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/**
 * Runs the attack for `seconds` with `attackers` attackers (addresses
 * 127.0.0.20 and up) on `rooms` rooms of `perRoom` messages of `bytes`
 * bytes, beside a bystander posting `postsPerSecond`. Resolves to the
 * figures: Redis's and the frontends' peak memory and CPU, the bystander's
 * post latencies and delivery counts, the attackers' connections.
 */
export async function replayAttack(topo, {
  attackers = 20, rooms = 8, perRoom = 1100, bytes = 3000, seconds = 30, postsPerSecond = 4, holdMs = 200,
} = {}) {
  const names = await fillRooms(topo, { rooms, perRoom, bytes });

  const bystander = new ResumingClient({ room: 'bystander' }).open(`http://${DOMAIN_1}:${topo.haproxyPort}`);
  await bystander.waitJoined(1);
  const poster = new Poster(topo.url, 'bystander', { host: DOMAIN_1, intervalMs: 1000 / postsPerSecond, label: 'bystander' });

  const redisPid = topo.redis.pid;
  const frontendPids = topo.frontends.map((f) => f.pid);
  const cpuBefore = { redis: cpuSecondsOf(redisPid), frontends: frontendPids.map(cpuSecondsOf) };
  const replayedBefore = await totalReplayed(topo);
  const startedAt = Date.now();
  let stopping = false;
  const stop = () => stopping;
  const memory = sampling(() => ({
    redis: memoryOf(redisPid).rss,
    frontends: frontendPids.reduce((sum, pid) => sum + memoryOf(pid).rss, 0),
  }), 100, stop);
  poster.start();
  const tallies = Promise.all(Array.from({ length: attackers },
    (_, i) => attacker(topo, `127.0.0.${20 + i}`, names, { holdMs, stop })));
  await sleep(seconds * 1000);
  stopping = true;
  const [attacks, samples] = await Promise.all([tallies, memory]);
  await poster.stop();
  const elapsed = (Date.now() - startedAt) / 1000;
  const cpu = {
    redis: (cpuSecondsOf(redisPid) - cpuBefore.redis) / elapsed,
    frontends: frontendPids.map((pid, i) => (cpuSecondsOf(pid) - cpuBefore.frontends[i]) / elapsed),
  };

  // A fence: the bystander's last post is the last thing it receives.
  const fence = await poster.post('fence');
  if (fence.status === 201) await bystander.waitForId(poster.acked.at(-1).id, 30_000);
  const counts = deliveryCounts('bystander', poster, [bystander]);
  bystander.close();
  const latencies = poster.log.filter((e) => e.status === 201).map((e) => e.endedAt - e.startedAt);
  return {
    seconds: elapsed,
    attackers,
    attackerConnections: attacks.reduce((n, t) => n + t.connections, 0),
    attackerRefusals: attacks.reduce((n, t) => n + t.refused, 0),
    replayedMessages: (await totalReplayed(topo)) - replayedBefore,
    redisAlive: await redisAnswers(topo),
    redisPeakMiB: Math.max(memoryOf(redisPid).peak, ...samples.map((s) => s.redis)) / 2 ** 20,
    redisCpuCores: cpu.redis,
    frontendsPeakMiB: Math.max(...samples.map((s) => s.frontends)) / 2 ** 20,
    frontendsCpuCores: cpu.frontends,
    postP50Ms: percentile(latencies, 50),
    postP99Ms: percentile(latencies, 99),
    counts,
  };
}

async function totalReplayed(topo) {
  const all = await Promise.all(topo.frontends.map((f) => metrics(f.metricsUrl)));
  return all.reduce((n, m) => n + m.chat_frontend_messages_replayed_total, 0);
}

/** Whether Redis still answers a ping. */
async function redisAnswers(topo) {
  try {
    return (await topo.redis.ping()) === 'PONG';
  } catch {
    return false;
  }
}

/** One line of figures, for a test's diagnostics or the benchmark's output. */
export function describe(figures) {
  const f = (x) => x.toFixed(2);
  return `${figures.attackers} attackers, ${figures.attackerConnections} connections ` +
    `(${figures.attackerRefusals} refused), ${figures.replayedMessages} messages replayed in ${f(figures.seconds)} s; ` +
    `Redis peak ${f(figures.redisPeakMiB)} MiB, CPU ${f(figures.redisCpuCores)} core; ` +
    `frontends peak ${f(figures.frontendsPeakMiB)} MiB, CPU ${figures.frontendsCpuCores.map(f).join(' + ')} core; ` +
    `bystander posts p50 ${figures.postP50Ms} ms, p99 ${figures.postP99Ms} ms; ${figures.counts.line}`;
}

// What the system tests share: the rig's addresses (as in the Vagrantfile),
// commands inside the machines (vagrant ssh), the frontends' status (asked
// from a load balancer: the instances admit no one else) and HAProxy's
// server states, and socket.io-client connections made through the
// floating address with a demo domain as Host.

import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import {
  DOMAIN_1, DOMAIN_2, Poster, acknowledgedMore, compareIds, deliveryCounts, request, resolvingAgent, sleep, waitFor, within,
} from '../../e2e/lib/helpers.mjs';

export { DOMAIN_1, DOMAIN_2, compareIds, deliveryCounts, request, sleep, waitFor, within };

// The official client, as locked in tests/e2e (npm ci there).
const { io } = createRequire(new URL('../../e2e/package.json', import.meta.url))('socket.io-client');

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const NET = process.env.CHAT_HA_RIG_NET ?? '10.78.1';

/** The floating address keepalived gives one of the load balancers (HAProxy on port 80). */
export const LB = `${NET}.10`;
export const LB_URL = `http://${LB}`;
/** The load balancers: lb1 holds the floating address at the start. */
export const LB_MACHINES = [{ name: 'lb1', ip: `${NET}.8` }, { name: 'lb2', ip: `${NET}.9` }];
/**
 * The rig's Redis layout, as the Vagrantfile and tests/rig read it from
 * CHAT_HA_RIG_REDIS: sentinel (redis1..3, a primary, its replicas and a
 * Sentinel each) or cluster (redis1..6, a Redis Cluster of three primaries
 * with a replica each).
 */
export const REDIS_LAYOUT = process.env.CHAT_HA_RIG_REDIS || 'sentinel';
if (!['sentinel', 'cluster'].includes(REDIS_LAYOUT)) throw new Error(`CHAT_HA_RIG_REDIS=${REDIS_LAYOUT}: use sentinel or cluster`);
/**
 * The Redis hosts: in the sentinel layout each with Redis and a Sentinel,
 * redis1 the primary at the start; in the cluster layout the six nodes.
 */
export const REDIS_HOSTS = Array.from({ length: REDIS_LAYOUT === 'cluster' ? 6 : 3 }, (_, i) => ({ name: `redis${i + 1}`, ip: `${NET}.${31 + i}` }));
/** The Redis primary at the start (sentinel layout). */
export const REDIS = REDIS_HOSTS[0].ip;
export const SENTINEL_PORT = 26379;
export const SENTINEL_MASTER = 'chat-ha';
/** Instances per frontend or backend host, on ports 9100+N and 9200+N. */
export const INSTANCES = 2;
export const FRONT_HOSTS = [{ name: 'front1', ip: `${NET}.11` }, { name: 'front2', ip: `${NET}.12` }];
export const BACK_HOSTS = [{ name: 'back1', ip: `${NET}.21` }, { name: 'back2', ip: `${NET}.22` }];
/** Every frontend instance, named as HAProxy's servers are: front1-0 ... */
export const FRONT_INSTANCES = FRONT_HOSTS.flatMap((h, i) => Array.from({ length: INSTANCES }, (_, n) => ({
  server: `front${i + 1}-${n}`, host: h.name, ip: h.ip, instance: n, port: 9100 + n,
})));

// `vagrant ssh NAME -c CMD` starts Vagrant (about a second) for every
// command: the tests ask Vagrant once for its ssh settings (vagrant
// ssh-config) and make the same connection with ssh directly, one
// connection per machine shared by all commands (ssh's ControlMaster; the
// status of the instances is polled through lb). The shared connections are
// closed when the test process exits.
// CHAT_HA_RIG_VAGRANT_SSH=1 uses vagrant ssh for every command instead.
let sshConfig;
const sshMasters = new Set();
function sshConfigFile() {
  sshConfig ??= new Promise((resolve, reject) => {
    execFile(path.join(REPO, 'tests/rig/vagrant.sh'), ['ssh-config'], { cwd: REPO, timeout: 60_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`vagrant ssh-config: ${err.message}\n${stderr}`));
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-ha-system-'));
      const file = path.join(dir, 'ssh-config');
      fs.writeFileSync(file, stdout);
      process.on('exit', () => {
        for (const name of sshMasters) {
          try {
            execFileSync('ssh', [...sshOptions(file), '-O', 'exit', name], { stdio: 'ignore', timeout: 5000 });
          } catch { /* already gone */ }
        }
        fs.rmSync(dir, { recursive: true, force: true });
      });
      resolve(file);
    });
  });
  return sshConfig;
}

function sshOptions(configFile) {
  return ['-F', configFile, '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR',
    '-o', 'ControlMaster=auto', '-o', `ControlPath=${path.dirname(configFile)}/%n.sock`, '-o', 'ControlPersist=60'];
}

/** Runs `command` (a shell command line) in machine `name`; resolves to its stdout. */
export async function ssh(name, command, { timeoutMs = 60_000 } = {}) {
  const vagrantSsh = process.env.CHAT_HA_RIG_VAGRANT_SSH === '1';
  if (!vagrantSsh) sshMasters.add(name);
  const [cmd, args] = vagrantSsh
    ? [path.join(REPO, 'tests/rig/vagrant.sh'), ['ssh', name, '-c', command]]
    : ['ssh', [...sshOptions(await sshConfigFile()), name, command]];
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd: REPO, timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`ssh ${name} ${JSON.stringify(command)}: ${err.message}\n${stdout}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

// The load balancer status is asked through and whose HAProxy is looked
// at: the one holding the floating address (the one clients reach), found
// at first use, until a test powers it off and names the other (useLb).
let lbMachine = null;
/** Asks status and HAProxy's states through machine `name` from now on. */
export function useLb(name) {
  lbMachine = name;
}
/** The load balancer machine status is asked through. */
export async function currentLb() {
  lbMachine ??= (await floatingAddressHolder()) ?? LB_MACHINES[0].name;
  return lbMachine;
}

/**
 * GET each of `urls` (an instance's port) from a load balancer, the only
 * machines the instances admit, in one ssh command: [{code, body}], code 0
 * for no answer.
 */
export async function getFromLb(urls) {
  // Each answer on one line: "CODE BODY" (the status endpoints answer one line).
  const script = urls.map((u) => `printf '%s ' "$(curl -s -o /tmp/chat-ha-get.$$ -w '%{http_code}' --max-time 2 '${u}' || true)"; `
    + 'tr -d "\\n" </tmp/chat-ha-get.$$ 2>/dev/null; echo').join('\n');
  const out = await ssh(await currentLb(), `${script}\nrm -f /tmp/chat-ha-get.$$`);
  return out.split('\n').slice(0, urls.length).map((line) => {
    const space = line.indexOf(' ');
    return { code: Number(line.slice(0, space)) || 0, body: line.slice(space + 1) };
  });
}

const statusOf = ({ code, body }) => {
  if (code !== 200) return null;
  try {
    return JSON.parse(body);
  } catch {
    return null;
  }
};

/** GET /front/status of one frontend instance, from lb; null if it does not answer. */
export async function frontStatus(inst) {
  const [answer] = await getFromLb([`http://${inst.ip}:${inst.port}/front/status`]);
  return statusOf(answer);
}

/** Sockets held by each frontend instance: {"front1-0": 3, ...} (null: not answering). */
export async function frontConnections() {
  const all = (await getFromLb(FRONT_INSTANCES.map((f) => `http://${f.ip}:${f.port}/front/status`))).map(statusOf);
  return Object.fromEntries(FRONT_INSTANCES.map((f, i) => [f.server, all[i]?.connections ?? null]));
}

/** HAProxy's servers: [{backend, server, status, stot, ...}] from `show stat` on a load balancer (default: the current one). */
export async function lbServers(machine) {
  const csv = await ssh(machine ?? await currentLb(), 'echo "show stat" | sudo socat stdio /run/haproxy/admin.sock');
  const lines = csv.trim().split('\n');
  const head = lines[0].replace(/^# /, '').split(',');
  return lines.slice(1).map((l) => Object.fromEntries(l.split(',').map((v, i) => [head[i], v])))
    .filter((r) => /^chat_(front|back)$/.test(r.pxname) && !/^(FRONTEND|BACKEND)$/.test(r.svname))
    .map((r) => ({ backend: r.pxname, server: r.svname, status: r.status, stot: Number(r.stot) }));
}

/** Waits until HAProxy reports each server named in `want` ({server: "UP"|"DOWN"}) so. */
export function waitForServers(want, timeoutMs = 20_000) {
  let states = {};
  return waitFor(() => `HAProxy to report ${JSON.stringify(want)} (it reports ${JSON.stringify(states)})`, async () => {
    states = Object.fromEntries((await lbServers()).map((s) => [s.server, s.status]));
    return Object.entries(want).every(([server, status]) => states[server]?.startsWith(status)) ? states : null;
  }, { timeoutMs, intervalMs: 500 });
}

/** POST /back/message through the load balancer, with `domain` as Host. */
export function post(room, message, domain = DOMAIN_1) {
  return request(`${LB_URL}/back/message`, {
    method: 'POST',
    host: domain,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ room, message }),
  });
}

/**
 * An http.Agent that connects to the load balancer whatever the host name: a
 * stand-in for DNS. No keep-alive: a request socket.io sends while closing
 * would otherwise hold the test process for HAProxy's keep-alive timeout.
 */
function lbAgent() {
  return resolvingAgent(LB, { keepAlive: false });
}

/**
 * A socket.io-client connection to http://DOMAIN/ (resolved to the load
 * balancer: the Host header names the domain, for polling and websocket
 * alike) that stays in one room: it joins on every connection, with `since`
 * = the last id received once it has one (so a reconnection resumes with no
 * gap), and records what it receives, duplicates and messages out of order.
 * With `reconnect`, it reconnects as the chat page does: socket.io's own
 * reconnection, and a new connection 300 ms after the server ended the
 * session (a draining frontend does that).
 */
export class RigClient {
  constructor(domain, room, { transports, reconnect = false, name } = {}) {
    this.domain = domain;
    this.room = room;
    this.transports = transports;
    this.name = name ?? `${domain} [${transports?.join(',') ?? 'default'}]`;
    this.agent = lbAgent();
    this.messages = [];
    this.ids = new Set();
    this.duplicates = [];
    this.outOfOrder = [];
    // Texts received under more than one id: a message a user sees twice.
    this.texts = new Set();
    this.textDuplicates = [];
    this.lastId = null;
    this.connectCount = 0;
    this.joins = [];
    this.disconnects = [];
    // What the connection did, with the last id received then: for a report
    // of how a client came to lose messages (lostClients).
    this.events = [];
    this.socket = io(`http://${domain}`, {
      path: '/front/socket.io',
      transports,
      agent: this.agent,
      withCredentials: true,
      forceNew: true,
      reconnection: reconnect,
      reconnectionDelay: 200,
      reconnectionDelayMax: 2000,
      timeout: 10_000,
    });
    this.socket.on('connect', () => {
      this.connectCount += 1;
      this.record('connect');
      this.join();
    });
    this.socket.on('message', (m) => this.receive(m));
    this.socket.on('disconnect', (reason) => {
      this.disconnects.push(reason);
      this.record(`disconnect: ${reason}`);
      if (reconnect && reason === 'io server disconnect') {
        setTimeout(() => { if (!this.closed && !this.socket.connected) this.socket.connect(); }, 300);
      }
    });
    this.connected = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      if (!reconnect) this.socket.once('connect_error', (e) => reject(new Error(`${this.name}: cannot connect: ${e.message}`)));
    });
    this.connected.catch(() => {});
  }

  join() {
    const socket = this.socket;
    const payload = this.lastId === null ? this.room : { room: this.room, since: this.lastId };
    this.record('join');
    socket.timeout(5000).emit('room', payload, (err, answer) => {
      this.record(`join answered: ${err ? err.message : JSON.stringify(answer)}`);
      if (!socket.connected) return;
      if (err || !answer?.ok) {
        this.joins.push(err ? { error: err.message } : answer);
        setTimeout(() => { if (socket.connected) this.join(); }, 250);
        return;
      }
      this.joins.push(answer);
    });
  }

  /** Notes a connection event, with when and the last id received then. */
  record(event) {
    this.events.push({ at: Date.now(), event, lastId: this.lastId });
  }

  receive(m) {
    if (m?.room !== this.room) return;
    if (this.ids.has(m.id)) {
      this.duplicates.push(m.id);
      return;
    }
    if (this.texts.has(m.message)) this.textDuplicates.push(m.message);
    this.texts.add(m.message);
    if (this.lastId !== null && compareIds(m.id, this.lastId) < 0) this.outOfOrder.push(m.id);
    else this.lastId = m.id;
    this.ids.add(m.id);
    this.messages.push(m);
  }

  /** Resolves once connected and joined. */
  async ready(timeoutMs = 10_000) {
    await within(timeoutMs, `${this.name} to connect`, this.connected);
    await waitFor(() => `${this.name} to join ${this.room} (answers: ${JSON.stringify(this.joins)})`,
      () => this.joins.some((a) => a.ok), { timeoutMs, intervalMs: 20 });
    return this;
  }

  get transport() {
    return this.socket.io.engine?.transport?.name;
  }

  /** The value of HAProxy's sticky cookie, if the client holds one. */
  get stickyCookie() {
    const jar = this.socket.io.engine?._cookieJar;
    if (!jar) return undefined;
    for (const [name, cookie] of jar.cookies) if (name === 'chat_front') return cookie.value;
    return undefined;
  }

  /** Waits until every id in `ids` has been received. */
  waitForIds(ids, timeoutMs = 10_000) {
    return waitFor(() => `${this.name} to receive ${ids.length} messages (has ${ids.filter((id) => this.ids.has(id)).length})`,
      () => ids.every((id) => this.ids.has(id)), { timeoutMs, intervalMs: 20 });
  }

  close() {
    this.closed = true;
    this.socket.close();
    this.agent.destroy();
  }
}

/**
 * Clients of one room connected one at a time through the load balancer,
 * each with the frontend instance its socket landed on (`server`, as
 * HAProxy names it, and `host`): the instance whose /front/status
 * connection count went up. HAProxy's round-robin takes the instances in
 * turn, but in an order that changes when a server goes down or comes back:
 * tests ask for clients until they land where wanted (until()).
 */
export class Spreader {
  constructor(room, { reconnect = false } = {}) {
    this.room = room;
    this.reconnect = reconnect;
    this.clients = [];
  }

  /** Connects one client ({domain, transports}); resolves to it, landed. */
  async add({ domain, transports, name }) {
    const total = (c) => Object.values(c).reduce((a, b) => a + (b ?? 0), 0);
    const previous = await frontConnections();
    const client = new RigClient(domain, this.room, { transports, reconnect: this.reconnect, name });
    this.clients.push(client);
    await client.ready();
    let now = previous;
    const counts = await waitFor(() => `the frontends to count ${total(previous) + 1} sockets (they count ${JSON.stringify(now)})`, async () => {
      now = await frontConnections();
      return total(now) === total(previous) + 1 ? now : null;
    }, { timeoutMs: 10_000, intervalMs: 50 });
    client.server = Object.keys(counts).find((k) => counts[k] > previous[k]);
    client.host = client.server?.split('-')[0];
    return client;
  }

  /** Adds clients like `spec` until one satisfies `wanted` (at most `tries`); resolves to it. */
  async until(spec, wanted, what, tries = 2 * FRONT_INSTANCES.length) {
    for (let i = 0; i < tries; i++) {
      const client = await this.add(spec);
      if (wanted(client)) return client;
    }
    throw new Error(`no ${spec.domain} ${spec.transports} client landed ${what} in ${tries} tries (${this.landing()})`);
  }

  /** Where each client landed, for messages. */
  landing() {
    return this.clients.map((c) => `${c.name} -> ${c.server}`).join(', ');
  }

  close() {
    for (const c of this.clients) c.close();
  }
}

/**
 * A steady stream of posts to `room` through the load balancer, the two
 * demo domains in turn, already started: a Poster of the shared helpers
 * (`acked`, `failed`, acknowledgedMore(), stop()). Its counts against the
 * clients: deliveryCounts(label, poster, clients).
 */
export function postStream(room, { intervalMs = 50, concurrency = 1 } = {}) {
  return new Poster(LB_URL, room, { hosts: [DOMAIN_1, DOMAIN_2], intervalMs, concurrency, label: 'msg' }).start();
}

/**
 * Connects clients through `spread` (a Spreader) until every frontend
 * instance holds a polling and a websocket client (domains alternating).
 * HAProxy's round-robin advances by a fixed step per client of one kind,
 * which can skip an instance for ever: when until() gives up, one client of
 * the other transport is added (it shifts the turn) and the search goes on.
 */
export async function spreadOverAll(spread, rounds = 4) {
  for (const transport of ['polling', 'websocket']) {
    for (const [i, f] of FRONT_INSTANCES.entries()) {
      const have = (c) => c.transports[0] === transport && c.server === f.server;
      for (let round = 1; !spread.clients.some(have); round++) {
        try {
          await spread.until({ domain: i % 2 ? DOMAIN_2 : DOMAIN_1, transports: [transport] }, have, `on ${f.server}`);
        } catch (e) {
          if (round >= rounds) throw e;
          await spread.add({ domain: DOMAIN_1, transports: [transport === 'polling' ? 'websocket' : 'polling'] });
        }
      }
    }
  }
  return spread.clients;
}

/** Runs a command on this host (the rig's host: root, where LXC runs); resolves to its stdout. */
function onHost(cmd, args, timeoutMs = 60_000) {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** Powers machine `name` off at once, as a power cut would (lxc-stop -k: no shutdown). */
export async function powerOff(name) {
  await onHost('lxc-stop', ['-k', '-n', `chat-ha-rig-${name}`]);
}

/** Powers machine `name` on again and waits until it answers ssh and systemd finished booting. */
export async function powerOn(name) {
  await onHost('lxc-start', ['-n', `chat-ha-rig-${name}`]);
  await waitFor(`${name} to boot`, async () => {
    const state = (await ssh(name, 'systemctl is-system-running || true', { timeoutMs: 10_000 })).trim();
    return ['running', 'degraded'].includes(state) ? state : null;
  }, { timeoutMs: 120_000, intervalMs: 1000 });
}

/** The primary a Sentinel on redis machine `via` names: {name, ip}. */
export async function sentinelPrimary(via) {
  const [ip] = await redisCli(via, `sentinel get-master-addr-by-name ${SENTINEL_MASTER}`, { sentinel: true });
  return REDIS_HOSTS.find((r) => r.ip === ip) ?? { name: null, ip };
}

/** `ROLE` of the Redis on redis machine `host`, as lines. */
export async function redisRole(host) {
  return redisCli(host, 'role');
}

/**
 * The answer to `command` (redis-cli words), as lines, from redis machine
 * `host`'s Redis as the user admin, or its Sentinel (`sentinel: true`) with
 * the Sentinels' password: nobody gets in anonymously.
 */
export async function redisCli(host, command, { sentinel = false } = {}) {
  const login = sentinel
    ? `-p ${SENTINEL_PORT} -a "$(cat /etc/chat-ha/sentinel-password)"`
    : '--user admin --pass "$(cat /etc/redis/admin-password)"';
  return (await ssh(host.name, `sudo sh -c 'redis-cli --no-auth-warning ${login} -h ${host.ip} ${command}'`)).trim().split('\n');
}

/** The load balancer machine that holds the floating address now, or null. */
export async function floatingAddressHolder() {
  for (const m of LB_MACHINES) {
    const held = await ssh(m.name, `ip -o -4 addr show dev eth1 | grep -c ' ${LB}/' || true`, { timeoutMs: 5000 }).catch(() => '0');
    if (held.trim() === '1') return m.name;
  }
  return null;
}

/**
 * Each client that lost messages, and how: a hole (messages received after
 * the first one lost) or a tail never received; whether it was connected at
 * the end, and what its connection did (RigClient.events) about when it
 * went past the first message lost.
 */
function lostClients(clients, perClient) {
  return clients.flatMap((c, i) => {
    const lost = [...perClient[i].lost].sort(compareIds);
    if (!lost.length) return [];
    const received = perClient[i].received;
    const after = received.filter((id) => compareIds(id, lost[0]) > 0);
    const before = received.filter((id) => compareIds(id, lost[0]) < 0).at(-1) ?? null;
    // The events around the first one that found the client past the
    // first message lost (for a tail, the last events).
    const past = c.events.findIndex((e) => e.lastId !== null && compareIds(e.lastId, lost[0]) > 0);
    const from = past === -1 ? c.events.length - 10 : past - 6;
    const shown = (e) => ({ ...e, at: new Date(e.at).toISOString().slice(11, 23) });
    return [{
      name: c.name,
      transport: c.transports[0],
      connectedAtEnd: c.socket.connected,
      lost: lost.length,
      firstLost: lost[0],
      lastLost: lost.at(-1),
      receivedBefore: before,
      receivedAfter: after.length,
      kind: after.length ? 'hole' : 'tail',
      events: c.events.slice(Math.max(0, from), Math.max(0, from) + 10).map(shown),
    }];
  });
}

/** Per transport: clients, reconnected, lost, why they disconnected, failed joins (for a drill's output). */
function byTransport(clients, report) {
  const out = {};
  for (const [i, c] of clients.entries()) {
    const t = (out[c.transports[0]] ??= { clients: 0, reconnected: 0, lost: 0, disconnects: {}, failedJoins: {} });
    t.clients += 1;
    if (c.connectCount > 1) t.reconnected += 1;
    t.lost += report.perClient[i].lost.length;
    for (const d of c.disconnects) t.disconnects[d] = (t.disconnects[d] ?? 0) + 1;
    for (const j of c.joins.filter((a) => !a.ok)) {
      const why = j.error ?? j.error_message ?? JSON.stringify(j);
      t.failedJoins[why] = (t.failedJoins[why] ?? 0) + 1;
    }
  }
  return out;
}

/**
 * The load every drill runs under: `clients` clients through the floating
 * address, spread over `rooms` rooms (half of each room's clients over
 * websocket, half over long-polling, the two demo domains in turn), each
 * rejoining with `since` after any reconnection; and in each room a stream
 * of posts, three at a time, each retried with its Idempotency-Key until
 * acknowledged. Several rooms, as a real cluster has: every client gets
 * its room's messages, not all of them.
 */
export class Load {
  /**
   * `names`: the rooms' names (default: `rooms` names made from `label`);
   * `attempts`: tries per post before it counts as failed.
   */
  constructor(label, { clients = 200, rooms = 10, names, attempts = 60 } = {}) {
    this.rooms = (names ?? Array.from({ length: rooms }, (_, i) => `${label}-${Date.now()}-${i}`))
      .map((name) => ({ name, clients: [] }));
    this.clientCount = clients;
    this.attempts = attempts;
  }

  get clients() {
    return this.rooms.flatMap((r) => r.clients);
  }

  /** Every room's poster. */
  get posters() {
    return this.rooms.map((r) => r.poster);
  }

  async start() {
    for (let n = 0; n < this.clientCount; n += 20) {
      const batch = Array.from({ length: Math.min(20, this.clientCount - n) }, (_, j) => {
        const i = n + j;
        const room = this.rooms[i % this.rooms.length];
        const client = new RigClient(i % 2 ? DOMAIN_2 : DOMAIN_1, room.name, {
          transports: [i % 4 < 2 ? 'websocket' : 'polling'], reconnect: true, name: `client ${i}`,
        });
        room.clients.push(client);
        return client;
      });
      await Promise.all(batch.map((c) => c.ready(30_000)));
    }
    for (const room of this.rooms) {
      room.poster = new Poster(LB_URL, room.name, {
        hosts: [DOMAIN_1, DOMAIN_2], intervalMs: 0, concurrency: 3, label: 'drill', attempts: this.attempts,
      }).start();
    }
    this.startedAt = Date.now();
    return this;
  }

  /** Posts acknowledged so far, in all rooms. */
  get acknowledged() {
    return this.posters.reduce((n, p) => n + p.acked.length, 0);
  }

  /** Resolves once `count` more posts than now are acknowledged, in all rooms. */
  acknowledgedMore(count, timeoutMs = 30_000) {
    return acknowledgedMore(() => this.acknowledged, count, timeoutMs);
  }

  /** Posts per second since the start. */
  rate() {
    return this.posters.reduce((n, p) => n + p.sent, 0) / ((Date.now() - this.startedAt) / 1000);
  }

  /** Posts per second from the start to `until` (posts started by then). */
  rateUntil(until) {
    const started = this.posters.flatMap((p) => p.tries).filter((t) => t.attempt === 1 && t.startedAt < until).length;
    return started / ((until - this.startedAt) / 1000);
  }

  /**
   * How long after `faultAt` posting failed: the failed tries, and the time
   * from the fault to the first acknowledgement after the last failed try
   * (ms; 0 when nothing failed). Over the rooms whose names `only` keeps
   * (default: all).
   */
  outage(faultAt, only = () => true) {
    const tries = this.rooms.filter((r) => only(r.name)).flatMap((r) => r.poster.tries);
    const failures = tries.filter((t) => t.status !== 201 && t.endedAt >= faultAt);
    if (!failures.length) return { failedTries: 0, backAfterMs: 0 };
    const lastFailure = Math.max(...failures.map((t) => t.endedAt));
    const firstOk = tries.filter((t) => t.status === 201 && t.endedAt >= lastFailure)
      .reduce((min, t) => Math.min(min, t.endedAt), Infinity);
    return { failedTries: failures.length, backAfterMs: firstOk - faultAt };
  }

  /**
   * Stops posting, waits until every client has its room's acknowledged
   * messages (or 30 s), closes the clients, and counts over all rooms:
   * sent, acknowledged, delivered, lost, duplicated (by id and by text),
   * failed. `perClient[i].received` against `inOrder[i]`: each client's
   * acknowledged messages as received, and as they should be (in id order).
   * `rate`: the posts/s offered until the fault at `faultAt`.
   */
  async finish(label, faultAt) {
    const rate = this.rateUntil(faultAt);
    const overall = this.rate();
    await Promise.all(this.posters.map((p) => p.stop()));
    await Promise.all(this.rooms.map(({ poster, clients }) => {
      const ids = poster.acked.map((m) => m.id);
      return Promise.all(clients.map((c) => c.waitForIds(ids, 30_000).catch(() => {})));
    }));
    const rooms = this.rooms.map(({ poster, clients }) => deliveryCounts(label, poster, clients));
    const sum = (f) => rooms.reduce((n, r) => n + f(r), 0);
    const clients = this.clients;
    const report = {
      sent: sum((r) => r.sent),
      acknowledged: sum((r) => r.acknowledged),
      failed: this.posters.flatMap((p) => p.failed),
      delivered: sum((r) => r.delivered),
      expected: sum((r) => r.expected),
      lost: sum((r) => r.lost),
      duplicated: sum((r) => r.duplicated),
      outOfOrder: sum((r) => r.outOfOrder),
      textDuplicated: clients.reduce((n, c) => n + c.textDuplicates.length, 0),
      reconnected: clients.filter((c) => c.connectCount > 1).length,
      perClient: rooms.flatMap((r) => r.perClient),
      inOrder: rooms.flatMap((r) => r.perClient.map(() => [...r.ackedIds].sort(compareIds))),
      rate,
    };
    const tries = this.posters.reduce((n, p) => n + p.tries.length, 0);
    report.line = `${label}: sent ${report.sent}, acknowledged ${report.acknowledged}, failed ${report.failed.length}; `
      + `${clients.length} clients in ${this.rooms.length} rooms: delivered ${report.delivered} of ${report.expected}, `
      + `lost ${report.lost}, duplicated ${report.duplicated} (by text ${report.textDuplicated}), out of order ${report.outOfOrder}; `
      + `${report.reconnected} clients reconnected; ${tries} tries for ${report.sent} posts, `
      + `${rate.toFixed(0)} posts/s until the fault, ${overall.toFixed(0)} overall`;
    report.byTransport = byTransport(clients, report);
    // Where messages were lost, if any: rooms and how many.
    report.lostByRoom = Object.fromEntries(this.rooms.map((r, i) => [r.name, rooms[i].lost]).filter(([, n]) => n > 0));
    report.lostClients = lostClients(clients, report.perClient);
    this.close();
    return report;
  }

  close() {
    for (const c of this.clients) c.close();
  }
}

/**
 * What every drill must show: at least 200 clients and 100 posts/s, every
 * post acknowledged in the end, and every client with every acknowledged
 * message of its room once, in order, none seen twice under two ids.
 */
export function assertNothingLost(report) {
  assert.ok(report.rate >= 100, `at least 100 posts/s until the fault (${report.rate.toFixed(0)})`);
  assert.ok(report.perClient.length >= 200, `at least 200 clients (${report.perClient.length})`);
  assert.deepEqual(report.failed, [], 'every post acknowledged in the end');
  const how = report.lostClients?.slice(0, 5).map((c) => JSON.stringify(c)).join('\n') ?? '';
  assert.equal(report.lost, 0, `acknowledged messages lost (the first clients that lost some, of ${report.lostClients?.length}):\n${how}`);
  assert.equal(report.duplicated, 0, 'messages delivered twice');
  assert.equal(report.textDuplicated, 0, 'messages seen twice under two ids');
  assert.equal(report.outOfOrder, 0, 'messages out of order');
  for (const [i, c] of report.perClient.entries()) {
    assert.deepEqual(c.received, report.inOrder[i], `${c.name}: every acknowledged message once, in order`);
  }
}

// --- The cluster layout: where a room's keys live.

/** Partitions rooms are spread over (redis.partitions, as packaged). */
export const PARTITIONS = 256;
export const CLUSTER_SLOTS = 16384;

/** A room's partition: the first 4 bytes of SHA-256(name), big-endian, modulo the partitions. */
export function roomPartition(room) {
  return crypto.createHash('sha256').update(room).digest().readUInt32BE(0) % PARTITIONS;
}

/** The stream holding a room's history (key_prefix "chat"). */
export function roomKey(room) {
  return `chat:{p${roomPartition(room)}}:room:${room}`;
}

/** CRC16-XMODEM, Redis Cluster's key hash. */
function crc16(bytes) {
  let crc = 0;
  for (const b of bytes) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc;
}

/** The slot of a room's keys: of their hash tag, p<partition>. */
export function roomSlot(room) {
  return crc16(Buffer.from(`p${roomPartition(room)}`)) % CLUSTER_SLOTS;
}

/**
 * CLUSTER NODES as redis machine `via` sees it: [{id, ip, host (its
 * machine, of REDIS_HOSTS), flags, primary (the primary's id, for a
 * replica), link, slots ([first, last] ranges)}].
 */
export async function clusterNodes(via) {
  return (await redisCli(via, 'cluster nodes')).filter(Boolean).map((line) => {
    const w = line.trim().split(/\s+/);
    const ip = w[1].split('@')[0].replace(/:\d+$/, '');
    return {
      id: w[0],
      ip,
      host: REDIS_HOSTS.find((r) => r.ip === ip) ?? null,
      flags: w[2].split(','),
      primary: w[3] === '-' ? null : w[3],
      link: w[7],
      slots: w.slice(8).filter((x) => !x.startsWith('[')).map((x) => {
        const [first, last = first] = x.split('-').map(Number);
        return [first, last];
      }),
    };
  });
}

/** The primaries serving slots, not taken for failed, in `nodes` (clusterNodes). */
export function livePrimaries(nodes) {
  return nodes.filter((n) => n.flags.includes('master') && !n.flags.some((f) => f.startsWith('fail')) && n.slots.length);
}

/** The live primary of `nodes` owning `slot`, or null. */
export function slotOwner(nodes, slot) {
  return livePrimaries(nodes).find((n) => n.slots.some(([a, b]) => slot >= a && slot <= b)) ?? null;
}

/** CLUSTER INFO of redis machine `host`'s node: {cluster_state: 'ok', ...}. */
export async function clusterInfo(host) {
  return Object.fromEntries((await redisCli(host, 'cluster info')).map((l) => l.trim().split(':')).filter((kv) => kv.length === 2));
}

/**
 * Whether the cluster is whole, as every machine of `hosts` (default: all
 * redis machines) sees it: state ok, every slot served by three primaries,
 * each with a replica linked to it on another machine. Resolves to the
 * nodes as the first host sees them, or null.
 */
export async function clusterWhole(hosts = REDIS_HOSTS) {
  for (const h of hosts) {
    const info = await clusterInfo(h).catch(() => ({}));
    if (info.cluster_state !== 'ok' || info.cluster_slots_ok !== String(CLUSTER_SLOTS)) return null;
  }
  const nodes = await clusterNodes(hosts[0]).catch(() => null);
  if (!nodes) return null;
  const primaries = livePrimaries(nodes);
  if (primaries.length !== 3) return null;
  for (const p of primaries) {
    const replicas = nodes.filter((n) => n.primary === p.id && n.link === 'connected' && !n.flags.some((f) => f.startsWith('fail')));
    if (replicas.length !== 1 || replicas[0].ip === p.ip) return null;
  }
  for (const h of hosts) {
    const replication = (await redisCli(h, 'info replication').catch(() => [])).map((l) => l.trim());
    if (replication.includes('role:slave') && !replication.includes('master_link_status:up')) return null;
  }
  return nodes;
}

/** Waits until the cluster is whole (clusterWhole); resolves to its nodes. */
export function waitForWholeCluster(timeoutMs = 60_000, hosts = REDIS_HOSTS) {
  return waitFor('the Redis Cluster to be ok, 3 primaries each with a replica on another machine, linked', () => clusterWhole(hosts),
    { timeoutMs, intervalMs: 500 });
}

/**
 * Room names starting with `stem`, `perShard` on each of the three
 * primaries of `nodes`: {names, shardOf: name -> primary's node}.
 */
export function roomsPerShard(nodes, stem, perShard) {
  const primaries = livePrimaries(nodes);
  const byShard = new Map(primaries.map((p) => [p.id, []]));
  for (let i = 0; [...byShard.values()].some((rooms) => rooms.length < perShard); i++) {
    const name = `${stem}-${i}`;
    const owner = slotOwner(nodes, roomSlot(name));
    const rooms = byShard.get(owner.id);
    if (rooms.length < perShard) rooms.push(name);
  }
  const shardOf = new Map();
  for (const p of primaries) for (const name of byShard.get(p.id)) shardOf.set(name, p);
  return { names: [...shardOf.keys()], shardOf };
}

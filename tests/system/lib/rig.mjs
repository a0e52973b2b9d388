// What the system tests share: the rig's addresses (as in the Vagrantfile),
// commands inside the machines (vagrant ssh), the frontends' status (asked
// from lb: the instances admit no one else) and HAProxy's server states,
// and socket.io-client connections made through the load balancer with a
// demo domain as Host.

import { execFile, execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import {
  DOMAIN_1, DOMAIN_2, Poster, compareIds, deliveryCounts, request, resolvingAgent, sleep, waitFor, within,
} from '../../e2e/lib/helpers.mjs';

export { DOMAIN_1, DOMAIN_2, compareIds, deliveryCounts, request, sleep, waitFor, within };

// The official client, as locked in tests/e2e (npm ci there).
const { io } = createRequire(new URL('../../e2e/package.json', import.meta.url))('socket.io-client');

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const NET = process.env.CHAT_HA_RIG_NET ?? '10.78.1';

/** The load balancer (HAProxy on port 80). */
export const LB = `${NET}.10`;
export const LB_URL = `http://${LB}`;
/** Instances per frontend or backend host, on ports 9100+N and 9200+N. */
export const INSTANCES = 2;
export const FRONT_HOSTS = [{ name: 'front1', ip: `${NET}.11` }, { name: 'front2', ip: `${NET}.12` }];
export const REDIS = `${NET}.30`;
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

/**
 * GET each of `urls` (an instance's port) from lb, the one machine the
 * instances admit, in one ssh command: [{code, body}], code 0 for no answer.
 */
export async function getFromLb(urls) {
  // Each answer on one line: "CODE BODY" (the status endpoints answer one line).
  const script = urls.map((u) => `printf '%s ' "$(curl -s -o /tmp/chat-ha-get.$$ -w '%{http_code}' --max-time 2 '${u}' || true)"; `
    + 'tr -d "\\n" </tmp/chat-ha-get.$$ 2>/dev/null; echo').join('\n');
  const out = await ssh('lb', `${script}\nrm -f /tmp/chat-ha-get.$$`);
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

/** HAProxy's servers: [{backend, server, status, stot, ...}] from `show stat` on lb. */
export async function lbServers() {
  const csv = await ssh('lb', 'echo "show stat" | sudo socat stdio /run/haproxy/admin.sock');
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
    this.lastId = null;
    this.connectCount = 0;
    this.joins = [];
    this.disconnects = [];
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
      this.join();
    });
    this.socket.on('message', (m) => this.receive(m));
    this.socket.on('disconnect', (reason) => {
      this.disconnects.push(reason);
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
    socket.timeout(5000).emit('room', payload, (err, answer) => {
      if (!socket.connected) return;
      if (err || !answer?.ok) {
        this.joins.push(err ? { error: err.message } : answer);
        setTimeout(() => { if (socket.connected) this.join(); }, 250);
        return;
      }
      this.joins.push(answer);
    });
  }

  receive(m) {
    if (m?.room !== this.room) return;
    if (this.ids.has(m.id)) {
      this.duplicates.push(m.id);
      return;
    }
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

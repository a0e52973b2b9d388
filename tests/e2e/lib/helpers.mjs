// What the end-to-end, browser and system tests share: HTTP requests with
// a chosen Host, real socket.io-client connections, a steady stream of
// posts, and waits that fail with a clear message.
//
// A test waits for an event (a message, a status, a log line), never for a
// while: to show that something did *not* happen, it sends a fence (a
// message posted after everything else) and, once the fence has arrived,
// looks at what came before it.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { io } from 'socket.io-client';

/** The demo domains of etc/haproxy/chat-ha-domains.lst that the tests use. */
export const DOMAIN_1 = 'www.node-services-1.com';
export const DOMAIN_2 = 'www.node-services-2.com';

/**
 * Resolves after `ms`. For pacing what a test does (a poster's rhythm, a
 * client coming and going), never for giving something time to happen:
 * wait for the event itself (waitFor), or send a fence.
 */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * `what` as text: a function is called, so that a wait's message tells the
 * state when the wait gave up, not when it began.
 */
function describeNow(what) {
  return typeof what === 'function' ? what() : what;
}

/**
 * Polls `check` (sync or async) until it returns a truthy value, which is
 * returned; fails after `timeoutMs` with `what` (text, or a function giving
 * it) and the last error.
 */
export async function waitFor(what, check, { timeoutMs = 10_000, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = null;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${describeNow(what)}` + (last ? ` (last error: ${last.message})` : ''));
    }
    await sleep(intervalMs);
  }
}

/** Rejects with `what` (text, or a function giving it) if `promise` has not settled within `timeoutMs`. */
export function within(timeoutMs, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${describeNow(what)}`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * The seed of a test's random choices: $CHAT_HA_TEST_SEED when set (to
 * replay a failed run's choices), else a fresh one. Print it with the
 * test's output.
 */
export function testSeed() {
  const given = process.env.CHAT_HA_TEST_SEED;
  if (given === undefined) return crypto.randomBytes(4).readUInt32BE();
  if (!/^\d+$/.test(given)) throw new Error(`CHAT_HA_TEST_SEED must be a whole number, not ${JSON.stringify(given)}`);
  return Number(given) % 2 ** 32;
}

/**
 * A random number generator seeded with `seed` (mulberry32): each call gives
 * a float in [0, 1), the same sequence for the same seed.
 */
export function randomFrom(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** Resident memory of process `pid` now (rss) and at its peak (peak), in bytes. */
export function memoryOf(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (name) => Number(new RegExp(`^${name}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { rss: kib('VmRSS'), peak: kib('VmHWM') };
}

/**
 * An HTTP request. `url` is the address to connect to; `host`, when given,
 * is sent as the Host header (as a browser would for a domain pointing at
 * this address). `localAddress` is the address to connect from (any of
 * 127.0.0.0/8: another client, as the server sees it). Resolves to {status,
 * headers, text, json} (json: parsed body or undefined).
 */
export function request(url, { method = 'GET', host, headers = {}, body, localAddress, timeoutMs = 10_000 } = {}) {
  return new Promise((resolve, reject) => {
    const allHeaders = { ...headers };
    if (host !== undefined) allHeaders.host = host;
    if (body !== undefined && allHeaders['content-length'] === undefined) {
      allHeaders['content-length'] = Buffer.byteLength(body);
    }
    const req = http.request(url, { method, headers: allHeaders, agent: false, localAddress }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json;
        if (/json/.test(res.headers['content-type'] ?? '')) {
          try { json = JSON.parse(text); } catch { /* left undefined */ }
        }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`${method} ${url}: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

/** POST /back/message as JSON. */
export function postMessage(baseUrl, room, message, { host, idempotencyKey } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (idempotencyKey) headers['idempotency-key'] = idempotencyKey;
  return request(`${baseUrl}/back/message`, {
    method: 'POST',
    host,
    headers,
    body: JSON.stringify({ room, message }),
  });
}

/**
 * An http.Agent that connects to the IPv4 `address` whatever the host name:
 * a stand-in for DNS. With `keepAlive` (as browsers do) it reuses
 * connections between requests; without, each request has its own.
 */
export function resolvingAgent(address, { keepAlive = true } = {}) {
  return new http.Agent({
    keepAlive,
    lookup: (hostname, options, callback) => (options.all
      ? callback(null, [{ address, family: 4 }])
      : callback(null, address, 4)),
  });
}

/** resolvingAgent for 127.0.0.1, with keep-alive. */
function loopbackAgent() {
  return resolvingAgent('127.0.0.1');
}

/**
 * A socket.io-client connection, recording what it receives.
 *
 * `url` is http://DOMAIN:PORT (resolved to 127.0.0.1, so the Host header
 * names the domain, for polling and websocket alike) or a plain address.
 * withCredentials keeps HAProxy's sticky cookie across polling requests;
 * `withCredentials: false` makes a client that keeps no cookies, as many
 * mobile and server-side clients are.
 */
export class Client {
  constructor(url, { transports, name = url, withCredentials = true } = {}) {
    this.name = `${name}${transports ? ` [${transports.join(',')}]` : ''}`;
    this.agent = loopbackAgent();
    this.messages = [];
    this.disconnects = [];
    this.connectErrors = [];
    this.connectCount = 0;
    this.socket = this.openSocket(url, {
      path: '/front/socket.io',
      transports,
      agent: this.agent,
      withCredentials,
      reconnection: false,
      forceNew: true,
      timeout: 10_000,
    });
    this.socket.on('message', (m) => this.messages.push(m));
    this.socket.on('disconnect', (reason) => this.disconnects.push(reason));
    this.socket.on('connect', () => { this.connectCount += 1; });
    this.socket.on('connect_error', (e) => this.connectErrors.push(connectErrorText(e)));
    this.connected = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      this.socket.once('connect_error', (e) => reject(new Error(`${this.name}: cannot connect: ${connectErrorText(e)}`)));
    });
    // Reported by the promise above; keeps an unawaited one from crashing the run.
    this.connected.catch(() => {});
  }

  /** The socket.io connection to `url` with `options` (a subclass opens another client's). */
  openSocket(url, options) {
    return io(url, options);
  }

  /** Resolves once connected (fails after `timeoutMs`). */
  async connect(timeoutMs = 10_000) {
    await within(timeoutMs, `${this.name} to connect`, this.connected);
    return this;
  }

  /** The transport in use now: 'polling' or 'websocket'. */
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

  /** Emits `room` with an ack; resolves to the ack's answer. */
  join(room, timeoutMs = 10_000) {
    return within(timeoutMs, `${this.name}: ack of room ${JSON.stringify(room)}`, this.socket.emitWithAck('room', room));
  }

  /** Waits until the client has received a message satisfying `match`. */
  waitForMessage(what, match, timeoutMs = 10_000) {
    return waitFor(() => `${this.name} to receive ${what} (received: ${JSON.stringify(this.messages.map((m) => m.message.slice(0, 80)))}, disconnects: ${JSON.stringify(this.disconnects)})`,
      () => this.messages.find(match), { timeoutMs, intervalMs: 20 });
  }

  close() {
    this.socket.close();
    this.agent.destroy();
  }
}

/** What a socket.io client's `connect_error` says, for a test's failure message. */
function connectErrorText(e) {
  return `${e?.message ?? e} ${e?.description?.message ?? e?.description ?? ''}`.trim();
}

/** Connects `clients` all at once; resolves when every one is connected. */
export async function connectAll(clients, timeoutMs = 15_000) {
  await Promise.all(clients.map((c) => c.connect(timeoutMs)));
  return clients;
}

/**
 * Runs `fn`; when it throws, adds the end of every process's log to the
 * error and keeps the log directory.
 */
export async function withLogs(topology, fn) {
  try {
    return await fn();
  } catch (e) {
    if (topology) {
      topology.keepLogs();
      e.message += `\n\nlogs in ${topology.logDir}:\n${topology.logs()}`;
    }
    throw e;
  }
}

/** A test body wrapped with withLogs for the topology `get()` returns. */
export function logged(get, fn) {
  return (t) => withLogs(get(), () => fn(t));
}

// ---------------------------------------------------------------------------
// Resuming, drills and abuse: message ids, the chat page's client loop, a
// steady stream of posts, delivery counts, metrics, raw Engine.IO.

/** Compares two message ids `<ms>-<seq>` as numbers: negative, 0 or positive. */
export function compareIds(a, b) {
  const [am, as] = a.split('-').map(BigInt);
  const [bm, bs] = b.split('-').map(BigInt);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

/** The answers to a join after which the client joins again shortly, as the chat page does. */
const JOIN_AGAIN = /join again shortly/;

/**
 * A client of one room written like the chat page: on every connect it joins
 * with `since` = the last id it has seen (a plain room name before the first
 * message), and joins again shortly when the answer says so (history
 * unavailable, or too much replayed to its address). It keeps its state across sockets: open() starts a new
 * connection (to any frontend) that resumes where the previous one stopped.
 *
 * Every `message` event is recorded: `messages` (in arrival order, each id
 * once), `duplicates` (ids received again), `outOfOrder` (ids older than one
 * already received).
 */
export class ResumingClient {
  constructor({ room, name = room, retryMs = 250, joinTimeoutMs = 5000 } = {}) {
    Object.assign(this, { room, name, retryMs, joinTimeoutMs });
    this.agent = loopbackAgent();
    this.socket = null;
    this.lastId = null;
    this.messages = [];
    this.ids = new Set();
    this.duplicates = [];
    this.outOfOrder = [];
    this.answers = []; // every join answer, in order
    this.joined = 0; // successful joins
    this.unavailable = 0; // "join again shortly" answers
    this.connectCount = 0;
    this.disconnects = [];
    this.connectErrors = [];
    this.sockets = 0;
  }

  /**
   * Connects to `url` (closing the current connection, if any). With
   * `reconnection`, socket.io reconnects by itself, as in the chat page, and
   * a session the server ended is opened again after 500 ms.
   */
  open(url, { transports, reconnection = false } = {}) {
    this.socket?.close();
    this.sockets += 1;
    this.url = url;
    const socket = this.openSocket(url, {
      path: '/front/socket.io',
      transports,
      agent: this.agent,
      withCredentials: true,
      forceNew: true,
      reconnection,
      reconnectionDelayMax: 5000,
      timeout: 10_000,
    });
    this.socket = socket;
    socket.on('connect', () => {
      this.connectCount += 1;
      this.join(socket);
    });
    socket.on('message', (m) => this.receive(m));
    socket.on('connect_error', (e) => this.connectErrors.push(connectErrorText(e)));
    socket.on('disconnect', (reason) => {
      this.disconnects.push(reason);
      if (reconnection && reason === 'io server disconnect') {
        setTimeout(() => { if (this.socket === socket && !socket.connected) socket.connect(); }, 500);
      }
    });
    return this;
  }

  /** The socket.io connection to `url` with `options` (a subclass opens another client's). */
  openSocket(url, options) {
    return io(url, options);
  }

  /** Emits `room` with `payload`; `answered(err, answer)` once, err when no answer came within joinTimeoutMs. */
  emitJoin(socket, payload, answered) {
    socket.timeout(this.joinTimeoutMs).emit('room', payload, answered);
  }

  join(socket) {
    const payload = this.lastId === null ? this.room : { room: this.room, since: this.lastId };
    this.emitJoin(socket, payload, (err, answer) => {
      if (this.socket !== socket || !socket.connected) return;
      if (err) {
        this.join(socket); // no answer in time: ask again on this connection
        return;
      }
      this.answers.push(answer);
      if (answer?.ok) {
        this.joined += 1;
      } else if (JOIN_AGAIN.test(answer?.error ?? '')) {
        this.unavailable += 1;
        setTimeout(() => { if (this.socket === socket && socket.connected) this.join(socket); }, this.retryMs);
      }
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

  get connected() {
    return this.socket?.connected === true;
  }

  /** Waits until the client has joined `count` times in all. */
  waitJoined(count, timeoutMs = 15_000) {
    return waitFor(() => `${this.name} to have joined ${count} times (joined ${this.joined}; last answers: ${JSON.stringify(this.answers.slice(-3))}, connect errors: ${JSON.stringify(this.connectErrors.slice(-3))}, disconnects: ${JSON.stringify(this.disconnects.slice(-3))})`,
      () => this.joined >= count && this.connected, { timeoutMs, intervalMs: 20 });
  }

  /** Waits until the client has received the message with `id`. */
  waitForId(id, timeoutMs = 15_000) {
    return waitFor(() => `${this.name} to receive message ${id} (last received ${this.lastId})`,
      () => this.ids.has(id), { timeoutMs, intervalMs: 20 });
  }

  /** Closes the current connection, keeping what was received. */
  drop() {
    this.socket?.close();
  }

  /** Closes the connection; the agent goes a moment later, so that a polling client's goodbye reaches the server. */
  close() {
    this.socket?.close();
    setTimeout(() => this.agent.destroy(), 1000).unref();
  }
}

/**
 * A steady, client-paced stream of posts to one room: each of `concurrency`
 * loops POSTs, waits for the answer, then `intervalMs`. The text carries a
 * sequence number; the Host header takes each of `hosts` in turn (`host`:
 * one). `acked` holds the stored messages (201) in the order acknowledged
 * (id order with one loop); `failed` every other outcome: {seq, status,
 * error, startedAt, endedAt}; `log` every post.
 *
 * With `attempts` above 1, each post carries an Idempotency-Key and is
 * tried again, `retryMs` later, after a 5xx, a 429 or a network error, as a
 * careful client does; `tries` records every attempt: {seq, attempt,
 * status, startedAt, endedAt}.
 */
export class Poster {
  constructor(baseUrl, room, {
    host, hosts = [host], intervalMs = 10, label = 'post', concurrency = 1, attempts = 1, retryMs = 200,
  } = {}) {
    Object.assign(this, { baseUrl, room, hosts, intervalMs, label, concurrency, attempts, retryMs });
    this.sent = 0;
    this.acked = [];
    this.failed = [];
    this.log = []; // {seq, status, startedAt, endedAt}
    this.tries = [];
    this.running = null;
    this.stopping = false;
  }

  async post(text) {
    this.sent += 1;
    const seq = this.sent;
    const host = this.hosts[seq % this.hosts.length];
    const message = `${this.label} ${seq}${text ? ` ${text}` : ''}`;
    const idempotencyKey = this.attempts > 1 ? crypto.randomUUID() : undefined;
    const startedAt = Date.now();
    let status;
    let error;
    for (let attempt = 1; attempt <= this.attempts; attempt++) {
      if (attempt > 1) await sleep(this.retryMs);
      const at = Date.now();
      try {
        const res = await postMessage(this.baseUrl, this.room, message, { host, idempotencyKey });
        status = res.status;
        error = status === 201 ? undefined : res.text;
        if (status === 201) this.acked.push(res.json);
      } catch (e) {
        status = 'error';
        error = e.message;
      }
      this.tries.push({ seq, attempt, status, startedAt: at, endedAt: Date.now() });
      if (!retryable(status)) break;
    }
    const entry = { seq, status, startedAt, endedAt: Date.now() };
    this.log.push(entry);
    if (status !== 201) this.failed.push({ ...entry, error });
    return entry;
  }

  start() {
    const loop = async () => {
      while (!this.stopping) {
        await this.post();
        await sleep(this.intervalMs);
      }
    };
    this.running = Promise.all(Array.from({ length: this.concurrency }, loop));
    return this;
  }

  async stop() {
    this.stopping = true;
    await this.running;
  }

  /**
   * Resolves once `count` more posts than now have been acknowledged: the
   * stream went on for a while, measured in what it did, not in time.
   */
  acknowledgedMore(count, timeoutMs = 30_000) {
    return acknowledgedMore(() => this.acked.length, count, timeoutMs, () => `failed: ${JSON.stringify(this.failedByStatus())}`);
  }

  /** Number of failed requests by status, e.g. {503: 12}. */
  failedByStatus() {
    const counts = {};
    for (const f of this.failed) counts[f.status] = (counts[f.status] ?? 0) + 1;
    return counts;
  }
}

/**
 * Resolves once `acknowledged()` has grown by `count` from now; `more()`
 * adds to the message on time-out.
 */
export function acknowledgedMore(acknowledged, count, timeoutMs = 30_000, more = () => '') {
  const target = acknowledged() + count;
  return waitFor(() => `${count} more posts acknowledged (${acknowledged() - target + count} so far; ${more()})`,
    () => acknowledged() >= target, { timeoutMs, intervalMs: 20 });
}

/** Whether a post that got `status` may be tried again with its key. */
function retryable(status) {
  return status === 'error' || status === 429 || status >= 500;
}

/**
 * What `clients` received of what `poster` had acknowledged: per client the
 * acknowledged messages lost, those received twice, out of order, and those
 * received that were never acknowledged. `line` sums it up for printing.
 * A client is anything with `name`, `messages` (in arrival order), `ids`
 * (a Set), `duplicates` and `outOfOrder`.
 */
export function deliveryCounts(label, poster, clients) {
  const ackedIds = poster.acked.map((m) => m.id);
  const acked = new Set(ackedIds);
  const perClient = clients.map((c) => {
    const got = c.messages.map((m) => m.id);
    return {
      name: c.name,
      delivered: got.filter((id) => acked.has(id)).length,
      lost: ackedIds.filter((id) => !c.ids.has(id)),
      duplicated: c.duplicates.length,
      outOfOrder: c.outOfOrder.length,
      unacknowledged: got.filter((id) => !acked.has(id)).length,
      // The acknowledged messages as received, for an exact comparison.
      received: got.filter((id) => acked.has(id)),
    };
  });
  const sum = (f) => perClient.reduce((n, c) => n + f(c), 0);
  const failed = poster.failedByStatus();
  const counts = {
    sent: poster.sent,
    acknowledged: ackedIds.length,
    failedRequests: poster.failed.length,
    delivered: sum((c) => c.delivered),
    expected: ackedIds.length * clients.length,
    lost: sum((c) => c.lost.length),
    duplicated: sum((c) => c.duplicated),
    outOfOrder: sum((c) => c.outOfOrder),
    unacknowledgedDelivered: sum((c) => c.unacknowledged),
  };
  const line = `${label}: sent ${counts.sent}, acknowledged ${counts.acknowledged}, ` +
    `failed requests ${counts.failedRequests}${counts.failedRequests ? ` ${JSON.stringify(failed)}` : ''}; ` +
    `${clients.length} clients: delivered ${counts.delivered} of ${counts.expected}, lost ${counts.lost}, ` +
    `duplicated ${counts.duplicated}, out of order ${counts.outOfOrder}, unacknowledged delivered ${counts.unacknowledgedDelivered}`;
  return { ...counts, perClient, ackedIds, line };
}

/** GET /metrics of a daemon (its own port): {name: value} of the unlabelled samples. */
export async function metrics(baseUrl) {
  const res = await request(`${baseUrl}/metrics`);
  if (res.status !== 200) throw new Error(`GET ${baseUrl}/metrics: ${res.status} ${res.text}`);
  const values = {};
  for (const line of res.text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$/.exec(line);
    if (m) values[m[1]] = Number(m[2]);
  }
  return values;
}

/**
 * A bare websocket client (RFC 6455) on node:net, to send what a real
 * client never would: any frame, any size, masked or not. Records the text
 * and binary messages received (`messages`, as strings), the server's close
 * frame (`closeFrame`) and whether the connection ended (`ended`).
 */
export class RawWebSocket {
  constructor(socket, rest) {
    this.socket = socket;
    this.messages = [];
    this.pongs = [];
    this.closeFrame = null;
    this.closeFrames = 0;
    this.ended = false;
    this.buffer = rest;
    this.fragments = null;
    this.waiters = new Set();
    this.onMessage = null;
    socket.on('data', (chunk) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.parse();
    });
    socket.on('error', () => { /* seen as the end of the connection */ });
    socket.on('close', () => {
      this.ended = true;
      this.notify();
    });
    // Frames that came with the handshake's answer, once the caller holds this object.
    setImmediate(() => this.parse());
  }

  /**
   * Opens `path` on 127.0.0.1:`port` with the Host header `host`, from
   * `localAddress` (any of 127.0.0.0/8) if given.
   */
  static open(port, path, { host = `127.0.0.1:${port}`, localAddress, timeoutMs = 5000 } = {}) {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: '127.0.0.1', port, localAddress });
      const key = crypto.randomBytes(16).toString('base64');
      let head = Buffer.alloc(0);
      const timer = setTimeout(() => socket.destroy(new Error(`websocket handshake for ${path}: no answer within ${timeoutMs} ms`)), timeoutMs);
      socket.once('error', (e) => { clearTimeout(timer); reject(e); });
      socket.once('connect', () => {
        socket.write([`GET ${path} HTTP/1.1`, `Host: ${host}`, 'Upgrade: websocket', 'Connection: Upgrade',
          `Sec-WebSocket-Key: ${key}`, 'Sec-WebSocket-Version: 13', '', ''].join('\r\n'));
      });
      const onData = (chunk) => {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        clearTimeout(timer);
        socket.off('data', onData);
        const statusLine = head.subarray(0, head.indexOf('\r\n')).toString('latin1');
        if (!/^HTTP\/1\.1 101 /.test(statusLine)) {
          socket.destroy();
          reject(new Error(`websocket handshake for ${path} refused: ${statusLine}`));
          return;
        }
        resolve(new RawWebSocket(socket, head.subarray(end + 4)));
      };
      socket.on('data', onData);
    });
  }

  notify() {
    for (const waiter of [...this.waiters]) waiter();
  }

  parse() {
    for (;;) {
      const b = this.buffer;
      if (b.length < 2) return;
      const fin = (b[0] & 0x80) !== 0;
      const opcode = b[0] & 0x0f;
      let length = b[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (b.length < 4) return;
        length = b.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (b.length < 10) return;
        length = Number(b.readBigUInt64BE(2));
        offset = 10;
      }
      if (b.length < offset + length) return;
      const payload = b.subarray(offset, offset + length);
      this.buffer = b.subarray(offset + length);
      if (opcode === 0x8) {
        this.closeFrames += 1;
        this.closeFrame = {
          code: payload.length >= 2 ? payload.readUInt16BE(0) : null,
          reason: payload.subarray(2).toString('utf8'),
        };
      } else if (opcode === 0x9) {
        this.sendFrame(0xa, payload);
      } else if (opcode === 0xa) {
        this.pongs.push(payload.toString('utf8'));
      } else if (opcode <= 0x2) {
        this.fragments = opcode === 0x0 ? Buffer.concat([this.fragments ?? Buffer.alloc(0), payload]) : payload;
        if (fin) {
          const text = this.fragments.toString('utf8');
          this.fragments = null;
          this.messages.push(text);
          this.onMessage?.(text);
        }
      }
      this.notify();
    }
  }

  /** Sends one frame; masked, as a client must, unless `mask` is false. */
  sendFrame(opcode, payload, { fin = true, mask = true } = {}) {
    if (this.socket.destroyed) return false;
    const data = Buffer.isBuffer(payload) ? payload : Buffer.from(payload, 'utf8');
    const header = [(fin ? 0x80 : 0) | opcode];
    const maskBit = mask ? 0x80 : 0;
    let extended = Buffer.alloc(0);
    if (data.length < 126) {
      header.push(maskBit | data.length);
    } else if (data.length < 65536) {
      header.push(maskBit | 126);
      extended = Buffer.alloc(2);
      extended.writeUInt16BE(data.length);
    } else {
      header.push(maskBit | 127);
      extended = Buffer.alloc(8);
      extended.writeBigUInt64BE(BigInt(data.length));
    }
    let key = Buffer.alloc(0);
    let body = data;
    if (mask) {
      key = crypto.randomBytes(4);
      body = Buffer.alloc(data.length);
      for (let i = 0; i < data.length; i++) body[i] = data[i] ^ key[i & 3];
    }
    this.socket.write(Buffer.concat([Buffer.from(header), extended, key, body]));
    return true;
  }

  /** Sends a text message. */
  send(text) {
    return this.sendFrame(0x1, text);
  }

  /** Resolves with check()'s value once truthy, re-checked on every frame and at the end of the connection. */
  until(what, check, timeoutMs = 5000) {
    return new Promise((resolve, reject) => {
      const run = () => {
        const value = check();
        if (value) {
          cleanup();
          resolve(value);
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what} (received ${JSON.stringify(this.messages.map((m) => m.slice(0, 200)))}, ended ${this.ended})`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(run);
      };
      this.waiters.add(run);
      run();
    });
  }

  close() {
    this.socket.destroy();
  }
}

/**
 * A Socket.IO session spoken by hand over a RawWebSocket: Engine.IO open,
 * Socket.IO connect to the default namespace; answers the server's pings.
 * Resolves to the RawWebSocket.
 */
export async function rawSocketIo(port, { host, localAddress } = {}) {
  const ws = await RawWebSocket.open(port, '/front/socket.io/?EIO=4&transport=websocket', { host, localAddress });
  ws.onMessage = (text) => { if (text === '2') ws.send('3'); };
  await ws.until('the Engine.IO open packet', () => ws.messages.some((m) => m.startsWith('0{')));
  ws.send('40');
  await ws.until('the Socket.IO connect packet', () => ws.messages.some((m) => m.startsWith('40{')));
  return ws;
}

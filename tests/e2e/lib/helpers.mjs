// What the end-to-end tests share: HTTP requests with a chosen Host, real
// socket.io-client connections, and waits that fail with a clear message.

import http from 'node:http';
import { io } from 'socket.io-client';

/** The demo domains of etc/haproxy/chat-ha-domains.lst that the tests use. */
export const DOMAIN_1 = 'www.node-services-1.com';
export const DOMAIN_2 = 'www.node-services-2.com';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Polls `check` (sync or async) until it returns a truthy value, which is
 * returned; fails after `timeoutMs` with `message` and the last error.
 */
export async function waitFor(message, check, { timeoutMs = 10_000, intervalMs = 50 } = {}) {
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
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${message}` + (last ? ` (last error: ${last.message})` : ''));
    }
    await sleep(intervalMs);
  }
}

/** Rejects with `message` if `promise` has not settled within `timeoutMs`. */
export function within(timeoutMs, message, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${message}`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * An HTTP request. `url` is the address to connect to; `host`, when given,
 * is sent as the Host header (as a browser would for a domain pointing at
 * this address). Resolves to {status, headers, text, json} (json: parsed
 * body or undefined).
 */
export function request(url, { method = 'GET', host, headers = {}, body, timeoutMs = 10_000 } = {}) {
  return new Promise((resolve, reject) => {
    const allHeaders = { ...headers };
    if (host !== undefined) allHeaders.host = host;
    if (body !== undefined && allHeaders['content-length'] === undefined) {
      allHeaders['content-length'] = Buffer.byteLength(body);
    }
    const req = http.request(url, { method, headers: allHeaders, agent: false }, (res) => {
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
export function postMessage(baseUrl, room, message, { host } = {}) {
  return request(`${baseUrl}/back/message`, {
    method: 'POST',
    host,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ room, message }),
  });
}

/** An http.Agent that connects to 127.0.0.1 whatever the host name: a stand-in for DNS. */
function loopbackAgent() {
  return new http.Agent({
    keepAlive: true,
    lookup: (hostname, options, callback) => (options.all
      ? callback(null, [{ address: '127.0.0.1', family: 4 }])
      : callback(null, '127.0.0.1', 4)),
  });
}

/**
 * A socket.io-client connection, recording what it receives.
 *
 * `url` is http://DOMAIN:PORT (resolved to 127.0.0.1, so the Host header
 * names the domain, for polling and websocket alike) or a plain address.
 * withCredentials keeps HAProxy's sticky cookie across polling requests.
 */
export class Client {
  constructor(url, { transports, name = url } = {}) {
    this.name = `${name}${transports ? ` [${transports.join(',')}]` : ''}`;
    this.agent = loopbackAgent();
    this.messages = [];
    this.disconnects = [];
    this.connectCount = 0;
    this.socket = io(url, {
      path: '/front/socket.io',
      transports,
      agent: this.agent,
      withCredentials: true,
      reconnection: false,
      forceNew: true,
      timeout: 10_000,
    });
    this.socket.on('message', (m) => this.messages.push(m));
    this.socket.on('disconnect', (reason) => this.disconnects.push(reason));
    this.socket.on('connect', () => { this.connectCount += 1; });
    this.connected = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      this.socket.once('connect_error', (e) => reject(new Error(`${this.name}: cannot connect: ${e.message} ${e.description?.message ?? e.description ?? ''}`)));
    });
    // Reported by the promise above; keeps an unawaited one from crashing the run.
    this.connected.catch(() => {});
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
    return waitFor(`${this.name} to receive ${what} (received so far: ${JSON.stringify(this.messages.map((m) => m.message))})`,
      () => this.messages.find(match), { timeoutMs, intervalMs: 20 });
  }

  close() {
    this.socket.close();
    this.agent.destroy();
  }
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

// Who may do what, through HAProxy: every rule of etc/haproxy/chat-ha.cfg
// against the attack it stops, with a bystander it must leave alone.
//
// The whole of 127.0.0.0/8 is local here: a request sent from 127.0.0.N is,
// for HAProxy, another client address. Each test uses addresses of its own,
// so that no count carries over from one test to the next.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { io } from 'socket.io-client';

import { bindInherited, haproxyConfig, haproxyGlobal, listeningSocket, startTopology } from './lib/topology.mjs';
import { DOMAIN_1, DOMAIN_2, logged, request, waitFor, within } from './lib/helpers.mjs';

const HANDSHAKE = '/front/socket.io/?EIO=4&transport=polling';

/** POST /back/message from `from` (default 127.0.0.1) with extra headers. */
function post(topo, { from, host = DOMAIN_1, headers = {}, room = 'access' } = {}) {
  return request(`${topo.url}/back/message`, {
    method: 'POST',
    host,
    localAddress: from,
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ room, message: 'hi' }),
  });
}

/** GET /back/messages of room `access` from `from`. */
function readHistory(topo, from) {
  return request(`${topo.url}/back/messages?room=access&limit=200`, { host: DOMAIN_1, localAddress: from });
}

/** The Engine.IO handshake of a long-polling socket, from `from`. */
function handshake(topo, from, headers = {}) {
  return request(`${topo.url}${HANDSHAKE}`, { host: DOMAIN_1, localAddress: from, headers });
}

/** The statuses of `count` requests made one after the other by `send`. */
async function statusesOf(count, send) {
  const statuses = [];
  for (let i = 0; i < count; i++) statuses.push((await send()).status);
  return statuses;
}

/**
 * A socket.io-client socket connecting from `from`, over websocket only
 * unless `transports` says otherwise: {socket, connected} (a promise of the
 * connection).
 */
function socketFrom(topo, from, transports = ['websocket']) {
  const agent = new http.Agent({ keepAlive: true, localAddress: from });
  const socket = io(topo.url, {
    path: '/front/socket.io', transports, agent, reconnection: false, forceNew: true, timeout: 10_000,
  });
  socket.on('disconnect', () => agent.destroy());
  const connected = new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (e) => reject(new Error(`socket from ${from}: ${e.message} ${e.description?.message ?? ''}`)));
  });
  return { socket, connected: within(15_000, `a socket from ${from} to connect or fail`, connected) };
}

describe('origins, posts and history reads at the packaged limits', () => {
  let topo;

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1, postsPer10s: null, readsPer10s: null });
  });

  after(async () => {
    await topo?.stop();
  });

  it('lets a page post and connect from its own origin or a listed one, and refuses every other origin with 403', logged(() => topo, async () => {
    const from = '127.0.0.10';
    const withPort = `${DOMAIN_1}:${topo.haproxyPort}`;
    const outcome = async (origin, host = DOMAIN_1) => (await post(topo, { from, host, headers: { origin } }));

    const allowed = [
      [`http://${DOMAIN_1}`, DOMAIN_1], // own origin, listed too
      [`http://${withPort}`, withPort], // own origin with its port, not listed
      [`https://${DOMAIN_2}`, DOMAIN_1], // a page of another listed domain
      ['https://LOCALHOST', DOMAIN_1], // listed; origins compare case-insensitively
    ];
    for (const [origin, host] of allowed) {
      const res = await outcome(origin, host);
      assert.equal(res.status, 201, `Origin ${origin}, Host ${host}: ${res.text}`);
    }
    const noOrigin = await post(topo, { from });
    assert.equal(noOrigin.status, 201, `no Origin (curl, a server): ${noOrigin.text}`);

    const refused = [
      [`https://${withPort}`, withPort], // the page's host and port, another scheme
      [`http://${DOMAIN_1}:${topo.haproxyPort + 1}`, withPort], // another port
      [`http://${DOMAIN_2}:8080`, DOMAIN_1], // a listed name on a port that is not listed
      [`ftp://${DOMAIN_1}`, DOMAIN_1],
      ['https://evil.example', DOMAIN_1],
      [`http://${DOMAIN_1}.evil.example`, DOMAIN_1],
      [`http://evil.example/${DOMAIN_1}`, DOMAIN_1],
      ['null', DOMAIN_1], // a sandboxed page or a file
    ];
    for (const [origin, host] of refused) {
      const res = await outcome(origin, host);
      assert.equal(res.status, 403, `Origin ${origin}, Host ${host}: ${res.text}`);
      assert.deepEqual(res.json, { error: 'origin not allowed' });
    }

    const foreignSocket = await handshake(topo, from, { origin: 'http://evil.example:8080' });
    assert.equal(foreignSocket.status, 403, foreignSocket.text);
    const ownSocket = await request(`${topo.url}${HANDSHAKE}`, {
      host: withPort, localAddress: from, headers: { origin: `http://${withPort}` },
    });
    assert.equal(ownSocket.status, 200, ownSocket.text);
  }));

  it('answers 429 with a JSON error once an address posts more than 50 messages in 10 s; its reads go on', logged(() => topo, async () => {
    const attacker = '127.0.0.11';
    const statuses = await statusesOf(60, () => post(topo, { from: attacker }));
    assert.deepEqual(statuses.slice(0, 50), Array(50).fill(201), `statuses: ${statuses}`);
    assert.deepEqual(statuses.slice(50), Array(10).fill(429), `statuses: ${statuses}`);
    const refused = await post(topo, { from: attacker });
    assert.equal(refused.status, 429);
    assert.deepEqual(refused.json, { error: 'too many messages; slow down' });
    assert.equal(refused.headers['retry-after'], '10');

    const history = await readHistory(topo, attacker);
    assert.equal(history.status, 200, `reads are counted apart: ${history.text}`);
    const bystander = await post(topo, { from: '127.0.0.12' });
    assert.equal(bystander.status, 201, `another address posts: ${bystander.text}`);
  }));

  it('answers 429 with a JSON error once an address reads history more than 100 times in 10 s; its posts go on', logged(() => topo, async () => {
    const attacker = '127.0.0.13';
    const statuses = await statusesOf(110, () => readHistory(topo, attacker));
    assert.deepEqual(statuses.slice(0, 100), Array(100).fill(200), `statuses: ${statuses}`);
    assert.deepEqual(statuses.slice(100), Array(10).fill(429), `statuses: ${statuses}`);
    const refused = await readHistory(topo, attacker);
    assert.equal(refused.status, 429);
    assert.deepEqual(refused.json, { error: 'too many history reads; slow down' });
    assert.equal(refused.headers['retry-after'], '10');

    const posted = await post(topo, { from: attacker });
    assert.equal(posted.status, 201, `posts are counted apart: ${posted.text}`);
    const bystander = await readHistory(topo, '127.0.0.14');
    assert.equal(bystander.status, 200, `another address reads: ${bystander.text}`);
  }));

  it('serves the status endpoints to local clients and keeps /metrics out of reach', logged(() => topo, async () => {
    assert.equal((await request(`${topo.url}/front/status`, { host: DOMAIN_1 })).status, 200);
    assert.equal((await request(`${topo.url}/back/status`, { host: DOMAIN_1, localAddress: '127.0.0.15' })).status, 200,
      'the packaged list holds all of 127.0.0.0/8');
    const metrics = await request(`${topo.url}/metrics`, { host: DOMAIN_1 });
    assert.equal(metrics.status, 404, metrics.text);
    const frontendMetrics = await request(`${topo.frontends[0].metricsUrl}/metrics`);
    assert.equal(frontendMetrics.status, 200, 'scraped directly on the instance');
    assert.match(frontendMetrics.text, /chat_frontend_sockets/);
  }));
});

describe('Socket.IO connections per address', () => {
  let topo;
  const sockets = [];

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1, socketsPerAddress: 4, connectsPer10s: 10 });
  });

  after(async () => {
    for (const s of sockets) s.close();
    await topo?.stop();
  });

  /** conn_cur of `address` in HAProxy's table of Socket.IO requests. */
  async function socketsHeld(address) {
    // IPv4 addresses are kept as IPv4-mapped IPv6 ones.
    const entry = (await topo.haproxy.stickTable('chat_limit_sockets')).find((e) => e.key === `::ffff:${address}`);
    return entry?.conn_cur ?? 0;
  }

  it('refuses an address more than 4 sockets at once with 429, and takes it back once one closes; others still connect', logged(() => topo, async () => {
    const attacker = '127.0.0.2';
    for (let i = 0; i < 4; i++) {
      const { socket, connected } = socketFrom(topo, attacker);
      sockets.push(socket);
      await connected;
    }
    assert.equal(await socketsHeld(attacker), 4);

    const fifth = socketFrom(topo, attacker);
    sockets.push(fifth.socket);
    await assert.rejects(fifth.connected, /websocket error/, 'the fifth socket of one address');
    const refused = await handshake(topo, attacker);
    assert.equal(refused.status, 429, refused.text);
    assert.deepEqual(refused.json, { error: 'too many connections from this address' });
    assert.equal(refused.headers['retry-after'], '10');
    assert.ok(sockets.slice(0, 4).every((s) => s.connected), 'the four sockets it holds stay connected');

    const bystander = socketFrom(topo, '127.0.0.3');
    sockets.push(bystander.socket);
    await bystander.connected;
    assert.deepEqual(await within(10_000, 'the join answer', bystander.socket.emitWithAck('room', 'access')), { ok: true });

    sockets[0].close();
    await waitFor('HAProxy to count 3 sockets of the attacker', async () => (await socketsHeld(attacker)) === 3);
    const again = socketFrom(topo, attacker);
    sockets.push(again.socket);
    await again.connected;
  }));

  it('refuses an address more than 10 new sockets in 10 s with 429; its open sessions and other addresses go on', logged(() => topo, async () => {
    const attacker = '127.0.0.4';
    // A long-polling socket makes a request per packet it sends and per
    // answer it waits for: none of them is a new socket.
    const polling = socketFrom(topo, attacker, ['polling']);
    sockets.push(polling.socket);
    await polling.connected;
    const join = () => within(10_000, 'a join answer', polling.socket.emitWithAck('room', 'access'));
    for (let i = 0; i < 12; i++) assert.deepEqual(await join(), { ok: true });

    const opened = [];
    for (let i = 2; i <= 10; i++) {
      const res = await handshake(topo, attacker);
      assert.equal(res.status, 200, `new socket ${i}: ${res.text}`);
      opened.push(JSON.parse(res.text.slice(res.text.indexOf('{'))).sid);
    }
    const refused = await handshake(topo, attacker);
    assert.equal(refused.status, 429, refused.text);
    assert.deepEqual(refused.json, { error: 'too many new connections; slow down' });
    assert.equal(refused.headers['retry-after'], '10');

    // The sessions it opened go on: the polling socket, and a handshaken one
    // sending its Socket.IO connect packet.
    assert.deepEqual(await join(), { ok: true });
    const inSession = await request(`${topo.url}${HANDSHAKE}&sid=${opened[0]}`, {
      method: 'POST', host: DOMAIN_1, localAddress: attacker, headers: { 'content-type': 'text/plain' }, body: '40',
    });
    assert.equal(inSession.status, 200, inSession.text);
    const bystander = await handshake(topo, '127.0.0.5');
    assert.equal(bystander.status, 200, bystander.text);
  }));
});

describe('/back/publish and the status endpoints', () => {
  const TOKEN = 'publish-token-for-the-access-tests';
  const OUTSIDER = '127.0.0.2';
  const ATTACKER = '127.0.0.3';
  const PUBLISHER = '127.0.0.4';
  let topo;

  before(async () => {
    topo = await startTopology({
      frontends: 1,
      backends: 1,
      internalNetworks: ['127.0.0.1/32', ATTACKER, `${PUBLISHER}/32`],
      publishTokens: [TOKEN],
      authFailuresPerMin: null,
    });
  });

  after(async () => {
    await topo?.stop();
  });

  const publish = (from, token) => request(`${topo.url}/back/publish`, {
    method: 'POST',
    host: DOMAIN_1,
    localAddress: from,
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ rooms: ['access-publish'], message: 'from a server' }),
  });

  it('answers publish and status requests from outside the internal list with 404', logged(() => topo, async () => {
    const outside = await publish(OUTSIDER, TOKEN);
    assert.equal(outside.status, 404, outside.text);
    assert.deepEqual(outside.json, { error: 'no such endpoint' });
    for (const status of ['/front/status', '/back/status']) {
      const res = await request(`${topo.url}${status}`, { host: DOMAIN_1, localAddress: OUTSIDER });
      assert.equal(res.status, 404, `${status}: ${res.text}`);
    }
    const posted = await post(topo, { from: OUTSIDER });
    assert.equal(posted.status, 201, `the public API stays open to it: ${posted.text}`);

    const inside = await publish('127.0.0.1', TOKEN);
    assert.equal(inside.status, 201, inside.text);
    assert.equal(inside.json.messages.length, 1);
    assert.equal((await request(`${topo.url}/back/status`, { host: DOMAIN_1 })).status, 200);
  }));

  it('answers 429 to an address whose last minute holds 10 failed tokens, whatever it tries next; others publish', logged(() => topo, async () => {
    const statuses = await statusesOf(10, () => publish(ATTACKER, `wrong-token-${Math.random()}`));
    assert.deepEqual(statuses, Array(10).fill(401));
    const refused = await publish(ATTACKER, 'yet-another-wrong-token');
    assert.equal(refused.status, 429, refused.text);
    assert.deepEqual(refused.json, { error: 'too many failed attempts; try again later' });
    assert.equal(refused.headers['retry-after'], '60');
    const rightToken = await publish(ATTACKER, TOKEN);
    assert.equal(rightToken.status, 429, `the right token too, from that address: ${rightToken.text}`);
    // Each refused attempt counts as one more failure: an address that keeps
    // trying stays refused; one that stops is let in again within a minute.
    const [entry] = (await topo.haproxy.stickTable('chat_limit_auth')).filter((e) => e.key === `::ffff:${ATTACKER}`);
    assert.equal(entry?.gpc0_rate, 12, JSON.stringify(entry));

    const bystander = await publish(PUBLISHER, TOKEN);
    assert.equal(bystander.status, 201, `another internal address publishes: ${bystander.text}`);
  }));
});

// This block runs an HAProxy of its own from the packaged file: with a TLS
// listener besides the plain one, and its backend server a relay to the
// real backend that shows what HAProxy sends.
describe('what HAProxy forwards, and origins over TLS', () => {
  let topo;
  let tmp;
  let proxy; // the HAProxy process of this block
  let tap; // a TCP relay between HAProxy and the backend that keeps what HAProxy sent
  let plainPort;
  let tlsPort;

  /** Last resort, should this process end before after() ran. */
  const killProxy = () => {
    if (proxy.exitCode === null && proxy.signalCode === null) process.kill(proxy.pid, 'SIGKILL');
  };

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1 });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-ha-access-'));
    tap = await startTap(topo.backends[0].port);
    // Both listening sockets are bound here and inherited by HAProxy (fd 3
    // and 4): no port is chosen and then bound by another process.
    const plain = await listeningSocket();
    const tls = await listeningSocket();
    [plainPort, tlsPort] = [plain.port, tls.port];
    const pem = selfSignedPem(tmp);
    const config = bindInherited(
      haproxyConfig({ port: plainPort, frontendPorts: [topo.frontends[0].port], backendPorts: [tap.port] }),
      plainPort, ['fd@3', `fd@4 ssl crt ${pem}`]);
    fs.writeFileSync(path.join(tmp, 'chat-ha.cfg'), config);
    fs.writeFileSync(path.join(tmp, 'global.cfg'), haproxyGlobal({ statsSocket: path.join(tmp, 'stats.sock') }));
    const log = fs.openSync(path.join(tmp, 'haproxy.log'), 'a');
    try {
      proxy = spawn('haproxy', ['-db', '-f', path.join(tmp, 'global.cfg'), '-f', path.join(tmp, 'chat-ha.cfg')],
        { stdio: ['ignore', log, log, plain.fd, tls.fd] });
    } finally {
      fs.closeSync(log);
      await Promise.all([plain.close(), tls.close()]);
    }
    process.once('exit', killProxy);
    await waitFor('HAProxy of this block to route posts', async () =>
      (await post({ url: `http://127.0.0.1:${plainPort}` })).status === 201, { timeoutMs: 20_000 });
  });

  after(async () => {
    process.off('exit', killProxy);
    if (proxy && proxy.exitCode === null && proxy.signalCode === null) {
      const exited = new Promise((resolve) => proxy.once('exit', resolve));
      process.kill(proxy.pid, 'SIGTERM');
      await exited;
    }
    tap?.close();
    await topo?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  const logs = () => ({
    ...topo,
    logs: () => `${topo.logs()}\n----- haproxy of this block\n${fs.readFileSync(path.join(tmp, 'haproxy.log'), 'utf8').slice(-3000)}`,
  });

  it('replaces any X-Forwarded-For a client sends with the address it connects from', logged(logs, async () => {
    const room = `forwarded-${Date.now()}`;
    const res = await post({ url: `http://127.0.0.1:${plainPort}` }, {
      from: '127.0.0.7', room, headers: { 'x-forwarded-for': ['203.0.113.9, 198.51.100.2', '192.0.2.1'] },
    });
    assert.equal(res.status, 201, res.text);
    const head = tap.requests().find((r) => r.startsWith('POST /back/message') && r.includes(`"room":"${room}"`));
    assert.ok(head, `HAProxy forwarded the post; saw:\n${tap.requests().join('\n')}`);
    const values = head.split('\r\n').filter((l) => /^x-forwarded-for:/i.test(l)).map((l) => l.slice(l.indexOf(':') + 1).trim());
    assert.deepEqual(values, ['127.0.0.7'], head);
  }));

  it('takes https:// as the own origin of a TLS connection, and http:// there as another', logged(logs, async () => {
    const host = `${DOMAIN_1}:${tlsPort}`;
    const own = await tlsPost(tlsPort, host, `https://${host}`);
    assert.equal(own.status, 201, own.text);
    const plainScheme = await tlsPost(tlsPort, host, `http://${host}`);
    assert.equal(plainScheme.status, 403, plainScheme.text);
    const listed = await tlsPost(tlsPort, host, `https://${DOMAIN_2}`);
    assert.equal(listed.status, 201, listed.text);
  }));
});

/** A self-signed certificate and its key in one PEM file, as HAProxy's `crt` takes them. */
function selfSignedPem(dir) {
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
    '-subj', `/CN=${DOMAIN_1}`, '-keyout', key, '-out', cert], { encoding: 'utf8' });
  if (made.status !== 0) throw new Error(`openssl req: ${made.error?.message ?? made.stderr}`);
  const pem = path.join(dir, 'haproxy.pem');
  fs.writeFileSync(pem, fs.readFileSync(cert, 'utf8') + fs.readFileSync(key, 'utf8'));
  return pem;
}

/** A POST /back/message over TLS to 127.0.0.1:`port`, with Host `host` and Origin `origin`. */
function tlsPost(port, host, origin) {
  const body = JSON.stringify({ room: 'access-tls', message: 'hi' });
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: '127.0.0.1', port, path: '/back/message', method: 'POST', servername: DOMAIN_1, rejectUnauthorized: false,
      agent: false, headers: { host, origin, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { text += c; });
      res.on('end', () => resolve({ status: res.statusCode, text }));
    });
    req.setTimeout(10_000, () => req.destroy(new Error('no answer over TLS within 10 s')));
    req.on('error', reject);
    req.end(body);
  });
}

/**
 * A TCP relay on a free port of 127.0.0.1 to `targetPort`: everything passes
 * unchanged, and what clients sent is kept, for the test to see what reached
 * the target. requests() splits it into requests (head and body) before
 * each request line (a body ends without a line break).
 */
async function startTap(targetPort) {
  const connections = new Set();
  const sent = []; // per client connection, everything it sent, as text
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: '127.0.0.1', port: targetPort });
    connections.add(client).add(upstream);
    const index = sent.push('') - 1;
    client.on('data', (chunk) => { sent[index] += chunk.toString('latin1'); });
    client.pipe(upstream).pipe(client);
    const end = () => { client.destroy(); upstream.destroy(); connections.delete(client); connections.delete(upstream); };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', resolve));
  return {
    port: server.address().port,
    requests: () => sent.flatMap((text) => text.split(/(?=(?:GET|POST|HEAD) \/\S* HTTP\/1\.1\r\n)/)),
    close() {
      for (const c of connections) c.destroy();
      server.close();
    },
  };
}

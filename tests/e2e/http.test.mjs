// What an HTTP client sees through HAProxy: the backend's error answers with
// their JSON bodies, HAProxy's own refusals (unknown host, unknown path), the
// chat page and the status endpoints.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

import { WWW_DIR, startTopology } from './lib/topology.mjs';
import { DOMAIN_1, DOMAIN_2, logged, postMessage, request, waitFor } from './lib/helpers.mjs';

const JSON_TYPE = { 'content-type': 'application/json' };
const ROOM_ERROR = "room must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' or '-'";

describe('HTTP through HAProxy', () => {
  let topo;

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 2 });
  });

  after(async () => {
    await topo?.stop();
  });

  /** A request through HAProxy with the Host of demo domain 1 (unless told otherwise). */
  const via = (urlPath, options = {}) => request(topo.url + urlPath, { host: DOMAIN_1, ...options });
  const post = (body, headers = JSON_TYPE) => via('/back/message', { method: 'POST', headers, body });

  /** Asserts a JSON error answer: its status, and an error text matching `pattern`. */
  function assertError(res, status, pattern) {
    assert.equal(res.status, status, `expected ${status}, got ${res.status}: ${res.text}`);
    assert.match(res.headers['content-type'] ?? '', /^application\/json/, `JSON error body: ${res.text}`);
    assert.deepEqual(Object.keys(res.json ?? {}), ['error'], `{"error": ...} body: ${res.text}`);
    assert.equal(typeof res.json.error, 'string');
    if (pattern) assert.match(res.json.error, pattern);
  }

  it('accepts a valid message through each domain and answers 201 with it', logged(() => topo, async () => {
    for (const host of [DOMAIN_1, DOMAIN_2, 'localhost', '127.0.0.1', `${DOMAIN_2}:8080`, DOMAIN_1.toUpperCase()]) {
      const res = await postMessage(topo.url, 'http-ok', `hello from ${host}`, { host });
      assert.equal(res.status, 201, `via Host ${host}: ${res.status} ${res.text}`);
      assert.equal(res.json.message, `hello from ${host}`);
      assert.equal(res.json.room, 'http-ok');
    }
    // Limits are inclusive: a 64-character room, a 4000-character message
    // (counted in characters, not bytes).
    const res = await post(JSON.stringify({ room: 'r'.repeat(64), message: 'é'.repeat(4000) }));
    assert.equal(res.status, 201, res.text);
    assert.equal(res.json.message, 'é'.repeat(4000));
  }));

  it('refuses bad message bodies with 400 and a JSON error', logged(() => topo, async () => {
    assertError(await post('{"room": "a", "message": '), 400, /malformed JSON/);
    assertError(await post('not json at all'), 400, /malformed JSON/);
    assertError(await post(JSON.stringify({ room: 'a' })), 400, /missing field `message`/);
    assertError(await post(JSON.stringify({ message: 'hi' })), 400, /missing field `room`/);
    assertError(await post(JSON.stringify({ room: 'a', message: 'hi', extra: 1 })), 400, /unknown field `extra`/);
    assertError(await post(JSON.stringify({ room: 'a', message: 42 })), 400, /invalid/);
    assertError(await post(JSON.stringify({ room: ['a'], message: 'hi' })), 400, /invalid/);
  }));

  // serde's derived code would read a struct from an array too; the body
  // must be an object.
  it('refuses a JSON array body with 400', async () => {
    assertError(await post(JSON.stringify(['http-array', 'hi'])), 400, /expected an object/);
  });

  it('refuses invalid rooms and messages with 400 and the reason', logged(() => topo, async () => {
    for (const room of ['', 'bad room', 'a/b', 'room!', 'é', 'r'.repeat(65)]) {
      const res = await post(JSON.stringify({ room, message: 'hi' }));
      assertError(res, 400);
      assert.equal(res.json.error, ROOM_ERROR, `room ${JSON.stringify(room)}`);
    }
    for (const message of ['', ' ', ' \n\t ']) {
      assertError(await post(JSON.stringify({ room: 'a', message })), 400, /^message must not be empty$/);
    }
    assertError(await post(JSON.stringify({ room: 'a', message: 'x'.repeat(4001) })), 400, /^message is longer than 4000 characters$/);
    assertError(await post(JSON.stringify({ room: 'a', message: 'é'.repeat(4001) })), 400, /^message is longer than 4000 characters$/);
    // None of them was stored.
    const history = await via('/back/messages?room=a&limit=200');
    assert.equal(history.status, 200, history.text);
    assert.deepEqual(history.json, { room: 'a', messages: [] });
  }));

  it('refuses a body over 16 KiB with 413', logged(() => topo, async () => {
    const big = JSON.stringify({ room: 'a', message: 'x'.repeat(17 * 1024) });
    assertError(await post(big), 413, /larger than 16384 bytes/);
    // Over the limit in bytes, though its message is within 4000 characters.
    const wide = `{"room":"a","message":"${'\\u00e9'.repeat(4000)}"}`;
    assert.equal(JSON.parse(wide).message.length, 4000);
    assert.ok(Buffer.byteLength(wide) > 16384);
    assertError(await post(wide), 413, /larger than 16384 bytes/);
  }));

  it('refuses a body that is not declared JSON with 415', logged(() => topo, async () => {
    const body = JSON.stringify({ room: 'a', message: 'hi' });
    assertError(await post(body, { 'content-type': 'text/plain' }), 415, /application\/json/);
    assertError(await post(body, { 'content-type': 'application/x-www-form-urlencoded' }), 415, /application\/json/);
    assertError(await post(body, {}), 415, /application\/json/);
  }));

  it('checks the history query: room and limit', logged(() => topo, async () => {
    assertError(await via('/back/messages'), 400);
    assertError(await via('/back/messages?limit=5'), 400);
    assertError(await via('/back/messages?room=bad%20room'), 400, /^room must be/);
    assertError(await via(`/back/messages?room=${'r'.repeat(65)}`), 400, /^room must be/);
    for (const limit of ['0', '201', '-1', 'abc', '1.5']) {
      assertError(await via(`/back/messages?room=a&limit=${limit}`), 400);
    }
    for (const limit of ['1', '200']) {
      const res = await via(`/back/messages?room=a&limit=${limit}`);
      assert.equal(res.status, 200, `limit=${limit}: ${res.text}`);
    }
  }));

  it('answers 404 with JSON for unknown paths under /back and /front', logged(() => topo, async () => {
    for (const p of ['/back', '/back/', '/back/nope', '/back/message/extra', '/front', '/front/a/b']) {
      assertError(await via(p), 404);
    }
    // Not a JSON body, not a room page either.
    assertError(await via('/front/bad%20room'), 404, /^room must be/);
  }));

  it('refuses unknown hosts with 421 and a JSON error, whatever the path', logged(() => topo, async () => {
    for (const host of ['evil.example', 'node-services-1.com', 'www.node-services-1.com.evil.example', 'localhost.', '127.0.0.2']) {
      for (const p of ['/front/lobby', '/back/status', '/back/messages?room=a', '/']) {
        const res = await request(topo.url + p, { host });
        assertError(res, 421, /^unknown host$/);
      }
      const res = await postMessage(topo.url, 'a', 'hi', { host });
      assertError(res, 421, /^unknown host$/);
    }
  }));

  it('refuses a request without a Host header', logged(() => topo, async () => {
    // HTTP/1.1 requires Host; without one, no domain matches.
    const res = await new Promise((resolve, reject) => {
      const socket = net.connect(topo.haproxyPort, '127.0.0.1', () => {
        socket.end('GET /back/status HTTP/1.1\r\nConnection: close\r\n\r\n');
      });
      let data = '';
      socket.setEncoding('utf8');
      socket.on('data', (d) => { data += d; });
      socket.on('end', () => resolve(data));
      socket.on('error', reject);
      socket.setTimeout(10_000, () => socket.destroy(new Error('no answer within 10 s')));
    });
    const status = Number(res.split(' ')[1]);
    assert.ok(status >= 400 && status < 500, `a 4xx status: ${res}`);
    assert.match(res, /\r\n\r\n\{"error":"[^"]+"\}/, `a JSON body: ${res}`);
  }));

  it('refuses paths outside /front and /back with 404 and a JSON error', logged(() => topo, async () => {
    for (const p of ['/', '/index.html', '/frontend', '/front-door', '/backend/status', '/socket.io/?EIO=4&transport=polling', '/status']) {
      for (const host of [DOMAIN_1, DOMAIN_2]) {
        assertError(await request(topo.url + p, { host }), 404, /no such endpoint/);
      }
    }
    assertError(await via('/', { method: 'POST', headers: JSON_TYPE, body: '{}' }), 404);
  }));

  it('serves the chat page for any valid room, through both domains', logged(() => topo, async () => {
    const page = fs.readFileSync(path.join(WWW_DIR, 'index.html'), 'utf8');
    for (const host of [DOMAIN_1, DOMAIN_2]) {
      for (const room of ['lobby', 'Room_1.test-2', 'r'.repeat(64)]) {
        const res = await request(`${topo.url}/front/${room}`, { host });
        assert.equal(res.status, 200, `${host} /front/${room}: ${res.status} ${res.text.slice(0, 200)}`);
        assert.match(res.headers['content-type'], /^text\/html/);
        assert.match(res.text, /<html/i);
        assert.equal(res.text, page);
        // Only the page's own scripts, styles and connections, in no frame.
        assert.equal(res.headers['content-security-policy'], "default-src 'self'; frame-ancestors 'none'");
        assert.equal(res.headers['x-content-type-options'], 'nosniff');
      }
    }
    const script = await request(`${topo.url}/front/assets/app.js`, { host: DOMAIN_1 });
    assert.equal(script.status, 200);
    assert.equal(script.headers['x-content-type-options'], 'nosniff');
    for (const room of ['bad%20room', 'room!', 'r'.repeat(65), '%C3%A9']) {
      const res = await via(`/front/${room}`);
      assertError(res, 404, /^room must be/);
    }
  }));

  it('answers the status of both tiers through HAProxy', logged(() => topo, async () => {
    for (const [p, instances] of [['/front/status', [0, 1]], ['/back/status', [0, 1]]]) {
      const seen = new Set();
      for (let i = 0; i < 4; i++) {
        const res = await via(p, { host: i % 2 ? DOMAIN_2 : DOMAIN_1 });
        assert.equal(res.status, 200, res.text);
        assert.equal(res.json.status, 'ok');
        assert.equal(res.json.redis, 'up');
        assert.equal(typeof res.json.connections, 'number');
        seen.add(res.json.instance);
      }
      if (p === '/back/status') {
        // Round-robin: both backends answer in turn.
        assert.deepEqual([...seen].sort(), instances, `instances answering ${p}`);
      }
    }
  }));

  it('answers 503 with a JSON error while no backend runs, and recovers when one is back', logged(() => topo, async () => {
    await Promise.all(topo.backends.map((b) => b.stop()));
    const res = await postMessage(topo.url, 'http-nobody', 'anyone there?', { host: DOMAIN_1 });
    assertError(res, 503, /^no server available$/);
    assertError(await via('/back/status'), 503, /^no server available$/);
    // The frontends are not affected.
    assert.equal((await via('/front/status')).status, 200);

    await topo.backends[1].start();
    await waitFor('HAProxy to send a POST to the restarted backend', async () => {
      const r = await postMessage(topo.url, 'http-nobody', 'back again', { host: DOMAIN_2 });
      return r.status === 201;
    }, { timeoutMs: 20_000, intervalMs: 250 });
    await topo.backends[0].start();
  }));
});

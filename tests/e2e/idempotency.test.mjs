// Posts are safe to repeat: HAProxy gives every POST an Idempotency-Key (so
// that it may re-send a post whose backend connection failed), a client may
// bring its own, and a repeated post is stored and delivered once.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';

import { startTopology } from './lib/topology.mjs';
import { Client, DOMAIN_1, DOMAIN_2, connectAll, request, waitFor } from './lib/helpers.mjs';

describe('idempotent posts through HAProxy', () => {
  let topo;

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 2 });
  });

  after(async () => {
    await topo?.stop();
  });

  const post = (room, message, { host = DOMAIN_1, key } = {}) => request(`${topo.url}/back/message`, {
    method: 'POST',
    host,
    headers: { 'content-type': 'application/json', ...(key ? { 'idempotency-key': key } : {}) },
    body: JSON.stringify({ room, message }),
  });

  /** The idempotency records in Redis, as the administrator sees them. */
  const records = () => execFileSync('redis-cli', ['-s', topo.redis.socket, '--user', topo.redis.admin.user, '--scan', '--pattern', 'chat:{p*}:idem:*'],
    { encoding: 'utf8', env: { ...process.env, REDISCLI_AUTH: topo.redis.admin.password } })
    .split('\n').filter((l) => l !== '');

  it('gives every POST without a key one, which the backend records', async () => {
    const before = records().length;
    for (let i = 0; i < 4; i++) {
      const res = await post('idem-auto', `auto ${i}`);
      assert.equal(res.status, 201, res.text);
    }
    const after = records();
    assert.equal(after.length, before + 4, 'one record per post');
    // Digests, not what HAProxy made the key of (the client's address and
    // port), beside the room's history (its partition's hash tag).
    for (const key of after) assert.match(key, /^chat:\{p[0-9]+\}:idem:[0-9a-f]{64}$/);
  });

  it('stores and delivers a post repeated with the same key once, whichever backend and domain it reaches', async () => {
    const listener = new Client(topo.url, { transports: ['websocket'] });
    await connectAll([listener]);
    try {
      assert.deepEqual(await listener.join('idem-room'), { ok: true });
      const answers = [];
      // Round-robin sends these to both backends; both domains are used.
      for (const host of [DOMAIN_1, DOMAIN_2, DOMAIN_1, DOMAIN_2]) {
        answers.push(await post('idem-room', 'exactly once', { host, key: 'client-key-1' }));
      }
      for (const res of answers) assert.equal(res.status, 201, res.text);
      assert.ok(answers.every((res) => res.json.id === answers[0].json.id), 'every repeat gets the first id');

      const marker = await post('idem-room', 'after the repeats');
      assert.equal(marker.status, 201);
      await waitFor('the marker message', () => listener.messages.some((m) => m.id === marker.json.id));
      assert.deepEqual(listener.messages.map((m) => m.message), ['exactly once', 'after the repeats']);

      const history = await request(`${topo.url}/back/messages?room=idem-room`, { host: DOMAIN_1 });
      assert.deepEqual(history.json.messages.map((m) => m.message), ['exactly once', 'after the repeats']);
    } finally {
      listener.close();
    }
  });

  it('refuses a key reused for another message with 409', async () => {
    assert.equal((await post('idem-conflict', 'first', { key: 'client-key-2' })).status, 201);
    const res = await post('idem-conflict', 'second', { key: 'client-key-2' });
    assert.equal(res.status, 409, res.text);
    assert.match(res.json.error, /Idempotency-Key/);
  });
});

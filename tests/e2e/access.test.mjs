// Who may do what, through HAProxy: pages of other origins are refused,
// posts are limited per client address, operators' paths stay inside.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { DOMAIN_1, request } from './lib/helpers.mjs';

describe('access rules at HAProxy', () => {
  let topo;

  before(async () => {
    // The packaged limit: 50 posts per address in 10 s.
    topo = await startTopology({ frontends: 1, backends: 1, postsPer10s: null });
  });

  after(async () => {
    await topo?.stop();
  });

  const post = (headers = {}) => request(`${topo.url}/back/message`, {
    method: 'POST',
    host: DOMAIN_1,
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ room: 'access', message: 'hi' }),
  });

  it('refuses posts and Socket.IO requests from pages of other origins with 403', async () => {
    const foreign = await post({ origin: 'https://evil.example' });
    assert.equal(foreign.status, 403, foreign.text);
    assert.deepEqual(foreign.json, { error: 'origin not allowed' });
    const handshake = await request(`${topo.url}/front/socket.io/?EIO=4&transport=polling`, {
      host: DOMAIN_1, headers: { origin: 'http://evil.example:8080' },
    });
    assert.equal(handshake.status, 403, handshake.text);

    for (const origin of [`http://${DOMAIN_1}`, 'http://www.node-services-2.com:8080', 'https://LOCALHOST']) {
      const res = await post({ origin });
      assert.equal(res.status, 201, `${origin}: ${res.text}`);
    }
    const page = await request(`${topo.url}/front/socket.io/?EIO=4&transport=polling`, {
      host: DOMAIN_1, headers: { origin: `http://${DOMAIN_1}` },
    });
    assert.equal(page.status, 200, page.text);
  });

  it('answers 429 with a JSON error once an address posts more than 50 messages in 10 s', async () => {
    const statuses = [];
    for (let i = 0; i < 60; i++) statuses.push((await post()).status);
    const limited = statuses.filter((s) => s === 429).length;
    assert.ok(statuses.slice(0, 40).every((s) => s === 201 || s === 429), `statuses: ${statuses}`);
    assert.ok(limited >= 10, `at least the posts past 50 are refused: ${statuses}`);
    const refused = await post();
    assert.equal(refused.status, 429);
    assert.deepEqual(refused.json, { error: 'too many messages; slow down' });
    assert.equal(refused.headers['retry-after'], '10');
    // Reading is not limited.
    const history = await request(`${topo.url}/back/messages?room=access`, { host: DOMAIN_1 });
    assert.equal(history.status, 200);
    assert.ok(history.json.messages.length <= 50, 'refused posts were not stored');
  });

  it('serves the status endpoints to local clients and keeps /metrics out of reach', async () => {
    assert.equal((await request(`${topo.url}/front/status`, { host: DOMAIN_1 })).status, 200);
    const metrics = await request(`${topo.url}/metrics`, { host: DOMAIN_1 });
    assert.equal(metrics.status, 404, metrics.text);
    const frontendMetrics = await request(`${topo.frontends[0].metricsUrl}/metrics`);
    assert.equal(frontendMetrics.status, 200, 'scraped directly on the instance');
    assert.match(frontendMetrics.text, /chat_frontend_sockets/);
  });
});

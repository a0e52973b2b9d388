// Engine.IO 3 long-polling payloads whose lengths count UTF-16 code units:
// a length that ends between the two units of one character (an emoji)
// ends only the session that posted it, at once; the frontend keeps
// answering and delivering to its other clients. (engineioxide-core's
// decoder never returned on such a payload, stopping the whole instance:
// found by the eio3_frames fuzz target.) A payload with such characters
// whose lengths are right is read as before.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { logged, postMessage, request } from './lib/helpers.mjs';
import { V2Client } from './lib/v2-client.mjs';

const SESSION_UNKNOWN = { code: '1', message: 'Session ID unknown' };
// 13 UTF-16 units end inside the emoji (two units).
const SPLITTING = '13:42["room","ü😀x"]';
// The same packet with its length right: an event the frontend ignores.
const RIGHT = '17:42["room","ü😀x"]';

describe('Engine.IO 3 payload lengths inside a character', () => {
  let topo;
  const closeLater = [];

  before(async () => {
    topo = await startTopology({ frontends: 1, backends: 1 });
  });

  after(async () => {
    for (const c of closeLater) c.close();
    await topo?.stop();
  });

  const polling = (sid) => `${topo.frontends[0].url}/front/socket.io/?EIO=3&transport=polling${sid ? `&sid=${sid}` : ''}`;

  /** A raw Engine.IO 3 long-polling session, past its handshake and Socket.IO connect. */
  const openSession = async () => {
    const open = await request(polling());
    assert.equal(open.status, 200, open.text);
    const sid = /"sid":"([^"]+)"/.exec(open.text)?.[1];
    assert.ok(sid, `a session id in ${open.text}`);
    const connect = await request(polling(sid), { timeoutMs: 5000 });
    assert.equal(connect.status, 200, `the connect packet: ${connect.text}`);
    return sid;
  };

  const post = (sid, text) => request(polling(sid), {
    method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body: Buffer.from(text), timeoutMs: 5000,
  });

  it('reads a payload whose lengths count an emoji as two units, and keeps the session', logged(() => topo, async () => {
    const sid = await openSession();
    const res = await post(sid, RIGHT);
    assert.equal(res.status, 200, `POST: ${res.status} ${res.text}`);
    assert.equal(res.text, 'ok');
    // Still its session: a ping is answered on its next poll.
    const ping = await post(sid, '1:2');
    assert.equal(ping.status, 200, ping.text);
    const poll = await request(polling(sid), { timeoutMs: 5000 });
    assert.equal(poll.status, 200, poll.text);
    assert.match(poll.text, /1:3/, 'the pong');
  }));

  it('ends the session whose length ends inside a character, and only it; the frontend keeps serving', logged(() => topo, async () => {
    const [frontend] = topo.frontends;
    const room = 'v2-framing';
    const bystander = new V2Client(frontend.url, { transports: ['polling'], name: 'bystander' });
    closeLater.push(bystander);
    await bystander.connect();
    assert.deepEqual(await bystander.join(room), { ok: true });

    const sid = await openSession();
    const res = await post(sid, SPLITTING);
    assert.equal(res.status, 400, `POST answered: ${res.status} ${res.text}`);
    const next = await request(polling(sid), { timeoutMs: 5000 });
    assert.equal(next.status, 400, `the session is gone: ${next.status} ${next.text}`);
    assert.deepEqual(next.json, SESSION_UNKNOWN);

    const status = await frontend.status();
    assert.equal(status.status, 'ok');
    const posted = await postMessage(topo.backends[0].url, room, 'after the bad payload');
    assert.equal(posted.status, 201, posted.text);
    await bystander.waitForMessage('the message posted after the bad payload', (m) => m.id === posted.json.id);
    assert.deepEqual(bystander.disconnects, [], 'the bystander kept its session');
  }));
});

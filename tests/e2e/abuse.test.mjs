// Abuse of a frontend: garbage Engine.IO over long-polling and over
// websocket, a flood of events, too many rooms, oversized messages. Each time
// the abuser gets a refusal or loses its session, and well-behaved clients
// connected to the same frontend all along (websocket and polling) keep
// receiving messages, while the frontend's status keeps answering.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { isDeepStrictEqual } from 'node:util';

import { startTopology } from './lib/topology.mjs';
import {
  Client, RawWebSocket, logged, metrics, postMessage, rawSocketIo, request, sleep, waitFor,
} from './lib/helpers.mjs';

const WATCH_ROOM = 'abuse-watch';
const SLOW_DOWN = { ok: false, error: 'too many events; slow down' };
const SESSION_UNKNOWN = { code: '1', message: 'Session ID unknown' };
// The server closes a flooder's connection 5 s after disconnecting it. Seen
// from the client, whose clock starts when the disconnect packet arrives,
// it is less by however late that packet was read: half of it is a margin
// no loaded machine eats, and still tells "waits" from "closes at once".
const FLOODER_GRACE_AT_LEAST_MS = 2500;

describe('abuse of a frontend', () => {
  let topo;
  let frontend;
  const watchers = [];
  const closeLater = [];
  let posted = 0;

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 1 });
    frontend = topo.frontends[0];
    for (const transport of ['websocket', 'polling']) {
      const c = new Client(frontend.url, { transports: [transport], name: `well-behaved ${transport} client` });
      await c.connect();
      assert.deepEqual(await c.join(WATCH_ROOM), { ok: true });
      watchers.push(c);
    }
  });

  after(async () => {
    for (const c of [...watchers, ...closeLater]) c.close();
    await topo?.stop();
  });

  /** What every abuse must leave intact: the other sockets get messages, the status answers. */
  const stillServing = async (what) => {
    posted += 1;
    const res = await postMessage(topo.backends[0].url, WATCH_ROOM, `after ${what} (${posted})`);
    assert.equal(res.status, 201, res.text);
    for (const c of watchers) {
      await c.waitForMessage(`the message posted after ${what}`, (m) => m.id === res.json.id);
      assert.equal(c.messages.length, posted, `${c.name}: every message once`);
      assert.equal(c.connectCount, 1, `${c.name} still on its first connection`);
      assert.deepEqual(c.disconnects, [], `${c.name} never disconnected`);
    }
    const status = await request(`${frontend.url}/front/status`);
    assert.equal(status.status, 200, status.text);
    assert.equal(status.json.status, 'ok');
    assert.equal(frontend.running, true, 'the frontend still runs');
  };

  // ---- Engine.IO over long-polling, by hand ------------------------------

  const polling = (sid) => `${frontend.url}/front/socket.io/?EIO=4&transport=polling${sid ? `&sid=${sid}` : ''}`;

  /** Opens an Engine.IO session and connects it to the default namespace; returns its sid. */
  const openPollingSession = async () => {
    const open = await request(polling());
    assert.equal(open.status, 200, open.text);
    assert.match(open.text, /^0\{/);
    const { sid } = JSON.parse(open.text.slice(1));
    const connect = await request(polling(sid), { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body: '40' });
    assert.equal(connect.status, 200, connect.text);
    const answer = await request(polling(sid));
    assert.equal(answer.status, 200, answer.text);
    assert.match(answer.text, /(^|\x1e)40\{"sid":/, 'the namespace connection is confirmed');
    return sid;
  };

  const pollingCases = [
    // [what, body, HTTP status of the POST]
    ['a message packet that is not Socket.IO ("4{{{")', '4{{{', 200],
    ['a truncated event ("42[")', '42[', 200],
    ['an event that is not an array ("42{}")', '42{}', 200],
    ['an unknown Engine.IO packet type ("7")', '7', 400],
    ['a packet type out of range ("99")', '99', 400],
    ['a body over the 32 KiB payload limit (40 KB)', `42["room","${'x'.repeat(40_000)}"]`, 413],
  ];
  for (const [what, body, status] of pollingCases) {
    it(`ends a polling session that sends ${what}`, logged(() => topo, async () => {
      const sid = await openPollingSession();
      const res = await request(polling(sid), { method: 'POST', headers: { 'content-type': 'text/plain;charset=UTF-8' }, body });
      assert.equal(res.status, status, `POST: ${res.status} ${res.text}`);
      // The session is gone: its next poll is refused.
      const next = await request(polling(sid), { timeoutMs: 5000 });
      assert.equal(next.status, 400, next.text);
      assert.deepEqual(next.json, SESSION_UNKNOWN);
      await stillServing(`a polling session sent ${what}`);
    }));
  }

  it('refuses polling requests for an unknown session and bad handshakes with 400', logged(() => topo, async () => {
    const unknown = await request(polling('no-such-session'));
    assert.equal(unknown.status, 400, unknown.text);
    assert.deepEqual(unknown.json, SESSION_UNKNOWN);
    for (const query of ['EIO=5&transport=polling', 'EIO=4&transport=carrier-pigeon', 'transport=polling']) {
      const res = await request(`${frontend.url}/front/socket.io/?${query}`);
      assert.equal(res.status, 400, `${query}: ${res.status} ${res.text}`);
    }
    await stillServing('bad polling requests');
  }));

  // ---- Engine.IO over websocket, by hand ---------------------------------

  const wsCases = [
    ['a message packet that is not Socket.IO ("4{{{")', (ws) => ws.send('4{{{')],
    ['a truncated event ("42[")', (ws) => ws.send('42[')],
    ['an unknown Engine.IO packet type ("7")', (ws) => ws.send('7')],
    ['a packet type out of range ("99")', (ws) => ws.send('99')],
    ['a binary frame', (ws) => ws.sendFrame(0x2, Buffer.from([0xde, 0xad, 0xbe, 0xef]))],
    ['a text frame that is not UTF-8', (ws) => ws.sendFrame(0x1, Buffer.from([0x34, 0x32, 0xff, 0xfe]))],
    ['an unmasked frame', (ws) => ws.sendFrame(0x1, '42["room","a"]', { mask: false })],
    ['a 5 KiB message (over the 4 KiB limit)', (ws) => ws.send(`42["room","${'x'.repeat(5 * 1024)}"]`)],
    ['a 6 KiB message in three fragments', (ws) => {
      ws.sendFrame(0x1, `42["room","${'x'.repeat(2048)}`, { fin: false });
      ws.sendFrame(0x0, 'y'.repeat(2048), { fin: false });
      ws.sendFrame(0x0, `${'z'.repeat(2048)}"]`);
    }],
  ];
  for (const [what, abuse] of wsCases) {
    it(`closes a websocket that sends ${what}`, logged(() => topo, async () => {
      const ws = await rawSocketIo(frontend.port);
      const before = ws.messages.length;
      abuse(ws);
      await ws.until('the server to close the connection', () => ws.ended);
      // Nothing but a ping or Engine.IO's own "close" packet came back.
      for (const m of ws.messages.slice(before)) assert.ok(m === '2' || m === '1', `unexpected answer ${JSON.stringify(m.slice(0, 200))}`);
      await stillServing(`a websocket sent ${what}`);
    }));
  }

  it('answers a websocket message just under the 4 KiB limit', logged(() => topo, async () => {
    const ws = await rawSocketIo(frontend.port);
    closeLater.push(ws);
    const frame = `421["room","${'x'.repeat(4096 - 14)}"]`;
    assert.equal(Buffer.byteLength(frame), 4096);
    ws.send(frame);
    const ack = await ws.until('the acknowledgement', () => ws.messages.find((m) => m.startsWith('431[')));
    assert.equal(JSON.parse(ack.slice(3))[0].ok, false, 'refused: not a room name');
    assert.equal(ws.ended, false);
    await stillServing('a 4 KiB websocket message');
  }));

  it('answers a websocket ping, and a close frame with one close frame before it closes', logged(() => topo, async () => {
    const ws = await rawSocketIo(frontend.port);
    ws.sendFrame(0x9, 'are you there');
    await ws.until('the pong', () => ws.pongs.includes('are you there'));
    ws.sendFrame(0x8, Buffer.from([0x03, 0xe8])); // 1000: normal closure
    await ws.until('the server to close the connection', () => ws.ended);
    assert.equal(ws.closeFrames, 1, 'one close frame in answer, nothing after it');
    await stillServing('a websocket closed by its client');
  }));

  // ---- the Socket.IO client misbehaving ----------------------------------

  const abuser = async (transport) => {
    const c = new Client(frontend.url, { transports: [transport], name: `abusive ${transport} client` });
    closeLater.push(c);
    return c.connect();
  };

  /** Emits `count` room events at once; resolves to their answers once settled ('no answer' for none). */
  const flood = async (c, count) => {
    const answers = await Promise.all(Array.from({ length: count }, (_, i) => new Promise((resolve) => {
      c.socket.timeout(3000).emit('room', `flood-${i % 5}`, (err, answer) => resolve(err ? 'no answer' : answer));
    })));
    const tally = { ok: 0, refused: 0, other: 0, none: 0 };
    for (const a of answers) {
      if (a === 'no answer') tally.none += 1;
      else if (a.ok === true) tally.ok += 1;
      else if (isDeepStrictEqual(a, SLOW_DOWN)) tally.refused += 1;
      else tally.other += 1;
    }
    return { answers, tally };
  };

  /**
   * What a flooder sees, over either transport: the burst (20) joins, then
   * refusals; the 50th refusal in a row is the last answer, followed by the
   * disconnect packet ("io server disconnect", so socket.io does not
   * reconnect by itself); nothing after it is answered.
   */
  const assertFloodedOut = async (c, { answers, tally }, what) => {
    assert.deepEqual({ tally, disconnects: c.disconnects },
      { tally: { ok: 20, refused: 50, other: 0, none: 430 }, disconnects: ['io server disconnect'] }, what);
    assert.deepEqual(answers.slice(0, 20), Array(20).fill({ ok: true }), what);
    assert.deepEqual(answers.slice(20, 70), Array(50).fill(SLOW_DOWN), what);
    assert.equal(c.socket.connected, false, what);
  };

  it('refuses a flood of 500 room events over polling, then disconnects the socket', logged(() => topo, async () => {
    const refusedBefore = (await metrics(frontend.metricsUrl)).chat_frontend_joins_refused_total;
    const c = await abuser('polling');
    await assertFloodedOut(c, await flood(c, 500), 'flood over polling');
    const refused = (await metrics(frontend.metricsUrl)).chat_frontend_joins_refused_total - refusedBefore;
    assert.ok(refused >= 50, `joins refused counted: ${refused}`);
    await stillServing('a flood over polling');
  }));

  it('refuses a flood of 500 room events over websocket, then disconnects the socket', logged(() => topo, async () => {
    // Several rounds: the answers once came or not depending on timing.
    for (let round = 0; round < 5; round++) {
      const c = await abuser('websocket');
      await assertFloodedOut(c, await flood(c, 500), `flood over websocket, round ${round}`);
      await stillServing(`a flood over websocket (round ${round})`);
    }
  }));

  it('closes the connection of a websocket flooder that ignores the disconnect', logged(() => topo, async () => {
    const ws = await rawSocketIo(frontend.port);
    const first = ws.messages.length;
    const answers = () => ws.messages.slice(first).filter((m) => m !== '2');
    let sent = 0;
    const send = (n) => {
      for (let i = 0; i < n; i++, sent++) ws.send(`42${sent}["room","flood-${sent % 5}"]`);
    };
    send(100);
    await ws.until('the disconnect packet', () => answers().includes('41'));
    const startedAt = Date.now();
    // The client goes on as if nothing happened: the server no longer
    // answers, and closes the connection a few seconds later.
    const keepOn = setInterval(() => send(5), 100);
    try {
      await ws.until('the server to close the connection', () => ws.ended, 30_000);
    } finally {
      clearInterval(keepOn);
    }
    const closedAfterMs = Date.now() - startedAt;
    const got = answers();
    const disconnectAt = got.indexOf('41');
    const acks = got.slice(0, disconnectAt).map((m) => {
      const match = /^43(\d+)(\[.*\])$/.exec(m);
      assert.ok(match, `an acknowledgement before the disconnect: ${JSON.stringify(m)}`);
      return { id: Number(match[1]), answer: JSON.parse(match[2])[0] };
    }).sort((a, b) => a.id - b.id);
    assert.deepEqual(acks.map((a) => a.id), Array.from({ length: 70 }, (_, i) => i), 'the first 70 events answered');
    assert.deepEqual(acks.map((a) => a.answer), [...Array(20).fill({ ok: true }), ...Array(50).fill(SLOW_DOWN)]);
    // After the disconnect: at most Engine.IO's own close packet.
    assert.deepEqual(got.slice(disconnectAt + 1).filter((m) => m !== '1'), [], 'nothing answered after the disconnect');
    assert.ok(sent > 100, `the client kept sending (${sent} events)`);
    assert.ok(closedAfterMs >= FLOODER_GRACE_AT_LEAST_MS, `closed ${closedAfterMs} ms after the disconnect (the server waits 5 s)`);
    await stillServing('a websocket flooder that ignores the disconnect');
  }));

  it('counts unknown events against the same budget', logged(() => topo, async () => {
    const c = await abuser('websocket');
    for (let i = 0; i < 25; i++) c.socket.emit('nonsense', i);
    assert.deepEqual(await c.join('abuse-after-nonsense'), SLOW_DOWN);
    // The budget refills (10 a second): the socket may join again. The
    // passing of time is what is tested here; a slower machine only lets
    // more of it pass.
    await sleep(1200);
    assert.deepEqual(await c.join('abuse-after-nonsense'), { ok: true });
    assert.equal(c.socket.connected, true);
    assert.deepEqual(c.disconnects, []);
    await stillServing('unknown events');
  }));

  for (const transport of ['websocket', 'polling']) {
    it(`refuses a 17th room (${transport}) and keeps the socket`, logged(() => topo, async () => {
      const c = await abuser(transport);
      for (let i = 0; i < 16; i++) assert.deepEqual(await c.join(`abuse-room-${i}`), { ok: true });
      assert.deepEqual(await c.join('abuse-room-16'), { ok: false, error: 'a socket may be in at most 16 rooms' });
      assert.equal(c.socket.connected, true);
      await stillServing(`17 rooms over ${transport}`);
    }));
  }

  it('closes a websocket client that sends an event over 4 KiB, unanswered', logged(() => topo, async () => {
    const c = await abuser('websocket');
    // The acknowledgement settles once: with the server's answer, or with
    // an error when the socket disconnects first (socket.io-client then
    // drops every pending acknowledgement), or after 30 s.
    const settled = new Promise((resolve) => {
      c.socket.timeout(30_000).emit('room', 'x'.repeat(5000), (err, answer) => resolve(err ? err.message : answer));
    });
    await waitFor('the client to be disconnected', () => c.disconnects.length > 0);
    assert.deepEqual(c.disconnects, ['transport close']);
    assert.equal(await settled, 'socket has been disconnected', 'no answer came before the disconnect');
    await stillServing('an oversized websocket event');
  }));

  it('answers a 5 KB event over polling (within the payload limit) and ends a polling client over 32 KiB', logged(() => topo, async () => {
    const c = await abuser('polling');
    const ack = await c.join('x'.repeat(5000));
    assert.equal(ack.ok, false);
    assert.match(ack.error, /^room must be/);
    assert.equal(c.socket.connected, true);
    c.socket.emit('room', 'x'.repeat(40_000));
    await waitFor('the client to be disconnected', () => c.disconnects.length > 0);
    assert.deepEqual(c.disconnects, ['transport error']);
    await stillServing('an oversized polling payload');
  }));
});

// Joining rooms: the acknowledgement a client gets for a valid name, an
// invalid one, and one room too many; and which messages it then receives.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import { startTopology } from './lib/topology.mjs';
import { Client, DOMAIN_1, DOMAIN_2, logged, postMessage } from './lib/helpers.mjs';

const ROOM_ERROR = "room must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '.' or '-'";

describe('joining rooms', () => {
  let topo;
  const clients = [];

  before(async () => {
    topo = await startTopology({ frontends: 2, backends: 2 });
  });

  after(async () => {
    for (const c of clients) c.close();
    await topo?.stop();
  });

  const connect = async (domain, transports) => {
    const client = new Client(`http://${domain}:${topo.haproxyPort}`, { transports, name: domain });
    clients.push(client);
    return client.connect();
  };

  for (const [domain, transport] of [[DOMAIN_1, 'websocket'], [DOMAIN_2, 'polling']]) {
    it(`refuses invalid room names with ok:false and the reason (${transport})`, logged(() => topo, async () => {
      const client = await connect(domain, [transport]);
      for (const name of ['', 'bad room', 'a/b', 'room!', 'é', 'r'.repeat(65)]) {
        assert.deepEqual(await client.join(name), { ok: false, error: ROOM_ERROR }, `join ${JSON.stringify(name)}`);
      }
      for (const payload of [42, null, ['lobby'], { name: 'lobby' }, true]) {
        const ack = await client.join(payload);
        assert.equal(ack.ok, false, `join ${JSON.stringify(payload)}: ${JSON.stringify(ack)}`);
        assert.equal(typeof ack.error, 'string');
        assert.ok(ack.error.length > 0);
      }
      // Still connected, and a valid name is accepted, as a string or as {room}.
      assert.deepEqual(await client.join('r'.repeat(64)), { ok: true });
      assert.deepEqual(await client.join({ room: 'Room_1.test-2' }), { ok: true });
      assert.equal(client.socket.connected, true);
      assert.deepEqual(client.disconnects, []);
    }));

    it(`accepts 16 rooms, refuses a 17th, and delivers only the joined rooms (${transport})`, logged(() => topo, async () => {
      const client = await connect(domain, [transport]);
      const rooms = Array.from({ length: 16 }, (_, i) => `${transport}-room-${i}`);
      for (const room of rooms) {
        assert.deepEqual(await client.join(room), { ok: true }, `join ${room}`);
      }
      const extra = `${transport}-room-16`;
      const refused = await client.join(extra);
      assert.equal(refused.ok, false, JSON.stringify(refused));
      assert.match(refused.error, /16/);
      // Joining a room it is already in is still fine.
      assert.deepEqual(await client.join(rooms[3]), { ok: true });
      assert.equal((await client.join(`${transport}-room-17`)).ok, false);

      // Messages of the 16 rooms arrive, those of the refused room do not.
      const expected = [];
      for (const room of [extra, ...rooms, extra]) {
        const res = await postMessage(topo.url, room, `to ${room}`, { host: DOMAIN_2 });
        assert.equal(res.status, 201, res.text);
        if (room !== extra) expected.push(res.json);
      }
      const last = rooms[15];
      const fence = await postMessage(topo.url, last, 'fence', { host: DOMAIN_1 });
      assert.equal(fence.status, 201, fence.text);
      expected.push(fence.json);
      await client.waitForMessage('the fence', (m) => m.message === 'fence');
      assert.deepEqual(client.messages, expected);
    }));
  }

  it('refuses a join after the room limit the same way through websocket and polling on either frontend', logged(() => topo, async () => {
    // One more of each, so both frontends are involved (round-robin).
    const a = await connect(DOMAIN_1, ['polling']);
    const b = await connect(DOMAIN_2, ['websocket']);
    for (const client of [a, b]) {
      for (let i = 0; i < 16; i++) assert.deepEqual(await client.join(`limit-${i}`), { ok: true });
      const ack = await client.join('limit-16');
      assert.equal(ack.ok, false);
      assert.match(ack.error, /16/);
    }
    const statuses = await Promise.all(topo.frontends.map((f) => f.status()));
    for (const s of statuses) assert.ok(s.connections > 0, `sockets on both frontends: ${JSON.stringify(statuses)}`);
  }));
});

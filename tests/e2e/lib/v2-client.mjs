// The socket.io 2.x client (npm socket.io-client 2.5.0, installed as
// socket.io-client-v2): Engine.IO protocol 3 and Socket.IO protocol 4, as
// the pages, apps and embedded clients of socket.io 2 deployments speak it.
//
// Its API differs from v4's where the tests touch it: no emitWithAck, no
// timeout() on an emit, no cookie jar (its XMLHttpRequest keeps no cookies,
// so HAProxy's sticky cookie never comes back), and the connection options
// of engine.io-client 3. The classes below give it the shape of helpers.mjs'
// Client and ResumingClient, so that a test treats both clients alike.

import ioV2 from 'socket.io-client-v2';

import { ResumingClient, resolvingAgent, waitFor, within } from './helpers.mjs';

/** Options of a socket.io 2 connection, as the tests open them. */
function v2Options({ transports, agent, reconnection = false }) {
  return {
    path: '/front/socket.io',
    transports,
    agent,
    forceNew: true,
    reconnection,
    reconnectionDelayMax: 5000,
    timeout: 10_000,
  };
}

/**
 * A socket.io 2 connection, recording what it receives: the same fields and
 * methods as helpers.mjs' Client (messages, disconnects, connectCount,
 * connect, join, waitForMessage, transport, close), and the pongs that
 * answered its pings.
 */
export class V2Client {
  constructor(url, { transports, name = url } = {}) {
    this.name = `v2 ${name}${transports ? ` [${transports.join(',')}]` : ''}`;
    this.agent = resolvingAgent('127.0.0.1');
    this.messages = [];
    this.disconnects = [];
    this.connectErrors = [];
    this.connectCount = 0;
    this.pongs = 0; // answers to the client's pings (Engine.IO 3: the client pings)
    this.socket = ioV2(url, v2Options({ transports, agent: this.agent }));
    this.socket.on('pong', () => { this.pongs += 1; });
    this.socket.on('message', (m) => this.messages.push(m));
    this.socket.on('disconnect', (reason) => this.disconnects.push(reason));
    this.socket.on('connect', () => { this.connectCount += 1; });
    this.socket.on('connect_error', (e) => this.connectErrors.push(String(e?.message ?? e)));
    this.connected = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      this.socket.once('connect_error', (e) => reject(new Error(`${this.name}: cannot connect: ${e?.message ?? e} ${e?.description ?? ''}`)));
    });
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

  /** The Engine.IO protocol the session speaks, from the engine's query ('3'). */
  get engineProtocol() {
    return String(this.socket.io.engine?.transport?.query?.EIO);
  }

  /** Emits `room` with an ack; resolves to the ack's answer. */
  join(room, timeoutMs = 10_000) {
    return within(timeoutMs, `${this.name}: ack of room ${JSON.stringify(room)}`,
      new Promise((resolve) => this.socket.emit('room', room, resolve)));
  }

  /** Waits until the client has received a message satisfying `match`. */
  waitForMessage(what, match, timeoutMs = 10_000) {
    return waitFor(() => `${this.name} to receive ${what} (received: ${JSON.stringify(this.messages.map((m) => m.message.slice(0, 80)))}, disconnects: ${JSON.stringify(this.disconnects)})`,
      () => this.messages.find(match), { timeoutMs, intervalMs: 20 });
  }

  close() {
    this.socket.close();
    setTimeout(() => this.agent.destroy(), 1000).unref();
  }
}

/**
 * helpers.mjs' ResumingClient over a socket.io 2 connection: on every
 * connect it joins with `since` = the last id it has seen, and joins again
 * when asked to; what it receives is recorded the same way.
 */
export class V2ResumingClient extends ResumingClient {
  open(url, { transports, reconnection = false } = {}) {
    this.socket?.close();
    this.sockets += 1;
    this.url = url;
    const socket = ioV2(url, v2Options({ transports, agent: this.agent, reconnection }));
    this.socket = socket;
    socket.on('connect', () => {
      this.connectCount += 1;
      this.join(socket);
    });
    socket.on('message', (m) => this.receive(m));
    socket.on('connect_error', (e) => this.connectErrors.push(String(e?.message ?? e)));
    socket.on('disconnect', (reason) => {
      this.disconnects.push(reason);
      if (reconnection && reason === 'io server disconnect') {
        setTimeout(() => { if (this.socket === socket && !socket.connected) socket.connect(); }, 500);
      }
    });
    return this;
  }

  join(socket) {
    const payload = this.lastId === null ? this.room : { room: this.room, since: this.lastId };
    // socket.io 2 has no timeout on an emit: a timer stands in for it.
    let answered = false;
    const timer = setTimeout(() => {
      if (answered || this.socket !== socket || !socket.connected) return;
      answered = true;
      this.join(socket); // no answer in time: ask again on this connection
    }, this.joinTimeoutMs);
    socket.emit('room', payload, (answer) => {
      clearTimeout(timer);
      if (answered || this.socket !== socket || !socket.connected) return;
      answered = true;
      this.answers.push(answer);
      if (answer?.ok) {
        this.joined += 1;
      } else if (/join again shortly/.test(answer?.error ?? '')) {
        this.unavailable += 1;
        setTimeout(() => { if (this.socket === socket && socket.connected) this.join(socket); }, this.retryMs);
      }
    });
  }
}

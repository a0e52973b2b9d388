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

import { Client, ResumingClient, within } from './helpers.mjs';

/**
 * The socket.io 2 connection for the options a helpers.mjs client opens
 * with: its transports, agent and reconnection, in engine.io-client 3's
 * terms (it has no cookie jar, so withCredentials means nothing to it).
 */
function openV2(url, { transports, agent, reconnection }) {
  return ioV2(url, {
    path: '/front/socket.io',
    transports,
    agent,
    forceNew: true,
    reconnection,
    reconnectionDelayMax: 5000,
    timeout: 10_000,
  });
}

/**
 * helpers.mjs' Client over a socket.io 2 connection (its name starts with
 * "v2"), counting the pongs that answered its pings and telling the
 * Engine.IO protocol of its session.
 */
export class V2Client extends Client {
  constructor(url, { transports, name = url } = {}) {
    super(url, { transports, name: `v2 ${name}` });
    this.pongs = 0; // answers to the client's pings (Engine.IO 3: the client pings)
    this.socket.on('pong', () => { this.pongs += 1; });
  }

  openSocket(url, options) {
    return openV2(url, options);
  }

  /** The Engine.IO protocol the session speaks, from the engine's query ('3'). */
  get engineProtocol() {
    return String(this.socket.io.engine?.transport?.query?.EIO);
  }

  /** Emits `room` with an ack; resolves to the ack's answer (socket.io 2 has no emitWithAck). */
  join(room, timeoutMs = 10_000) {
    return within(timeoutMs, `${this.name}: ack of room ${JSON.stringify(room)}`,
      new Promise((resolve) => this.socket.emit('room', room, resolve)));
  }

  /** Closes the connection; the agent goes a moment later, so that a polling client's goodbye reaches the server. */
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
  openSocket(url, options) {
    return openV2(url, options);
  }

  /** socket.io 2 has no timeout on an emit: a timer stands in for it. */
  emitJoin(socket, payload, answered) {
    let done = false;
    const once = (err, answer) => {
      if (done) return;
      done = true;
      answered(err, answer);
    };
    const timer = setTimeout(() => once(new Error('no answer in time')), this.joinTimeoutMs);
    socket.emit('room', payload, (answer) => {
      clearTimeout(timer);
      once(null, answer);
    });
  }
}

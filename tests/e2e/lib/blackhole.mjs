// A TCP relay that can go silent: what a client looks like to the server
// when its network vanishes (a phone out of coverage, a laptop closed, a
// NAT entry dropped). Until vanish() it relays every connection both ways;
// from then on it relays nothing, closes nothing and answers nothing, so
// the server hears neither data nor a close and must find out by itself.

import net from 'node:net';

/**
 * Listens on 127.0.0.1 (any free port) and relays each connection to
 * 127.0.0.1:`targetPort`. `url` is the address to give a client.
 */
export async function startBlackhole(targetPort) {
  const pairs = new Set(); // {client, upstream} of every relayed connection
  const unanswered = new Set(); // connections made after vanish()
  let vanished = false;
  const server = net.createServer((client) => {
    if (vanished) {
      // Held open, never answered.
      client.on('error', () => {});
      unanswered.add(client);
      return;
    }
    const upstream = net.connect({ host: '127.0.0.1', port: targetPort });
    const pair = { client, upstream, upstreamEndedAt: null };
    pairs.add(pair);
    // A vanished client's errors are nobody's concern but the server's.
    client.on('error', () => {});
    upstream.on('error', () => {});
    // The server's own close of a connection, seen from the client's side
    // of the network: the proof that it gave up on the client by itself.
    upstream.on('close', () => { pair.upstreamEndedAt = Date.now(); });
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ port: 0, host: '127.0.0.1' }, resolve);
  });
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    /** Relays nothing more, either way, and closes nothing. */
    vanish() {
      vanished = true;
      for (const { client, upstream } of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        // What arrives from either side, its end included, is read and
        // dropped: nothing reaches the other side, and the server's close
        // of a connection is still seen here.
        client.on('data', () => {}).resume();
        upstream.on('data', () => {}).resume();
      }
    },
    /** Connections the server has closed since they were opened. */
    closedByServer() {
      return [...pairs].filter((p) => p.upstreamEndedAt !== null);
    },
    /** Connections the server still holds open. */
    openUpstream() {
      return [...pairs].filter((p) => p.upstreamEndedAt === null);
    },
    /** Closes every connection and the listener. */
    close() {
      for (const { client, upstream } of pairs) {
        client.destroy();
        upstream.destroy();
      }
      for (const client of unanswered) client.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

#!/usr/bin/env node
// Runs the whole cluster on this host, in the foreground, until Ctrl-C:
// Redis, the frontends, the backends and HAProxy on --port (default 8080).
//
//   node tests/e2e/run.mjs [--port 8080] [--frontends 2] [--backends 2] [--log-dir DIR]

import { parseArgs } from 'node:util';

import { PACKAGED_LIMITS, startTopology } from './lib/topology.mjs';

const usage = 'usage: node tests/e2e/run.mjs [--port N] [--frontends N] [--backends N] [--log-dir DIR]';

function die(message) {
  console.error(message);
  process.exit(2);
}

let options;
try {
  ({ values: options } = parseArgs({
    options: {
      port: { type: 'string', default: '8080' },
      frontends: { type: 'string', default: '2' },
      backends: { type: 'string', default: '2' },
      'log-dir': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  }));
} catch (e) {
  die(`${e.message}\n${usage}`);
}
if (options.help) {
  console.log(usage);
  process.exit(0);
}
const count = (name, min, max) => {
  const n = Number(options[name]);
  if (!Number.isInteger(n) || n < min || n > max) die(`--${name} must be a whole number from ${min} to ${max}\n${usage}`);
  return n;
};
const port = count('port', 1, 65535);
const frontends = count('frontends', 1, 16);
const backends = count('backends', 1, 16);

console.log(`starting Redis, ${frontends} frontend(s), ${backends} backend(s) and HAProxy on port ${port}...`);
let topo;
try {
  topo = await startTopology({ frontends, backends, haproxyPort: port, logDir: options['log-dir'], ...PACKAGED_LIMITS });
} catch (e) {
  // The port is bound before anything starts: taken, it is the first error.
  const taken = /the port is in use/.test(e.message) ? '; choose another with --port N' : '';
  console.error(`could not start: ${e.message}${taken}`);
  process.exit(1);
}

let stopping = false;
for (const signal of ['SIGINT', 'SIGTERM']) {
  // The topology's own handler stops every process and exits.
  process.on(signal, () => {
    if (!stopping) console.log('\nstopping...');
    stopping = true;
  });
}

const base = `http://localhost:${port}`;
const list = (ds) => ds.map((d) => d.port).join(', ');
console.log(`
chat-ha is running.

  Chat page:   ${base}/front/lobby   (any room name: ${base}/front/<room>)
               also http://www.node-services-1.com:${port}/front/lobby and
               http://www.node-services-2.com:${port}/front/lobby where those
               names resolve to this host
  Post:        curl -si -H 'Content-Type: application/json' \\
                 -d '{"room":"lobby","message":"hello from curl"}' ${base}/back/message
  History:     curl -s '${base}/back/messages?room=lobby&limit=10'
  Status:      curl -s ${base}/front/status ; curl -s ${base}/back/status

  Redis on ${topo.redis.socket}; frontends on ports ${list(topo.frontends)}; backends on ports ${list(topo.backends)}
  Logs in ${topo.logDir}

Press Ctrl-C to stop everything.`);

// Say so when a daemon stops on its own; the rest keeps running.
for (const d of [...topo.frontends, ...topo.backends]) {
  d.proc.exited.then((exit) => {
    if (stopping) return;
    console.error(`\n${d.proc.name} (port ${d.port}) exited (code ${exit.code}, signal ${exit.signal}); its log: ${d.logFile}\n${d.proc.logTail(2000)}`);
  });
}

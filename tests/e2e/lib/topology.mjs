// Starts a private chat-ha cluster on this host: one redis-server, N
// chat-frontend and M chat-backend processes, and HAProxy in front of them
// configured from the packaged etc/haproxy/chat-ha.cfg.
//
// Nothing picks a port and hopes it is still free when used: the daemons
// bind port 0 and say in their log where they listen, Redis listens on a
// unix socket in the topology's temporary directory, and HAProxy gets its
// listening socket from this process, already bound (`bind fd@3`). Every
// process has its own log file, and is stopped by PID by stop(), or on
// exit, SIGINT or SIGTERM of this process.
//
// Binaries come from $CHAT_HA_BIN_DIR (default <repo>/target/debug);
// redis-server and haproxy from $PATH.

import { execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { sleep } from './helpers.mjs';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const HAPROXY_CFG = path.join(REPO, 'etc', 'haproxy', 'chat-ha.cfg');
export const DOMAINS_LST = path.join(REPO, 'etc', 'haproxy', 'chat-ha-domains.lst');
export const ORIGINS_LST = path.join(REPO, 'etc', 'haproxy', 'chat-ha-origins.lst');
export const INTERNAL_LST = path.join(REPO, 'etc', 'haproxy', 'chat-ha-internal.lst');
export const WWW_DIR = path.join(REPO, 'share', 'www');
export const REDIS_CONF = path.join(REPO, 'etc', 'redis', 'chat-ha.conf');
export const REDIS_USER_ACL = path.join(REPO, 'etc', 'redis', 'chat-ha-user.acl');

const READY_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 15_000;

// Variables that would make the daemons behave as systemd services (log to
// the journal, take a listening socket, notify readiness).
const SYSTEMD_ENV = [
  'INVOCATION_ID', 'JOURNAL_STREAM', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES',
  'NOTIFY_SOCKET', 'WATCHDOG_PID', 'WATCHDOG_USEC',
];

// ---------------------------------------------------------------------------
// Cleanup of everything started by this Node process.

const liveProcesses = new Set(); // ManagedProcess
const liveTopologies = new Set(); // topology objects
const tempDirs = new Set();
let handlersInstalled = false;
let stoppingOnSignal = false;

function installHandlers() {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on('exit', () => {
    // Last resort (a crash, process.exit): nothing asynchronous runs any
    // more. Log directories stay, for finding out what happened.
    for (const p of liveProcesses) p.killNow();
    for (const dir of tempDirs) {
      try { fs.rmSync(dir, { recursive: true, force: true }); } catch { /* best effort */ }
    }
  });
  for (const [signal, number] of [['SIGINT', 2], ['SIGTERM', 15]]) {
    process.on(signal, () => {
      if (stoppingOnSignal) return;
      stoppingOnSignal = true;
      const all = [...liveTopologies].map((t) => t.stop());
      Promise.allSettled(all).finally(() => process.exit(128 + number));
    });
  }
}

// ---------------------------------------------------------------------------
// Listening sockets handed to a child.

/**
 * A TCP socket listening on 127.0.0.1:`port` (0: any free port), for a
 * child process to inherit (HAProxy's `bind fd@N`): bound here, so the port
 * cannot be taken between choosing it and using it. `fd` is the descriptor
 * to pass in the child's `stdio`; close() once the child has started, so
 * that this process takes none of its connections.
 */
export async function listeningSocket(port = 0) {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', (e) => reject(new Error(`cannot listen on 127.0.0.1:${port}: ` +
      (e.code === 'EADDRINUSE' ? 'the port is in use' : e.message))));
    server.listen({ port, host: '127.0.0.1', backlog: 511 }, resolve);
  });
  return {
    port: server.address().port,
    // Node has no public way to hand a listening socket to a child that is
    // not Node: the descriptor libuv holds is the one to pass.
    fd: server._handle.fd,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/**
 * `config` (haproxyConfig's output for `port`) with its `bind
 * 127.0.0.1:PORT` line replaced by a line for each of `binds`, e.g.
 * ['fd@3', 'fd@4 ssl crt /path/cert.pem']: the sockets HAProxy inherits.
 */
export function bindInherited(config, port, binds) {
  const line = `    bind 127.0.0.1:${port}\n`;
  if (!config.includes(line)) throw new Error(`no "${line.trim()}" line in the HAProxy configuration`);
  return config.replace(line, binds.map((b) => `    bind ${b}\n`).join(''));
}

// ---------------------------------------------------------------------------
// Small clients used for readiness checks.

/** GET `url`; resolves to {status, body} or rejects (refused, timeout). */
function httpGet(url, timeoutMs = 2000) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: timeoutMs, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => resolve({ status: res.statusCode, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

/** Sends one line to a TCP or unix socket and returns everything it answers until it closes. */
function talk(connectOptions, line, { timeoutMs = 2000, until } = {}) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(connectOptions);
    let data = '';
    const timer = setTimeout(() => socket.destroy(new Error('no answer within ' + timeoutMs + ' ms')), timeoutMs);
    socket.setEncoding('utf8');
    socket.on('connect', () => socket.write(line));
    socket.on('data', (chunk) => {
      data += chunk;
      if (until && until(data)) socket.end();
    });
    socket.on('error', (e) => { clearTimeout(timer); reject(e); });
    socket.on('close', () => { clearTimeout(timer); resolve(data); });
  });
}

// ---------------------------------------------------------------------------
// One child process.

class ManagedProcess {
  /** `inheritedFds`: descriptors the child gets as 3, 4, ... (listening sockets). */
  constructor({ name, command, args, env, logFile, cwd, inheritedFds = [] }) {
    Object.assign(this, { name, command, args, env, logFile, cwd, inheritedFds });
    this.child = null;
    this.exit = null; // {code, signal} once the current run ended
    this.exited = null; // promise of the current run's end
    this.runLogOffset = 0; // where the current run's lines start in the log
  }

  get pid() {
    return this.child && this.exit === null ? this.child.pid : undefined;
  }

  get running() {
    return this.child !== null && this.exit === null;
  }

  start() {
    if (this.running) throw new Error(`${this.name} is already running (pid ${this.child.pid})`);
    const fd = fs.openSync(this.logFile, 'a');
    fs.writeSync(fd, `\n=== ${new Date().toISOString()} starting ${this.name}: ${this.command} ${this.args.join(' ')}\n`);
    this.runLogOffset = fs.fstatSync(fd).size;
    let child;
    try {
      child = spawn(this.command, this.args, {
        cwd: this.cwd,
        env: this.env,
        stdio: ['ignore', fd, fd, ...this.inheritedFds],
        // Own process group: Ctrl-C in a terminal reaches this Node process
        // only, which then stops the children in order.
        detached: true,
      });
    } finally {
      fs.closeSync(fd);
    }
    this.child = child;
    this.exit = null;
    liveProcesses.add(this);
    this.exited = new Promise((resolve) => {
      const done = (code, signal) => {
        if (this.child !== child || this.exit !== null) return;
        this.exit = { code, signal };
        liveProcesses.delete(this);
        resolve(this.exit);
      };
      child.on('exit', done);
      child.on('error', (e) => {
        try { fs.appendFileSync(this.logFile, `=== cannot start ${this.name}: ${e.message}\n`); } catch { /* ignore */ }
        done(null, null);
      });
    });
    return this;
  }

  /** Sends `signal`, waits for the exit; SIGKILL if it takes longer than `timeoutMs`. */
  async stop({ signal = 'SIGTERM', timeoutMs = STOP_TIMEOUT_MS } = {}) {
    if (!this.running) return this.exit;
    const { pid } = this.child;
    try { process.kill(pid, signal); } catch { /* already gone */ }
    let timer;
    const timedOut = new Promise((resolve) => { timer = setTimeout(() => resolve(null), timeoutMs); });
    const result = await Promise.race([this.exited, timedOut]);
    clearTimeout(timer);
    if (result) return result;
    try { fs.appendFileSync(this.logFile, `=== ${this.name} still running ${timeoutMs} ms after ${signal}: SIGKILL\n`); } catch { /* ignore */ }
    try { process.kill(pid, 'SIGKILL'); } catch { /* already gone */ }
    return this.exited;
  }

  killNow() {
    if (this.running) {
      try { process.kill(this.child.pid, 'SIGKILL'); } catch { /* already gone */ }
    }
  }

  /** What the current run has written to the log so far. */
  runLog() {
    const fd = fs.openSync(this.logFile, 'r');
    try {
      const length = Math.max(0, fs.fstatSync(fd).size - this.runLogOffset);
      const buffer = Buffer.alloc(length);
      fs.readSync(fd, buffer, 0, length, this.runLogOffset);
      return buffer.toString('utf8');
    } finally {
      fs.closeSync(fd);
    }
  }

  /** The last `bytes` of this process's log. */
  logTail(bytes = 4000) {
    try {
      const text = fs.readFileSync(this.logFile, 'utf8');
      return text.length > bytes ? '…' + text.slice(-bytes) : text;
    } catch (e) {
      return `(no log: ${e.message})`;
    }
  }

  /** Polls `check` until it resolves truthy, and returns that; fails early if the process exits. */
  async waitUntil(what, check, timeoutMs = READY_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    let lastError = null;
    for (;;) {
      if (!this.running) {
        const how = this.exit ? `code ${this.exit.code}, signal ${this.exit.signal}` : 'not started';
        throw new Error(`${this.name} exited (${how}) before ${what}; its log (${this.logFile}):\n${this.logTail()}`);
      }
      try {
        const value = await check();
        if (value) return value;
        lastError = null;
      } catch (e) {
        lastError = e;
      }
      if (Date.now() > deadline) {
        throw new Error(`${this.name} (pid ${this.pid}): not ${what} within ${timeoutMs} ms` +
          (lastError ? ` (last error: ${lastError.message})` : '') +
          `; its log (${this.logFile}):\n${this.logTail()}`);
      }
      await sleep(100);
    }
  }
}

// ---------------------------------------------------------------------------
// HAProxy configuration.

/**
 * The packaged HAProxy configuration for this topology: its listening
 * address and the paths of its lists (domains, origins, internal networks)
 * replaced, the lists defaulting to the repository's copies; and a server
 * per started instance (front0, front1..., back0...), added as on a host:
 * by chat-ha-servers (debian/haproxy-dropin/), from a chat-ha-servers.lst
 * that names each instance and its port.
 */
export function haproxyConfig({
  text = fs.readFileSync(HAPROXY_CFG, 'utf8'), port, frontendPorts, backendPorts,
  domainsPath = DOMAINS_LST, originsPath = ORIGINS_LST, internalPath = INTERNAL_LST,
}) {
  const lists = { domains: domainsPath, origins: originsPath, internal: internalPath };
  const out = [];
  let section = null; // e.g. ['frontend', 'chat_ha']
  let bound = false;
  for (const line of text.split('\n')) {
    const words = line.trim().split(/\s+/);
    if (/^[^\s#]/.test(line)) {
      section = words;
      out.push(line);
      continue;
    }
    if (section && section[0] === 'frontend' && words[0] === 'bind' && port !== undefined) {
      if (!bound) out.push(`    bind 127.0.0.1:${port}`);
      bound = true;
      continue;
    }
    out.push(line.replace(/(-f\s+)\S*chat-ha-(domains|origins|internal)\.lst/g, (_, f, list) => `${f}${lists[list]}`));
  }
  if (port !== undefined && !bound) throw new Error(`${HAPROXY_CFG}: no bind line in the frontend`);
  // One line per instance, without a count: a server named as the line.
  const servers = [
    ...frontendPorts.map((p, i) => `chat-frontend front${i} 127.0.0.1:${p}\n`),
    ...backendPorts.map((p, i) => `chat-backend back${i} 127.0.0.1:${p}\n`),
  ];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-ha-servers-'));
  try {
    const list = path.join(dir, 'chat-ha-servers.lst');
    fs.writeFileSync(list, servers.join(''));
    const script = path.join(REPO, 'debian', 'haproxy-dropin', 'chat-ha-servers');
    try {
      return execFileSync('sh', [script, list, '-', '-'], { input: out.join('\n'), encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      throw new Error(`chat-ha-servers failed (${e.status ?? e.message}): ${e.stderr ?? ''}`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The global section the packaged file leaves to the host's haproxy.cfg. */
export function haproxyGlobal({ statsSocket }) {
  return [
    'global',
    '    log stderr format raw daemon',
    `    stats socket ${statsSocket} mode 600 level admin`,
    '',
  ].join('\n');
}

/** Parses HAProxy's `show stat` CSV into objects keyed by column name. */
function parseStats(csv) {
  const lines = csv.split('\n').filter((l) => l.trim() !== '');
  if (lines.length === 0 || !lines[0].startsWith('# ')) throw new Error(`unexpected stats output: ${csv.slice(0, 200)}`);
  const columns = lines[0].slice(2).split(',');
  return lines.slice(1).map((line) => {
    const values = line.split(',');
    return Object.fromEntries(columns.map((c, i) => [c, values[i]]));
  });
}

// ---------------------------------------------------------------------------
// The topology.

function tomlString(s) {
  return JSON.stringify(s); // a JSON string is a valid TOML basic string
}

/** `frontendLines`: more lines of the [frontend] section (TOML, newline-terminated). */
function daemonConfig({ redisUrl, redisPasswordFile, threads, publishTokensFile, frontendLines = '' }) {
  return [
    '# written by tests/e2e/lib/topology.mjs',
    '[log]',
    'level = "info"',
    '[redis]',
    `url = ${tomlString(redisUrl)}`,
    `password_file = ${tomlString(redisPasswordFile)}`,
    '[frontend]',
    `www_dir = ${tomlString(WWW_DIR)}`,
    `threads = ${threads}`,
    frontendLines.replace(/\n$/, ''),
    '[backend]',
    ...(publishTokensFile ? [`publish_tokens_file = ${tomlString(publishTokensFile)}`] : []),
    '',
  ].join('\n');
}

/** The version of the redis-server on $PATH, as [major, minor]. */
function redisVersion() {
  const text = execFileSync('redis-server', ['--version'], { encoding: 'utf8' });
  const [, major, minor] = /v=(\d+)\.(\d+)/.exec(text);
  return [Number(major), Number(minor)];
}

/**
 * A configuration for a test's redis-server, as the package chat-redis sets
 * Redis up: the directives of etc/redis/chat-ha.conf (but the include of
 * Debian's redis.conf and the ACL file, which the test's own server has
 * not), nobody anonymous, the chat-ha user with the rules of
 * etc/redis/chat-ha-user.acl, and an administrator for the tests' own looks,
 * as chat-redis's postinst writes them.
 */
export function redisConfig({ password, adminPassword }) {
  const directives = fs.readFileSync(REDIS_CONF, 'utf8').split('\n')
    .filter((l) => l.trim() !== '' && !l.startsWith('#') && !/^(include|aclfile)\s/.test(l));
  let user = fs.readFileSync(REDIS_USER_ACL, 'utf8').split('\n').find((l) => l.startsWith('user chat-ha '));
  user = user.replace('@PASSWORD@', `>${password}`);
  const [major, minor] = redisVersion();
  // Redis before 7.2 knows no CLIENT SETINFO, and refuses the rule.
  if (major < 7 || (major === 7 && minor < 2)) user = user.replace(' +client|setinfo', '');
  return [
    '# written by tests/e2e/lib/topology.mjs from etc/redis/',
    ...directives,
    // Locked, never off: Redis replays its append-only file as the default
    // user, and drops the transactions that user may not run.
    `user default on >${adminPassword} ~* &* +@all`,
    user,
    `user admin on >${adminPassword} ~* &* +@all`,
    '',
  ].join('\n');
}

/**
 * HAProxy's limits per client address: the startTopology option and the
 * environment variable chat-ha.cfg reads it from. Tests ask far more from
 * one address than a person does, so every limit is lifted unless the
 * option is null, which keeps the packaged default.
 */
const HAPROXY_LIMITS = {
  postsPer10s: 'CHAT_HA_POSTS_PER_10S',
  readsPer10s: 'CHAT_HA_READS_PER_10S',
  socketsPerAddress: 'CHAT_HA_SOCKETS_PER_ADDRESS',
  connectsPer10s: 'CHAT_HA_CONNECTS_PER_10S',
  authFailuresPerMin: 'CHAT_HA_AUTH_FAILURES_PER_MIN',
};
const LIFTED_LIMIT = 1_000_000;

/** Parses `show table` of HAProxy's stats socket into [{key, <data>: number}]. */
function parseStickTable(text) {
  return text.split('\n').filter((l) => /^0x[0-9a-f]+: /.test(l)).map((line) => {
    const entry = {};
    for (const [, name, value] of line.matchAll(/(\w+)(?:\(\d+\))?=(\S+)/g)) {
      entry[name] = name === 'key' ? value : Number(value);
    }
    return entry;
  });
}

/**
 * startTopology options that keep every limit per client address as
 * packaged (HAProxy's, and the frontends' replay budget), where tests lift
 * them because all their clients share one address.
 */
export const PACKAGED_LIMITS = Object.freeze({
  postsPer10s: null,
  readsPer10s: null,
  socketsPerAddress: null,
  connectsPer10s: null,
  authFailuresPerMin: null,
  replayPerAddress: null,
});

/**
 * Starts Redis, the frontends, the backends and HAProxy; resolves once every
 * one of them is ready. See the module comment.
 */
export async function startTopology({
  frontends = 2,
  backends = 2,
  // HAProxy's port on 127.0.0.1 (make run's); 0: any free one.
  haproxyPort = 0,
  frontendThreads = [],
  // Lines added to the [frontend] section of every frontend's configuration,
  // e.g. 'max_queued_bytes = 65536\n'.
  frontendConfig = '',
  logDir,
  // HAProxy's limits per client address (HAPROXY_LIMITS): a number, or
  // null for the packaged default; lifted when not given.
  postsPer10s,
  readsPer10s,
  socketsPerAddress,
  connectsPer10s,
  authFailuresPerMin,
  // Networks HAProxy treats as internal (status endpoints, publishing),
  // e.g. ['127.0.0.1/32']; by default the packaged chat-ha-internal.lst.
  internalNetworks,
  // Tokens the backends accept on POST /back/publish (at least 16
  // characters each); by default none, and publishing is off.
  publishTokens,
  // The frontends' budget of history replayed per client address
  // (frontend.replay_per_second and replay_burst): every test client comes
  // from one address, so it is lifted unless this is null (as packaged).
  replayPerAddress = 1_000_000,
} = {}) {
  const limits = { postsPer10s, readsPer10s, socketsPerAddress, connectsPer10s, authFailuresPerMin };
  installHandlers();
  const binDir = process.env.CHAT_HA_BIN_DIR || path.join(REPO, 'target', 'debug');
  for (const bin of ['chat-frontend', 'chat-backend']) {
    if (!fs.existsSync(path.join(binDir, bin))) {
      throw new Error(`${path.join(binDir, bin)} not found: build it first (cargo build --bins) or set CHAT_HA_BIN_DIR`);
    }
  }

  // HAProxy's listening socket first: a port asked for and taken fails
  // before anything starts.
  const proxySocket = await listeningSocket(haproxyPort);
  const tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'chat-ha-topology-'));
  tempDirs.add(tmp);
  const ownLogDir = !logDir;
  logDir = logDir ? path.resolve(logDir) : await fsp.mkdtemp(path.join(os.tmpdir(), 'chat-ha-logs-'));
  await fsp.mkdir(logDir, { recursive: true });
  const redisDir = path.join(tmp, 'redis');
  await fsp.mkdir(redisDir);

  const env = { ...process.env, NO_COLOR: '1' };
  for (const name of SYSTEMD_ENV) delete env[name];
  for (const [option, variable] of Object.entries(HAPROXY_LIMITS)) {
    const limit = limits[option] === undefined ? LIFTED_LIMIT : limits[option];
    if (limit === null) delete env[variable];
    else env[variable] = String(limit);
  }

  const processes = [];
  const manage = (options) => {
    const p = new ManagedProcess({ env, cwd: tmp, ...options });
    processes.push(p);
    return p;
  };

  // Redis as packaged (chat-redis): its limits, ACL users and append-only
  // file (in the temp dir, so a restarted Redis has every message it
  // acknowledged); no RDB snapshots. It listens on a unix socket only; the
  // daemons log in as chat-ha.
  const redisSocket = path.join(tmp, 'redis.sock');
  const redisUrl = `unix://${redisSocket}`;
  const redisPassword = crypto.randomBytes(16).toString('hex');
  const redisAdmin = { user: 'admin', password: crypto.randomBytes(16).toString('hex') };
  const redisPasswordFile = path.join(tmp, 'redis-password');
  fs.writeFileSync(redisPasswordFile, `${redisPassword}\n`, { mode: 0o600 });
  const redisConfFile = path.join(tmp, 'redis.conf');
  fs.writeFileSync(redisConfFile, redisConfig({ password: redisPassword, adminPassword: redisAdmin.password }), { mode: 0o600 });
  const redisProcess = manage({
    name: 'redis-server',
    command: 'redis-server',
    args: [
      redisConfFile, '--port', '0', '--unixsocket', redisSocket, '--unixsocketperm', '700', '--dir', redisDir,
      '--save', '', '--daemonize', 'no', '--logfile', '',
    ],
    logFile: path.join(logDir, 'redis.log'),
  });
  /** Sends `command` (an inline command line) as the administrator; resolves to the answer's first line. */
  const redisAsAdmin = async (command) => {
    const answer = await talk({ path: redisSocket },
      `AUTH ${redisAdmin.user} ${redisAdmin.password}\r\n${command}\r\n`,
      { until: (d) => d.split('\r\n').length > 2 });
    return answer.split('\r\n')[1];
  };
  const redisReady = () => redisProcess.waitUntil('answering PING',
    async () => (await redisAsAdmin('PING')) === '+PONG');

  let publishTokensFile;
  if (publishTokens) {
    publishTokensFile = path.join(tmp, 'publish-tokens');
    fs.writeFileSync(publishTokensFile, publishTokens.map((t) => `${t}\n`).join(''), { mode: 0o600 });
  }

  // HAProxy: its stats socket (where the tests read its view of the
  // servers, and where a restarted daemon's new address is given to it)
  // and its listening socket, bound here and inherited as fd 3.
  const statsSocket = path.join(tmp, 'haproxy.sock');
  /** Sends one command to HAProxy's stats socket; resolves to the answer. */
  const haproxyCommand = (command) => talk({ path: statsSocket }, `${command}\n`);
  const serverRows = async () => parseStats(await haproxyCommand('show stat'))
    .filter((row) => (row.pxname === 'chat_front' || row.pxname === 'chat_back') && row.svname !== 'BACKEND');

  /**
   * Points HAProxy's server of `backend` that was at `from` (host:port) to
   * `to`: a daemon started again listens on a port of its own choosing.
   */
  const moveServer = async (backend, from, to) => {
    const row = (await serverRows()).find((r) => r.pxname === backend && r.addr === from);
    if (!row) throw new Error(`HAProxy has no server at ${from} in ${backend}`);
    const [host, port] = splitAddress(to);
    const answer = await haproxyCommand(`set server ${backend}/${row.svname} addr ${host} port ${port}`);
    if (!/changed|no need to change/i.test(answer)) throw new Error(`HAProxy refused to move ${backend}/${row.svname} to ${to}: ${answer.trim()}`);
  };

  const daemon = (role, index, threads) => {
    const configFile = path.join(tmp, `${role}-${index}.toml`);
    const replayLines = replayPerAddress === null ? ''
      : `replay_per_second = ${replayPerAddress}\nreplay_burst = ${replayPerAddress}\n`;
    const frontendLines = role === 'frontend' ? replayLines + frontendConfig : '';
    fs.writeFileSync(configFile, daemonConfig({ redisUrl, redisPasswordFile, threads, publishTokensFile, frontendLines }));
    const proc = manage({
      name: `chat-${role} ${index}`,
      command: path.join(binDir, `chat-${role}`),
      args: ['--config', configFile, '--listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0', '--instance', String(index)],
      logFile: path.join(logDir, `${role}-${index}.log`),
    });
    const haproxyBackend = role === 'frontend' ? 'chat_front' : 'chat_back';
    let addresses = null; // {listen, metrics} of the current run, once it said
    const url = () => `http://${addresses.listen}`;
    const statusUrl = () => `${url()}/${role === 'frontend' ? 'front' : 'back'}/status`;
    const bound = async () => {
      addresses = await proc.waitUntil('saying where it listens', () => boundAddresses(proc.runLog()));
    };
    // Ready: the status endpoint answers; and, while Redis runs, says so
    // (a frontend delivers only what is appended after it reached Redis).
    const ready = () => proc.waitUntil('ready (status answering, Redis up when running)', async () => {
      const res = await httpGet(statusUrl());
      if (res.status !== 200) return false;
      const status = JSON.parse(res.body);
      return !redisProcess.running || status.redis === 'up';
    });
    return {
      instance: index,
      /** Where the current run listens (a new port after each start). */
      get port() { return addresses && splitAddress(addresses.listen)[1]; },
      get url() { return addresses && url(); },
      /** Where its /metrics are served (not on its public port). */
      get metricsUrl() { return addresses && `http://${addresses.metrics}`; },
      get pid() { return proc.pid; },
      get running() { return proc.running; },
      logFile: proc.logFile,
      async status() { return JSON.parse((await httpGet(statusUrl())).body); },
      stop: (options) => proc.stop(options),
      /** Starts it again; HAProxy is pointed at its new address. */
      async start() {
        const before = addresses;
        proc.start();
        await bound();
        if (before && haproxyProcess.running) await moveServer(haproxyBackend, before.listen, addresses.listen);
        await ready();
      },
      proc,
      bound,
      ready,
    };
  };

  const frontendList = Array.from({ length: frontends }, (_, i) => daemon('frontend', i, frontendThreads[i] ?? 1));
  const backendList = Array.from({ length: backends }, (_, i) => daemon('backend', i, 1));
  const daemons = [...frontendList, ...backendList];

  // HAProxy with the packaged configuration, pointed at these instances
  // once they listen.
  const globalFile = path.join(tmp, 'haproxy-global.cfg');
  const haproxyFile = path.join(tmp, 'chat-ha.cfg');
  fs.writeFileSync(globalFile, haproxyGlobal({ statsSocket }));
  let internalPath;
  if (internalNetworks) {
    internalPath = path.join(tmp, 'chat-ha-internal.lst');
    fs.writeFileSync(internalPath, internalNetworks.map((n) => `${n}\n`).join(''));
  }
  const writeHaproxyConfig = () => {
    const ports = (list) => list.map((d) => d.port);
    const config = haproxyConfig({
      port: proxySocket.port, frontendPorts: ports(frontendList), backendPorts: ports(backendList), internalPath,
    });
    fs.writeFileSync(haproxyFile, bindInherited(config, proxySocket.port, ['fd@3']));
  };
  const haproxyProcess = manage({
    name: 'haproxy',
    command: 'haproxy',
    args: ['-db', '-f', globalFile, '-f', haproxyFile],
    logFile: path.join(logDir, 'haproxy.log'),
    inheritedFds: [proxySocket.fd],
  });
  const serverStates = async () => (await serverRows())
    .map((row) => ({ backend: row.pxname, server: row.svname, status: row.status, sessions: Number(row.stot) }));
  const haproxyReady = () => haproxyProcess.waitUntil('seeing every server UP', async () => {
    const states = await serverStates();
    return states.length === frontends + backends && states.every((s) => s.status === 'UP');
  });

  let stopping = null;
  const topology = {
    url: `http://127.0.0.1:${proxySocket.port}`,
    haproxyPort: proxySocket.port,
    logDir,
    tmpDir: tmp,
    redis: {
      /** The unix socket Redis listens on (redis-cli -s), and the daemons' URL of it. */
      socket: redisSocket,
      url: redisUrl,
      get pid() { return redisProcess.pid; },
      get running() { return redisProcess.running; },
      stop: (options) => redisProcess.stop(options),
      async start() { redisProcess.start(); await redisReady(); },
      /** The administrator's login, for a test's own looks (redis-cli --user, REDISCLI_AUTH). */
      admin: redisAdmin,
      /** Sends PING as the administrator; resolves to Redis's answer ('PONG'), without its RESP framing. */
      async ping() {
        return (await redisAsAdmin('PING')).replace(/^[+-]/, '');
      },
    },
    frontends: frontendList,
    backends: backendList,
    haproxy: {
      get pid() { return haproxyProcess.pid; },
      config: haproxyFile,
      /** [{backend, server, status, sessions}] for every server, as HAProxy sees them. */
      serverStates,
      /** The entries of stick table `name` (e.g. chat_limit_sockets): [{key, conn_cur, ...}]. */
      async stickTable(name) {
        return parseStickTable(await haproxyCommand(`show table ${name}`));
      },
    },
    failed: false,
    /** Keep the log directory after stop() (a test failed). */
    keepLogs() { topology.failed = true; },
    /** The end of every process's log, for a failure message. */
    logs(bytes = 3000) {
      return processes.map((p) => `----- ${p.name} (${p.logFile})\n${p.logTail(bytes)}`).join('\n');
    },
    /** Stops everything, by PID, and removes the temporary files. Idempotent. */
    stop() {
      stopping ??= (async () => {
        await proxySocket.close();
        // HAProxy first: clients lose their connections at once instead of
        // waiting for the daemons' graceful stop.
        await haproxyProcess.stop();
        await Promise.all(daemons.map((d) => d.proc.stop()));
        await redisProcess.stop();
        liveTopologies.delete(topology);
        await fsp.rm(tmp, { recursive: true, force: true });
        tempDirs.delete(tmp);
        if (ownLogDir && !topology.failed) await fsp.rm(logDir, { recursive: true, force: true });
      })();
      return stopping;
    },
  };
  liveTopologies.add(topology);

  try {
    redisProcess.start();
    await redisReady();
    for (const d of daemons) d.proc.start();
    await Promise.all(daemons.map((d) => d.bound()));
    await Promise.all(daemons.map((d) => d.ready()));
    writeHaproxyConfig();
    haproxyProcess.start();
    // HAProxy holds the listening socket now; this process lets go of it.
    await proxySocket.close();
    await haproxyReady();
  } catch (e) {
    topology.keepLogs();
    await topology.stop();
    e.message += `\n(logs kept in ${logDir})`;
    throw e;
  }
  return topology;
}

/** Splits `host:port` (or `[v6]:port`) into [host, port as a number]. */
function splitAddress(address) {
  const at = address.lastIndexOf(':');
  return [address.slice(0, at).replace(/^\[(.*)\]$/, '$1'), Number(address.slice(at + 1))];
}

/**
 * Where a daemon listens, from its log: its public and metrics addresses,
 * {listen, metrics} (host:port), once it has logged both; else null.
 */
function boundAddresses(log) {
  const listen = /listening on (\S+)/.exec(log)?.[1];
  const metrics = /serving \/metrics on (\S+)/.exec(log)?.[1];
  return listen && metrics ? { listen, metrics } : null;
}

// Who may reach what. The instances listen on their host's rig address and
// admit only the load balancers (and loopback): from this host or another
// rig machine an instance port gives no answer, from lb1 and lb2 it does.
// /metrics is served on a loopback port of its own, never through the load
// balancers' public side. Redis answers
// nobody anonymous; the daemons' user may not flush or reconfigure it.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';

import {
  BACK_HOSTS, DOMAIN_1, FRONT_HOSTS, INSTANCES, LB_MACHINES, LB_URL, REDIS, getFromLb, request, ssh,
} from './lib/rig.mjs';

const FRONT1 = FRONT_HOSTS[0];
const BACK1 = BACK_HOSTS[0];
/** How long a connection that is given no answer is waited on. */
const NO_ANSWER_MS = 3000;

/**
 * Connects from this host to `ip:port`, sends `request`, and resolves to
 * what happened: {outcome: "answered" | "refused" | "closed unanswered" |
 * "no connection" | "connected, no answer", data}. The first three are
 * events; the last two are what remains after NO_ANSWER_MS.
 */
function tryFromHost(ip, port, request) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: ip, port });
    let data = '';
    let connected = false;
    const finish = (outcome) => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ outcome, data });
    };
    const timer = setTimeout(() => finish(connected ? 'connected, no answer' : 'no connection'), NO_ANSWER_MS);
    socket.on('connect', () => {
      connected = true;
      socket.write(request);
    });
    socket.on('data', (chunk) => {
      data += chunk;
      finish('answered');
    });
    socket.on('error', (e) => finish(e.code === 'ECONNREFUSED' ? 'refused' : connected ? 'closed unanswered' : `error ${e.code}`));
    socket.on('end', () => finish('closed unanswered'));
  });
}

const httpGet = (path) => `GET ${path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`;

/** `curl URL` run in machine `name`: "EXIT CODE" ("0 200"; "7 000" refused; "28 000" no answer in time). */
async function curlFrom(name, url) {
  const out = await ssh(name, `code=$(curl -s -o /dev/null -w '%{http_code}' --max-time ${NO_ANSWER_MS / 1000} '${url}') && rc=0 || rc=$?; echo "$rc $code"`);
  return out.trim();
}

/** Sends Redis `commands` (RESP inline) from machine `name`; resolves to the replies, one per line. */
async function redisFrom(name, commands, { password = false } = {}) {
  // QUIT last: Redis answers it and closes, which ends socat; the password
  // (the chat-ha user's, as provisioned on that machine) never leaves it.
  const auth = password ? 'AUTH chat-ha %s\\r\\n' : '';
  const lines = commands.map((c) => `${c}\\r\\n`).join('');
  const printf = `printf "${auth}${lines}QUIT\\r\\n"${password ? ' "$(cat /etc/chat-ha/redis-password)"' : ''}`;
  const out = await ssh(name, `sudo sh -c '${printf} | socat -t 5 - TCP:${REDIS}:6379'`);
  return out.trim().split('\r\n').map((l) => l.trim());
}

describe('access to the instances', () => {
  it('each instance listens on its rig address only, its metrics on loopback only', async () => {
    for (const [h, base] of [[FRONT1, 9100], [BACK1, 9200]]) {
      const listening = (await ssh(h.name, 'ss -Hltn | awk \'{print $4}\'')).trim().split('\n');
      for (let n = 0; n < INSTANCES; n++) {
        assert.deepEqual(listening.filter((l) => l.endsWith(`:${base + n}`)), [`${h.ip}:${base + n}`], `${h.name}: ${listening}`);
        assert.deepEqual(listening.filter((l) => l.endsWith(`:${base + 200 + n}`)), [`127.0.0.1:${base + 200 + n}`], `${h.name}: ${listening}`);
      }
    }
  });

  for (const m of LB_MACHINES) {
    it(`answers ${m.name}`, async () => {
      for (const url of [`http://${FRONT1.ip}:9100/front/status`, `http://${BACK1.ip}:9200/back/status`]) {
        assert.equal(await curlFrom(m.name, url), '0 200', `${m.name} -> ${url}`);
      }
    });
  }

  it('gives this host no answer', async (t) => {
    for (const [h, port, path] of [[FRONT1, 9100, '/front/status'], [BACK1, 9201, '/back/status']]) {
      const got = await tryFromHost(h.ip, port, httpGet(path));
      t.diagnostic(`this host -> ${h.name}:${port}: ${got.outcome}`);
      assert.notEqual(got.outcome, 'answered', `${h.name}:${port} answered this host: ${got.data}`);
      assert.equal(got.data, '');
    }
  });

  it('gives another rig machine no answer', async (t) => {
    for (const [from, to] of [[BACK1.name, `http://${FRONT1.ip}:9100/front/status`],
      [FRONT1.name, `http://${BACK1.ip}:9200/back/status`], ['redis1', `http://${FRONT_HOSTS[1].ip}:9101/front/status`]]) {
      const got = await curlFrom(from, to);
      t.diagnostic(`${from} -> ${to}: curl exit and status ${got}`);
      assert.match(got, /^(28|52|56) 000$/, `${from} -> ${to}: ${got}`);
    }
  });
});

describe('metrics', () => {
  it('are not routed by the load balancers', async () => {
    const res = await request(`${LB_URL}/metrics`, { host: DOMAIN_1 });
    assert.equal(res.status, 404);
  });

  it('are not on the instances\' public ports', async () => {
    const answers = await getFromLb([`http://${FRONT1.ip}:9100/metrics`, `http://${BACK1.ip}:9200/metrics`]);
    assert.deepEqual(answers.map((a) => a.code), [404, 404]);
  });

  it('cannot be reached from a load balancer on their own ports', async () => {
    assert.equal(await curlFrom('lb1', `http://${FRONT1.ip}:9300/metrics`), '7 000');
    assert.equal(await curlFrom('lb1', `http://${BACK1.ip}:9400/metrics`), '7 000');
  });

  it('are served on loopback, inside the host', async () => {
    assert.equal(await curlFrom(FRONT1.name, 'http://127.0.0.1:9300/metrics'), '0 200');
    assert.equal(await curlFrom(BACK1.name, 'http://127.0.0.1:9401/metrics'), '0 200');
  });
});

describe('Redis', () => {
  it('refuses anonymous commands from a rig machine', async () => {
    const replies = await redisFrom(BACK1.name, ['PING', 'SET chat:x 1', 'FLUSHALL']);
    assert.equal(replies.length, 4, replies.join(' | '));
    for (const r of replies.slice(0, 3)) assert.match(r, /^-NOAUTH/);
  });

  it('refuses anonymous commands from this host', async () => {
    const got = await tryFromHost(REDIS, 6379, 'PING\r\nQUIT\r\n');
    assert.match(got.data, /^-NOAUTH/);
  });

  it('lets the daemons\' user in with the provisioned password, and not flush or reconfigure', async () => {
    const replies = await redisFrom(FRONT1.name, ['PING', 'FLUSHALL', 'CONFIG SET maxmemory 1', 'SET other 1'], { password: true });
    assert.equal(replies[0], '+OK', replies.join(' | '));
    assert.equal(replies[1], '+PONG');
    assert.match(replies[2], /^-NOPERM/);
    assert.match(replies[3], /^-NOPERM/);
    assert.match(replies[4], /^-NOPERM/);
  });

  for (const secret of ['redis-password', 'sentinel-password']) {
    it(`/etc/chat-ha/${secret} is the same on every machine but the load balancers, and in no journal`, async () => {
      const file = `/etc/chat-ha/${secret}`;
      const sums = await Promise.all(['redis1', FRONT1.name, BACK1.name, 'lb1'].map(async (m) => (
        await ssh(m, `sudo sh -c 'if [ -e ${file} ]; then sha256sum <${file}; `
          + `journalctl -q --no-pager -o cat | grep -c -F -f ${file} || true; else echo none; fi'`)
      ).trim().split('\n')));
      const [redis, front, back, lb] = sums;
      assert.deepEqual(lb, ['none'], `lb1 has no ${file}`);
      assert.equal(front[0], redis[0]);
      assert.equal(back[0], redis[0]);
      for (const s of [redis, front, back]) assert.equal(s[1], '0', `journal lines with ${file}`);
    });
  }
});

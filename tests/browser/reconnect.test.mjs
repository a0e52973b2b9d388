// The page recovers by itself when the frontend it is connected to stops:
// it says so, reconnects, joins its room again and fills in what it missed.

import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  startChat, openChat, closeChat, waitState, waitForMessage, countMessage, shownMessages, fence,
  typeAndEnter, postMessage, assertOrderedUnique, unique, uniqueRoom, WAIT_MS,
  SCREENSHOT_DIR,
} from './lib/harness.mjs';
import { waitFor } from '../e2e/lib/helpers.mjs';

// Reconnecting waits out socket.io's backoff (at most 5 s between attempts)
// and HAProxy noticing that a frontend is back.
const RECONNECT_MS = 40000;

let env;
let page;

before(async () => {
  env = await startChat({ name: 'reconnect', frontends: 2, backends: 2 });
});

afterEach(async () => {
  await closeChat(page);
  page = null;
  // Every frontend runs again before the next test.
  for (const fe of env.topo.frontends) await startFrontend(fe);
});

after(async () => {
  await closeChat(page);
  if (env) await env.stop();
});

async function stopFrontend(fe) {
  if (fe.running) await fe.stop();
}

async function startFrontend(fe) {
  if (!fe.running) await fe.start();
}

async function frontendStatus(fe) {
  const response = await fetch(`http://127.0.0.1:${fe.port}/front/status`, {
    signal: AbortSignal.timeout(2000),
  });
  return response.json();
}

/** The frontend the only open page is connected to, asked of each frontend. */
async function connectedFrontend() {
  let counts = [];
  return waitFor(() => `exactly one frontend to report the page's connection in /front/status (counts: ${counts})`, async () => {
    counts = [];
    for (const fe of env.topo.frontends) {
      counts.push(fe.running ? (await frontendStatus(fe)).connections : 0);
    }
    const total = counts.reduce((a, b) => a + b, 0);
    return total === 1 ? env.topo.frontends[counts.indexOf(1)] : null;
  }, { timeoutMs: WAIT_MS, intervalMs: 100 });
}

/** Waits until the page has shown `state` after having been connected. */
async function waitStateSeenAfterConnected(state) {
  await waitFor(() => `the page to show "${state}" (states seen: ${page.states.join(' → ')})`, () => {
    const connectedAt = page.states.indexOf('connected');
    return connectedAt >= 0 && page.states.indexOf(state, connectedAt + 1) > connectedAt;
  }, { timeoutMs: WAIT_MS, intervalMs: 100 });
}

test('when its frontend stops, the page says reconnecting, moves to the other one and keeps working', { timeout: 120000 }, async () => {
  const room = uniqueRoom('failover');
  page = await openChat(env, { domain: 0, room });
  const before = unique('before the stop');
  await typeAndEnter(page, before);
  await waitForMessage(page, before);

  const first = await connectedFrontend();
  await stopFrontend(first);
  await waitStateSeenAfterConnected('reconnecting');
  await waitState(page, 'connected', { timeout: RECONNECT_MS });
  const second = await connectedFrontend();
  assert.notEqual(second, first, 'the page is now on the frontend that still runs');

  const typed = unique('typed after the failover');
  await typeAndEnter(page, typed);
  await waitForMessage(page, typed);
  const posted = unique('posted by another client after the failover');
  await postMessage(env, room, posted);
  await waitForMessage(page, posted);

  // The stopped frontend comes back; the page stays where it is and works.
  await startFrontend(first);
  const later = unique('after the restart');
  await postMessage(env, room, later);
  await waitForMessage(page, later);
  await fence(env, room, [page]);
  for (const text of [before, typed, posted, later]) {
    assert.equal(await countMessage(page, text), 1, `${text} shown once`);
  }
  assertOrderedUnique(await shownMessages(page), page.chatUrl);
  assert.deepEqual(page.errors, []);
});

for (const transport of ['websocket', 'polling']) {
  test(`${transport}: a message posted while every frontend is down appears once after reconnection`, { timeout: 120000 }, async () => {
    const room = uniqueRoom(`outage-${transport}`);
    const query = transport === 'polling' ? '?transport=polling' : '';
    page = await openChat(env, { domain: 1, room, query });
    const before = unique('before the outage');
    await postMessage(env, room, before);
    await waitForMessage(page, before);

    // Stop the other frontend first, so that the page cannot fail over,
    // then the one the page is connected to.
    const mine = await connectedFrontend();
    for (const fe of env.topo.frontends) if (fe !== mine) await stopFrontend(fe);
    await stopFrontend(mine);
    await waitStateSeenAfterConnected('reconnecting');
    if (transport === 'websocket') {
      fs.mkdirSync(SCREENSHOT_DIR, { recursive: true });
      await page.screenshot({ path: path.join(SCREENSHOT_DIR, 'chat-reconnecting.png') });
    }

    // Stored by a backend while the page has no frontend to hear it from:
    // it cannot show it yet (below: it does, once, after reconnecting).
    const missed = unique('posted during the outage');
    await postMessage(env, room, missed);
    assert.equal(await countMessage(page, missed), 0, 'not shown while disconnected');
    assert.notEqual(await page.locator('#status').getAttribute('data-state'), 'connected');

    await startFrontend(mine);
    for (const fe of env.topo.frontends) await startFrontend(fe);
    await waitState(page, 'connected', { timeout: RECONNECT_MS });
    await waitForMessage(page, missed);

    const typed = unique('typed after reconnection');
    await typeAndEnter(page, typed);
    await waitForMessage(page, typed);
    const posted = unique('posted after reconnection');
    await postMessage(env, room, posted);
    await waitForMessage(page, posted);
    const last = await fence(env, room, [page]);

    for (const text of [before, missed, typed, posted]) {
      assert.equal(await countMessage(page, text), 1, `${text} shown once`);
    }
    const shown = await shownMessages(page);
    assert.deepEqual(shown.map((m) => m.text), [before, missed, typed, posted, last]);
    assertOrderedUnique(shown, page.chatUrl);
    if (transport === 'polling') assert.deepEqual(page.sockets, [], 'no WebSocket was opened');
    assert.deepEqual(page.errors, []);
  });
}

test('after a reconnection the page resumes from the frontend: what it missed appears even when the history cannot be read', { timeout: 120000 }, async () => {
  const room = uniqueRoom('resume');
  page = await openChat(env, { domain: 0, room });
  const before = unique('before the outage');
  await postMessage(env, room, before);
  await waitForMessage(page, before);

  // From now on the page cannot read the history: what it missed can only
  // come from the frontend it reconnects to.
  let historyRequests = 0;
  await page.route('**/back/messages**', (route) => {
    historyRequests += 1;
    return route.abort();
  });
  for (const fe of env.topo.frontends) await stopFrontend(fe);
  await waitStateSeenAfterConnected('reconnecting');
  const missed = [unique('missed 1'), unique('missed 2'), unique('missed 3')];
  for (const text of missed) await postMessage(env, room, text);

  for (const fe of env.topo.frontends) await startFrontend(fe);
  await waitState(page, 'connected', { timeout: RECONNECT_MS });
  for (const text of missed) await waitForMessage(page, text);
  const after = unique('after the reconnection');
  await postMessage(env, room, after);
  await waitForMessage(page, after);
  const last = await fence(env, room, [page]);

  const shown = await shownMessages(page);
  assert.deepEqual(shown.map((m) => m.text), [before, ...missed, after, last]);
  assertOrderedUnique(shown, page.chatUrl);
  assert.equal(historyRequests, 0, 'the history was not needed');
  assert.equal(await page.locator('#history-error').isVisible(), false, 'no history error shown');
  assert.deepEqual(page.errors, []);
});

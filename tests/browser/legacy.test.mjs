// A chat page of the socket.io 2 era (legacy/index.html: the socket.io 2.5.0
// client from a script tag, io.connect on /front/socket.io, XMLHttpRequest
// posts to /back/message) beside the current page (share/www), in one room,
// in real Chromium through HAProxy. The test serves the old page and its
// client on the HAProxy origin, as such a deployment served them from its
// own host; everything else is chat-ha's.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  startChat, openChat, closeChat, waitInPage, waitForMessage, fence, shownMessages, typeAndEnter, postMessage,
  assertOrderedUnique, unique, uniqueRoom, WAIT_MS,
} from './lib/harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const LEGACY_PAGE = path.join(HERE, 'legacy', 'index.html');
// The socket.io 2 client as locked for the e2e tests (socket.io-client-v2).
const V2_PACKAGE = path.join(HERE, '..', 'e2e', 'node_modules', 'socket.io-client-v2');
const V2_CLIENT = path.join(V2_PACKAGE, 'dist', 'socket.io.js');

// The old page is served by this test (Playwright fulfils its requests), so
// Chromium knows no address it came from and counts it as from the public
// internet, and its requests to HAProxy on 127.0.0.1 as reaching into the
// local network, which it blocks. Served by a host as a deployment serves
// it, the page comes from the same address as HAProxy and nothing is
// blocked; these checks are off in this test's browser for that reason.
const NO_LOCAL_NETWORK_CHECKS =
  '--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessChecks,LocalNetworkAccessChecks';

let env;
const pages = [];

before(async () => {
  const version = JSON.parse(fs.readFileSync(path.join(V2_PACKAGE, 'package.json'), 'utf8')).version;
  assert.equal(version, '2.5.0', `${V2_PACKAGE}: run npm ci in tests/e2e`);
  env = await startChat({ name: 'legacy', frontends: 2, backends: 2, browserArgs: [NO_LOCAL_NETWORK_CHECKS] });
});

after(async () => {
  for (const page of pages) await closeChat(page);
  if (env) await env.stop();
});

/**
 * Opens the old page of `room` on demo domain `domain`, its files served
 * by this test on that origin, and waits until it has joined.
 */
async function openLegacy(domain, room) {
  const context = await env.browser.newContext();
  const page = await context.newPage();
  pages.push(page);
  page.setDefaultTimeout(WAIT_MS);
  page.errors = [];
  page.sockets = [];
  page.on('pageerror', (error) => page.errors.push(String(error)));
  page.on('websocket', (ws) => page.sockets.push(ws.url()));
  // What its Socket.IO requests were answered, for a failure's message.
  page.answers = [];
  page.on('response', (r) => {
    if (r.url().includes('/front/socket.io')) page.answers.push(`${r.status()} ${r.url().replace(/^.*\/front/, '/front')}`);
  });
  page.on('requestfailed', (r) => page.answers.push(`failed ${r.url()}: ${r.failure()?.errorText}`));
  const origin = env.origins[domain];
  await page.route(`${origin}/legacy/**`, (route) => {
    const file = new URL(route.request().url()).pathname === '/legacy/socket.io.js' ? V2_CLIENT : LEGACY_PAGE;
    const contentType = file === V2_CLIENT ? 'application/javascript' : 'text/html; charset=utf-8';
    return route.fulfill({ status: 200, contentType, body: fs.readFileSync(file) });
  });
  page.chatUrl = `${origin}/legacy/index.html?room=${room}`;
  await page.goto(page.chatUrl);
  await waitInPage(page, () => document.getElementById('state').dataset.state === 'joined', null,
    { message: `${page.chatUrl} to join`, describe: async () => `${await page.locator('#state').textContent()}; ${page.answers.join(', ')}; errors: ${page.errors}` });
  return page;
}

/** The messages the old page shows, in page order: [{id, text}]. */
function legacyMessages(page) {
  return page.$$eval('#messages > li', (items) => items.map((li) => ({ id: li.dataset.id, text: li.textContent })));
}

async function waitForLegacyMessage(page, text) {
  await waitInPage(page, (t) => [...document.querySelectorAll('#messages > li')].some((li) => li.textContent === t), text,
    { message: `${page.chatUrl} to show ${JSON.stringify(text)}`, describe: async () => JSON.stringify(await legacyMessages(page)) });
}

test('a socket.io 2 page and the current page in one room show every post, in the same order', { timeout: 90000 }, async () => {
  const room = uniqueRoom('legacy');
  const current = await openChat(env, { domain: 0, room });
  pages.push(current);
  const legacy = await openLegacy(1, room);

  const fromLegacy = unique('from the socket.io 2 page');
  await legacy.fill('#text', fromLegacy);
  await legacy.press('#text', 'Enter');
  await waitForLegacyMessage(legacy, fromLegacy);
  await waitForMessage(current, fromLegacy);
  await waitInPage(legacy, () => document.getElementById('text').value === '', null,
    { message: 'the old page to clear its box after a 201' });

  const fromCurrent = unique('from the current page');
  await typeAndEnter(current, fromCurrent);
  await waitForMessage(current, fromCurrent);
  await waitForLegacyMessage(legacy, fromCurrent);

  const fromApi = unique('from the API');
  await postMessage(env, room, fromApi);
  const fenceText = await fence(env, room, [current]);
  await waitForLegacyMessage(legacy, fenceText);

  const shownCurrent = await shownMessages(current);
  const shownLegacy = await legacyMessages(legacy);
  assert.deepEqual(shownCurrent.map((m) => m.text), [fromLegacy, fromCurrent, fromApi, fenceText], 'the current page: every post once, in order');
  assert.deepEqual(shownLegacy, shownCurrent, 'the old page shows the same messages, ids and order');
  assertOrderedUnique(shownLegacy, legacy.chatUrl);

  // Each page spoke its own protocol over a websocket: Engine.IO 3 for
  // the socket.io 2 client, 4 for the current one.
  assert.ok(legacy.sockets.some((u) => /[?&]EIO=3(&|$)/.test(u)), `the old page's websockets: ${legacy.sockets}`);
  assert.ok(current.sockets.some((u) => /[?&]EIO=4(&|$)/.test(u)), `the current page's websockets: ${current.sockets}`);
  assert.deepEqual(legacy.errors, [], 'no errors on the old page');
  assert.deepEqual(current.errors, [], 'no errors on the current page');
});

// Shared pieces of the browser tests: the topology (Redis, frontends,
// backends, HAProxy), headless Chromium, waits that fail with a message
// saying what was awaited, and fences (see fence()). The rest is shared with
// the other tiers in tests/e2e/lib/helpers.mjs.
//
// The pages are opened on the demo domains www.node-services-1.com and
// www.node-services-2.com, which Chromium resolves to 127.0.0.1, where HAProxy
// listens on a free port.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startTopology } from '../../e2e/lib/topology.mjs';
import { compareIds } from '../../e2e/lib/helpers.mjs';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const SCREENSHOT_DIR = path.join(REPO, 'target', 'screenshots');
/** Each test file's daemon logs of its last run: target/browser-logs/<name>/. */
export const LOG_DIR = path.join(REPO, 'target', 'browser-logs');
export const DOMAINS = ['www.node-services-1.com', 'www.node-services-2.com'];
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** Default wait, long enough for a reconnect through HAProxy on 2 busy cores. */
export const WAIT_MS = 15000;

/**
 * Starts the topology and Chromium; `stop()` ends both. (The launcher also
 * stops its processes if this process exits or is interrupted, and so does
 * Playwright with Chromium.) The daemons' logs are kept, until the next run,
 * in target/browser-logs/<name>/.
 */
export async function startChat({ name, frontends = 2, backends = 2, browserArgs = [] }) {
  const logDir = path.join(LOG_DIR, name);
  fs.rmSync(logDir, { recursive: true, force: true });
  const env = { topo: null, browser: null };
  let stopping = null;
  env.stop = () => {
    stopping ??= (async () => {
      const errors = [];
      if (env.browser) await env.browser.close().catch((e) => errors.push(e));
      if (env.topo) await env.topo.stop().catch((e) => errors.push(e));
      if (errors.length) throw errors[0];
    })();
    return stopping;
  };
  try {
    env.topo = await startTopology({ frontends, backends, haproxyPort: 0, logDir });
    env.browser = await launchBrowser(browserArgs);
  } catch (e) {
    await env.stop().catch(() => {});
    throw e;
  }
  env.port = env.topo.haproxyPort;
  env.origins = DOMAINS.map((d) => `http://${d}:${env.port}`);
  // The API as Node reaches it: through HAProxy on 127.0.0.1.
  env.api = `http://127.0.0.1:${env.port}`;
  return env;
}

/** Headless Chromium; `extraArgs`: more command-line switches. */
export function launchBrowser(extraArgs = []) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30000,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      `--host-resolver-rules=${DOMAINS.map((d) => `MAP ${d} 127.0.0.1`).join(',')}`,
      ...extraArgs,
    ],
  });
}

/**
 * Opens the chat page of `room` in a fresh browser context (its own cookies
 * and storage) and waits until it is connected. The returned page carries:
 *   page.dialogs  - every dialog that opened (each is dismissed)
 *   page.errors   - uncaught page errors
 *   page.states   - every value #status[data-state] took, in order
 *   page.sockets  - URLs of the WebSockets the page opened
 */
export async function openChat(env, {
  domain = 0, room = 'rooma', query = '', viewport = { width: 1280, height: 800 },
  waitConnected = true,
} = {}) {
  const context = await env.browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.dialogs = [];
  page.errors = [];
  page.states = [];
  page.sockets = [];
  page.on('dialog', (dialog) => {
    page.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  page.on('pageerror', (error) => page.errors.push(String(error)));
  page.on('websocket', (ws) => page.sockets.push(ws.url()));
  await page.exposeFunction('__testRecordState', (state) => { page.states.push(state); });
  // Test instrumentation only: reports each change of the status element's
  // data-state to the test, so a short-lived state is not missed.
  await page.addInitScript(() => {
    document.addEventListener('DOMContentLoaded', () => {
      const status = document.getElementById('status');
      if (!status) return;
      window.__testRecordState(status.dataset.state);
      new MutationObserver(() => window.__testRecordState(status.dataset.state))
        .observe(status, { attributes: true, attributeFilter: ['data-state'] });
    });
  });
  page.chatUrl = `${env.origins[domain]}/front/${room}${query}`;
  await page.goto(page.chatUrl, { timeout: WAIT_MS });
  if (waitConnected) await waitState(page, 'connected');
  return page;
}

export async function closeChat(page) {
  if (page) await page.context().close().catch(() => {});
}

/**
 * Waits until `predicate(arg)`, run in the page, is truthy; on timeout fails
 * with `message` and `describe()` (when given) appended.
 */
export async function waitInPage(page, predicate, arg, { timeout = WAIT_MS, message, describe } = {}) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 100 });
  } catch (e) {
    let detail = '';
    if (describe) detail = ` (${await describe().catch((err) => `could not inspect: ${err}`)})`;
    throw new Error(`timed out after ${timeout} ms: ${message}${detail}`, { cause: e });
  }
}

export async function waitState(page, state, { timeout = WAIT_MS } = {}) {
  await waitInPage(
    page,
    (s) => document.getElementById('status')?.dataset.state === s,
    state,
    {
      timeout,
      message: `${page.chatUrl} to show connection state "${state}"`,
      describe: async () => `states seen: ${page.states.join(' → ')}`,
    },
  );
}

/** The messages shown, in page order: [{id, text}]. */
export function shownMessages(page) {
  return page.$$eval('#messages > li', (items) => items.map((li) => ({
    id: li.dataset.id,
    text: li.querySelector('.message-text')?.textContent ?? null,
  })));
}

/** Waits until the message text `text` is shown at least once. */
export async function waitForMessage(page, text, { timeout = WAIT_MS } = {}) {
  await waitInPage(
    page,
    (t) => [...document.querySelectorAll('#messages > li .message-text')].some((e) => e.textContent === t),
    text,
    {
      timeout,
      message: `${page.chatUrl} to show the message ${JSON.stringify(text.slice(0, 80))}`,
      describe: async () => `shown: ${JSON.stringify((await shownMessages(page)).map((m) => m.text.slice(0, 40)))}`,
    },
  );
}

/**
 * Posts a fence to `room` and waits until each of `pages` shows it and has
 * read the room's history: whatever reached a page before the fence is
 * shown by then (the socket delivers in order; the history the page reads
 * on joining is merged as it arrives), so what is not shown was not sent.
 * Returns the fence's text.
 */
export async function fence(env, room, pages) {
  const text = unique('fence');
  await postMessage(env, room, text);
  for (const page of pages) {
    await waitForMessage(page, text);
    await waitInPage(page, () => document.getElementById('messages')?.getAttribute('aria-busy') === 'false', null,
      { message: `${page.chatUrl} to have read the history` });
  }
  return text;
}

export async function countMessage(page, text) {
  return (await shownMessages(page)).filter((m) => m.text === text).length;
}

/** Types `text` into the message box like a person and presses Enter. */
export async function typeAndEnter(page, text) {
  const box = page.locator('#composer-text');
  await box.click();
  await box.pressSequentially(text);
  await box.press('Enter');
}

/** Posts through the backend API, as another client would. */
export async function postMessage(env, room, message) {
  const response = await fetch(`${env.api}/back/message`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ room, message }),
    signal: AbortSignal.timeout(WAIT_MS),
  });
  const body = await response.json();
  if (response.status !== 201) {
    throw new Error(`POST /back/message answered ${response.status}: ${JSON.stringify(body)}`);
  }
  return body;
}

export async function history(env, room) {
  const response = await fetch(`${env.api}/back/messages?room=${room}&limit=200`, {
    signal: AbortSignal.timeout(WAIT_MS),
  });
  if (response.status !== 200) throw new Error(`GET /back/messages answered ${response.status}`);
  return (await response.json()).messages;
}

/** Fails unless the shown ids are unique and strictly increasing. */
export function assertOrderedUnique(messages, where) {
  for (let i = 1; i < messages.length; i += 1) {
    if (compareIds(messages[i - 1].id, messages[i].id) >= 0) {
      throw new Error(`${where}: messages out of order or repeated at ${i}: ` +
        `${messages[i - 1].id} then ${messages[i].id}`);
    }
  }
}

let counter = 0;
/** A text no other test sends. */
export function unique(label) {
  counter += 1;
  return `${label} ${process.pid}-${Date.now().toString(36)}-${counter}`;
}

/** A room no other test uses. */
export function uniqueRoom(label) {
  counter += 1;
  return `${label}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}


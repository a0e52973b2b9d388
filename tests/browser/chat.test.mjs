// The chat page in real Chromium, through HAProxy, against 2 frontends and
// 2 backends sharing one Redis.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startChat, openChat, closeChat, waitState, waitInPage, waitForMessage, countMessage, fence,
  shownMessages, typeAndEnter, postMessage, history, assertOrderedUnique, unique, uniqueRoom,
  WAIT_MS,
} from './lib/harness.mjs';

let env;
const pages = [];

before(async () => {
  env = await startChat({ name: 'chat', frontends: 2, backends: 2 });
});

after(async () => {
  for (const page of pages) await closeChat(page);
  if (env) await env.stop();
});

async function open(options) {
  const page = await openChat(env, options);
  pages.push(page);
  return page;
}

test('a message sent with Enter in one room appears once on both domains, not in another room', { timeout: 60000 }, async () => {
  const a = await open({ domain: 0, room: 'rooma' });
  const b = await open({ domain: 1, room: 'rooma' });
  const c = await open({ domain: 0, room: 'roomb' });
  for (const page of [a, b, c]) {
    assert.equal(await page.locator('#room-name').textContent(), page === c ? 'roomb' : 'rooma');
  }

  const text = unique('hello from A');
  await typeAndEnter(a, text);
  await waitForMessage(a, text);
  await waitForMessage(b, text);
  // The box is cleared by the post's answer, which may come after the
  // message through the socket.
  await waitInPage(a, () => document.getElementById('composer-text').value === '', null,
    { message: 'the box to be cleared after a 201' });

  // A control message to roomb, then a fence in each room: once a page
  // shows its room's fence, a copy of the message or a message of the
  // other room would have been shown already.
  const control = unique('control for roomb');
  await postMessage(env, 'roomb', control);
  await fence(env, 'rooma', [a, b]);
  await fence(env, 'roomb', [c]);

  assert.equal(await countMessage(a, text), 1, 'A shows the message once');
  assert.equal(await countMessage(b, text), 1, 'B shows the message once');
  assert.equal(await countMessage(c, text), 0, 'C (roomb) does not show it');
  assert.equal(await countMessage(a, control), 0, 'A (rooma) does not show the roomb message');
  for (const page of [a, b, c]) {
    assertOrderedUnique(await shownMessages(page), page.chatUrl);
    assert.deepEqual(page.errors, [], `no page errors on ${page.chatUrl}`);
  }
});

test('markup in a message is shown as text and runs nothing', { timeout: 60000 }, async () => {
  const room = uniqueRoom('xss');
  const a = await open({ domain: 0, room });
  const b = await open({ domain: 1, room });
  const payload = '<img src=x onerror=alert(1)>';
  const typed = `${payload} ${unique('typed')}`;
  const posted = `<script>alert(2)</script><b>bold</b> ${payload} ${unique('posted')}`;

  await typeAndEnter(a, typed);
  await postMessage(env, room, posted);
  for (const page of [a, b]) {
    await waitForMessage(page, typed);
    await waitForMessage(page, posted);
  }
  // Also as history, after a reload.
  await b.reload();
  await waitState(b, 'connected');
  await waitForMessage(b, typed);
  await waitForMessage(b, posted);
  await fence(env, room, [a, b]);

  for (const page of [a, b]) {
    assert.deepEqual(page.dialogs, [], `no dialog opened on ${page.chatUrl}`);
    assert.deepEqual(page.errors, [], `no page errors on ${page.chatUrl}`);
    assert.equal(await page.locator('#messages img, #messages script, #messages b').count(), 0,
      'no element was made from the message text');
    assert.equal(await countMessage(page, typed), 1);
    assert.equal(await countMessage(page, posted), 1);
  }
});

test('reloading shows the history in order, without repeats', { timeout: 60000 }, async () => {
  const room = uniqueRoom('history');
  const texts = [];
  for (let i = 1; i <= 5; i += 1) {
    const text = unique(`history ${i}`);
    texts.push(text);
    await postMessage(env, room, text);
  }
  const page = await open({ domain: 1, room });
  await waitForMessage(page, texts[4]);
  const sent = unique('history 6, sent from the page');
  await typeAndEnter(page, sent);
  await waitForMessage(page, sent);
  texts.push(sent);

  await page.reload();
  await waitState(page, 'connected');
  await waitForMessage(page, sent);
  texts.push(await fence(env, room, [page]));
  const shown = await shownMessages(page);
  assert.deepEqual(shown.map((m) => m.text), texts, 'history in the order it was sent, then the live fence');
  assertOrderedUnique(shown, page.chatUrl);
  const stored = await history(env, room);
  assert.deepEqual(shown.map((m) => m.id), stored.map((m) => m.id), 'the ids the backend holds');
  // Timestamps in local time, with a machine-readable datetime.
  const datetime = await page.locator('#messages > li time').first().getAttribute('datetime');
  assert.equal(new Date(datetime).getTime(), stored[0].ts);
});

test('a page forced to long-polling sends and receives like a websocket one', { timeout: 60000 }, async () => {
  const room = uniqueRoom('polling');
  const polling = await open({ domain: 1, room, query: '?transport=polling' });
  const ws = await open({ domain: 0, room });

  const fromPolling = unique('from the polling page');
  await typeAndEnter(polling, fromPolling);
  await waitForMessage(ws, fromPolling);
  await waitForMessage(polling, fromPolling);

  const fromWs = unique('from the websocket page');
  await typeAndEnter(ws, fromWs);
  await waitForMessage(polling, fromWs);

  // Delivered by the socket, not by the sender's own answer.
  const fromApi = unique('from the API');
  await postMessage(env, room, fromApi);
  await waitForMessage(polling, fromApi);
  await waitForMessage(ws, fromApi);
  await fence(env, room, [polling, ws]);

  assert.deepEqual(polling.sockets, [], 'the polling page opened no WebSocket');
  assert.ok(ws.sockets.some((url) => url.includes('/front/socket.io/') && url.includes('transport=websocket')),
    `the default page upgraded to a WebSocket (opened: ${JSON.stringify(ws.sockets)})`);
  for (const page of [polling, ws]) {
    for (const text of [fromPolling, fromWs, fromApi]) {
      assert.equal(await countMessage(page, text), 1, `${page.chatUrl} shows ${text} once`);
    }
  }
});

test('an over-long message shows the server\'s error inline and keeps the text', { timeout: 60000 }, async () => {
  const room = uniqueRoom('long');
  const page = await open({ domain: 0, room });
  const text = 'x'.repeat(4000) + 'y';
  const box = page.locator('#composer-text');
  await box.fill(text);
  await box.press('Enter');
  const error = page.locator('#send-error');
  await waitInPage(page, () => {
    const e = document.getElementById('send-error');
    return e && !e.hidden && e.textContent.length > 0;
  }, null, { message: 'the inline send error to appear' });
  assert.match(await error.textContent(), /longer than 4000 characters/);
  assert.equal(await error.getAttribute('role'), 'alert');
  assert.equal(await box.inputValue(), text, 'the unsent text is kept');
  assert.equal((await shownMessages(page)).length, 0, 'nothing was shown');
  assert.deepEqual(await history(env, room), [], 'nothing was stored');

  // Fixed and sent: the error goes away and the box is cleared.
  await box.press('Backspace');
  await box.press('Enter');
  await waitForMessage(page, 'x'.repeat(4000));
  await waitInPage(page, () => document.getElementById('composer-text').value === '', null,
    { message: 'the box to be cleared once the post is acknowledged' });
  assert.equal(await error.isHidden(), true, 'the error is cleared after a successful send');
});

test('a send that cannot reach the server says "server unavailable" and keeps the text', { timeout: 60000 }, async () => {
  const room = uniqueRoom('down');
  const page = await open({ domain: 0, room });
  await page.route('**/back/message', (route) => route.abort('connectionrefused'));
  const text = unique('kept while the network fails');
  await typeAndEnter(page, text);
  await waitInPage(page, () => !document.getElementById('send-error').hidden, null,
    { message: 'the inline send error to appear' });
  assert.match(await page.locator('#send-error').textContent(), /server unavailable/);
  assert.equal(await page.locator('#composer-text').inputValue(), text);
  await page.unroute('**/back/message');
  await page.locator('#send').click();
  await waitForMessage(page, text);
  // The message may arrive over the socket before the post's answer, which
  // is what clears the box.
  await waitInPage(page, () => document.getElementById('composer-text').value === '', null,
    { message: 'the box to be cleared once the post is acknowledged' });
});

test('Shift+Enter makes a new line and does not send', { timeout: 60000 }, async () => {
  const room = uniqueRoom('newline');
  const page = await open({ domain: 1, room });
  const box = page.locator('#composer-text');
  await box.click();
  await box.pressSequentially('line one');
  await box.press('Shift+Enter');
  await box.pressSequentially('line two');
  assert.equal(await box.inputValue(), 'line one\nline two', 'a new line, and the box still takes text');

  await box.press('Enter');
  await waitForMessage(page, 'line one\nline two');
  // The message may come through the socket before the post's answer,
  // which is what clears the box.
  await waitInPage(page, () => document.getElementById('composer-text').value === '', null,
    { message: 'the box to be cleared once the post is acknowledged' });
  // The page sends one message at a time, the next once the last is
  // answered: a message sent by Shift+Enter would be stored and shown
  // before the one sent by Enter, the fence.
  const stored = await history(env, room);
  assert.deepEqual(stored.map((m) => m.message), ['line one\nline two'], 'Shift+Enter stored nothing');
  assert.deepEqual((await shownMessages(page)).map((m) => m.text), ['line one\nline two'], 'Shift+Enter sent nothing');
});

test('the room field checks the name and switches rooms', { timeout: 60000 }, async () => {
  const page = await open({ domain: 0, room: 'rooma' });
  const input = page.locator('#room-input');
  await input.fill('not a room!');
  await input.press('Enter');
  await waitInPage(page, () => !document.getElementById('room-error').hidden, null,
    { message: 'the room-name error to appear' });
  assert.equal(new URL(page.url()).pathname, '/front/rooma', 'an invalid name does not navigate');
  assert.equal(await input.getAttribute('aria-invalid'), 'true');

  await input.fill('roomb');
  await Promise.all([
    page.waitForURL('**/front/roomb', { timeout: WAIT_MS }),
    input.press('Enter'),
  ]);
  await waitState(page, 'connected');
  assert.equal(await page.locator('#room-name').textContent(), 'roomb');
});

test('accessible basics: labels, live region, keyboard order', { timeout: 60000 }, async () => {
  const page = await open({ domain: 0, room: 'rooma' });
  const unlabeled = await page.$$eval('input, textarea, button', (els) => els
    .filter((e) => !e.hidden && e.offsetParent !== null)
    .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
    .map((e) => e.outerHTML));
  assert.deepEqual(unlabeled, [], 'every control has a label');
  assert.equal(await page.locator('#messages').getAttribute('aria-live'), 'polite');
  assert.equal(await page.locator('html').getAttribute('lang'), 'en');

  const order = [];
  for (let i = 0; i < 6; i += 1) {
    await page.keyboard.press('Tab');
    order.push(await page.evaluate(() => {
      const e = document.activeElement;
      return e.id || e.className || e.tagName;
    }));
  }
  assert.deepEqual(order, ['skip-link', 'room-input', 'room-go', 'messages', 'composer-text', 'send']);
  // The focused control is visibly outlined.
  const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  assert.notEqual(outline, 'none');
});

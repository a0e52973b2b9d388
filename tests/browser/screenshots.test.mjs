// Screenshots of the chat page at desktop and phone sizes, written to
// target/screenshots/ for a person to look at; the test also checks that
// nothing overflows sideways at either width.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  startChat, openChat, closeChat, waitForMessage, waitInPage, typeAndEnter, postMessage,
  SCREENSHOT_DIR,
} from './lib/harness.mjs';

const SIZES = [
  { name: 'desktop', viewport: { width: 1280, height: 800 } },
  { name: 'phone', viewport: { width: 375, height: 740 } },
];

let env;
// A fresh topology: this room is empty until the messages below.
let room;
const conversation = [
  'Good morning! Is the deploy still planned for 10:00?',
  'Yes. Redis failover was tested yesterday:\n- frontend 1 stopped\n- clients moved to frontend 2\n- nothing lost',
  'Great! Can someone check the dashboard link? https://example.invalid/dashboards/chat-ha/overview?range=24h&refresh=30s',
  'Looks fine from here.',
];

before(async () => {
  env = await startChat({ name: 'screenshots', frontends: 2, backends: 2 });
  room = 'design-review';
  for (const text of conversation) await postMessage(env, room, text);
  fs.mkdirSync(SCREENSHOT_DIR, { recursive: true });
});

after(async () => {
  if (env) await env.stop();
});

for (const { name, viewport } of SIZES) {
  test(`screenshot: ${name} ${viewport.width}x${viewport.height}`, { timeout: 60000 }, async () => {
    const page = await openChat(env, { domain: 0, room, viewport });
    try {
      await waitForMessage(page, conversation.at(-1));
      const own = `Sent from the ${name} page, with Enter.`;
      await typeAndEnter(page, own);
      await waitForMessage(page, own);
      await page.locator('#composer-text').fill('A draft, not sent yet');
      await page.locator('#composer-text').blur();

      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `the page does not scroll sideways at ${viewport.width}px (${overflow}px too wide)`);
      const file = path.join(SCREENSHOT_DIR, `chat-${name}.png`);
      await page.screenshot({ path: file });
      assert.ok(fs.statSync(file).size > 5000, `${file} was written`);

      // The same page with a failed send, showing the inline error.
      await page.locator('#composer-text').fill('y'.repeat(4001));
      await page.locator('#send').click();
      await waitInPage(page, () => !document.getElementById('send-error').hidden, null,
        { message: 'the inline send error to appear' });
      await page.locator('#composer-text').evaluate((e) => { e.scrollTop = 0; });
      await page.screenshot({ path: path.join(SCREENSHOT_DIR, `chat-${name}-error.png`) });
    } finally {
      await closeChat(page);
    }
  });
}

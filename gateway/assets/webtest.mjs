// Browser test of the web chat page (gateway/assets/index.html) against a running gateway.
//
// Not part of `cargo test`: it needs a browser. Setup (outside the repo):
//   apt-get install -y chromium redis-server
//   mkdir -p /tmp/webtest && (cd /tmp/webtest && npm install playwright-core)
// Run a stack and the test:
//   redis-server --port 16379 --save '' --daemonize yes
//   REDIS_URL=redis://127.0.0.1:16379 LISTEN_ADDR=127.0.0.1:18080 target/debug/chatcluster-gateway &
//   node gateway/assets/webtest.mjs
// or let the test start (and restart, to test reconnection on a 1001 close) the gateway itself:
//   GATEWAY_BIN=target/debug/chatcluster-gateway REDIS_URL=redis://127.0.0.1:16379 node gateway/assets/webtest.mjs
//
// Environment: GATEWAY (default http://127.0.0.1:18080), GATEWAY_BIN, REDIS_URL,
// PLAYWRIGHT_DIR (where playwright-core is installed, default /tmp/webtest),
// CHROMIUM (default /usr/bin/chromium), OUT (screenshot prefix, default /tmp/web-),
// GAP=n: bob misses n messages while offline; run the gateway with HISTORY_SIZE below n
// to test recovery through `history` (with DATABASE_URL and a worker all n must come
// back; without a database the page must show the gap and a notice instead).
// The page is the index.html beside this file: when the gateway's embedded copy
// differs (not rebuilt yet), the file is served from a local port and pointed at
// the gateway with the page's development parameter ?ws=.
// Prints "N passed, N failed" and exits non-zero on any failure.

import { createRequire } from 'node:module';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const GATEWAY = process.env.GATEWAY || 'http://127.0.0.1:18080';
const OUT = process.env.OUT || '/tmp/web-';
const require = createRequire(path.join(process.env.PLAYWRIGHT_DIR || '/tmp/webtest', 'x.js'));
const { chromium } = require('playwright-core');
const WS = GATEWAY.replace(/^http/, 'ws') + '/ws';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let passed = 0, failed = 0;
async function check(name, fn) {
  try { await fn(); passed++; console.log(`ok   - ${name}`); } catch (e) { failed++; console.log(`FAIL - ${name}: ${e.message.split('\n')[0]}`); }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }

// ---- the gateway ------------------------------------------------------------
let gw = null;
function startGateway() {
  const listen = new URL(GATEWAY).host;
  gw = spawn(process.env.GATEWAY_BIN, [], {
    env: { ...process.env, LISTEN_ADDR: listen, REDIS_URL: process.env.REDIS_URL || 'redis://127.0.0.1:16379' },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
}
async function waitHealthy() {
  for (let i = 0; i < 100; i++) {
    try { if ((await fetch(GATEWAY + '/health')).ok) return; } catch { /* not yet */ }
    await sleep(100);
  }
  throw new Error(`gateway not healthy at ${GATEWAY}`);
}
async function stopGateway() {
  if (!gw) return;
  const done = new Promise((r) => gw.once('exit', r));
  gw.kill('SIGTERM');
  await Promise.race([done, sleep(15000)]);
  gw = null;
}

// ---- the page ---------------------------------------------------------------
const pageFile = path.join(here, 'index.html');
const html = readFileSync(pageFile, 'utf8');
let server = null, pageUrl = GATEWAY + '/';
async function choosePage() {
  const embedded = await (await fetch(GATEWAY + '/')).text();
  if (embedded === html) { console.log('# testing the page embedded in the gateway'); return; }
  server = http.createServer((req, res) => { res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }); res.end(html); });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  pageUrl = `http://127.0.0.1:${server.address().port}/?ws=${encodeURIComponent(WS)}`;
  console.log(`# the gateway embeds an older page; serving ${pageFile} at ${pageUrl}`);
}

// ---- helpers on a page --------------------------------------------------------
const state = (page, fn, arg) => page.evaluate(fn, arg);
async function login(page, name) {
  await page.goto(pageUrl);
  await page.fill('#login-name', name);
  await page.press('#login-name', 'Enter');
  await page.waitForSelector('#conn[data-state=online]', { timeout: 10000 });
}
async function join(page, channel) {
  await page.fill('#join-name', channel);
  await page.press('#join-name', 'Enter');
  await page.waitForFunction((c) => document.getElementById('view-title').textContent === '#' + c, channel, { timeout: 5000 });
}
async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}
const waitText = (page, text, timeout = 5000) => page.waitForFunction(
  (t) => [...document.querySelectorAll('#msg-list .msg .text')].some((e) => e.textContent === t), text, { timeout });
const countText = (page, text) => page.evaluate(
  (t) => [...document.querySelectorAll('#msg-list .msg .text')].filter((e) => e.textContent === t).length, text);
const offsets = (page, channel) => state(page, (c) => window.__chatcluster.channels.get(c).msgs.map((m) => m.offset), channel);

// ---- the test -----------------------------------------------------------------
async function main() {
  if (process.env.GATEWAY_BIN) startGateway();
  await waitHealthy();
  await choosePage();
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
      '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
  const problems = [];
  const open = async (who) => {
    const ctx = await browser.newContext({ viewport: { width: 1200, height: 760 } });
    const page = await ctx.newPage();
    page.on('pageerror', (e) => problems.push(`${who}: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`${who} console: ${m.text()}`); });
    return page;
  };
  const alice = await open('alice'), bob = await open('bob');
  const stamp = Date.now().toString(36);
  const geral = 'geral';
  try {
    await check('login screen validates the name', async () => {
      await alice.goto(pageUrl);
      await alice.screenshot({ path: OUT + 'login.png' });
      await alice.fill('#login-name', 'not a name!');
      await alice.press('#login-name', 'Enter');
      assert((await alice.textContent('#login-error')).trim() !== '', 'no error shown');
      assert(await alice.isVisible('#login-form'), 'left the login screen');
    });
    await check('alice and bob log in and go online', async () => { await login(alice, 'alice'); await login(bob, 'bob'); });
    await check('both join #geral', async () => { await join(alice, geral); await join(bob, geral); });
    await check('presence lists both users', async () => {
      for (const [page, other] of [[alice, 'bob'], [bob, 'alice']]) {
        await page.waitForSelector(`#presence-list [data-nav="user:${other}"]`, { timeout: 5000 });
      }
      assert((await alice.textContent('#presence-list')).includes('alice (you)'), 'self not listed');
    });
    const hello = `Olá bob! <b>not bold</b> & "quotes" 🎉 ${stamp}`;
    await check('alice sends, bob sees it once, as text', async () => {
      await say(alice, hello);
      await waitText(bob, hello);
      await waitText(alice, hello);
      assert(await countText(bob, hello) === 1, 'duplicated on bob');
      assert(await countText(alice, hello) === 1, 'duplicated on alice');
      assert(await bob.$$eval('#msg-list b', (els) => els.length) === 0, 'HTML was interpreted');
      const author = await bob.evaluate(() => [...document.querySelectorAll('#msg-list .msg .author')].pop().textContent);
      assert(author === 'alice', `author ${author}`);
      assert(await bob.evaluate(() => !!document.querySelector('#msg-list .msg time').textContent), 'no time shown');
    });
    await check('composer: Enter sent and cleared, too-long text refused', async () => {
      assert(await alice.inputValue('#text') === '', 'composer not cleared');
      await alice.fill('#text', 'é'.repeat(2049));        // 4098 bytes
      assert(await alice.isDisabled('#send-btn'), 'send enabled for 4098 bytes');
      assert((await alice.textContent('#text-count')).includes('4098'), 'no byte count');
      await alice.fill('#text', '');
    });
    await check('invalid channel name is refused in the UI', async () => {
      await alice.fill('#join-name', 'bad name!');
      await alice.press('#join-name', 'Enter');
      assert((await alice.textContent('#join-error')).trim() !== '', 'no error');
      await alice.fill('#join-name', '');
    });
    await check('history without a database is reported, not fatal', async () => {
      const note = await alice.evaluate(() => { const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent; });
      console.log(`#   notice on #geral: ${JSON.stringify(note)}`);
    });
    await alice.screenshot({ path: OUT + 'alice.png' });
    const dm = `Oi alice, DM aqui ${stamp}`;
    await check('bob DMs alice from the presence list; alice gets an unread badge', async () => {
      await bob.click('#presence-list [data-nav="user:alice"]');
      await bob.waitForFunction(() => document.getElementById('view-title').textContent.startsWith('@alice'));
      await say(bob, dm);
      await waitText(bob, dm);
      await alice.waitForSelector('#dm-list [data-nav="dm:bob"] .badge', { timeout: 5000 });
      assert((await alice.textContent('#dm-list [data-nav="dm:bob"] .badge')) === '1', 'badge is not 1');
      await alice.screenshot({ path: OUT + 'alice-unread.png' });
      await alice.click('#dm-list [data-nav="dm:bob"]');
      await waitText(alice, dm);
      assert(await countText(bob, dm) === 1, 'DM duplicated on the sender (reply + echo)');
    });
    await check('alice answers the DM', async () => {
      await say(alice, `resposta ${stamp}`);
      await waitText(bob, `resposta ${stamp}`);
      await alice.screenshot({ path: OUT + 'alice-dm.png' });
    });
    await check('channel unread count while looking elsewhere', async () => {
      await bob.click('#channel-list [data-nav="channel:geral"]');
      await say(bob, `unread test ${stamp}`);
      await alice.waitForFunction(() => {
        const b = document.querySelector('#channel-list [data-nav="channel:geral"] .badge');
        return b && b.textContent === '1';
      }, null, { timeout: 5000 });
      await alice.click('#channel-list [data-nav="channel:geral"]');
      await waitText(alice, `unread test ${stamp}`);
      assert(!(await alice.$('#channel-list [data-nav="channel:geral"] .badge')), 'badge not cleared');
    });
    await check('auto-scroll follows new messages; scrolled up it does not', async () => {
      for (let i = 0; i < 25; i++) await say(alice, `fill ${i} ${stamp}`);
      await waitText(bob, `fill 24 ${stamp}`);
      await sleep(200);
      const atBottom = (p) => p.evaluate(() => { const b = document.getElementById('messages'); return b.scrollHeight - b.scrollTop - b.clientHeight < 40; });
      assert(await atBottom(bob), 'bob not at the bottom');
      await bob.evaluate(() => { const b = document.getElementById('messages'); b.scrollTop = 0; b.dispatchEvent(new Event('scroll')); });
      await say(alice, `while scrolled up ${stamp}`);
      await waitText(bob, `while scrolled up ${stamp}`);
      await sleep(100);
      assert(!(await atBottom(bob)), 'bob was scrolled down');
      assert(await bob.isVisible('#jump-btn'), 'no "new messages" button');
      await bob.screenshot({ path: OUT + 'bob-scrolled.png' });
      await bob.click('#jump-btn');
      await sleep(100);
      assert(await atBottom(bob), 'jump button did not scroll');
    });
    await check('bob drops and reconnects: missed messages recovered, no duplicates', async () => {
      await bob.evaluate(() => { const S = window.__chatcluster; S.wanted = false; S.ws.close(); });
      await bob.waitForSelector('#conn[data-state=offline]');
      for (let i = 1; i <= 3; i++) await say(alice, `missed ${i} ${stamp}`);
      await waitText(alice, `missed 3 ${stamp}`);
      await bob.evaluate(() => { window.__chatcluster.wanted = true; window.dispatchEvent(new Event('online')); });
      await bob.waitForSelector('#conn[data-state=online]', { timeout: 10000 });
      for (let i = 1; i <= 3; i++) { await waitText(bob, `missed ${i} ${stamp}`); assert(await countText(bob, `missed ${i} ${stamp}`) === 1, 'duplicate'); }
      const offs = await offsets(bob, geral);
      for (let i = 1; i < offs.length; i++) assert(offs[i] === offs[i - 1] + 1, `offsets not contiguous: ${offs.slice(Math.max(0, i - 2), i + 2)}`);
    });
    if (process.env.GAP) {   // more messages than the gateway keeps (HISTORY_SIZE): recovery must page `history`
      await check(`bob misses ${process.env.GAP} messages: recovered from history (or the gap is shown)`, async () => {
        await bob.evaluate(() => { const S = window.__chatcluster; S.wanted = false; S.ws.close(); });
        await bob.waitForSelector('#conn[data-state=offline]');
        const n = Number(process.env.GAP);
        for (let i = 1; i <= n; i++) await say(alice, `gap ${i} ${stamp}`);
        await waitText(alice, `gap ${n} ${stamp}`);
        await bob.evaluate(() => { window.__chatcluster.wanted = true; window.dispatchEvent(new Event('online')); });
        await bob.waitForSelector('#conn[data-state=online]', { timeout: 10000 });
        await sleep(1500);
        await bob.screenshot({ path: OUT + 'bob-gap.png' });
        const have = await bob.evaluate((s) => [...document.querySelectorAll('#msg-list .msg .text')].filter((e) => e.textContent.startsWith('gap ') && e.textContent.endsWith(s)).length, stamp);
        const note = await bob.evaluate(() => { const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent; });
        const gapShown = await bob.evaluate(() => document.querySelectorAll('#msg-list .gap').length);
        console.log(`#   bob has ${have}/${n} gap messages; gap markers ${gapShown}; notice ${JSON.stringify(note)}`);
        assert(have === n || (gapShown > 0 && note), 'messages lost silently');
      });
    }
    if (process.env.GATEWAY_BIN) {
      await check('gateway restart (1001): both pages reconnect and recover', async () => {
        const closes = bob.evaluate(() => new Promise((r) => {
          const ws = window.__chatcluster.ws; ws.addEventListener('close', (e) => r(e.code));
        }));
        await stopGateway();
        const code = await closes;
        console.log(`#   close code seen by the page: ${code}`);
        await bob.waitForSelector('#conn[data-state=reconnecting]', { timeout: 5000 });
        await bob.screenshot({ path: OUT + 'bob-reconnecting.png' });
        startGateway();
        await waitHealthy();
        await alice.waitForSelector('#conn[data-state=online]', { timeout: 40000 });
        await bob.waitForSelector('#conn[data-state=online]', { timeout: 40000 });
        await say(alice, `after restart ${stamp}`);
        await waitText(bob, `after restart ${stamp}`);
        assert(await countText(bob, `after restart ${stamp}`) === 1, 'duplicate');
        assert(code === 1001, `close code ${code}, expected 1001`);
      });
    }
    await check('offsets identical on both pages', async () => {
      await say(alice, `final ${stamp}`);
      await waitText(bob, `final ${stamp}`);
      const a = await offsets(alice, geral), b = await offsets(bob, geral);
      assert(a.length && b.length && a[a.length - 1] === b[b.length - 1], `last offsets: alice ${a.slice(-3)} / bob ${b.slice(-3)}`);
      const inA = new Set(a);
      assert(b.every((o) => inA.has(o)), 'bob has offsets alice has not');
      const ids = (p) => p.evaluate((c) => Object.fromEntries(window.__chatcluster.channels.get(c).msgs.map((m) => [m.offset, m.msg_id])), geral);
      const ia = await ids(alice), ib = await ids(bob);
      assert(Object.keys(ib).every((o) => ia[o] === ib[o]), 'same offset, different msg_id');
    });
    await bob.screenshot({ path: OUT + 'bob.png' });
    await check('narrow screen: drawers for channels and people', async () => {
      await alice.setViewportSize({ width: 390, height: 760 });
      await sleep(100);
      await alice.screenshot({ path: OUT + 'mobile.png' });
      assert(await alice.isHidden('#sidebar'), 'sidebar visible on a phone');
      await alice.click('#menu-btn');
      assert(await alice.isVisible('#sidebar'), 'menu did not open the sidebar');
      await alice.screenshot({ path: OUT + 'mobile-menu.png' });
      await alice.keyboard.press('Escape');
      await alice.click('#people-btn');
      assert(await alice.isVisible('#presence-list'), 'people drawer did not open');
      await alice.screenshot({ path: OUT + 'mobile-people.png' });
    });
    await check('no page errors', async () => assert(problems.length === 0, problems.join(' | ')));
  } finally {
    await browser.close();
    if (server) server.close();
    await stopGateway();
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch(async (e) => { console.error(e); await stopGateway(); process.exit(2); });

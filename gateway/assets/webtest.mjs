// Browser test of the web chat page (gateway/assets/index.html) in headless Chromium,
// against a whole local stack started with `chatctl up` (HAProxy → 2 gateways on Unix
// sockets, Redis, PostgreSQL, a worker).
//
// Not part of `cargo test`: it needs a browser. scripts/test runs it; by hand:
//   apt-get install -y chromium nodejs npm
//   mkdir -p ~/.cache/webtest && (cd ~/.cache/webtest && npm install playwright-core)
//   cargo build -p chatctl -p chatcluster-gateway -p chatcluster-worker
//   PLAYWRIGHT_DIR=~/.cache/webtest node gateway/assets/webtest.mjs
//
// Environment: CHATCTL (default target/debug/chatctl), PLAYWRIGHT_DIR (where playwright-core
// is installed, default /tmp/webtest), CHROMIUM (default /usr/bin/chromium), OUT (directory
// of the screenshots, one per step, default target/test-artifacts/web).
//
// Two users on different gateways chat; one gateway is killed (SIGKILL) mid-chat and the
// stack restarts it: both pages must be back within 3 s of the restart, with the messages
// sent meanwhile shown exactly once. A graceful restart (SIGTERM, close 1001) follows.
// Also: Unicode names (and an over-long one refused, never cut), conversations after a
// reload, a DM to an offline user delivered once at login, and publishes retried with their
// idempotency key (a socket closed right after sending; the same key sent twice) stored once.
// The page is the index.html beside this file: when the gateway's embedded copy differs
// (not rebuilt yet), the file is served from a local port and pointed at the stack with the
// page's development parameter ?ws=.
// Prints "N passed, N failed" and exits non-zero on any failure.

import { createRequire } from 'node:module';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..', '..');
const CHATCTL = process.env.CHATCTL || path.join(repo, 'target', 'debug', 'chatctl');
const OUT = process.env.OUT || path.join(repo, 'target', 'test-artifacts', 'web');
const require = createRequire(path.join(process.env.PLAYWRIGHT_DIR || '/tmp/webtest', 'x.js'));
const { chromium } = require('playwright-core');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
mkdirSync(OUT, { recursive: true });
for (const old of readdirSync(OUT).filter((f) => f.endsWith('.png'))) rmSync(path.join(OUT, old));

let passed = 0, failed = 0;
async function check(name, fn) {
  try { await fn(); passed++; console.log(`ok   - ${name}`); } catch (e) { failed++; console.log(`FAIL - ${name}: ${e.message.split('\n')[0]}`); }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }

// ---- the stack (chatctl up) -------------------------------------------------
const stateDir = mkdtempSync(path.join(os.tmpdir(), 'chatcluster-webtest-'));
let up = null;
function stack() { return JSON.parse(readFileSync(path.join(stateDir, 'stack.json'), 'utf8')); }
function child(name) { return stack().children.find((c) => c.name === name); }
const freePort = () => new Promise((resolve) => {
  const s = net.createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});
async function startStack() {
  const [port, stats] = [await freePort(), await freePort()];
  up = spawn(CHATCTL, ['up', '--state-dir', stateDir, '--gateways', '2', '--drain-timeout', '1s',
    '--port', String(port), '--stats-port', String(stats)], { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((r) => up.once('exit', (code) => r(code)));
  for (let i = 0; i < 600; i++) {
    const code = await Promise.race([exited, sleep(200).then(() => null)]);
    if (code !== null) throw new Error(`chatctl up exited with ${code}`);
    try { if (stack().phase === 'running') return; } catch { /* not written yet */ }
  }
  throw new Error('the stack did not come up in 120 s');
}
async function stopStack() {
  if (!up) return null;
  const done = new Promise((r) => up.once('exit', (code) => r(code)));
  let report = '';
  try { report = execFileSync(CHATCTL, ['down', '--state-dir', stateDir], { encoding: 'utf8' }); } catch (e) { report = String(e.stdout || e.message); }
  const code = await Promise.race([done, sleep(60000).then(() => 'timeout')]);
  up = null;
  return { code, report };
}
// Gateway whose metrics count `n` open WebSocket connections.
async function connections(name) {
  const text = await (await fetch(`http://127.0.0.1:${child(name).port}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith('chatcluster_gateway_connections '));
  return line ? Number(line.split(' ')[1]) : NaN;
}
async function waitReady(name, restarts, timeout) {
  const until = Date.now() + timeout;
  while (Date.now() < until) {
    const c = child(name);
    if (c.restarts >= restarts && c.pid) {
      try { if ((await fetch(`http://127.0.0.1:${c.port}/ready`)).ok) return Date.now(); } catch { /* starting */ }
    }
    await sleep(25);
  }
  throw new Error(`${name} not restarted and ready within ${timeout} ms`);
}

// ---- the page ---------------------------------------------------------------
const pageFile = path.join(here, 'index.html');
const html = readFileSync(pageFile, 'utf8');
let server = null, pageUrl = '';
async function choosePage(base) {
  pageUrl = base;
  const embedded = await (await fetch(base)).text();
  if (embedded === html) { console.log('# testing the page embedded in the gateway'); return; }
  server = http.createServer((req, res) => { res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }); res.end(html); });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const ws = base.replace(/^http/, 'ws') + 'ws';
  pageUrl = `http://127.0.0.1:${server.address().port}/?ws=${encodeURIComponent(ws)}`;
  console.log(`# the gateway embeds an older page; serving ${pageFile} at ${pageUrl}`);
}

// ---- helpers on a page --------------------------------------------------------
let shot = 0;
const snap = (page, name) => page.screenshot({ path: path.join(OUT, `${String(++shot).padStart(2, '0')}-${name}.png`) });
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
const offsets = (page, channel) => page.evaluate((c) => window.__chatcluster.channels.get(c).msgs.map((m) => m.offset), channel);
const contiguous = (offs) => offs.every((o, i) => i === 0 || o === offs[i - 1] + 1);
// How often `text` is in #channel's history, read over the HTTP API.
async function storedCount(channel, text) {
  const r = await fetch(`${stack().page_url}api/channels/${encodeURIComponent(channel)}/messages?limit=100`);
  assert(r.ok, `GET messages: ${r.status}`);
  return (await r.json()).messages.filter((m) => m.text === text).length;
}

// ---- the test -----------------------------------------------------------------
async function main() {
  await startStack();
  await choosePage(stack().page_url);
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
    page.on('console', (m) => { if (m.type() === 'error' && !/WebSocket connection to .* failed/.test(m.text())) problems.push(`${who} console: ${m.text()}`); });
    return page;
  };
  const alice = await open('alice'), bob = await open('bob');
  const stamp = Date.now().toString(36);
  const geral = 'geral';
  let aliceGateway = null;
  try {
    await check('login screen validates the name', async () => {
      await alice.goto(pageUrl);
      await snap(alice, 'login');
      await alice.fill('#login-name', 'not a name!');
      await alice.press('#login-name', 'Enter');
      assert((await alice.textContent('#login-error')).trim() !== '', 'no error shown');
      assert(await alice.isVisible('#login-form'), 'left the login screen');
    });
    await check('alice and bob log in, each on another gateway', async () => {
      const count = async () => [await connections('gateway-0'), await connections('gateway-1')];
      const before = await count();
      await login(alice, 'alice');
      const first = await count();
      await login(bob, 'bob');
      const both = await count();
      const added = (a, b) => [a[0] - b[0], a[1] - b[1]].join(',');
      assert(['1,0', '0,1'].includes(added(first, before)), `alice added ${added(first, before)} connections`);
      assert(added(both, first) === (added(first, before) === '1,0' ? '0,1' : '1,0'), `bob added ${added(both, first)}: same gateway as alice`);
      aliceGateway = first[0] > before[0] ? 'gateway-0' : 'gateway-1';
      console.log(`#   alice is on ${aliceGateway}`);
    });
    await check('both join #geral', async () => { await join(alice, geral); await join(bob, geral); });
    await check('presence lists both users', async () => {
      for (const [page, other] of [[alice, 'bob'], [bob, 'alice']]) {
        await page.waitForSelector(`#presence-list [data-nav="user:${other}"]`, { timeout: 5000 });
      }
      assert((await alice.textContent('#presence-list')).includes('alice (you)'), 'self not listed');
      assert(await alice.isHidden('#stale-note'), 'presence marked stale while online');
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
      await snap(bob, 'chatting');
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
    await check('a Unicode channel name works; an over-long one is refused with its size, not cut', async () => {
      const cafe = 'café-会議室';
      await join(alice, cafe);
      await say(alice, `Unicode ${stamp}`);
      await waitText(alice, `Unicode ${stamp}`);
      const long = 'á'.repeat(33);                       // 33 characters, 66 bytes of UTF-8
      await alice.fill('#join-name', long);
      await alice.press('#join-name', 'Enter');
      const error = (await alice.textContent('#join-error')).trim();
      assert(error.includes('66 bytes'), `error: "${error}"`);
      assert(await alice.inputValue('#join-name') === long, 'the name was cut');
      assert(!(await alice.$(`#channel-list [data-nav="channel:${'á'.repeat(32)}"]`)), 'joined a shortened name');
      await alice.fill('#join-name', '');
      await alice.click('#channel-list [data-nav="channel:geral"]');
    });
    await check('the channel list updates live', async () => {
      const other = `live-${stamp}`;
      await join(bob, other);
      await alice.waitForSelector(`#other-list [data-nav="join:${other}"]`, { timeout: 12000 });
      await bob.click('#channel-list [data-nav="channel:geral"]');
    });
    const dm = `Oi alice, DM aqui ${stamp}`;
    await check('bob DMs alice from the presence list; alice gets an unread badge', async () => {
      await bob.click('#presence-list [data-nav="user:alice"]');
      await bob.waitForFunction(() => document.getElementById('view-title').textContent.startsWith('@alice'));
      await say(bob, dm);
      await waitText(bob, dm);
      await alice.waitForSelector('#dm-list [data-nav="dm:bob"] .badge', { timeout: 5000 });
      assert((await alice.textContent('#dm-list [data-nav="dm:bob"] .badge')) === '1', 'badge is not 1');
      await snap(alice, 'unread');
      await alice.click('#dm-list [data-nav="dm:bob"]');
      await waitText(alice, dm);
      assert(await countText(bob, dm) === 1, 'DM duplicated on the sender (reply + echo)');
      await say(alice, `resposta ${stamp}`);
      await waitText(bob, `resposta ${stamp}`);
    });
    await check('conversations are shown after a reload, each message once', async () => {
      await bob.reload();
      await bob.waitForSelector('#conn[data-state=online]', { timeout: 10000 });
      await bob.waitForSelector('#dm-list [data-nav="dm:alice"]', { timeout: 5000 });
      await bob.click('#dm-list [data-nav="dm:alice"]');
      await waitText(bob, dm);
      await waitText(bob, `resposta ${stamp}`);
      assert(await countText(bob, dm) === 1 && await countText(bob, `resposta ${stamp}`) === 1, 'not shown exactly once');
      await snap(bob, 'conversations-after-reload');
    });
    await check('a DM to an offline user appears once when they log in', async () => {
      const jose = await open('josé');
      await login(jose, 'josé');                        // known to the server, then offline
      await jose.click('#logout-btn');
      await jose.context().close();
      await alice.fill('#dm-name', 'josé');
      await alice.press('#dm-name', 'Enter');
      await alice.waitForFunction(() => document.getElementById('view-title').textContent.startsWith('@josé'));
      const text = `while you were away ${stamp}`;
      await say(alice, text);
      await waitText(alice, text);
      const later = await open('josé, later');           // another device: no inbox position yet
      await login(later, 'josé');
      await later.waitForSelector('#dm-list [data-nav="dm:alice"] .badge', { timeout: 5000 });
      await later.click('#dm-list [data-nav="dm:alice"]');
      await waitText(later, text);
      await sleep(300);
      assert(await countText(later, text) === 1, 'not shown exactly once');
      // a reconnect recovers from the inbox position: nothing again
      await later.evaluate(() => window.__chatcluster.ws.close());
      await later.waitForSelector('#conn[data-state=online]', { timeout: 5000 });
      await alice.fill('#dm-name', 'josé');
      await alice.press('#dm-name', 'Enter');
      await say(alice, `after the reconnect ${stamp}`);
      await waitText(later, `after the reconnect ${stamp}`);
      assert(await countText(later, text) === 1 && await countText(later, `after the reconnect ${stamp}`) === 1, 'doubled after a reconnect');
      await snap(later, 'dm-offline-delivered');
      await later.context().close();
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
      await bob.click('#jump-btn');
      await sleep(100);
      assert(await atBottom(bob), 'jump button did not scroll');
    });
    await check('bob drops and comes back online: missed messages once, a live countdown meanwhile', async () => {
      await bob.evaluate(() => { const S = window.__chatcluster; S.wanted = false; S.ws.close(); });
      await bob.waitForSelector('#conn[data-state=offline]');
      assert(await bob.isVisible('#stale-note'), 'presence not marked stale while offline');
      for (let i = 1; i <= 3; i++) await say(alice, `missed ${i} ${stamp}`);
      await waitText(alice, `missed 3 ${stamp}`);
      await bob.evaluate(() => { window.__chatcluster.wanted = true; window.dispatchEvent(new Event('online')); });
      await bob.waitForSelector('#conn[data-state=online]', { timeout: 5000 });
      for (let i = 1; i <= 3; i++) { await waitText(bob, `missed ${i} ${stamp}`); assert(await countText(bob, `missed ${i} ${stamp}`) === 1, 'duplicate'); }
      assert(contiguous(await offsets(bob, geral)), 'offsets not contiguous');
    });

    // ---- a gateway dies mid-chat ---------------------------------------------------
    await check(`SIGKILL of alice's gateway: both pages back within 3 s of its restart, missed messages once`, async () => {
      const gw = child(aliceGateway);
      const restarts = gw.restarts;
      await alice.waitForSelector('#conn[data-state=online]', { timeout: 5000 });
      // the listener is in place before the kill (an evaluate still in flight may run after it)
      await alice.evaluate(() => { const ws = window.__chatcluster.ws; window.__closed = new Promise((r) => ws.addEventListener('close', (e) => r(e.code))); });
      process.kill(gw.pid, 'SIGKILL');
      const code = await alice.evaluate(() => window.__closed);
      await snap(alice, 'gateway-killed-alice');
      await snap(bob, 'gateway-killed-bob');
      for (let i = 1; i <= 3; i++) await say(bob, `while down ${i} ${stamp}`);
      const restarted = await waitReady(aliceGateway, restarts + 1, 15000);
      await snap(alice, 'gateway-restarted-alice');
      await Promise.all([alice, bob].map((p) => p.waitForSelector('#conn[data-state=online]', { timeout: 3000 })));
      const back = Date.now() - restarted;
      console.log(`#   close code ${code}; ${aliceGateway} restarted; both pages online ${back} ms after (0 = already back)`);
      for (let i = 1; i <= 3; i++) {
        await waitText(alice, `while down ${i} ${stamp}`, 3000);
        assert(await countText(alice, `while down ${i} ${stamp}`) === 1, `"while down ${i}" not shown exactly once`);
      }
      await say(alice, `after the kill ${stamp}`);
      await waitText(bob, `after the kill ${stamp}`);
      assert(await countText(bob, `after the kill ${stamp}`) === 1, 'duplicate on bob');
      assert(contiguous(await offsets(alice, geral)), 'alice offsets not contiguous');
      await snap(alice, 'back-alice');
      await snap(bob, 'back-bob');
    });
    await check('graceful restart (SIGTERM, close 1001) of the other gateway: both recover', async () => {
      const name = aliceGateway === 'gateway-0' ? 'gateway-1' : 'gateway-0';
      const gw = child(name);
      await bob.waitForSelector('#conn[data-state=online]', { timeout: 5000 });
      // as above: the listener is in place before the signal
      await bob.evaluate(() => { const ws = window.__chatcluster.ws; window.__closed = new Promise((r) => ws.addEventListener('close', (e) => r(e.code))); });
      process.kill(gw.pid, 'SIGTERM');
      const closes = bob.evaluate(() => window.__closed);
      const code = await Promise.race([closes, sleep(10000).then(() => 'none')]);
      await snap(bob, 'graceful-restart-bob');
      await waitReady(name, gw.restarts + 1, 15000);
      await Promise.all([alice, bob].map((p) => p.waitForSelector('#conn[data-state=online]', { timeout: 3000 })));
      await say(bob, `after graceful ${stamp}`);
      await waitText(alice, `after graceful ${stamp}`);
      assert(await countText(alice, `after graceful ${stamp}`) === 1, 'duplicate');
      assert(code === 1001 || code === 'none', `close code ${code}, expected 1001`);
    });
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
    await check('a publish whose socket closes right after sending is retried with its key and stored once', async () => {
      const text = `retried ${stamp}`;
      await alice.click('#channel-list [data-nav="channel:geral"]');
      await alice.evaluate(() => {
        window.__sent = []; window.__states = new Set();
        new MutationObserver(() => {
          for (const li of document.querySelectorAll('#msg-list .pending')) window.__states.add(li.dataset.state);
        }).observe(document.getElementById('msg-list'), { childList: true, subtree: true });
        const send = WebSocket.prototype.send;
        window.__restoreSend = () => { WebSocket.prototype.send = send; };
        let armed = true;
        WebSocket.prototype.send = function (data) {
          send.call(this, data);
          const f = JSON.parse(data);
          if (f.op !== 'publish') return;
          window.__sent.push(f);
          if (armed) { armed = false; this.close(); }   // lost before the reply
        };
      });
      await say(alice, text);
      await waitText(bob, text, 10000);
      await alice.waitForFunction(() => window.__chatcluster.outbox.size === 0, null, { timeout: 10000 });
      const sent = await alice.evaluate((t) => { window.__restoreSend(); return window.__sent.filter((f) => f.text === t); }, text);
      assert(sent.length >= 2, `sent ${sent.length} time(s): not retried`);
      assert(sent.every((f) => f.idempotency_key && f.idempotency_key === sent[0].idempotency_key), 'retried with another key');
      assert(await alice.evaluate(() => window.__states.has('sending')), 'no "sending…" state shown');
      await sleep(300);
      assert(await countText(bob, text) === 1 && await countText(alice, text) === 1, 'shown more than once');
      assert(await storedCount(geral, text) === 1, 'stored more than once');
    });
    await check('the same idempotency key sent twice answers the first result and stores once', async () => {
      const text = `same key ${stamp}`;
      const [a, b] = await alice.evaluate(async ({ t, c }) => {
        const req = window.__chatcluster.debug.req;
        const write = { channel: c, text: t, idempotency_key: `webtest-${t.replace(/\W/g, '-')}` };
        return [await req('publish', write), await req('publish', write)];
      }, { t: text, c: geral });
      assert(a.offset === b.offset && a.msg_id === b.msg_id, `two results: ${JSON.stringify([a, b])}`);
      await waitText(bob, text);
      assert(await storedCount(geral, text) === 1, 'stored twice');
    });

    await check('history comes from PostgreSQL after a reload', async () => {
      await sleep(1000);                       // the worker's batch reaches PostgreSQL
      await bob.reload();
      await bob.waitForSelector('#conn[data-state=online]', { timeout: 10000 });
      await waitText(bob, `final ${stamp}`, 10000);
    });
    await check('narrow screen: drawers for channels and people, and who you are', async () => {
      await alice.setViewportSize({ width: 390, height: 760 });
      await sleep(100);
      await snap(alice, 'mobile');
      assert(await alice.isHidden('#sidebar'), 'sidebar visible on a phone');
      assert(await alice.isVisible('#me') && (await alice.textContent('#me')) === 'alice', 'the user is not shown on a phone');
      await alice.click('#menu-btn');
      assert(await alice.isVisible('#sidebar'), 'menu did not open the sidebar');
      await snap(alice, 'mobile-menu');
      await alice.keyboard.press('Escape');
      await alice.click('#people-btn');
      assert(await alice.isVisible('#presence-list'), 'people drawer did not open');
      await snap(alice, 'mobile-people');
    });
    await check('no page errors', async () => assert(problems.length === 0, problems.join(' | ')));
  } finally {
    await browser.close();
    if (server) server.close();
  }
  await check('the stack stops cleanly (PostgreSQL logs a normal shutdown)', async () => {
    const { code, report } = await stopStack();
    console.log(report.trim().split('\n').map((l) => `#   ${l}`).join('\n'));
    assert(code === 0, `chatctl up exited with ${code}`);
    assert(report.includes('database system is shut down'), 'no clean PostgreSQL shutdown in the report');
  });
  rmSync(stateDir, { recursive: true, force: true });
  console.log(`screenshots in ${OUT}`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch(async (e) => { console.error(e); await stopStack(); process.exit(2); });

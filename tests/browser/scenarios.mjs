// The browser scenarios of the agent's web UI, written once and run in every browser of
// drivers.mjs (chromium.test.mjs, firefox.test.mjs): a real CA, hub and agents (the `ztm`
// binary) driven the way a new user would. The Chromium run saves a screenshot of each view
// to docs/screenshots/.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { promisify } from "node:util";
import { mkdtempSync, writeFileSync, mkdirSync, existsSync, rmSync, readFileSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import http from "node:http";
import net from "node:net";

const run = promisify(execFile);
const { formatBytes } = await import(`data:text/javascript,${encodeURIComponent(
  readFileSync(new URL("../../crates/agent/ui/lib.js", import.meta.url), "utf8"))}`);
const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const shots = join(root, "docs/screenshots");
const bin = process.env.ZTM_BIN
  || [join(root, "target/release/ztm"), join(root, "target/debug/ztm")].find(existsSync);

// ---- processes --------------------------------------------------------------------

function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => res(port)); });
  });
}

async function until(what, fn, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try { if (await fn()) return; } catch (e) { last = e; }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
}

async function call(addr, method, path, body) {
  const resp = await fetch(`http://${addr}${path}`, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  if (!resp.ok) throw new Error(`${method} ${path}: ${resp.status} ${text}`);
  return text;
}

const meshes = async (addr) => JSON.parse(await call(addr, "GET", "/api/meshes"));

// A part of a list as the agent answers it: its items, and how many match in all.
async function listPage(addr, path) {
  const resp = await fetch(`http://${addr}${path}`);
  if (!resp.ok) throw new Error(`GET ${path}: ${resp.status} ${await resp.text()}`);
  return { items: await resp.json(), total: Number(resp.headers.get("ztm-total")) };
}

// A GET on a connection of its own, closed after the answer.
function get(port, path = "/") {
  return new Promise((res, rej) => {
    const req = http.get({ host: "127.0.0.1", port, path, timeout: 5000, agent: false }, (r) => {
      let body = "";
      r.on("data", (d) => { body += d; });
      r.on("end", () => res({ status: r.statusCode, body }));
    });
    req.on("error", rej);
    req.on("timeout", () => req.destroy(new Error("timeout")));
  });
}

// A TCP connection to a local port, held open until the test ends it: its socket once it is
// connected, and `exchange(bytes, until)`, which sends the bytes and resolves with everything
// received once it includes `until`.
function hold(port) {
  return new Promise((res, rej) => {
    const socket = net.connect(port, "127.0.0.1", () => {
      socket.off("error", rej);
      let got = Buffer.alloc(0);
      let waiting = null;
      socket.on("data", (d) => {
        got = Buffer.concat([got, d]);
        if (waiting && got.includes(waiting.until)) waiting.done(got);
      });
      socket.exchange = (bytes, until) => new Promise((done) => {
        got = Buffer.alloc(0);
        waiting = { until, done };
        socket.write(bytes);
      });
      res(socket);
    });
    socket.once("error", rej);
  });
}

// A date as the UI shows it: YYYY-MM-DD in UTC.
const isoDate = (ms) => new Date(ms).toISOString().slice(0, 10);

// ---- the page, by what a user sees ---------------------------------------------------

// Runs in the page: the elements a query names, and which of them are visible. A query has
// `scope` (CSS: look only inside it) and one of `label` (the form control of the <label>
// with this text), `button` (a button, tab or disclosure with this name) or `css` (with
// `text`: whose text is this). Texts are strings (exact) or {re, flags} (a pattern).
function inPage({ q, want }) {
  const matches = (value, m) => m === undefined || m === null
    || (typeof m === "object" ? new RegExp(m.re, m.flags).test(value) : value === m);
  const squash = (s) => s.replace(/\s+/g, " ").trim();
  const visible = (e) => Boolean(e.offsetWidth || e.offsetHeight || e.getClientRects().length)
    && getComputedStyle(e).visibility !== "hidden";
  const found = [];
  for (const scope of q.scope ? document.querySelectorAll(q.scope) : [document]) {
    if (q.label !== undefined) {
      for (const l of scope.querySelectorAll("label")) {
        const own = squash([...l.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.textContent).join(" "));
        const control = l.control || l.querySelector("input, select, textarea");
        if (control && matches(own, q.label)) found.push(control);
      }
    } else if (q.button !== undefined) {
      for (const b of scope.querySelectorAll("button, [role=tab], summary")) {
        if (matches(squash(b.getAttribute("aria-label") || b.textContent), q.button)) found.push(b);
      }
    } else {
      for (const e of scope.querySelectorAll(q.css)) if (matches(squash(e.textContent), q.text)) found.push(e);
    }
  }
  const shown = found.filter(visible);
  if (want === "element") return shown[0] || null;
  if (want === "texts") return shown.map((e) => squash(e.textContent));
  if (want === "value") return found.length ? found[0].value : null;
  return { any: found.length > 0, visible: shown.length > 0 };
}

// A query as it crosses into the page (patterns become {re, flags}).
function wire(q) {
  const out = {};
  for (const [k, v] of Object.entries(q)) out[k] = v instanceof RegExp ? { re: v.source, flags: v.flags } : v;
  return out;
}

function describe(q) {
  return Object.entries(q).map(([k, v]) => `${k}=${v}`).join(" ");
}

class UI {
  constructor(browser, page) {
    this.browser = browser;
    this.page = page;
  }

  // The first visible element of `q`, once there is one.
  async element(q, timeout = 20000) {
    let handle = null;
    await until(describe(q), async () => {
      const h = await this.page.evaluateHandle(inPage, { q: wire(q), want: "element" });
      handle = h.asElement();
      return handle !== null;
    }, timeout);
    return handle;
  }

  // Waits until `q` is visible (or `hidden`, or `detached`: not in the page at all).
  async waitFor(q, { state = "visible", timeout = 20000 } = {}) {
    await until(`${describe(q)} ${state}`, async () => {
      const s = await this.page.evaluate(inPage, { q: wire(q), want: "state" });
      return state === "visible" ? s.visible : state === "hidden" ? !s.visible : !s.any;
    }, timeout);
  }

  async isVisible(q) {
    return (await this.page.evaluate(inPage, { q: wire(q), want: "state" })).visible;
  }

  texts(q) { return this.page.evaluate(inPage, { q: wire(q), want: "texts" }); }
  value(q) { return this.page.evaluate(inPage, { q: wire(q), want: "value" }); }
  // Does `action` to the first visible element of `q`. The UI redraws its tables every two
  // seconds: an element replaced in between is looked up again.
  async act(q, action, timeout = 20000) {
    const deadline = Date.now() + timeout;
    for (;;) {
      const el = await this.element(q, Math.max(1, deadline - Date.now()));
      try {
        return await action(el);
      } catch (e) {
        if (!/detached|not attached|not connected|not clickable|stale|no such (node|element)|not found in the document/i.test(e.message) || Date.now() > deadline) throw e;
      }
    }
  }

  click(q) { return this.act(q, (el) => this.page.click(el)); }
  fill(q, text) { return this.act(q, (el) => this.page.fill(el, text)); }
  setFiles(q, path) { return this.act(q, (el) => this.page.setFiles(el, path)); }

  // Chooses the option with this text.
  async select(q, optionText) {
    const el = await this.element(q);
    let value;
    await until(`option ${optionText} in ${describe(q)}`, async () => {
      value = await el.evaluate((s, t) => {
        const o = [...s.options].find((x) => x.textContent.trim() === t);
        return o ? o.value : null;
      }, optionText);
      return value !== null;
    });
    await this.page.select(el, value);
  }

  // Drops a file with this text on the element of `css`, as a file dragged from the desktop.
  drop(css, name, text) {
    return this.page.evaluate(({ css, name, text }) => {
      const target = document.querySelector(css);
      const dt = new DataTransfer();
      dt.items.add(new File([text], name, { type: "application/json" }));
      for (const type of ["dragenter", "dragover", "drop"]) {
        target.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
      }
    }, { css, name, text });
  }

  // Saves docs/screenshots/NAME.png (in the browser that takes the screenshots).
  async shot(name, fullPage = false) {
    if (this.browser.screenshots) await this.page.screenshot(join(shots, `${name}.png`), fullPage);
  }

  // Fails on anything the page reported (script errors, console errors, invalid patterns).
  assertNoProblems() {
    assert.deepEqual(this.page.problems, [], "the page reported no errors");
  }
}

// ---- the scenarios -------------------------------------------------------------------------

export function scenarios(label, launch) {
  assert.ok(bin, "build the ztm binary first (cargo build --release)");
  const dir = mkdtempSync(join(tmpdir(), "ztm-ui-"));
  const procs = [];
  let browser;
  let ca, hub;

  function start(name, args) {
    const logPath = join(dir, `${name}.log`);
    const fd = openSync(logPath, "a");
    const p = spawn(bin, args, { cwd: dir, env: { ...process.env, HOME: dir, ZTM_LOG: "debug" }, stdio: ["ignore", fd, fd] });
    p.log = () => readFileSync(logPath, "utf8");
    p.name = name;
    procs.push(p);
    return p;
  }

  async function agent(name, extra = []) {
    const addr = `127.0.0.1:${await freePort()}`;
    const p = start(name, ["agent", "--listen", addr, "--database", join(dir, `${name}.db`), ...extra]);
    p.addr = addr;
    return p;
  }

  async function open(addr, size = { width: 1200, height: 800 }) {
    const ui = new UI(browser, await browser.newPage(size));
    await ui.page.goto(`http://${addr}/`);
    return ui;
  }

  // `ztm invite USER`, as the mesh's operator runs it: the invitation file's path, or with
  // `print` the one-line text.
  async function invite(user, { mesh = "home", print = false } = {}) {
    const args = ["invite", user, "--hub", hub, "--ca", ca, "--mesh", mesh];
    const file = join(dir, `${user}.ztm-invite`);
    const { stdout } = await run(bin, print ? [...args, "--print"] : [...args, "--file", file], { cwd: dir, env: { ...process.env, HOME: dir } });
    return print ? stdout.trim() : file;
  }

  before(async () => {
    const [caPort, hubPort] = await Promise.all([freePort(), freePort()]);
    ca = `127.0.0.1:${caPort}`;
    hub = `127.0.0.1:${hubPort}`;
    start("ca", ["ca", "--listen", ca, "--database", join(dir, "ca.db")]);
    await until("the CA", () => call(ca, "GET", "/api/certificates/ca"));
    start("hub", ["hub", "--listen", hub, "--ca", ca, "--name", hub]);
    mkdirSync(shots, { recursive: true });
    browser = await launch();
  });

  after(async () => {
    if (browser) await browser.close();
    for (const p of procs) p.kill("SIGKILL");
    if (process.env.ZTM_KEEP_TEST_DIRS) console.log(`# logs kept in ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  });

  const opts = { timeout: 120000 };

  test(`${label}: a new user joins with three files, sees endpoints, publishes a service, maps a port and cleans up`, opts, async (t) => {
    const [webPort, mapPort] = await Promise.all([freePort(), freePort()]);
    const a = (await agent("a")).addr;
    const agentB = await agent("b");
    const b = agentB.addr;
    await until("agent A", () => call(a, "GET", "/api/meshes"));
    await until("agent B", () => call(b, "GET", "/api/meshes"));

    // The three files a user is handed.
    const caPem = await call(ca, "GET", "/api/certificates/ca");
    const rootKey = await call(ca, "POST", "/api/certificates/root");
    const rootCrt = await call(ca, "GET", "/api/certificates/root");
    const bobKey = await call(ca, "POST", "/api/certificates/bob");
    for (const [f, text] of [["ca.crt", caPem], ["root.crt", rootCrt], ["root.key", rootKey], ["bob.key", bobKey]]) {
      writeFileSync(join(dir, f), text);
    }
    // B joins through its API (it is "another computer").
    await call(b, "POST", "/api/meshes/demo", { ca: caPem, agent: { name: "b", certificate: rootCrt, privateKey: rootKey }, bootstraps: [hub] });

    // The service behind B.
    const server = http.createServer((req, res) => res.end("hello from behind B\n"));
    await new Promise((r) => server.listen(webPort, "127.0.0.1", r));
    t.after(() => server.close());

    const ui = await open(a);
    t.after(() => ui.page.close());
    await ui.waitFor({ css: "#mesh-list", text: /has not joined a mesh yet/ });
    // Every pattern compiles the way browsers compile it (with the v flag); an invalid one
    // would silently turn its field's check off.
    assert.deepEqual(await ui.page.evaluate(() => [...document.querySelectorAll("[pattern]")]
      .map((e) => e.getAttribute("pattern"))
      .filter((p) => { try { new RegExp(`^(?:${p})$`, "v"); return false; } catch { return true; } })), []);

    // The three-file form sits behind a toggle, under the invitation form.
    await ui.click({ button: /^Join with three files instead/ });
    const form = "#join-form";
    await ui.fill({ scope: form, label: "Mesh name" }, "demo");
    await ui.fill({ scope: form, label: "This computer's name" }, "a");
    await ui.fill({ scope: form, label: "Hub address(es)" }, hub);
    await ui.setFiles({ scope: form, label: "CA certificate" }, join(dir, "ca.crt"));
    await ui.setFiles({ scope: form, label: "User certificate" }, join(dir, "root.crt"));
    // A key that does not match the certificate: an error in words, nothing joined.
    await ui.setFiles({ scope: form, label: "Private key" }, join(dir, "bob.key"));
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ scope: form, css: "[data-error]", text: /does not match/ });
    assert.equal((await meshes(a)).length, 0, "a failed join changes nothing");
    await ui.shot("join-error", true);

    // The right key.
    await ui.setFiles({ scope: form, label: "Private key" }, join(dir, "root.key"));
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ css: '[data-mesh="demo"] .badge', text: "connected" });
    await ui.waitFor({ css: "#status.ok" });
    await ui.shot("meshes");

    // Endpoints: A and B online.
    await ui.click({ button: "Endpoints" });
    await ui.waitFor({ css: '[data-endpoint="a"] .online' });
    await ui.waitFor({ css: '[data-endpoint="b"] .online' });
    await ui.waitFor({ css: '[data-endpoint="a"] .badge', text: "this computer" });
    await ui.shot("endpoints");

    // A service on B, created from A's UI.
    await ui.click({ button: "Services" });
    const svc = "#service-form";
    await ui.select({ scope: svc, label: "On endpoint" }, "b");
    await ui.fill({ scope: svc, label: "Name" }, "web");
    await ui.fill({ scope: svc, label: "Host" }, "127.0.0.1");
    await ui.fill({ scope: svc, label: "Port" }, String(webPort));
    await ui.click({ scope: svc, button: "Create service" });
    await ui.waitFor({ css: '[data-service="tcp/web"][data-provider="b"]' });
    await ui.shot("services");

    // A port on A to it; the test's own HTTP request goes through the tunnel.
    await ui.click({ button: "Ports" });
    const pf = "#port-form";
    await ui.select({ scope: pf, label: "Service" }, "tcp/web");
    await ui.fill({ scope: pf, label: "Listen port" }, String(mapPort));
    await ui.click({ scope: pf, button: "Map port" });
    const row = `[data-port="127.0.0.1:${mapPort}/tcp"]`;
    await ui.waitFor({ css: `${row} td`, text: "open" });
    let reply;
    await until("a reply through the tunnel", async () => { reply = await get(mapPort); return reply.status === 200; });
    assert.equal(reply.body, "hello from behind B\n");

    // The port's live figures: a connection held open through it shows as active (1 of the
    // connections opened), its known bytes each way show, and once closed none is active.
    const active = { css: `${row} [data-stat="active"]` };
    await ui.waitFor({ ...active, text: "0" });
    const portPath = `/api/meshes/demo/endpoints/a/ports/127.0.0.1/tcp/${mapPort}`;
    const before = JSON.parse(await call(a, "GET", portPath)).stats;
    // A refresh changes only what changed: the row's Delete button, focused as a keyboard
    // user would, is the same element and keeps the focus while the figures beside it move.
    const deleteButton = await ui.element({ scope: row, button: /^Delete port/ });
    await deleteButton.evaluate((b) => b.focus());
    const held = await hold(mapPort);
    await ui.waitFor({ ...active, text: "1" });
    await ui.waitFor({ css: `${row} [data-stat="opened"]`, text: `of ${before.total + 1}` });
    const request = Buffer.from(`GET /${"x".repeat(2000)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
    const response = await held.exchange(request, "hello from behind B\n");
    await ui.waitFor({ css: `${row} [data-stat="to-service"]`, text: formatBytes(before.bytesToService + request.length) });
    await ui.waitFor({ css: `${row} [data-stat="from-service"]`, text: formatBytes(before.bytesFromService + response.length) });
    assert.equal(await ui.isVisible(active), true);
    assert.deepEqual(await ui.texts(active), ["1"], "still open while its bytes show");
    assert.deepEqual(await deleteButton.evaluate((b) => [b.isConnected, document.activeElement === b]), [true, true],
      "the Delete button was kept, with the focus, through the refreshes that changed its row");
    held.destroy();
    await ui.waitFor({ ...active, text: "0" });
    const after = JSON.parse(await call(a, "GET", portPath)).stats;
    assert.equal(after.bytesToService - before.bytesToService, request.length);
    assert.equal(after.bytesFromService - before.bytesFromService, response.length);
    assert.equal(after.failed, 0);
    await ui.shot("ports");

    // Delete the port, then the service; both disappear.
    await ui.click({ scope: row, button: /^Delete port/ });
    await ui.waitFor({ css: row }, { state: "detached" });
    await assert.rejects(get(mapPort), "the port is closed");
    await ui.click({ button: "Services" });
    const svcRow = '[data-service="tcp/web"][data-provider="b"]';
    await ui.click({ scope: svcRow, button: "Delete tcp/web on b" });
    await ui.waitFor({ css: svcRow }, { state: "detached" });
    assert.equal(JSON.parse(await call(b, "GET", "/api/meshes/demo/endpoints/b/services")).length, 0);

    // Stopping B shows it offline without a reload.
    await ui.click({ button: "Endpoints" });
    await ui.waitFor({ css: '[data-endpoint="b"] .online' });
    agentB.kill("SIGTERM");
    await ui.waitFor({ css: '[data-endpoint="b"] .offline' }, { timeout: 45000 });
    await ui.shot("endpoint-offline");

    await ui.click({ button: "Log" });
    await ui.waitFor({ css: "#log-rows li" });
    await ui.shot("log");

    // A phone-sized window still shows the views.
    await ui.page.setViewport(390, 800);
    await ui.click({ button: "Endpoints" });
    await ui.waitFor({ css: '[data-endpoint="a"]' });
    await ui.shot("phone");

    ui.assertNoProblems();
    for (const p of procs) assert.equal(p.exitCode === null || p === agentB, true, `${p.name} still running:\n${p.log()}`);
    assert.ok(!(await call(a, "GET", "/api/meshes/demo")).includes(rootKey.trim().split("\n")[1]), "the API never returns the key");
  });

  test(`${label}: an endpoint becomes an exit, another's proxy connects out through it, and the figures show`, opts, async (t) => {
    const [echoPort, proxyPort] = await Promise.all([freePort(), freePort()]);
    const [x, y] = (await Promise.all([agent("x"), agent("y")])).map((p) => p.addr);
    await until("agents X and Y", async () => Boolean(await call(x, "GET", "/api/meshes")) && Boolean(await call(y, "GET", "/api/meshes")));
    for (const [addr, user, name] of [[x, "xena", "x"], [y, "yves", "y"]]) {
      await call(addr, "POST", "/api/meshes/out", { invitation: await invite(user, { mesh: "out", print: true }), agent: { name } });
    }
    // What the exit lets out to: an echo server next to Y.
    const echo = net.createServer((c) => c.pipe(c));
    await new Promise((r) => echo.listen(echoPort, "127.0.0.1", r));
    t.after(() => echo.close());

    // Y's own page makes Y an exit; a bad rule first, refused in the agent's words.
    const uiY = await open(y);
    t.after(() => uiY.page.close());
    await uiY.click({ button: "Ports" });
    await uiY.waitFor({ css: '#exit-state [data-exit="none"]', text: "y is not an exit." });
    const ef = "#exit-form";
    await uiY.waitFor({ scope: ef, button: "Stop being an exit" }, { state: "hidden" });
    await uiY.fill({ scope: ef, label: "Allowed destinations" }, "10.0.0.0/33");
    await uiY.click({ scope: ef, button: "Save exit" });
    await uiY.waitFor({ scope: ef, css: "[data-error]", text: /^allow: .*10\.0\.0\.0\/33/ });
    assert.equal(await uiY.isVisible({ css: '#exit-state [data-exit="yes"]' }), false, "a refused rule changes nothing");
    await uiY.fill({ scope: ef, label: "Allowed destinations" }, `127.0.0.1:${echoPort}\n*.corp.example:443`);
    await uiY.fill({ scope: ef, label: "Allowed users" }, "xena, yves");
    await uiY.click({ scope: ef, button: "Save exit" });
    await uiY.waitFor({ css: '#exit-state [data-exit="yes"]', text: "y is an exit to:" });
    await uiY.waitFor({ scope: ef, css: "[data-error]" }, { state: "hidden" });
    const exit = JSON.parse(await call(y, "GET", "/api/meshes/out/endpoints/y/exit"));
    assert.deepEqual(exit.users, ["xena", "yves"]);
    assert.equal(exit.allow.length, 2);
    assert.deepEqual(await uiY.texts({ css: "#exit-state .rules li" }), exit.allow);
    await uiY.waitFor({ css: "#exit-state [data-exit-users]", text: "Users: xena, yves" });
    await uiY.waitFor({ scope: ef, button: "Stop being an exit" });
    await uiY.shot("exit", true);

    // X's page: a proxy to Y's exit, picked from the exits X's user may use.
    const uiX = await open(x);
    t.after(() => uiX.page.close());
    await uiX.click({ button: "Ports" });
    await uiX.waitFor({ css: '#exit-state [data-exit="none"]', text: "x is not an exit." });
    const pf = "#proxy-form";
    await uiX.waitFor({ css: "#proxy-rows td", text: "No proxies on this endpoint." });
    await uiX.select({ scope: pf, label: "Exit" }, "y (yves)");
    await uiX.fill({ scope: pf, label: "Listen port" }, String(proxyPort));
    await uiX.click({ scope: pf, button: "Create proxy" });
    const row = `[data-proxy="127.0.0.1:${proxyPort}"]`;
    await uiX.waitFor({ css: `${row} td[data-label="State"]`, text: "open" });
    await uiX.waitFor({ css: `${row} td[data-label="Exit"]`, text: "y (yves)" });
    const proxyPath = `/api/meshes/out/endpoints/x/proxies/127.0.0.1/${proxyPort}`;
    assert.equal(JSON.parse(await call(x, "GET", proxyPath)).exit.user, "yves");

    // From here: HTTP CONNECT through the proxy to the echo server, held open, bytes each way.
    const active = { css: `${row} [data-stat="active"]` };
    await uiX.waitFor({ ...active, text: "0" });
    const held = await hold(proxyPort);
    const connected = await held.exchange(`CONNECT 127.0.0.1:${echoPort} HTTP/1.1\r\nHost: 127.0.0.1:${echoPort}\r\n\r\n`, "\r\n\r\n");
    assert.match(connected.toString(), /^HTTP\/1\.[01] 200/);
    const payload = Buffer.from(`${"echo ".repeat(600)}end\n`);
    const echoed = await held.exchange(payload, "end\n");
    assert.equal(echoed.toString(), payload.toString(), "the bytes came back through the exit");
    await uiX.waitFor({ ...active, text: "1" });
    let stats;
    await until("the proxy's figures", async () => {
      stats = JSON.parse(await call(x, "GET", proxyPath)).stats;
      return stats.bytesToService >= payload.length && stats.bytesFromService >= payload.length;
    });
    await uiX.waitFor({ css: `${row} [data-stat="to-service"]`, text: formatBytes(stats.bytesToService) });
    await uiX.waitFor({ css: `${row} [data-stat="from-service"]`, text: formatBytes(stats.bytesFromService) });
    assert.deepEqual(await uiX.texts(active), ["1"], "still open while its bytes show");
    await uiX.shot("proxies", true);
    held.destroy();
    await uiX.waitFor({ ...active, text: "0" });

    // A destination the exit does not allow: refused, and counted as failed.
    const denied = await hold(proxyPort);
    const refusal = await denied.exchange(`CONNECT 127.0.0.1:${proxyPort} HTTP/1.1\r\nHost: x\r\n\r\n`, "\r\n\r\n");
    assert.doesNotMatch(refusal.toString(), /^HTTP\/1\.[01] 200/);
    denied.destroy();
    await uiX.waitFor({ css: `${row} [data-stat="failed"]`, text: /failed/ });

    // Y stops being an exit (its page asks first); X deletes its proxy.
    await uiY.page.evaluate(() => { window.confirm = () => true; });
    await uiY.click({ scope: ef, button: "Stop being an exit" });
    await uiY.waitFor({ css: '#exit-state [data-exit="none"]', text: "y is not an exit." });
    await assert.rejects(call(y, "GET", "/api/meshes/out/endpoints/y/exit"), /404/);
    await uiX.click({ scope: row, button: `Delete proxy 127.0.0.1:${proxyPort}` });
    await uiX.waitFor({ css: row }, { state: "detached" });
    await assert.rejects(hold(proxyPort), "the proxy is closed");
    uiX.assertNoProblems();
    uiY.assertNoProblems();
  });

  test(`${label}: an agent started with a token asks for it once and keeps it for the tab`, opts, async (t) => {
    const { addr } = await agent("t", ["--token", "s3cret token"]);
    await until("agent T", async () => (await get(Number(addr.split(":")[1]), "/")).status === 200);
    const ui = await open(addr);
    t.after(() => ui.page.close());

    // The API answers 401: the token form instead of the views.
    const form = "#token-form";
    await ui.waitFor({ css: form });
    assert.equal(await ui.isVisible({ css: "main" }), false);
    await ui.fill({ scope: form, label: "API token" }, "wrong");
    await ui.click({ scope: form, button: "Continue" });
    await ui.waitFor({ scope: form, css: "[data-error]", text: /refused this token/ });

    // The right one: the views, and it is sent with every request from then on.
    await ui.fill({ scope: form, label: "API token" }, "s3cret token");
    await ui.click({ scope: form, button: "Continue" });
    await ui.waitFor({ css: "#mesh-list", text: /has not joined a mesh yet/ });
    await ui.waitFor({ css: form }, { state: "hidden" });
    await ui.click({ button: "Log" });
    await ui.page.reload();
    await ui.waitFor({ css: "#mesh-list", text: /has not joined a mesh yet/ });
    assert.equal(await ui.isVisible({ css: form }), false, "the tab keeps the token across reloads");
    assert.equal(await ui.page.evaluate(() => localStorage.getItem("ztm.token")), null, "never kept beyond the tab");
    ui.assertNoProblems();
  });

  test(`${label}: a new computer joins with an invitation file; damaged ones are refused in words and change nothing`, opts, async (t) => {
    const c = (await agent("c")).addr;
    await until("agent C", () => call(c, "GET", "/api/meshes"));
    const file = await invite("carol");
    const cut = await invite("cid", { print: true });
    const ui = await open(c);
    t.after(() => ui.page.close());
    await ui.waitFor({ css: "#mesh-list", text: /has not joined a mesh yet/ });
    const form = "#invite-form";
    const error = { scope: form, css: "[data-error]" };
    const nothingJoined = async () => {
      assert.deepEqual(await meshes(c), [], "a refused invitation changes nothing");
      assert.equal(await ui.isVisible({ css: "[data-mesh]" }), false);
    };

    // Garbage, then an invitation cut off: said in words, before anything is sent.
    await ui.fill({ scope: form, label: "This computer's name" }, "c");
    await ui.fill({ scope: form, label: "Or paste the invitation" }, "hello, this is my invitation");
    await ui.waitFor({ ...error, text: /not a ZTM invitation/ });
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ ...error, text: /not a ZTM invitation/ });
    await ui.fill({ scope: form, label: "Or paste the invitation" }, cut.slice(0, Math.floor(cut.length / 2)));
    await ui.waitFor({ ...error, text: /cut off or damaged/ });
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ ...error, text: /cut off or damaged/ });
    await nothingJoined();

    // An altered invitation file dropped on the form (another user's key): it reads as an
    // invitation, and the agent refuses it in words.
    const altered = JSON.parse(readFileSync(file, "utf8"));
    altered.privateKey = await call(ca, "POST", "/api/certificates/mallory");
    await ui.fill({ scope: form, label: "Or paste the invitation" }, "");
    await ui.drop(form, "altered.ztm-invite", JSON.stringify(altered, null, 2));
    await ui.waitFor({ scope: form, css: "[data-invitation]", text: /user carol to mesh home/ });
    assert.equal(await ui.value({ scope: form, label: "Mesh name" }), "home", "the mesh name comes from the invitation");
    // The name rule is checked in the page (the pattern is valid in this browser).
    await ui.fill({ scope: form, label: "This computer's name" }, "my laptop!");
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ ...error, text: /may hold only letters, digits/ });
    assert.equal(await ui.page.evaluate(() => document.querySelector('#invite-form [name="name"]').validity.patternMismatch), true);
    await ui.fill({ scope: form, label: "This computer's name" }, "c");
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ ...error, text: /private key does not match its certificate/ });
    await nothingJoined();

    // The invitation file, chosen with the file picker.
    await ui.setFiles({ scope: form, label: "Invitation file" }, file);
    await ui.waitFor({ scope: form, css: "[data-invitation]", text: /carol\.ztm-invite: an invitation for user carol to mesh home, through hub / });
    await ui.waitFor({ ...error }, { state: "hidden" });
    assert.equal(await ui.value({ scope: form, label: "Mesh name" }), "home");
    await ui.shot("join-invitation");
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ css: '[data-mesh="home"] .badge', text: "connected" });
    await ui.waitFor({ css: "#status.ok" });
    const [m] = await meshes(c);
    assert.equal(m.name, "home");
    assert.equal(m.agent.name, "c");
    assert.equal(m.agent.username, "carol");

    // The certificates' lifetimes, as the agent has them.
    assert.ok(m.agent.expires > Date.now() && m.caExpires > Date.now(), JSON.stringify(m));
    await ui.waitFor({ css: '[data-mesh="home"] [data-expiry="agent"] time', text: isoDate(m.agent.expires) });
    await ui.waitFor({ css: '[data-mesh="home"] [data-expiry="agent"]', text: /^This computer's certificate expires on \d{4}-\d\d-\d\d \(in \d+ (days|months|years)\)$/ });
    await ui.waitFor({ css: '[data-mesh="home"] [data-expiry="ca"] time', text: isoDate(m.caExpires) });
    assert.equal(await ui.isVisible({ css: '[data-mesh="home"] .warnings' }), false, "no warning a year before expiry");

    await ui.click({ button: "Endpoints" });
    await ui.waitFor({ css: '[data-endpoint="c"] .online' });
    ui.assertNoProblems();
  });

  test(`${label}: a mesh with more services than a page: search, pages and pickers ask only for what they show`, opts, async (t) => {
    const count = 150;
    const mapPort = await freePort();
    const [p, q] = (await Promise.all([agent("p"), agent("q")])).map((x) => x.addr);
    await until("agents P and Q", async () => Boolean(await call(p, "GET", "/api/meshes")) && Boolean(await call(q, "GET", "/api/meshes")));
    for (const [addr, user, name] of [[p, "pat", "p"], [q, "quinn", "q"]]) {
      await call(addr, "POST", "/api/meshes/big", { invitation: await invite(user, { mesh: "big", print: true }), agent: { name } });
    }
    // Q provides the services (the agent's REST API, as a script would), ten at a time.
    const names = Array.from({ length: count }, (_, i) => `bulk-${String(i).padStart(3, "0")}`);
    for (let i = 0; i < count; i += 10) {
      await Promise.all(names.slice(i, i + 10).map((n, j) =>
        call(q, "POST", `/api/meshes/big/endpoints/q/services/tcp/${n}`, { host: "127.0.0.1", port: 20000 + i + j })));
    }
    await until(`P sees Q's ${count} services`, async () => (await listPage(p, "/api/meshes/big/services?q=bulk-&limit=1")).total === count, 30000);
    // What else the mesh holds (what other scenarios left), as the agent lists it.
    const all = (await listPage(p, "/api/meshes/big/services?limit=1")).total;
    const rest = (await listPage(p, "/api/meshes/big/services?offset=100&limit=100")).items.reduce((n, s) => n + s.endpoints.length, 0);
    const endpoints = (await listPage(p, "/api/meshes/big/endpoints?limit=1")).total;
    assert.ok(endpoints <= 100, "the endpoints fit on one page");

    const ui = await open(p);
    t.after(() => ui.page.close());
    const listRequests = () => ui.page.requests.map((u) => new URL(u))
      .filter((u) => /^\/api\/meshes\/[^/]+\/(endpoints|services)$/.test(u.pathname));
    const rows = (css) => ui.page.evaluate((sel) => document.querySelectorAll(sel).length, css);
    const range = { scope: "#view-services", css: "[data-range]" };
    const svcRows = '#service-rows tr[data-service]';

    // The first page: 100 rows, and how many there are in all.
    await ui.click({ button: "Services" });
    await ui.waitFor({ ...range, text: `Services 1–100 of ${all}` });
    await ui.waitFor({ css: '[data-service="tcp/bulk-099"][data-provider="q"]' });
    assert.equal(await rows(svcRows), 100);
    assert.equal(await ui.isVisible({ css: '[data-service="tcp/bulk-100"]' }), false);

    // The periodic refresh asks for that page again, and only for it.
    const seen = listRequests().length;
    await until("two refreshes of the services view", async () =>
      listRequests().slice(seen).filter((u) => u.pathname.endsWith("/services")).length >= 2, 10000);
    for (const u of listRequests().slice(seen).filter((x) => x.pathname.endsWith("/services"))) {
      assert.equal(u.searchParams.get("limit"), "100", u.href);
      assert.equal(u.searchParams.get("offset"), null, u.href);
    }
    assert.equal(await rows(svcRows), 100, "still one page after a refresh");

    // The next page holds the rest; then there is no next one.
    await ui.click({ scope: "#view-services", button: "Next" });
    await ui.waitFor({ ...range, text: `Services 101–${all} of ${all}` });
    await ui.waitFor({ css: '[data-service="tcp/bulk-149"]' });
    await ui.waitFor({ css: '[data-service="tcp/bulk-000"]' }, { state: "detached" });
    assert.equal(await rows(svcRows), rest);
    assert.equal(await ui.page.evaluate(() => document.querySelector("#view-services [data-next]").disabled), true);
    assert.ok(listRequests().some((u) => u.pathname.endsWith("/services") && u.searchParams.get("offset") === "100"));

    // A search narrows the rows and the total (ignoring case), from the first page.
    await ui.fill({ scope: "#view-services", label: "Search" }, "BULK-14");
    await ui.waitFor({ ...range, text: "Services 1–10 of 10" });
    await ui.waitFor({ css: '[data-service="tcp/bulk-140"]' });
    assert.equal(await rows(svcRows), 10);
    assert.deepEqual(await ui.texts({ css: '#service-rows td[data-label="Service"]' }), names.slice(140).map((n) => `tcp/${n}`));
    assert.equal(await ui.isVisible({ scope: "#view-services", button: "Next" }), false, "one page: no paging");
    assert.ok(listRequests().some((u) => u.searchParams.get("q") === "BULK-14" && u.searchParams.get("limit") === "100"));
    await ui.fill({ scope: "#view-services", label: "Search" }, "no such thing");
    await ui.waitFor({ ...range, text: "No services" });
    await ui.waitFor({ css: "#service-rows td", text: "No service matches this search." });
    await ui.fill({ scope: "#view-services", label: "Search" }, "");
    await ui.waitFor({ ...range, text: `Services 1–100 of ${all}` });

    // The endpoint picker of the form starts at this computer.
    const chosen = (css) => ui.page.evaluate((sel) => {
      const s = document.querySelector(sel);
      return { text: s.selectedOptions[0] ? s.selectedOptions[0].textContent : null, options: s.options.length };
    }, css);
    assert.equal((await chosen('#service-form [name="ep"]')).text, "p (this computer)");

    // Endpoints: a small list, on one page; a search by user.
    await ui.click({ button: "Endpoints" });
    const epRange = { scope: "#view-endpoints", css: "[data-range]" };
    await ui.waitFor({ ...epRange, text: new RegExp(`^Endpoints 1–\\d+ of \\d+$`) });
    await ui.waitFor({ css: '[data-endpoint="p"] .badge', text: "this computer" });
    await ui.waitFor({ css: '[data-endpoint="q"] .online' });
    assert.equal(await ui.isVisible({ scope: "#view-endpoints", button: "Next" }), false);
    await ui.fill({ scope: "#view-endpoints", label: "Search" }, "quinn");
    await ui.waitFor({ ...epRange, text: "Endpoints 1–1 of 1" });
    await ui.waitFor({ css: '[data-endpoint="p"]' }, { state: "detached" });
    assert.equal(await rows("#endpoint-rows tr[data-endpoint]"), 1);

    // Ports: the service picker offers 100 services; its filter finds the others, and the
    // target picker lists the chosen service's providers from that one service.
    await ui.click({ button: "Ports" });
    const pf = "#port-form";
    await until("the service picker filled", async () => (await chosen(`${pf} [name="service"]`)).options === 100);
    assert.equal((await chosen("#ports-ep")).text, "p (this computer)");
    assert.equal(await ui.page.evaluate(() => [...document.querySelectorAll('#port-form [name="service"] option')]
      .some((o) => o.value === "tcp/bulk-149")), false);
    await ui.fill({ css: '#port-form [aria-label="Find a service"]' }, "bulk-149");
    await until("tcp/bulk-149 chosen", async () => (await chosen(`${pf} [name="service"]`)).text === "tcp/bulk-149");
    assert.equal((await chosen(`${pf} [name="service"]`)).options, 1);
    await ui.select({ scope: pf, label: "Target endpoint" }, "q");
    assert.ok(ui.page.requests.some((u) => new URL(u).pathname === "/api/meshes/big/services/tcp/bulk-149"), "the one-service route");
    // Without a filter the choice stays, among at most 100 options.
    await ui.fill({ css: '#port-form [aria-label="Find a service"]' }, "");
    await until("the service picker refilled", async () => (await chosen(`${pf} [name="service"]`)).options === 100);
    assert.equal((await chosen(`${pf} [name="service"]`)).text, "tcp/bulk-149");
    assert.equal((await chosen(`${pf} [name="target"]`)).text, "q");
    await ui.fill({ scope: pf, label: "Listen port" }, String(mapPort));
    await ui.click({ scope: pf, button: "Map port" });
    const row = `[data-port="127.0.0.1:${mapPort}/tcp"]`;
    await ui.waitFor({ css: `${row} td[data-label="Target"]`, text: "bulk-149 @ q" });
    await ui.waitFor({ css: `${row} td`, text: "open" });

    // No list was ever asked for whole.
    const lists = listRequests();
    assert.ok(lists.length > 10, `${lists.length} list requests`);
    assert.deepEqual(lists.filter((u) => !u.searchParams.has("limit")).map((u) => u.href), [], "every list request has a limit");
    ui.assertNoProblems();
  });

  test(`${label}: a new computer joins with a pasted invitation; warnings of certificates near their expiry`, opts, async (t) => {
    const d = (await agent("d")).addr;
    await until("agent D", () => call(d, "GET", "/api/meshes"));
    const text = await invite("dave", { mesh: "office", print: true });
    const ui = await open(d);
    t.after(() => ui.page.close());
    await ui.waitFor({ css: "#mesh-list", text: /has not joined a mesh yet/ });
    const form = "#invite-form";
    await ui.fill({ scope: form, label: "Or paste the invitation" }, text);
    await ui.waitFor({ scope: form, css: "[data-invitation]", text: /The pasted text: an invitation for user dave to mesh office/ });
    assert.equal(await ui.value({ scope: form, label: "Mesh name" }), "office");
    await ui.fill({ scope: form, label: "This computer's name" }, "d");
    await ui.click({ scope: form, button: "Join" });
    await ui.waitFor({ css: '[data-mesh="office"] .badge', text: "connected" });
    const [m] = await meshes(d);
    assert.equal(m.agent.username, "dave");
    await ui.waitFor({ css: '[data-mesh="office"] [data-expiry="agent"] time', text: isoDate(m.agent.expires) });
    assert.equal(await ui.value({ scope: form, label: "Or paste the invitation" }), "", "the form forgets the invitation");

    // A second mesh whose certificates expire in 10 and 20 days (made with openssl, by a CA no
    // hub knows): warnings, apart from the errors.
    const x = (name) => join(dir, `soon-${name}`);
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    await run("openssl", ["req", "-x509", ...ec, "-keyout", x("ca.key"), "-out", x("ca.crt"), "-days", "20", "-subj", "/CN=ca",
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    await run("openssl", ["req", ...ec, "-keyout", x("user.key"), "-out", x("user.csr"), "-subj", "/CN=dave",
      "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=clientAuth"]);
    await run("openssl", ["x509", "-req", "-in", x("user.csr"), "-CA", x("ca.crt"), "-CAkey", x("ca.key"), "-days", "10",
      "-copy_extensions", "copyall", "-out", x("user.crt")]);
    await call(d, "POST", "/api/meshes/soon", {
      ca: readFileSync(x("ca.crt"), "utf8"),
      agent: { name: "d", certificate: readFileSync(x("user.crt"), "utf8"), privateKey: readFileSync(x("user.key"), "utf8") },
      bootstraps: [hub],
    });
    const warnings = { css: '[data-mesh="soon"] .warnings li' };
    await ui.waitFor({ ...warnings, text: /^this agent's certificate expires on \d{4}-\d\d-\d\d \(in (10|11) days\)/ });
    await ui.waitFor({ ...warnings, text: /^the mesh's CA certificate expires on \d{4}-\d\d-\d\d \(in (20|21) days\)/ });
    await ui.waitFor({ css: '[data-mesh="soon"] .errors li' }, { timeout: 30000 });
    const style = await ui.page.evaluate(() => {
      const color = (sel) => getComputedStyle(document.querySelector(sel)).color;
      return { warning: color('[data-mesh="soon"] .warnings li'), error: color('[data-mesh="soon"] .errors li') };
    });
    assert.notEqual(style.warning, style.error, "warnings look unlike errors");
    await ui.shot("expiry-warning", true);
    ui.assertNoProblems();
  });
}

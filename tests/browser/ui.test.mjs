// Browser test of the agent's web UI: real CA, hub and two agents (the `ztm` binary), driven in
// Debian's Chromium through playwright-core the way a new user would. Saves a screenshot of
// each view to docs/screenshots/.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync, existsSync, rmSync, readFileSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import http from "node:http";
import net from "node:net";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const shots = join(root, "docs/screenshots");
const bin = process.env.ZTM_BIN
  || [join(root, "target/release/ztm"), join(root, "target/debug/ztm")].find(existsSync);
assert.ok(bin, "build the ztm binary first (cargo build --release)");

const dir = mkdtempSync(join(tmpdir(), "ztm-ui-"));
const procs = [];
let browser;

after(async () => {
  if (browser) await browser.close();

  for (const p of procs) p.kill("SIGKILL");
  if (process.env.ZTM_KEEP_TEST_DIRS) console.log(`# logs kept in ${dir}`);
  else rmSync(dir, { recursive: true, force: true });
});

function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => res(port)); });
  });
}

function start(name, args) {
  const logPath = join(dir, `${name}.log`);
  const fd = openSync(logPath, "a");
  const p = spawn(bin, args, { cwd: dir, env: { ...process.env, HOME: dir, ZTM_LOG: "debug" }, stdio: ["ignore", fd, fd] });
  p.log = () => readFileSync(logPath, "utf8");
  p.name = name;
  procs.push(p);
  return p;
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

function get(port, path = "/") {
  return new Promise((res, rej) => {
    const req = http.get({ host: "127.0.0.1", port, path, timeout: 5000 }, (r) => {
      let body = "";
      r.on("data", (d) => { body += d; });
      r.on("end", () => res({ status: r.statusCode, body }));
    });
    req.on("error", rej);
    req.on("timeout", () => req.destroy(new Error("timeout")));
  });
}

test("a new user joins, sees endpoints, publishes a service, maps a port and cleans up", async (t) => {
  const [caPort, hubPort, aPort, bPort, webPort, mapPort] = await Promise.all(Array.from({ length: 6 }, freePort));
  const ca = `127.0.0.1:${caPort}`, hub = `127.0.0.1:${hubPort}`, a = `127.0.0.1:${aPort}`, b = `127.0.0.1:${bPort}`;
  start("ca", ["ca", "--listen", ca, "--database", join(dir, "ca.db")]);
  start("hub", ["hub", "--listen", hub, "--ca", ca, "--name", hub]);
  start("a", ["agent", "--listen", a, "--database", join(dir, "a.db")]);
  const agentB = start("b", ["agent", "--listen", b, "--database", join(dir, "b.db")]);
  await until("the CA", () => call(ca, "GET", "/api/certificates/ca"));
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

  mkdirSync(shots, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(`http://${a}/`);
  await page.getByText("has not joined a mesh yet").waitFor();

  // A key that does not match the certificate: an error in words, nothing joined.
  const form = page.locator("#join-form");
  await form.getByLabel("Mesh name").fill("demo");
  await form.getByLabel("This computer's name").fill("a");
  await form.getByLabel("Hub address(es)").fill(hub);
  await form.getByLabel("CA certificate").setInputFiles(join(dir, "ca.crt"));
  await form.getByLabel("User certificate").setInputFiles(join(dir, "root.crt"));
  await form.getByLabel("Private key").setInputFiles(join(dir, "bob.key"));
  await form.getByRole("button", { name: "Join" }).click();
  await form.locator("[data-error]").filter({ hasText: /does not match/ }).waitFor();
  assert.equal(JSON.parse(await call(a, "GET", "/api/meshes")).length, 0, "a failed join changes nothing");
  await page.screenshot({ path: join(shots, "join-error.png") });

  // The right key.
  await form.getByLabel("Private key").setInputFiles(join(dir, "root.key"));
  await form.getByRole("button", { name: "Join" }).click();
  await page.locator('[data-mesh="demo"]').getByText("connected", { exact: true }).waitFor();
  await page.locator("#status.ok").waitFor();
  await page.screenshot({ path: join(shots, "meshes.png") });

  // Endpoints: A and B online.
  await page.getByRole("tab", { name: "Endpoints" }).click();
  await page.locator('[data-endpoint="a"] .online').waitFor();
  await page.locator('[data-endpoint="b"] .online').waitFor();
  await page.locator('[data-endpoint="a"]').getByText("this computer").waitFor();
  await page.screenshot({ path: join(shots, "endpoints.png") });

  // A service on B, created from A's UI.
  await page.getByRole("tab", { name: "Services" }).click();
  const svc = page.locator("#service-form");
  await svc.getByLabel("On endpoint").selectOption({ label: "b" });
  await svc.getByLabel("Name").fill("web");
  await svc.getByLabel("Host").fill("127.0.0.1");
  await svc.getByLabel("Port").fill(String(webPort));
  await svc.getByRole("button", { name: "Create service" }).click();
  await page.locator('[data-service="tcp/web"][data-provider="b"]').waitFor();
  await page.screenshot({ path: join(shots, "services.png") });

  // A port on A to it; the test's own HTTP request goes through the tunnel.
  await page.getByRole("tab", { name: "Ports" }).click();
  const pf = page.locator("#port-form");
  await pf.getByLabel("Service").selectOption("tcp/web");
  await pf.getByLabel("Listen port").fill(String(mapPort));
  await pf.getByRole("button", { name: "Map port" }).click();
  const row = page.locator(`[data-port="127.0.0.1:${mapPort}/tcp"]`);
  await row.getByText("open", { exact: true }).waitFor();
  let reply;
  await until("a reply through the tunnel", async () => { reply = await get(mapPort); return reply.status === 200; });
  assert.equal(reply.body, "hello from behind B\n");
  await page.screenshot({ path: join(shots, "ports.png") });

  // Delete the port, then the service; both disappear.
  await row.getByRole("button", { name: /Delete port/ }).click();
  await row.waitFor({ state: "detached" });
  await assert.rejects(get(mapPort), "the port is closed");
  await page.getByRole("tab", { name: "Services" }).click();
  const svcRow = page.locator('[data-service="tcp/web"][data-provider="b"]');
  await svcRow.getByRole("button", { name: /Delete tcp\/web on b/ }).click();
  await svcRow.waitFor({ state: "detached" });
  assert.equal(JSON.parse(await call(b, "GET", "/api/meshes/demo/endpoints/b/services")).length, 0);

  // Stopping B shows it offline without a reload.
  await page.getByRole("tab", { name: "Endpoints" }).click();
  await page.locator('[data-endpoint="b"] .online').waitFor();
  agentB.kill("SIGTERM");
  await page.locator('[data-endpoint="b"] .offline').waitFor({ timeout: 45000 });
  await page.screenshot({ path: join(shots, "endpoint-offline.png") });

  await page.getByRole("tab", { name: "Log" }).click();
  await page.locator("#log-rows li").first().waitFor();
  await page.screenshot({ path: join(shots, "log.png") });

  // A phone-sized window still shows the views.
  await page.setViewportSize({ width: 390, height: 800 });
  await page.getByRole("tab", { name: "Endpoints" }).click();
  await page.locator('[data-endpoint="a"]').waitFor();
  await page.screenshot({ path: join(shots, "phone.png") });

  assert.deepEqual(pageErrors, [], "no script errors in the page");
  for (const p of procs) assert.equal(p.exitCode === null || p === agentB, true, `${p.name} still running:\n${p.log()}`);
  const keyText = readFileSync(join(dir, "root.key"), "utf8");
  assert.ok(!(await call(a, "GET", "/api/meshes/demo")).includes(keyText.trim().split("\n")[1]), "the API never returns the key");
});

test("an agent started with a token asks for it once and keeps it for the tab", async () => {
  const port = await freePort();
  const addr = `127.0.0.1:${port}`;
  start("t", ["agent", "--listen", addr, "--database", join(dir, "t.db"), "--token", "s3cret token"]);
  await until("agent T", async () => (await get(port, "/")).status === 200);
  if (!browser) {
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"],
    });
  }
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(`http://${addr}/`);

  // The API answers 401: the token form instead of the views.
  const form = page.locator("#token-form");
  await form.waitFor();
  assert.equal(await page.locator("main").isHidden(), true);
  await form.getByLabel("API token").fill("wrong");
  await form.getByRole("button", { name: "Continue" }).click();
  await form.locator("[data-error]").filter({ hasText: /refused this token/ }).waitFor();

  // The right one: the views, and it is sent with every request from then on.
  await form.getByLabel("API token").fill("s3cret token");
  await form.getByRole("button", { name: "Continue" }).click();
  await page.getByText("has not joined a mesh yet").waitFor();
  await form.waitFor({ state: "hidden" });
  await page.getByRole("tab", { name: "Log" }).click();
  await page.reload();
  await page.getByText("has not joined a mesh yet").waitFor();
  assert.equal(await form.isHidden(), true, "the tab keeps the token across reloads");
  assert.equal(await page.evaluate(() => localStorage.getItem("ztm.token")), null, "never kept beyond the tab");
  assert.deepEqual(pageErrors, [], "no script errors in the page");
  await page.close();
});

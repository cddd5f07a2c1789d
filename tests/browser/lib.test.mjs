// Unit tests of the web UI's helpers (crates/agent/ui/lib.js) that need no browser: reading an
// invitation in either form, dates in words, lists asked for in pages, and byte counts.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const src = readFileSync(new URL("../../crates/agent/ui/lib.js", import.meta.url), "utf8");
const lib = await import(`data:text/javascript,${encodeURIComponent(src)}`);

const pem = (kind, body) => `-----BEGIN ${kind}-----\n${body}\n-----END ${kind}-----\n`;
const invitation = {
  ztmInvitation: 1, mesh: "home", user: "alice", hubs: ["hub.example.org:8888"],
  ca: pem("CERTIFICATE", "CA"), certificate: pem("CERTIFICATE", "ME"), privateKey: pem("PRIVATE KEY", "KEY"),
};
const json = JSON.stringify(invitation, null, 2) + "\n";
const text = `ztm-invite-1:${Buffer.from(JSON.stringify(invitation)).toString("base64url")}`;

test("both forms of an invitation read back", () => {
  const want = { mesh: "home", user: "alice", hubs: ["hub.example.org:8888"] };
  assert.deepEqual(lib.readInvitation(json), want);
  assert.deepEqual(lib.readInvitation(text), want);
  // Pasted with surrounding space, wrapped by a chat program, or with base64 padding.
  assert.deepEqual(lib.readInvitation(`  ${text.replace(/(.{60})/g, "$1\n")}\n`), want);
  assert.deepEqual(lib.readInvitation(`${text}==`), want);
});

test("a damaged invitation says what is wrong with it", () => {
  const cases = [
    ["", /empty/],
    ["hello", /not a ZTM invitation/],
    ['{"some": "json"}', /not a ZTM invitation/],
    ["ztm-invite-1:!!!", /cut off or damaged/],
    [json.replace('"ztmInvitation": 1', '"ztmInvitation": 2'), /version 2/],
    [json.replace('"user": "alice"', '"user": ""'), /no user/],
    [json.replace('"hub.example.org:8888"', ""), /no hub address/],
    ["x".repeat(64 * 1024 + 1), /too large/],
  ];
  for (const [input, want] of cases) assert.throws(() => lib.readInvitation(input), want, input.slice(0, 60));
  for (const cut of [15, Math.floor(text.length / 2), text.length - 3]) {
    assert.throws(() => lib.readInvitation(text.slice(0, cut)), /cut off or damaged/, `text cut at ${cut}`);
  }
  for (const cut of [5, Math.floor(json.length / 2), json.length - 3]) {
    assert.throws(() => lib.readInvitation(json.slice(0, cut)), /cut off or damaged/, `file cut at ${cut}`);
  }
});

test("dates as the agent writes them, and how far they are", () => {
  const now = 1_800_000_000_000; // 2027-01-15 08:00 UTC
  const day = 24 * 3600 * 1000;
  assert.equal(lib.isoDate(now), "2027-01-15");
  assert.equal(lib.isoDate(951_782_400_000), "2000-02-29");
  assert.equal(lib.daysFrom(now + 30 * day, now), "in 30 days");
  assert.equal(lib.daysFrom(now + 1, now), "in 1 day");
  assert.equal(lib.daysFrom(now + 365 * day, now), "in 12 months");
  assert.equal(lib.daysFrom(now + 5 * 365 * day, now), "in 5 years");
  assert.equal(lib.daysFrom(now - 1000, now), "today");
  assert.equal(lib.daysFrom(now - 3 * day, now), "3 days ago");
});

// The agent as `fetch` sees it: answers `body` with these headers, and keeps the requests.
function fakeAgent(status, body, headers = {}) {
  const asked = [];
  globalThis.sessionStorage = { getItem: () => null };
  globalThis.fetch = async (path, init) => {
    asked.push({ path, init });
    return new Response(body === undefined ? "" : JSON.stringify(body), { status, headers });
  };
  return asked;
}

test("the path of a page always has a limit, and leaves empty parts out", () => {
  const path = "/api/meshes/home/services";
  assert.equal(lib.PAGE, 100);
  assert.equal(lib.pagePath(path), `${path}?limit=100`);
  assert.equal(lib.pagePath(path, { offset: 200, limit: 50 }), `${path}?offset=200&limit=50`);
  assert.equal(lib.pagePath(path, { q: "  ", offset: 0 }), `${path}?limit=100`);
  // A search is sent as typed (trimmed), encoded so that the agent reads it back.
  const withSearch = new URL(lib.pagePath(path, { q: " Office PC&x=1 ", offset: 100 }), "http://agent");
  assert.equal(withSearch.searchParams.get("q"), "Office PC&x=1");
  assert.equal(withSearch.searchParams.get("offset"), "100");
  assert.equal(withSearch.searchParams.get("limit"), "100");
  assert.deepEqual([...withSearch.searchParams.keys()], ["q", "offset", "limit"]);
});

test("a page of a list reads how many match in all from ztm-total", async () => {
  const items = [{ name: "a" }, { name: "b" }];
  const asked = fakeAgent(200, items, { "ztm-total": "150" });
  assert.deepEqual(await lib.apiPage("/api/meshes/m/endpoints", { q: "a", offset: 100 }), { items, total: 150 });
  assert.equal(asked.length, 1);
  assert.equal(asked[0].path, "/api/meshes/m/endpoints?q=a&offset=100&limit=100");
  assert.equal(asked[0].init.method, "GET");

  // Without the header (an agent that sends whole lists), the total is what came.
  fakeAgent(200, items);
  assert.deepEqual(await lib.apiPage("/api/meshes/m/endpoints", { offset: 100 }), { items, total: 102 });
  fakeAgent(200, [], { "ztm-total": "not a number" });
  assert.deepEqual(await lib.apiPage("/api/meshes/m/services"), { items: [], total: 0 });
});

test("a refused page is an error with the agent's message and status", async () => {
  fakeAgent(400, { status: 400, message: "limit: give 1 to 10000" });
  await assert.rejects(lib.apiPage("/api/meshes/m/services", { limit: 0 }), (e) => {
    assert.equal(e.message, "limit: give 1 to 10000");
    assert.equal(e.status, 400);
    return true;
  });
  fakeAgent(404, { status: 404, message: "no service tcp/x in mesh m" });
  await assert.rejects(lib.api("GET", "/api/meshes/m/services/tcp/x"), { status: 404, message: "no service tcp/x in mesh m" });
});

test("which rows a page shows, in words", () => {
  assert.equal(lib.pageLabel("services", 0, 100, 150), "Services 1–100 of 150");
  assert.equal(lib.pageLabel("services", 100, 50, 150), "Services 101–150 of 150");
  assert.equal(lib.pageLabel("endpoints", 0, 3, 3), "Endpoints 1–3 of 3");
  assert.equal(lib.pageLabel("endpoints", 0, 0, 0), "No endpoints");
  assert.equal(lib.pageLabel("services", 200, 0, 150), "Services: none here of 150");
});

test("a debounced call waits for the input to pause, and takes the last arguments", () => {
  mock.timers.enable({ apis: ["setTimeout"] });
  try {
    const calls = [];
    const typed = lib.debounce((q) => calls.push(q), 250);
    typed("b");
    mock.timers.tick(100);
    typed("bu");
    mock.timers.tick(200);
    typed("bul");
    assert.deepEqual(calls, []);
    mock.timers.tick(250);
    assert.deepEqual(calls, ["bul"]);
    typed("bulk");
    mock.timers.tick(250);
    assert.deepEqual(calls, ["bul", "bulk"]);
  } finally {
    mock.timers.reset();
  }
});

test("byte counts read as people write them", () => {
  const cases = [
    [0, "0 B"],
    [1023, "1023 B"],
    [1024, "1.0 KiB"],
    [1536, "1.5 KiB"],
    [102348, "99.9 KiB"],
    [102400, "100 KiB"],
    [1047552, "1023 KiB"],
    // 1023.5 KiB would show as 1024 KiB: the next unit instead.
    [1048064, "1.0 MiB"],
    [1.2 * 1024 * 1024, "1.2 MiB"],
    [4 * 2 ** 30, "4.0 GiB"],
    [800 * 2 ** 30, "800 GiB"],
    [2 ** 64, "16.0 EiB"],
  ];
  for (const [n, want] of cases) assert.equal(lib.formatBytes(n), want, String(n));
  for (const bad of [undefined, null, "12", -1, NaN, Infinity]) assert.equal(lib.formatBytes(bad), "–", String(bad));
});

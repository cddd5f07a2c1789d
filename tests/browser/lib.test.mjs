// Unit tests of the web UI's helpers (crates/agent/ui/lib.js) that need no browser: reading an
// invitation in either form, and dates in words.
import { test } from "node:test";
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

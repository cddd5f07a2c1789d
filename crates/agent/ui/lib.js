// Small helpers for the UI: the API client (errors become Error with the agent's message and
// status), lists asked for in pages, element creation with text-only content, and file reading.

// An agent started with --token answers API requests only with it. The UI asks for it once
// and keeps it for this browser tab only.
const TOKEN_KEY = "ztm.token";

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// The agent asks for its API token (none was given, or the one given is wrong).
export class TokenRequired extends Error {
  constructor(message, hadToken) {
    super(message);
    this.hadToken = hadToken;
  }
}

// One request to the agent: its answer's JSON (null when empty) and the response.
async function request(method, path, body) {
  const init = { method, headers: {} };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new Error(`cannot reach the agent (${e.message})`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  // Only the agent's own refusal carries the challenge (a far endpoint's 401 does not).
  if (resp.status === 401 && /^Bearer/.test(resp.headers.get("WWW-Authenticate") || "")) {
    throw new TokenRequired((data && data.message) || "this agent requires its API token", Boolean(token));
  }
  if (!resp.ok) {
    const e = new Error((data && data.message) || `${resp.status} ${resp.statusText}`);
    e.status = resp.status;
    throw e;
  }
  return { data, resp };
}

export async function api(method, path, body) {
  return (await request(method, path, body)).data;
}

// ---- lists in pages -----------------------------------------------------------

// Rows a page of a list shows, and options a picker offers.
export const PAGE = 100;

// The path of a part of a list (`/api/meshes/{mesh}/endpoints` or `/services`): what matches
// the search `q` (ignoring case, in names, users and ids), from `offset`, at most `limit`.
// Always with a limit: a list of the whole mesh may be long.
export function pagePath(path, { q = "", offset = 0, limit = PAGE } = {}) {
  const params = new URLSearchParams();
  const search = String(q || "").trim();
  if (search) params.set("q", search);
  if (offset > 0) params.set("offset", String(offset));
  params.set("limit", String(limit));
  return `${path}?${params}`;
}

// A part of a list: `{items, total}`, where `total` is how many items match in all (the
// agent's `ztm-total` header).
export async function apiPage(path, { q = "", offset = 0, limit = PAGE } = {}) {
  const { data, resp } = await request("GET", pagePath(path, { q, offset, limit }));
  const items = Array.isArray(data) ? data : [];
  const header = (resp.headers.get("ztm-total") || "").trim();
  const total = /^\d+$/.test(header) ? Number(header) : offset + items.length;
  return { items, total };
}

// Which rows of a list a page shows, in words: "Services 101–150 of 150", "No services".
export function pageLabel(noun, offset, count, total) {
  if (!total) return `No ${noun}`;
  const Noun = noun[0].toUpperCase() + noun.slice(1);
  if (!count) return `${Noun}: none here of ${total}`;
  return `${Noun} ${offset + 1}–${offset + count} of ${total}`;
}

// `fn` called once input has paused for `ms`, with the last arguments.
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

export function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of [].concat(children)) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Makes `parent`'s children look like `children`, changing only what differs: a node already
// drawn that is of the same kind as its new one is kept and brought up to date. So a refresh
// leaves keyboard focus, an open drop-down and a click between mouse down and up where they
// were. Click handlers are set as `onclick`, which a kept node takes from its new one.
export function fill(parent, children) {
  patchChildren(parent, children.filter(Boolean).map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}

function patchChildren(parent, next) {
  const old = [...parent.childNodes];
  next.forEach((n, i) => {
    const o = old[i];
    if (!o) parent.append(n);
    else if (!patch(o, n)) parent.replaceChild(n, o);
  });
  for (const o of old.slice(next.length)) o.remove();
}

// Turns the drawn node `o` into `n` in place; false when it is another kind of node.
function patch(o, n) {
  if (o.nodeType !== n.nodeType || o.nodeName !== n.nodeName) return false;
  // An option is the choice it stands for, selected or not: another choice is another option.
  if (o.nodeName === "OPTION" && !o.isEqualNode(n)) return false;
  if (o.nodeType !== Node.ELEMENT_NODE) {
    if (o.nodeValue !== n.nodeValue) o.nodeValue = n.nodeValue;
    return true;
  }
  for (const a of [...o.attributes]) if (!n.hasAttribute(a.name)) o.removeAttribute(a.name);
  for (const a of n.attributes) if (o.getAttribute(a.name) !== a.value) o.setAttribute(a.name, a.value);
  if (o.onclick !== n.onclick) o.onclick = n.onclick;
  patchChildren(o, [...n.childNodes]);
  return true;
}

export function formError(form, message) {
  const p = form.querySelector("[data-error]");
  if (p) p.textContent = message;
}

export function readFile(input) {
  const file = input.files && input.files[0];
  if (!file) return Promise.reject(new Error(`choose a file for "${input.name}"`));
  if (file.size > 64 * 1024) return Promise.reject(new Error(`${file.name} is too large to be a PEM file`));
  return file.text();
}

// ---- invitations ------------------------------------------------------------

// The one-line form of an invitation starts with this; the rest is its JSON in URL-safe
// base64 without padding (crates/proto/src/invite.rs).
const INVITE_PREFIX = "ztm-invite-1:";
const INVITE_MAX = 64 * 1024;

// Reads what the UI shows of an invitation (its mesh, user and hubs) from either form, or
// throws an Error saying in words what is wrong with it. The agent checks the certificates
// and the key when it joins with it.
export function readInvitation(input) {
  const text = String(input || "").trim();
  if (!text) throw new Error("the invitation is empty");
  if (text.length > INVITE_MAX) throw new Error("this is too large to be a ZTM invitation");
  let json;
  if (text.startsWith(INVITE_PREFIX)) {
    const b64 = text.slice(INVITE_PREFIX.length).replace(/\s+/g, "").replace(/=+$/, "");
    if (!/^[A-Za-z0-9_\-]*$/.test(b64) || b64.length % 4 === 1) {
      throw new Error("the invitation text is cut off or damaged (its base64 does not decode)");
    }
    try {
      const std = b64.replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(std + "=".repeat((4 - (std.length % 4)) % 4)), (c) => c.charCodeAt(0));
      json = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw new Error("the invitation text is cut off or damaged (its base64 does not decode)");
    }
  } else if (text.startsWith("{")) {
    json = text;
  } else {
    throw new Error(`this is not a ZTM invitation (it is neither the invitation file nor a line starting with ${INVITE_PREFIX})`);
  }
  let inv;
  try { inv = JSON.parse(json); } catch { throw new Error("the invitation is cut off or damaged (its JSON is incomplete)"); }
  if (!inv || typeof inv !== "object" || typeof inv.ztmInvitation !== "number") {
    throw new Error("this is not a ZTM invitation (its JSON has no ztmInvitation version)");
  }
  if (inv.ztmInvitation !== 1) throw new Error(`the invitation is of version ${inv.ztmInvitation}; this agent reads version 1`);
  for (const [field, what] of [["mesh", "mesh name"], ["user", "user"], ["ca", "CA certificate"], ["certificate", "certificate"], ["privateKey", "private key"]]) {
    if (typeof inv[field] !== "string" || !inv[field].trim()) throw new Error(`the invitation has no ${what}`);
  }
  const hubs = Array.isArray(inv.hubs) ? inv.hubs.filter((h) => typeof h === "string" && h.trim()) : [];
  if (!hubs.length) throw new Error("the invitation has no hub address");
  return { mesh: inv.mesh, user: inv.user, hubs };
}

// ---- figures ------------------------------------------------------------------

const BYTE_UNITS = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

// A byte count for people: "512 B", "1.5 KiB", "12.3 MiB", "800 GiB" (units of 1024; one
// decimal below 100). Counts that are not numbers show as "–".
export function formatBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n) || n < 0) return "–";
  if (n < 1024) return `${Math.floor(n)} B`;
  let value = n / 1024;
  let unit = 0;
  // Rounded as shown, a value must stay below 1024 of its unit.
  while (value >= 1023.5 && unit + 1 < BYTE_UNITS.length) {
    value /= 1024;
    unit += 1;
  }
  return `${value < 99.95 ? value.toFixed(1) : value.toFixed(0)} ${BYTE_UNITS[unit]}`;
}

// ---- dates --------------------------------------------------------------------

const DAY_MS = 24 * 3600 * 1000;

// A date as the agent writes it in its messages: YYYY-MM-DD, in UTC.
export function isoDate(ms) {
  return new Date(ms).toISOString().slice(0, 10);
}

// How far a time is from now, in words: "in 12 days", "in 11 months", "in 5 years", "today",
// "3 days ago".
export function daysFrom(ms, now = Date.now()) {
  const span = (days) => {
    if (days <= 60) return days === 1 ? "1 day" : `${days} days`;
    if (days < 730) return `${Math.round(days / 30.44)} months`;
    return `${Math.round(days / 365.25)} years`;
  };
  if (ms > now) return `in ${span(Math.ceil((ms - now) / DAY_MS))}`;
  const days = Math.floor((now - ms) / DAY_MS);
  return days === 0 ? "today" : `${span(days)} ago`;
}

// Small helpers for the UI: the API client (errors become Error with the agent's message),
// element creation with text-only content, and file reading.

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

export async function api(method, path, body) {
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
    throw new Error((data && data.message) || `${resp.status} ${resp.statusText}`);
  }
  return data;
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

export function fill(parent, children) {
  parent.replaceChildren(...children.filter(Boolean));
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

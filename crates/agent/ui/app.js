// The agent's web UI: talks only to the agent's REST API (same origin) and refreshes the
// visible view every two seconds. Data is always inserted as text, never as HTML. A mesh may
// hold many thousands of endpoints and services: the UI asks only for the page of a list it
// shows and for at most PAGE options of each picker, never for a whole list.

import {
  api, apiPage, daysFrom, debounce, el, fill, formatBytes, formError, isoDate, PAGE, pageLabel, readFile,
  readInvitation, setToken, TokenRequired,
} from "/ui/lib.js";

const REFRESH_MS = 2000;
// How long typing in a search box or a picker's filter pauses before the agent is asked.
const SEARCH_MS = 250;
const state = { view: "meshes", mesh: null, meshes: [] };

const $ = (sel) => document.querySelector(sel);

function meshPath() {
  return `/api/meshes/${enc(state.mesh)}`;
}

// This computer's endpoint in the chosen mesh, as its mesh record says.
function localEndpoint() {
  const m = state.meshes.find((x) => x.name === state.mesh);
  return m ? { id: m.agent.id, name: m.agent.name, username: m.agent.username, isLocal: true } : null;
}

// Names of the mesh's endpoints by id (and by id and user), from the lists and look-ups the
// UI made: a port's target shows its endpoint's name.
const names = { known: new Map(), asked: new Map() };

function learnNames(endpoints) {
  for (const e of endpoints) {
    names.known.set(e.id, e.name);
    names.known.set(`${e.id} ${e.username}`, e.name);
  }
}

function endpointName(id, user) {
  const local = localEndpoint();
  if (local && local.id === id && (!user || user === local.username)) return local.name;
  return names.known.get(user ? `${id} ${user}` : id) || id;
}

// Looks up the endpoints of `targets` ({id, user}) whose names are not known yet (a search
// for an id finds that endpoint only); one that cannot be found is looked up again after 30 s.
async function lookUpNames(targets) {
  const now = Date.now();
  const unknown = targets.filter((t) => !names.known.has(t.user ? `${t.id} ${t.user}` : t.id));
  const wanted = [...new Set(unknown.map((t) => t.id))].filter((id) => !(names.asked.get(id) > now - 30000));
  await Promise.all(wanted.map(async (id) => {
    names.asked.set(id, now);
    try {
      learnNames((await apiPage(`${meshPath()}/endpoints`, { q: id, limit: 10 })).items);
    } catch { /* shown by its id meanwhile */ }
  }));
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

// ---- meshes ---------------------------------------------------------------

function renderMeshes() {
  const list = $("#mesh-list");
  if (!state.meshes.length) {
    fill(list, [el("p", { class: "muted" }, "This computer has not joined a mesh yet. Join one below.")]);
    return;
  }
  fill(list, state.meshes.map((m) => {
    const leave = el("button", { class: "danger", type: "button" }, "Leave");
    const err = el("p", { class: "error", role: "alert" });
    leave.onclick = async () => {
      if (!confirm(`Leave mesh ${m.name}? Its services and ports on this computer are removed.`)) return;
      try {
        await api("DELETE", `/api/meshes/${enc(m.name)}`);
        await refresh();
      } catch (e) { err.textContent = e.message; }
    };
    return el("div", { class: "card mesh", "data-mesh": m.name }, [
      el("h3", {}, [m.name, el("span", { class: m.connected ? "badge online" : "badge offline" }, m.connected ? "connected" : "not connected")]),
      el("div", {}, `This computer: ${m.agent.name} (user ${m.agent.username || "?"}, id ${m.agent.id})`),
      el("div", { class: "muted" }, `Hubs: ${m.bootstraps.join(", ")}`),
      expiry("agent", "This computer's certificate", m.agent.expires),
      expiry("ca", "The CA certificate", m.caExpires),
      m.warnings && m.warnings.length ? el("ul", { class: "warnings", "aria-label": "Warnings" }, m.warnings.map((w) => el("li", {}, w.message))) : null,
      m.errors.length ? el("ul", { class: "errors", "aria-label": "Errors" }, m.errors.map((e) => el("li", {}, e.message))) : null,
      leave, err,
    ]);
  }));
}

// "This computer's certificate expires on 2027-02-14 (in 30 days)": the date in UTC, as the
// agent's own warnings write it.
function expiry(which, what, ms) {
  if (!ms) return el("div", { class: "muted", "data-expiry": which }, `${what}: expiry unknown`);
  const past = ms <= Date.now();
  return el("div", { class: past ? "expiry expired" : "expiry", "data-expiry": which }, [
    `${what} ${past ? "expired on" : "expires on"} `,
    el("time", { datetime: new Date(ms).toISOString(), title: new Date(ms).toLocaleString() }, isoDate(ms)),
    ` (${daysFrom(ms)})`,
  ]);
}

// After a join: the new mesh's card in view, the three-file form folded away.
function showJoined(mesh) {
  $("#three-files").open = false;
  const card = [...document.querySelectorAll("#mesh-list [data-mesh]")].find((c) => c.dataset.mesh === mesh);
  if (card) card.scrollIntoView({ block: "nearest" });
}

// ---- joining with an invitation -------------------------------------------------

// The invitation the join form holds: its text (from the file picker, a drop or the text
// box) and where it came from, in words.
const invite = { text: "", source: "" };

function inviteForm() { return $("#invite-form"); }

// Shows what the invitation is for (and fills in its mesh name), or what is wrong with it.
function showInvitation() {
  const form = inviteForm();
  const summary = form.querySelector("[data-invitation]");
  formError(form, "");
  summary.textContent = "";
  if (!invite.text.trim()) return;
  let inv;
  try {
    inv = readInvitation(invite.text);
  } catch (e) {
    formError(form, `${invite.source}: ${e.message}.`);
    return;
  }
  form.elements.mesh.value = inv.mesh;
  const hubs = `${inv.hubs.length === 1 ? "hub" : "hubs"} ${inv.hubs.join(", ")}`;
  const taken = state.meshes.some((m) => m.name === inv.mesh)
    ? ` This computer is in a mesh named ${inv.mesh} already: leave it first, or join under another mesh name.` : "";
  summary.textContent = `${invite.source}: an invitation for user ${inv.user} to mesh ${inv.mesh}, through ${hubs}.${taken}`;
}

async function takeInvitationFile(file, how) {
  const form = inviteForm();
  form.elements.text.value = "";
  if (file.size > 64 * 1024) {
    Object.assign(invite, { text: "", source: "" });
    showInvitation();
    formError(form, `${file.name} is too large to be a ZTM invitation.`);
    return;
  }
  Object.assign(invite, { text: await file.text(), source: `${how} ${file.name}` });
  showInvitation();
}

function takeInvitationText(text) {
  const form = inviteForm();
  form.elements.file.value = "";
  Object.assign(invite, { text, source: "The pasted text" });
  showInvitation();
}

function dropped(ev) {
  const dt = ev.dataTransfer;
  if (!dt) return;
  ev.preventDefault();
  inviteForm().classList.remove("dropping");
  const form = inviteForm();
  if (dt.files && dt.files.length) {
    try { form.elements.file.files = dt.files; } catch { /* the text below still counts */ }
    takeInvitationFile(dt.files[0], "Dropped file").catch((e) => formError(form, e.message));
  } else {
    const text = dt.getData("text/plain");
    if (!text) return;
    form.elements.text.value = text;
    takeInvitationText(text);
  }
}

// The rule of names, in words, for a field whose pattern or presence check fails.
function nameProblem(input, what) {
  if (input.validity.valueMissing) return `Enter ${what}.`;
  if (!input.checkValidity()) {
    return `${what[0].toUpperCase()}${what.slice(1)} may hold only letters, digits, dot, underscore, @ and hyphen, ` +
      "must start with a letter or digit, and may be at most 64 characters long.";
  }
  return null;
}

async function joinWithInvitation(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  if (!invite.text.trim()) {
    formError(form, "Choose the invitation file, drop it on this box, or paste its text.");
    return;
  }
  try {
    readInvitation(invite.text);
  } catch (e) {
    formError(form, `${invite.source}: ${e.message}.`);
    return;
  }
  const { mesh, name } = form.elements;
  mesh.value = mesh.value.trim();
  name.value = name.value.trim();
  for (const [input, what] of [[mesh, "the mesh name"], [name, "this computer's name"]]) {
    const problem = nameProblem(input, what);
    if (problem) { formError(form, problem); input.focus(); return; }
  }
  const meshName = mesh.value;
  const button = form.querySelector('button[type="submit"]');
  button.disabled = true;
  try {
    await api("POST", `/api/meshes/${enc(meshName)}`, { invitation: invite.text, agent: { name: name.value } });
    state.mesh = meshName;
    localStorage.setItem("ztm.mesh", meshName);
    form.reset();
    Object.assign(invite, { text: "", source: "" });
    showInvitation();
    await refresh();
    showJoined(meshName);
  } catch (e) {
    formError(form, e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- joining with three files ---------------------------------------------------

async function join(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const f = new FormData(form);
  try {
    const [ca, cert, key] = await Promise.all(["ca", "cert", "key"].map((n) => readFile(form.elements[n])));
    const hubs = String(f.get("hubs")).split(/[\s,]+/).filter(Boolean);
    const mesh = String(f.get("mesh")).trim();
    await api("POST", `/api/meshes/${enc(mesh)}`, {
      ca, agent: { name: String(f.get("name")).trim(), certificate: cert, privateKey: key }, bootstraps: hubs,
    });
    state.mesh = mesh;
    localStorage.setItem("ztm.mesh", mesh);
    form.reset();
    await refresh();
    showJoined(mesh);
  } catch (e) {
    formError(form, e.message);
  }
}

// ---- lists in pages ------------------------------------------------------------

// The endpoints and services views show one page of their list: what matches their search
// box, from `offset`, at most PAGE items; `total` is how many match in all.
const lists = {
  endpoints: { q: "", offset: 0, total: 0, shown: 0, render: (items) => renderEndpoints(items) },
  services: { q: "", offset: 0, total: 0, shown: 0, render: (items) => renderServices(items) },
};

async function loadList(name) {
  const list = lists[name];
  const { q, offset } = list;
  const { items, total } = await apiPage(`${meshPath()}/${name}`, { q, offset, limit: PAGE });
  if (list.q !== q || list.offset !== offset) return; // asked for another page meanwhile
  if (!items.length && offset > 0) {
    // The list became shorter than this page: its last page instead.
    list.offset = total ? Math.min(offset - PAGE, Math.floor((total - 1) / PAGE) * PAGE) : 0;
    if (list.offset < 0) list.offset = 0;
    return loadList(name);
  }
  Object.assign(list, { total, shown: items.length });
  list.render(items);
  renderPager(name);
}

function renderPager(name) {
  const { offset, total, shown } = lists[name];
  const view = $(`#view-${name}`);
  view.querySelector("[data-range]").textContent = pageLabel(name, offset, shown, total);
  const prev = view.querySelector("[data-prev]");
  const next = view.querySelector("[data-next]");
  prev.disabled = offset === 0;
  next.disabled = offset + PAGE >= total;
  // Paging only when there is more than one page.
  prev.hidden = next.hidden = offset === 0 && total <= PAGE;
}

function listControls(name) {
  const list = lists[name];
  const view = $(`#view-${name}`);
  const search = view.querySelector("[data-search]");
  const apply = () => {
    const q = search.value.trim();
    if (q === list.q) return;
    Object.assign(list, { q, offset: 0 });
    refresh();
  };
  search.addEventListener("input", debounce(apply, SEARCH_MS));
  search.addEventListener("keydown", (ev) => { if (ev.key === "Enter") apply(); });
  view.querySelector("[data-prev]").addEventListener("click", () => {
    list.offset = Math.max(0, list.offset - PAGE);
    refresh();
  });
  view.querySelector("[data-next]").addEventListener("click", () => {
    if (list.offset + PAGE >= list.total) return;
    list.offset += PAGE;
    refresh();
  });
}

// ---- pickers ------------------------------------------------------------------

// A <select> offering at most PAGE options out of a list that may be long (the mesh's
// endpoints, its services, a service's providers), with the filter input beside it: what is
// typed there narrows the options. The chosen item stays chosen, and offered, as long as it
// exists, whatever the options show; typing a filter that leaves it out chooses the first
// match instead.
class Picker {
  // `find(q)`: `{items, total}`, at most PAGE items that match `q`; `one(value)`: the chosen
  // item when `find` leaves it out, or null when it is gone; `option(item)`: its
  // `{value, text}`; `fixed`: options always offered first; `fallback()`: the option chosen
  // while nothing is (null: the first one), which needs no `one` to say it exists.
  constructor(select, { find, one, option, fixed = [], fallback = () => null }) {
    Object.assign(this, { select, find, one, option, fixed, fallback, drawn: "" });
    this.filter = select.closest(".picker").querySelector("[data-filter]");
    const filtered = () => this.load(true).catch(failed);
    this.filter.addEventListener("input", debounce(filtered, SEARCH_MS));
    // Enter in a filter filters; it does not submit the form around it.
    this.filter.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); filtered(); }
    });
  }

  // Forgets the options and the filter (another mesh is shown).
  reset() {
    this.filter.value = "";
    this.drawn = "";
    fill(this.select, this.fixed.map((o) => el("option", { value: o.value }, o.text)));
  }

  async load(filtered = false) {
    const sel = this.select;
    const q = this.filter.value.trim();
    const { items, total } = await this.find(q);
    if (q !== this.filter.value.trim()) return; // typed on: another load follows
    const options = items.map((i) => this.option(i));
    const current = sel.selectedOptions[0];
    let chosen = current ? { value: current.value, text: current.textContent } : this.fallback();
    const isChosen = (o) => Boolean(chosen) && o.value === chosen.value;
    const room = PAGE - this.fixed.length;
    const fallback = this.fallback();
    if (chosen && current && !this.fixed.some(isChosen) && !options.slice(0, room).some(isChosen)) {
      if (filtered && q && options.length) {
        chosen = options[0];
      } else if (!fallback || !isChosen(fallback)) {
        let item = chosen;
        try { item = await this.one(chosen.value); } catch { /* kept as it is */ }
        if (sel.value !== chosen.value) return; // chosen anew meanwhile
        if (item !== chosen) chosen = item ? this.option(item) : null;
      }
    }
    const kept = chosen && !this.fixed.some(isChosen) && !options.slice(0, room).some(isChosen);
    const shown = [...this.fixed, ...(kept ? [chosen] : []),
      ...options.filter((o) => !kept || !isChosen(o)).slice(0, kept ? room - 1 : room)];
    const before = sel.value;
    const drawn = JSON.stringify(shown);
    if (drawn !== this.drawn) {
      fill(sel, shown.map((o) => el("option", { value: o.value }, o.text)));
      this.drawn = drawn;
    }
    if (chosen) sel.value = chosen.value;
    else if (!shown.some((o) => o.value === before)) sel.selectedIndex = shown.length ? 0 : -1;
    const offered = shown.length - this.fixed.length - (kept ? 1 : 0);
    this.filter.title = total > offered ? `${offered} of ${total} shown: type to find others` : "";
    if (current && sel.value !== before) sel.dispatchEvent(new Event("change", { bubbles: true }));
  }
}

const pickers = {};

const endpointOption = (e) => ({ value: e.id, text: e.name + (e.isLocal ? " (this computer)" : "") });

// A picker of the mesh's endpoints; this computer is chosen at first.
function endpointPicker(select) {
  return new Picker(select, {
    find: async (q) => {
      const page = await apiPage(`${meshPath()}/endpoints`, { q, limit: PAGE });
      learnNames(page.items);
      return page;
    },
    // A search for an id finds that endpoint only.
    one: async (id) => (await apiPage(`${meshPath()}/endpoints`, { q: id, limit: 10 })).items.find((e) => e.id === id) || null,
    option: endpointOption,
    fallback: () => {
      const local = localEndpoint();
      return local ? endpointOption(local) : null;
    },
  });
}

// One service of the mesh ("tcp/web"), or null when no endpoint provides it.
async function oneService(value) {
  const at = value.indexOf("/");
  if (at < 0) return null;
  try {
    return await api("GET", `${meshPath()}/services/${enc(value.slice(0, at))}/${enc(value.slice(at + 1))}`);
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

const serviceOption = (s) => ({ value: `${s.protocol}/${s.name}`, text: `${s.protocol}/${s.name}` });

function servicePicker(select) {
  return new Picker(select, {
    find: (q) => apiPage(`${meshPath()}/services`, { q, limit: PAGE }),
    one: oneService,
    option: serviceOption,
  });
}

// The providers of the service `service` (a picker) has chosen, from that one service.
function providerPicker(select, service) {
  let providers = [];
  return new Picker(select, {
    find: async (q) => {
      const svc = service.value ? await oneService(service.value) : null;
      providers = svc ? svc.endpoints : [];
      const t = q.toLowerCase();
      const items = providers.filter((p) => !t || p.name.toLowerCase().includes(t) || p.id.includes(t));
      return { items: items.slice(0, PAGE), total: items.length };
    },
    one: async (id) => providers.find((p) => p.id === id) || null,
    option: (p) => ({ value: p.id, text: p.name }),
    fixed: [{ value: "", text: "any provider (load balanced)" }],
  });
}

// ---- endpoints ------------------------------------------------------------

function renderEndpoints(endpoints) {
  learnNames(endpoints);
  const rows = endpoints.map((e) => el("tr", { "data-endpoint": e.name }, [
    el("td", { "data-label": "Name" }, [e.name, e.isLocal ? el("span", { class: "badge" }, "this computer") : null]),
    el("td", { "data-label": "User" }, e.username),
    el("td", { "data-label": "Address" }, e.ip ? `${e.ip}:${e.port}` : ""),
    el("td", { "data-label": "Status", class: e.online ? "online" : "offline" }, e.online ? "online" : "offline"),
    el("td", { "data-label": "Last heartbeat" }, ago(e.heartbeat)),
  ]));
  fill($("#endpoint-rows"), rows.length ? rows : [el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No endpoint matches this search."))]);
}

// ---- services -------------------------------------------------------------

function renderServices(services) {
  const local = localEndpoint() || {};
  const rows = [];
  for (const s of services) {
    for (const p of s.endpoints) {
      const del = el("button", { class: "danger", type: "button", "aria-label": `Delete ${s.protocol}/${s.name} on ${p.name}` }, "Delete");
      const err = el("span", { class: "error", role: "alert" });
      del.onclick = async () => {
        try {
          await api("DELETE", `${meshPath()}/endpoints/${enc(p.id)}/services/${s.protocol}/${enc(s.name)}`);
          await refresh();
        } catch (e) { err.textContent = e.message; }
      };
      const here = s.isLocal && p.id === local.id;
      rows.push(el("tr", { "data-service": `${s.protocol}/${s.name}`, "data-provider": p.name }, [
        el("td", { "data-label": "Service" }, `${s.protocol}/${s.name}`),
        el("td", { "data-label": "Provided by" }, p.name),
        el("td", { "data-label": "Local target" }, here && s.host ? `${s.host}:${s.port}` : ""),
        el("td", { "data-label": "Allowed users" }, p.users ? p.users.join(", ") : "everyone"),
        el("td", {}, [del, err]),
      ]));
    }
  }
  const none = lists.services.q ? "No service matches this search." : "No services in this mesh yet.";
  fill($("#service-rows"), rows.length ? rows : [el("tr", {}, el("td", { colspan: "5", class: "muted" }, none))]);
}

// The target endpoints of the service the port form has chosen (and its protocol).
async function updateTargetChoices() {
  const form = $("#port-form");
  const [proto] = String(form.elements.service.value || "").split("/");
  if (proto && form.elements.proto.value !== proto) form.elements.proto.value = proto;
  await pickers.target.load();
}

async function createService(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const f = new FormData(form);
  const users = String(f.get("users") || "").split(/[\s,]+/).filter(Boolean);
  const body = { host: String(f.get("host")).trim(), port: Number(f.get("port")) };
  if (users.length) body.users = users;
  try {
    await api("POST", `${meshPath()}/endpoints/${enc(f.get("ep"))}/services/${f.get("proto")}/${enc(String(f.get("name")).trim())}`, body);
    form.elements.name.value = "";
    await refresh();
  } catch (e) {
    formError(form, e.message);
  }
}

// ---- ports ----------------------------------------------------------------

async function loadPorts() {
  const ep = $("#ports-ep").value || (localEndpoint() || {}).id;
  if (!ep) return [];
  const ports = await api("GET", `${meshPath()}/endpoints/${enc(ep)}/ports`);
  await lookUpNames(ports.filter((p) => p.target.endpoint).map((p) => ({ id: p.target.endpoint, user: p.target.user })));
  return ports;
}

function renderPorts(ports, error) {
  const ep = $("#ports-ep").value;
  const rows = ports.map((p) => {
    const del = el("button", { class: "danger", type: "button", "aria-label": `Delete port ${p.listen.ip}:${p.listen.port}/${p.protocol}` }, "Delete");
    const err = el("span", { class: "error", role: "alert" });
    del.onclick = async () => {
      try {
        await api("DELETE", `${meshPath()}/endpoints/${enc(ep)}/ports/${enc(p.listen.ip)}/${p.protocol}/${p.listen.port}`);
        await refresh();
      } catch (e) { err.textContent = e.message; }
    };
    return el("tr", { "data-port": `${p.listen.ip}:${p.listen.port}/${p.protocol}` }, [
      el("td", { "data-label": "Listen" }, `${p.listen.ip}:${p.listen.port}`),
      el("td", { "data-label": "Protocol" }, p.protocol),
      el("td", { "data-label": "Target" }, p.target.service + (p.target.endpoint ? ` @ ${endpointName(p.target.endpoint, p.target.user)}` : p.target.trust ? ` @ any of ${p.target.trust.join(", ")}` : "")),
      el("td", { "data-label": "State", class: p.open ? "online" : "offline" }, p.open ? "open" : (p.error || "closed")),
      ...portFigures(p.stats),
      el("td", {}, [del, err]),
    ]);
  });
  if (error) rows.push(el("tr", {}, el("td", { colspan: String(PORT_COLUMNS), class: "error" }, error)));
  fill($("#port-rows"), rows.length ? rows : [el("tr", {}, el("td", { colspan: String(PORT_COLUMNS), class: "muted" }, "No ports mapped on this endpoint."))]);
}

// Columns of the ports table.
const PORT_COLUMNS = 9;

// A port's live figures as table cells: connections open now (with those opened and failed
// so far), bytes each way, the last error and when. An agent that gives none shows dashes.
function portFigures(stats, [to, from] = ["To service", "From service"]) {
  const s = stats || {};
  const count = (n) => (typeof n === "number" ? String(n) : "–");
  const lastError = s.lastError
    ? [el("span", {}, s.lastError.message), el("span", { class: "muted", title: new Date(s.lastError.time).toLocaleString() }, ` (${ago(s.lastError.time)})`)]
    : "";
  return [
    el("td", { "data-label": "Active", class: "num", title: `${count(s.total)} opened, ${count(s.failed)} failed` }, [
      el("span", { "data-stat": "active" }, count(s.active)),
      el("span", { class: "muted small", "data-stat": "opened" }, ` of ${count(s.total)}`),
      s.failed ? el("span", { class: "error-count small", "data-stat": "failed" }, ` · ${s.failed} failed`) : null,
    ]),
    el("td", { "data-label": to, "data-stat": "to-service", class: "num", title: `${count(s.bytesToService)} bytes` }, formatBytes(s.bytesToService)),
    el("td", { "data-label": from, "data-stat": "from-service", class: "num", title: `${count(s.bytesFromService)} bytes` }, formatBytes(s.bytesFromService)),
    el("td", { "data-label": "Last error", "data-stat": "last-error", class: "last-error" }, lastError),
  ];
}

async function createPort(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const f = new FormData(form);
  const ep = $("#ports-ep").value;
  const [, service] = String(f.get("service") || "").split("/");
  if (!service) { formError(form, "Choose a service (create one on the Services tab first)."); return; }
  const target = { service };
  if (f.get("target")) target.endpoint = String(f.get("target"));
  const trust = String(f.get("trust") || "").split(",").map((u) => u.trim()).filter(Boolean);
  if (!target.endpoint && trust.length) target.trust = trust;
  try {
    const port = await api("POST", `${meshPath()}/endpoints/${enc(ep)}/ports/${enc(String(f.get("ip")).trim())}/${f.get("proto")}/${Number(f.get("port"))}`, { target });
    if (!port.open && port.error) formError(form, port.error);
    await refresh();
  } catch (e) {
    formError(form, e.message);
  }
}

// ---- proxies and exits -------------------------------------------------------------

// The endpoint the ports view shows (its ports, proxies and exit).
function portsEndpoint() {
  return $("#ports-ep").value || (localEndpoint() || {}).id;
}

// The exits of the mesh this user may use, as last listed (the exit picker's options).
let exitsKnown = [];

// A picker of the online exits this user may use: a searched page of PAGE from the agent.
function exitPicker(select) {
  const option = (e) => ({ value: e.id, text: `${e.name} (${e.username})` });
  return new Picker(select, {
    find: async (q) => {
      const page = await apiPage(`${meshPath()}/exits`, { q, limit: PAGE });
      exitsKnown = page.items;
      learnNames(exitsKnown);
      return page;
    },
    // An exit chosen earlier may be beyond the page shown: a search for its id finds it.
    one: async (id) => exitsKnown.find((e) => e.id === id)
      || (await apiPage(`${meshPath()}/exits`, { q: id, limit: PAGE })).items.find((e) => e.id === id)
      || null,
    option,
    fixed: [{ value: "", text: "any trusted exit" }],
  });
}

async function loadProxies(ep) {
  const proxies = await api("GET", `${meshPath()}/endpoints/${enc(ep)}/proxies`);
  await lookUpNames(proxies.filter((p) => p.exit.endpoint).map((p) => ({ id: p.exit.endpoint, user: p.exit.user })));
  return proxies;
}

// Columns of the proxies table.
const PROXY_COLUMNS = 8;

function exitText(x) {
  if (x.endpoint) return endpointName(x.endpoint, x.user) + (x.user ? ` (${x.user})` : "");
  return x.trust ? `any exit of ${x.trust.join(", ")}` : "any trusted exit";
}

function renderProxies(ep, proxies, error) {
  const rows = proxies.map((p) => {
    const where = `${p.listen.ip}:${p.listen.port}`;
    const del = el("button", { class: "danger", type: "button", "aria-label": `Delete proxy ${where}` }, "Delete");
    const err = el("span", { class: "error", role: "alert" });
    del.onclick = async () => {
      try {
        await api("DELETE", `${meshPath()}/endpoints/${enc(ep)}/proxies/${enc(p.listen.ip)}/${p.listen.port}`);
        await refresh();
      } catch (e) { err.textContent = e.message; }
    };
    return el("tr", { "data-proxy": where }, [
      el("td", { "data-label": "Listen" }, where),
      el("td", { "data-label": "Exit" }, exitText(p.exit)),
      el("td", { "data-label": "State", class: p.open ? "online" : "offline" }, p.open ? "open" : (p.error || "closed")),
      ...portFigures(p.stats, ["To destination", "From destination"]),
      el("td", {}, [del, err]),
    ]);
  });
  if (error) rows.push(el("tr", {}, el("td", { colspan: String(PROXY_COLUMNS), class: "error" }, error)));
  fill($("#proxy-rows"), rows.length ? rows : [el("tr", {}, el("td", { colspan: String(PROXY_COLUMNS), class: "muted" }, "No proxies on this endpoint."))]);
}

async function createProxy(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const f = new FormData(form);
  const ep = portsEndpoint();
  const exit = {};
  if (f.get("exit")) exit.endpoint = String(f.get("exit"));
  const trust = String(f.get("trust") || "").split(",").map((u) => u.trim()).filter(Boolean);
  if (!exit.endpoint && trust.length) exit.trust = trust;
  try {
    const proxy = await api("POST", `${meshPath()}/endpoints/${enc(ep)}/proxies/${enc(String(f.get("ip")).trim())}/${Number(f.get("port"))}`, { exit });
    if (!proxy.open && proxy.error) formError(form, proxy.error);
    await refresh();
  } catch (e) {
    formError(form, e.message);
  }
}

// The exit of the shown endpoint: null when it is not one. `exitShown` is what the form was
// last filled with, so that a refresh does not undo what is being typed.
let exitShown = { ep: null, text: null };

async function loadExit(ep) {
  try {
    return await api("GET", `${meshPath()}/endpoints/${enc(ep)}/exit`);
  } catch (e) {
    if (e.status === 404) return null;
    throw e;
  }
}

function renderExit(ep, exit, error) {
  const box = $("#exit-state");
  const form = $("#exit-form");
  const name = endpointName(ep);
  if (error) {
    fill(box, [el("p", { class: "error" }, error)]);
    return;
  }
  if (!exit) {
    fill(box, [el("p", { "data-exit": "none" }, `${name} is not an exit.`)]);
  } else {
    fill(box, [
      el("p", { "data-exit": "yes" }, [el("span", { class: "online" }, `${name} is an exit`), " to:"]),
      el("ul", { class: "rules", "aria-label": "Allowed destinations" }, exit.allow.map((r) => el("li", {}, el("code", {}, r)))),
      el("p", { "data-exit-users": "" }, `Users: ${exit.users ? exit.users.join(", ") : "everyone"}`),
    ]);
  }
  form.querySelector("h3").textContent = exit ? `Change ${name}'s exit` : `Make ${name} an exit`;
  form.querySelector("[data-stop-exit]").hidden = !exit;
  // The form takes what the agent has when another endpoint is shown or the exit changed,
  // unless it is being edited.
  const text = JSON.stringify(exit);
  const editing = form.contains(document.activeElement) && exitShown.ep === ep;
  if (!editing && (exitShown.ep !== ep || exitShown.text !== text)) {
    form.elements.allow.value = exit ? exit.allow.join("\n") : "";
    form.elements.users.value = exit && exit.users ? exit.users.join(", ") : "";
    exitShown = { ep, text };
  }
}

async function saveExit(ev) {
  ev.preventDefault();
  const form = ev.target;
  formError(form, "");
  const f = new FormData(form);
  const allow = String(f.get("allow") || "").split("\n").map((r) => r.trim()).filter(Boolean);
  const users = String(f.get("users") || "").split(/[\s,]+/).filter(Boolean);
  const body = { allow };
  if (users.length) body.users = users;
  try {
    await api("POST", `${meshPath()}/endpoints/${enc(portsEndpoint())}/exit`, body);
    exitShown = { ep: null, text: null };
    await refresh();
  } catch (e) {
    formError(form, e.message);
  }
}

async function stopExit() {
  const form = $("#exit-form");
  formError(form, "");
  const ep = portsEndpoint();
  if (!confirm(`Stop ${endpointName(ep)} being an exit? Proxies using it lose it.`)) return;
  try {
    await api("DELETE", `${meshPath()}/endpoints/${enc(ep)}/exit`);
    exitShown = { ep: null, text: null };
    await refresh();
  } catch (e) {
    formError(form, e.message);
  }
}

// ---- log ------------------------------------------------------------------

function renderLog(entries) {
  fill($("#log-rows"), entries.slice().reverse().map((e) => el("li", { class: e.type === "error" ? "error" : "" },
    `${new Date(e.time).toLocaleString()}  ${e.type}  ${e.message}`)));
}

// ---- plumbing ---------------------------------------------------------------

function enc(s) { return encodeURIComponent(String(s)); }

function renderHeader() {
  const sel = $("#mesh-select");
  fill(sel, state.meshes.map((m) => el("option", { value: m.name }, m.name)));
  if (state.mesh) sel.value = state.mesh;
  const m = state.meshes.find((x) => x.name === state.mesh);
  const status = $("#status");
  if (!m) { status.textContent = "no mesh joined"; status.className = "status"; return; }
  status.textContent = m.connected ? `connected to ${m.name}` : `not connected${m.errors.length ? ": " + m.errors[0].message : ""}`;
  status.className = m.connected ? "status ok" : "status bad";
}

// What was learnt of the mesh shown last; another one starts afresh.
let meshShown = null;

function forgetMesh() {
  names.known.clear();
  names.asked.clear();
  for (const [name, list] of Object.entries(lists)) {
    Object.assign(list, { q: "", offset: 0, total: 0, shown: 0 });
    $(`#view-${name} [data-search]`).value = "";
  }
  for (const p of Object.values(pickers)) p.reset();
  exitShown = { ep: null, text: null };
}

// The visible view's data: a page of its list, its pickers' options, its ports (with the
// endpoint's proxies and exit) or log.
async function loadView() {
  if (state.view === "endpoints") await loadList("endpoints");
  if (state.view === "services") await Promise.all([loadList("services"), pickers.serviceEp.load()]);
  if (state.view === "ports") {
    await Promise.all([pickers.portsEp.load(), pickers.service.load().then(updateTargetChoices)]);
    const ep = portsEndpoint();
    await Promise.all([
      (async () => { try { renderPorts(await loadPorts(), null); } catch (e) { renderPorts([], e.message); } })(),
      ep ? pickers.exit.load() : null,
      ep ? (async () => { try { renderProxies(ep, await loadProxies(ep), null); } catch (e) { renderProxies(ep, [], e.message); } })() : null,
      ep ? (async () => { try { renderExit(ep, await loadExit(ep), null); } catch (e) { renderExit(ep, null, e.message); } })() : null,
    ]);
  }
  if (state.view === "log") renderLog(await api("GET", `${meshPath()}/log`));
}

function failed(e) {
  if (e instanceof TokenRequired) {
    askToken(e);
    return;
  }
  const status = $("#status");
  status.textContent = `agent unreachable: ${e.message}`;
  status.className = "status bad";
}

async function update() {
  try {
    state.meshes = await api("GET", "/api/meshes");
    askToken(null);
    if (!state.meshes.some((m) => m.name === state.mesh)) {
      const saved = localStorage.getItem("ztm.mesh");
      state.mesh = state.meshes.some((m) => m.name === saved) ? saved : (state.meshes[0] || {}).name || null;
    }
    if (state.mesh !== meshShown) {
      forgetMesh();
      meshShown = state.mesh;
    }
    renderHeader();
    renderMeshes();
    if (state.mesh) await loadView();
  } catch (e) {
    failed(e);
  }
}

// Shows what the agent has now. A call while an update runs gets another one after it (so
// that what was just done or chosen shows); the timer's calls skip while one runs.
let refreshing = null;
let again = null;
function refresh() {
  if (!refreshing) {
    refreshing = update().finally(() => { refreshing = null; });
    return refreshing;
  }
  if (!again) again = refreshing.then(() => { again = null; return refresh(); });
  return again;
}

function tick() {
  if (!refreshing) refresh();
}

// ---- API token ----------------------------------------------------------------

// Shows the token form instead of the views while the agent asks for its token (`refusal`),
// and the views again once it answers.
function askToken(refusal) {
  const form = $("#token-form");
  const asking = refusal !== null;
  if (!asking && form.hidden) return;
  form.hidden = !asking;
  $("main").hidden = asking;
  $("#tabs").hidden = asking;
  if (asking) {
    formError(form, refusal.hadToken ? "The agent refused this token." : "");
    const status = $("#status");
    status.textContent = "API token required";
    status.className = "status bad";
  }
}

async function submitToken(ev) {
  ev.preventDefault();
  const form = ev.target;
  setToken(String(new FormData(form).get("token") || "").trim());
  form.reset();
  await refresh();
}

function show(view) {
  state.view = view;
  for (const b of document.querySelectorAll("#tabs button")) b.setAttribute("aria-selected", String(b.dataset.view === view));
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
  $("#mesh-select").addEventListener("change", (ev) => {
    state.mesh = ev.target.value;
    localStorage.setItem("ztm.mesh", state.mesh);
    refresh();
  });
  $("#token-form").addEventListener("submit", submitToken);
  $("#join-form").addEventListener("submit", join);
  const inv = inviteForm();
  inv.addEventListener("submit", joinWithInvitation);
  inv.elements.file.addEventListener("change", () => {
    const file = inv.elements.file.files[0];
    if (file) takeInvitationFile(file, "File").catch((e) => formError(inv, e.message));
    else takeInvitationText(inv.elements.text.value);
  });
  inv.elements.text.addEventListener("input", () => takeInvitationText(inv.elements.text.value));
  inv.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
    inv.classList.add("dropping");
  });
  inv.addEventListener("dragleave", (ev) => { if (!inv.contains(ev.relatedTarget)) inv.classList.remove("dropping"); });
  inv.addEventListener("drop", dropped);
  // A file dropped anywhere else is not opened by the browser (an invitation holds a key).
  document.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    if (ev.dataTransfer && !inv.contains(ev.target)) ev.dataTransfer.dropEffect = "none";
  });
  document.addEventListener("drop", (ev) => ev.preventDefault());
  listControls("endpoints");
  listControls("services");
  const portForm = $("#port-form");
  pickers.serviceEp = endpointPicker($("#service-form").elements.ep);
  pickers.portsEp = endpointPicker($("#ports-ep"));
  pickers.service = servicePicker(portForm.elements.service);
  pickers.target = providerPicker(portForm.elements.target, portForm.elements.service);
  $("#service-form").addEventListener("submit", createService);
  portForm.addEventListener("submit", createPort);
  pickers.exit = exitPicker($("#proxy-form").elements.exit);
  $("#proxy-form").addEventListener("submit", createProxy);
  $("#exit-form").addEventListener("submit", saveExit);
  $("#exit-form [data-stop-exit]").addEventListener("click", stopExit);
  portForm.elements.service.addEventListener("change", () => updateTargetChoices().catch(failed));
  $("#ports-ep").addEventListener("change", () => refresh());
  const hash = location.hash.slice(1);
  show(["meshes", "endpoints", "services", "ports", "log"].includes(hash) ? hash : "meshes");
  setInterval(tick, REFRESH_MS);
});

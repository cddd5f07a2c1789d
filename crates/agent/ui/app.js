// The agent's web UI: talks only to the agent's REST API (same origin) and refreshes the
// visible view every two seconds. Data is always inserted as text, never as HTML.

import { api, daysFrom, el, fill, formError, isoDate, readFile, readInvitation, setToken, TokenRequired } from "/ui/lib.js";

const REFRESH_MS = 2000;
const state = { view: "meshes", mesh: null, meshes: [], endpoints: [], services: [] };

const $ = (sel) => document.querySelector(sel);

function localEndpoint() {
  return state.endpoints.find((e) => e.isLocal);
}

function endpointName(id, user) {
  const e = state.endpoints.find((x) => x.id === id && (!user || x.username === user));
  return e ? e.name : id;
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
    leave.addEventListener("click", async () => {
      if (!confirm(`Leave mesh ${m.name}? Its services and ports on this computer are removed.`)) return;
      try {
        await api("DELETE", `/api/meshes/${enc(m.name)}`);
        await refresh();
      } catch (e) { err.textContent = e.message; }
    });
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

// ---- endpoints ------------------------------------------------------------

function renderEndpoints() {
  fill($("#endpoint-rows"), state.endpoints.map((e) => el("tr", { "data-endpoint": e.name }, [
    el("td", { "data-label": "Name" }, [e.name, e.isLocal ? el("span", { class: "badge" }, "this computer") : null]),
    el("td", { "data-label": "User" }, e.username),
    el("td", { "data-label": "Address" }, e.ip ? `${e.ip}:${e.port}` : ""),
    el("td", { "data-label": "Status", class: e.online ? "online" : "offline" }, e.online ? "online" : "offline"),
    el("td", { "data-label": "Last heartbeat" }, ago(e.heartbeat)),
  ])));
  for (const sel of document.querySelectorAll("select[data-endpoints]")) {
    const keep = sel.value;
    fill(sel, state.endpoints.map((e) => el("option", { value: e.id }, e.name + (e.isLocal ? " (this computer)" : ""))));
    sel.value = state.endpoints.some((e) => e.id === keep) ? keep : (localEndpoint() || {}).id || "";
  }
}

// ---- services -------------------------------------------------------------

function renderServices() {
  const rows = [];
  for (const s of state.services) {
    for (const p of s.endpoints) {
      const del = el("button", { class: "danger", type: "button", "aria-label": `Delete ${s.protocol}/${s.name} on ${p.name}` }, "Delete");
      const err = el("span", { class: "error", role: "alert" });
      del.addEventListener("click", async () => {
        try {
          await api("DELETE", `/api/meshes/${enc(state.mesh)}/endpoints/${enc(p.id)}/services/${s.protocol}/${enc(s.name)}`);
          await refresh();
        } catch (e) { err.textContent = e.message; }
      });
      const local = s.isLocal && p.id === (localEndpoint() || {}).id;
      rows.push(el("tr", { "data-service": `${s.protocol}/${s.name}`, "data-provider": p.name }, [
        el("td", { "data-label": "Service" }, `${s.protocol}/${s.name}`),
        el("td", { "data-label": "Provided by" }, p.name),
        el("td", { "data-label": "Local target" }, local && s.host ? `${s.host}:${s.port}` : ""),
        el("td", { "data-label": "Allowed users" }, p.users ? p.users.join(", ") : "everyone"),
        el("td", {}, [del, err]),
      ]));
    }
  }
  fill($("#service-rows"), rows.length ? rows : [el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No services in this mesh yet."))]);
  for (const sel of document.querySelectorAll("select[data-services]")) {
    const keep = sel.value;
    fill(sel, state.services.map((s) => el("option", { value: `${s.protocol}/${s.name}` }, `${s.protocol}/${s.name}`)));
    if (keep) sel.value = keep;
  }
  updateTargetChoices();
}

function updateTargetChoices() {
  const form = $("#port-form");
  const [proto, name] = String(form.elements.service.value || "").split("/");
  const svc = state.services.find((s) => s.protocol === proto && s.name === name);
  const target = form.elements.target;
  const keep = target.value;
  fill(target, [el("option", { value: "" }, "any provider (load balanced)"),
    ...(svc ? svc.endpoints : []).map((p) => el("option", { value: p.id }, p.name))]);
  target.value = keep;
  if (svc && form.elements.proto.value !== proto) form.elements.proto.value = proto;
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
    await api("POST", `/api/meshes/${enc(state.mesh)}/endpoints/${enc(f.get("ep"))}/services/${f.get("proto")}/${enc(String(f.get("name")).trim())}`, body);
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
  return api("GET", `/api/meshes/${enc(state.mesh)}/endpoints/${enc(ep)}/ports`);
}

function renderPorts(ports, error) {
  const ep = $("#ports-ep").value;
  const rows = ports.map((p) => {
    const del = el("button", { class: "danger", type: "button", "aria-label": `Delete port ${p.listen.ip}:${p.listen.port}/${p.protocol}` }, "Delete");
    const err = el("span", { class: "error", role: "alert" });
    del.addEventListener("click", async () => {
      try {
        await api("DELETE", `/api/meshes/${enc(state.mesh)}/endpoints/${enc(ep)}/ports/${enc(p.listen.ip)}/${p.protocol}/${p.listen.port}`);
        await refresh();
      } catch (e) { err.textContent = e.message; }
    });
    return el("tr", { "data-port": `${p.listen.ip}:${p.listen.port}/${p.protocol}` }, [
      el("td", { "data-label": "Listen" }, `${p.listen.ip}:${p.listen.port}`),
      el("td", { "data-label": "Protocol" }, p.protocol),
      el("td", { "data-label": "Target" }, p.target.service + (p.target.endpoint ? ` @ ${endpointName(p.target.endpoint, p.target.user)}` : p.target.trust ? ` @ any of ${p.target.trust.join(", ")}` : "")),
      el("td", { "data-label": "State", class: p.open ? "online" : "offline" }, p.open ? "open" : (p.error || "closed")),
      el("td", {}, [del, err]),
    ]);
  });
  if (error) rows.push(el("tr", {}, el("td", { colspan: "5", class: "error" }, error)));
  fill($("#port-rows"), rows.length ? rows : [el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No ports mapped on this endpoint."))]);
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
    const port = await api("POST", `/api/meshes/${enc(state.mesh)}/endpoints/${enc(ep)}/ports/${enc(String(f.get("ip")).trim())}/${f.get("proto")}/${Number(f.get("port"))}`, { target });
    if (!port.open && port.error) formError(form, port.error);
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

let refreshing = null;
async function refresh() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    try {
      state.meshes = await api("GET", "/api/meshes");
      askToken(null);
      if (!state.meshes.some((m) => m.name === state.mesh)) {
        const saved = localStorage.getItem("ztm.mesh");
        state.mesh = state.meshes.some((m) => m.name === saved) ? saved : (state.meshes[0] || {}).name || null;
      }
      renderHeader();
      renderMeshes();
      if (!state.mesh) return;
      const m = enc(state.mesh);
      if (state.view !== "meshes" && state.view !== "log") {
        [state.endpoints, state.services] = await Promise.all([api("GET", `/api/meshes/${m}/endpoints`), api("GET", `/api/meshes/${m}/services`)]);
        renderEndpoints();
        renderServices();
      }
      if (state.view === "ports") {
        try { renderPorts(await loadPorts(), null); } catch (e) { renderPorts([], e.message); }
      }
      if (state.view === "log") renderLog(await api("GET", `/api/meshes/${m}/log`));
    } catch (e) {
      if (e instanceof TokenRequired) {
        askToken(e);
        return;
      }
      const status = $("#status");
      status.textContent = `agent unreachable: ${e.message}`;
      status.className = "status bad";
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
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
  $("#service-form").addEventListener("submit", createService);
  $("#port-form").addEventListener("submit", createPort);
  $("#port-form").elements.service.addEventListener("change", updateTargetChoices);
  $("#ports-ep").addEventListener("change", () => refresh());
  const hash = location.hash.slice(1);
  show(["meshes", "endpoints", "services", "ports", "log"].includes(hash) ? hash : "meshes");
  setInterval(refresh, REFRESH_MS);
});

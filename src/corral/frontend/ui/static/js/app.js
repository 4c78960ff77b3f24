// The dashboard shell: hash routing, the 2 s poll of the visible page, sign-in, errors, actions.

import { api, ApiError, credential } from "./api.js";
import { confirmAction } from "./dialogs.js";
import { h } from "./dom.js";
import backends from "./pages/backends.js";
import events from "./pages/events.js";
import keys from "./pages/keys.js";
import models from "./pages/models.js";
import nodes from "./pages/nodes.js";
import overview from "./pages/overview.js";
import replicas from "./pages/replicas.js";
import usage from "./pages/usage.js";

const PAGES = { overview, nodes, models, replicas, backends, events, usage, keys };
const POLL_MS = 2000;

const $ = (id) => document.getElementById(id);

const app = {
  id: null, // the visible page
  data: null, // its latest data
  timer: 0,
  seq: 0, // bumps on every fetch; an older answer is dropped
  signingIn: false,
  states: {}, // per page: what its toolbar holds (filters, ranges)
};

function pageId() {
  const id = location.hash.replace(/^#\/?/, "").split("/")[0];
  return Object.hasOwn(PAGES, id) ? id : "overview";
}

/** What a page gets: the API, its own state, and ways to act and refresh. */
function context(id) {
  app.states[id] ||= {};
  return {
    api,
    state: app.states[id],
    signedIn: () => Boolean(credential.get()),
    useKey,
    refresh: () => tick(),
    rerender: () => app.data && render(app.data),
    act,
  };
}

/** Run an operator action (after a confirmation when `confirm` is given), then refresh. */
async function act(run, confirm) {
  if (confirm && !(await confirmAction(confirm.title, confirm.message, confirm.label)))
    return false;
  try {
    await run();
    showError(null);
  } catch (exc) {
    if (exc instanceof ApiError && exc.unauthorized) showLogin(exc.message);
    else showError(exc.message || String(exc));
    return false;
  }
  await tick();
  return true;
}

function show(id) {
  app.id = id;
  app.data = null;
  const page = PAGES[id];
  document.title = `${page.title} · Corral`;
  $("page-title").textContent = page.title;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === id);
    if (link.dataset.page === id) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const toolbar = page.toolbar ? page.toolbar(context(id)) : null;
  $("toolbar").replaceChildren(...(toolbar ? [toolbar] : []));
  $("content").replaceChildren(h("p", { class: "muted" }, "Loading…"));
  showError(null);
  tick();
}

function render(data) {
  const content = $("content");
  const scroll = {};
  for (const box of content.querySelectorAll("[data-key]"))
    scroll[box.dataset.key] = box.scrollLeft;
  content.replaceChildren(PAGES[app.id].render(data, context(app.id)));
  for (const box of content.querySelectorAll("[data-key]")) {
    if (scroll[box.dataset.key]) box.scrollLeft = scroll[box.dataset.key];
  }
}

async function tick() {
  clearTimeout(app.timer);
  if (app.signingIn) return;
  const seq = ++app.seq;
  const id = app.id;
  try {
    const data = await PAGES[id].load(api, context(id));
    if (seq !== app.seq) return;
    app.data = data;
    render(data);
    showError(null);
    setLive("live");
  } catch (exc) {
    if (seq !== app.seq) return;
    if (exc instanceof ApiError && exc.unauthorized) {
      showLogin(exc.message);
      return;
    }
    showError(exc.message || String(exc));
    setLive("failing");
  }
  schedule();
}

function schedule() {
  clearTimeout(app.timer);
  if (document.hidden || app.signingIn) {
    setLive("paused");
    return;
  }
  app.timer = setTimeout(tick, POLL_MS);
}

function setLive(state) {
  const el = $("live");
  el.className = `live ${state === "live" ? "" : state}`;
  const text = { live: "Live", failing: "Retrying", paused: "Paused" }[state];
  el.replaceChildren(h("span", { class: "label" }, text));
}

function showError(message) {
  const el = $("error");
  el.hidden = !message;
  el.textContent = message || "";
}

// --- sign-in ------------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(app.timer);
  app.signingIn = true;
  if (credential.get()) credential.clear(); // it was refused
  updateSignOut();
  showError(null);
  $("login-reason").textContent = `The admin API answered: ${message}`;
  $("login").hidden = false;
  $("toolbar").hidden = true;
  $("content").hidden = true;
  setLive("paused");
  $("login-key").focus();
}

function signIn(event) {
  event.preventDefault();
  const input = $("login-key");
  const key = input.value.trim();
  input.value = "";
  if (key) useKey(key);
}

/** Send `key` from now on (this tab only) and resume. */
function useKey(key) {
  credential.set(key);
  app.signingIn = false;
  $("login").hidden = true;
  $("toolbar").hidden = false;
  $("content").hidden = false;
  updateSignOut();
  tick();
}

function signOut() {
  credential.clear();
  updateSignOut();
  tick(); // an open cluster keeps working; otherwise the form comes back
}

function updateSignOut() {
  $("logout").hidden = !credential.get();
}

// --- navigation ----------------------------------------------------------------------------

function toggleMenu(open) {
  const nav = $("nav");
  const next = open ?? !nav.classList.contains("open");
  nav.classList.toggle("open", next);
  $("menu-toggle").setAttribute("aria-expanded", String(next));
}

function start() {
  $("login-form").addEventListener("submit", signIn);
  $("logout").addEventListener("click", signOut);
  $("menu-toggle").addEventListener("click", () => toggleMenu());
  $("nav").addEventListener("click", (event) => {
    if (event.target.closest("a")) toggleMenu(false);
  });
  window.addEventListener("hashchange", () => show(pageId()));
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) schedule();
    else tick();
  });
  updateSignOut();
  show(pageId());
}

start();

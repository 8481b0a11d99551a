// The dashboard's entry point: sign-in, the live socket, and the routes (#/jobs, #/jobs/<id>, #/queues).

import { Api, Problem } from "./api.js";
import { el } from "./elements.js";
import { JobView } from "./job.js";
import { JobsView } from "./jobs.js";
import { LiveEvents } from "./live.js";
import { QueuesView } from "./queues.js";
import { JobStore } from "./store.js";

const KEY_ITEM = "conveyor.api-key";
// Jobs resumed by id after a reconnect, at most (a socket may follow 1000 by id): the ones views follow
// first, then the most recently seen. The others come back in the `all` snapshot, in their current state.
const MAX_RESUMED = 500;
const TRIM_EVERY_MS = 10000;
const main = document.getElementById("main");
const connection = document.getElementById("connection");
const offline = document.getElementById("offline");

// A `#key=<key>` fragment (never sent to a server) signs in, then leaves the address bar at once.
function keyFromFragment() {
  const match = /^#key=([^&]+)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(null, "", `${location.pathname}${location.search}#/jobs`);
  return decodeURIComponent(match[1]);
}

class Dashboard {
  constructor(api, me, config) {
    this.api = api;
    this.me = me;
    this.scopes = new Set(me.scopes);
    this.config = config;
    this.store = new JobStore();
    this.view = null;
    // Views that follow a job by id, for resumes: id -> the last seq they have.
    this.watchers = new Map();
    this.live = new LiveEvents(config.events_url, api.key, {
      onMessage: (message) => this.received(message),
      onConnection: (state, details) => this.connectionChanged(state, details),
      resumePoints: () => this.resumePoints(),
    });
  }

  start() {
    document.getElementById("nav").hidden = false;
    document.getElementById("sign-out").hidden = false;
    document.getElementById("tenant").textContent = `tenant ${this.me.tenant}`;
    window.addEventListener("hashchange", () => {
      this.route();
      main.focus(); // a screen reader or keyboard user starts at the new view
    });
    this.live.start();
    this.route();
    setInterval(() => this.store.trim(new Set([...this.watchers.keys(), ...(this.view?.shown?.() ?? [])])), TRIM_EVERY_MS);
  }

  can(scope) {
    return this.scopes.has(scope);
  }

  route() {
    const hash = location.hash || "#/jobs";
    if (this.view) this.view.close();
    main.replaceChildren();
    const job = /^#\/jobs\/([^/]+)$/.exec(hash);
    if (job) this.view = new JobView(this, decodeURIComponent(job[1]));
    else if (hash === "#/queues") this.view = new QueuesView(this);
    else this.view = new JobsView(this);
    for (const link of document.querySelectorAll("#nav a")) {
      const current = hash.startsWith(`#/${link.dataset.view}`);
      if (current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    main.append(this.view.element);
    this.view.open();
  }

  resumePoints() {
    const unfinished = this.store.unfinished();
    const points = {};
    for (const [id, seq] of this.watchers) points[id] = Math.min(seq, unfinished[id] ?? seq);
    for (const id of Object.keys(unfinished).reverse()) {
      if (Object.keys(points).length >= MAX_RESUMED) break;
      if (!(id in points)) points[id] = unfinished[id];
    }
    return points;
  }

  received(message) {
    if (message.type === "snapshot" && message.all) {
      for (const snapshot of message.jobs) this.store.put(snapshot.job, snapshot.seq);
    } else if (message.type === "snapshot") {
      this.store.put(message.job, message.seq);
    } else if (message.type === "state" || message.type === "progress") {
      if (this.store.apply(message) === "new") this.view?.discovered?.(message.job_id);
    }
    this.view?.message?.(message);
  }

  connectionChanged(state, details = {}) {
    connection.dataset.connection = state;
    connection.textContent = { online: "● live", offline: "○ offline", connecting: "○ connecting…", refused: "× key refused" }[state];
    offline.hidden = state !== "offline";
    if (state === "online" && details.resumed) this.view?.resumed?.();
  }
}

function signInForm(error) {
  const input = el("input", { id: "api-key", name: "key", type: "password", autocomplete: "off", required: true });
  const form = el(
    "form",
    { class: "sign-in", "aria-labelledby": "sign-in-title" },
    el("h2", { id: "sign-in-title" }, "Sign in"),
    el("label", { for: "api-key" }, "API key"),
    input,
    el("button", { type: "submit" }, "Sign in"),
    error ? el("p", { class: "problem", role: "alert" }, error) : null,
    el("p", { class: "muted" }, "The key stays in this tab (sessionStorage) and is sent only to this gateway and its progress service."),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, input.value.trim());
    boot();
  });
  main.replaceChildren(form);
  input.focus();
}

async function boot() {
  const fromFragment = keyFromFragment();
  if (fromFragment) sessionStorage.setItem(KEY_ITEM, fromFragment);
  const key = sessionStorage.getItem(KEY_ITEM);
  if (!key) return signInForm();
  const api = new Api(key);
  try {
    const [me, config] = await Promise.all([api.me(), api.config()]);
    new Dashboard(api, me, config).start();
  } catch (error) {
    if (!(error instanceof Problem)) throw error;
    if (error.status === 401) sessionStorage.removeItem(KEY_ITEM);
    signInForm(error.title + (error.detail ? `: ${error.detail}` : ""));
  }
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  location.hash = "";
  location.reload();
});

boot();

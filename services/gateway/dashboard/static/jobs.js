// The jobs view: the newest jobs (a page from `GET /v1/jobs`), kept live by the socket's events:
// new jobs appear at the top, and each row's status and progress bar move as events arrive.

import { Problem } from "./api.js";
import { el, progressText, showProgress, timeEl } from "./elements.js";

const PAGE_SIZE = 25;
// The most rows the first page grows to as new jobs arrive; older ones are a page further back.
const MAX_LIVE_ROWS = 200;
// New jobs' details are read in a batch: a few one by one, more as one page.
const DETAILS_DELAY_MS = 250;
const DETAILS_ONE_BY_ONE = 3;
const STATUSES = ["scheduled", "queued", "running", "succeeded", "failed", "canceled"];

export class JobsView {
  constructor(app) {
    this.app = app;
    this.filters = { status: "", type: "", labels: [] };
    this.cursors = []; // the cursors of the pages before this one; [] on the newest page
    this.cursor = null;
    this.pageIds = [];
    this.next = null;
    this.rows = new Map();
    this.pending = new Set();
    this.detailsTimer = null;
    this.element = this.build();
  }

  build() {
    this.statusSelect = el("select", { id: "filter-status", name: "status" },
      el("option", { value: "" }, "any"), STATUSES.map((status) => el("option", { value: status }, status)));
    this.typeSelect = el("select", { id: "filter-type", name: "type" }, el("option", { value: "" }, "any"));
    this.labelInput = el("input", { id: "filter-label", name: "label", placeholder: "key=value key2=value2", autocomplete: "off" });
    const form = el("form", { class: "filters", "aria-label": "Filter jobs", onsubmit: (event) => this.applyFilters(event) },
      el("label", { for: "filter-status" }, "Status"), this.statusSelect,
      el("label", { for: "filter-type" }, "Type"), this.typeSelect,
      el("label", { for: "filter-label" }, "Labels"), this.labelInput,
      el("button", { type: "submit" }, "Filter"));
    this.problem = el("p", { class: "problem", role: "alert", hidden: true });
    this.body = el("tbody", { id: "jobs-body" });
    this.empty = el("p", { class: "muted", hidden: true }, "No jobs.");
    this.newer = el("button", { type: "button", id: "page-newer", onclick: () => this.newerPage() }, "← Newer");
    this.older = el("button", { type: "button", id: "page-older", onclick: () => this.olderPage() }, "Older →");
    return el("section", { "aria-labelledby": "jobs-title", class: "jobs" },
      el("h2", { id: "jobs-title" }, "Jobs"),
      form,
      this.problem,
      el("div", { class: "table-scroll" },
        el("table", { id: "jobs" },
          el("caption", { class: "visually-hidden" }, "The newest jobs, live"),
          el("thead", {}, el("tr", {},
            el("th", { scope: "col" }, "Job"), el("th", { scope: "col" }, "Type"),
            el("th", { scope: "col" }, "Status"), el("th", { scope: "col" }, "Progress"),
            el("th", { scope: "col", class: "wide" }, "Labels"), el("th", { scope: "col", class: "wide" }, "Created"),
            el("th", { scope: "col", class: "wide" }, "Attempts"))),
          this.body)),
      this.empty,
      el("nav", { class: "pager", "aria-label": "Pages" }, this.newer, this.older));
  }

  open() {
    this.unsubscribe = this.app.store.subscribe((id) => this.changed(id));
    this.app.api.types().then((types) => {
      for (const type of types) this.typeSelect.append(el("option", { value: type.name }, type.name));
      this.typeSelect.value = this.filters.type;
    }, (error) => this.show(error));
    this.load();
  }

  close() {
    this.unsubscribe?.();
    clearTimeout(this.detailsTimer);
  }

  shown() {
    return this.rows.keys();
  }

  get onFirstPage() {
    return this.cursor === null;
  }

  applyFilters(event) {
    event.preventDefault();
    this.filters = {
      status: this.statusSelect.value,
      type: this.typeSelect.value,
      labels: this.labelInput.value.split(/[\s,]+/).filter(Boolean),
    };
    this.cursors = [];
    this.cursor = null;
    this.load();
  }

  olderPage() {
    if (!this.next) return;
    this.cursors.push(this.cursor);
    this.cursor = this.next;
    this.load();
  }

  newerPage() {
    if (!this.cursors.length) return;
    this.cursor = this.cursors.pop();
    this.load();
  }

  async load() {
    try {
      const page = await this.app.api.list(this.filters, PAGE_SIZE, this.cursor);
      this.problem.hidden = true;
      for (const job of page.items) this.app.store.put(job);
      this.pageIds = page.items.map((job) => job.id);
      this.next = page.next_cursor;
      this.render();
    } catch (error) {
      this.show(error);
    }
  }

  // The socket came back: what happened meanwhile to jobs it did not follow (new ones that have
  // finished already) is read again; the jobs it follows were resumed with after_seq.
  resumed() {
    if (this.onFirstPage) this.load();
  }

  show(error) {
    if (!(error instanceof Problem)) throw error;
    this.problem.textContent = error.title + (error.detail ? `: ${error.detail}` : "");
    this.problem.hidden = false;
  }

  // A job first heard of on the socket: its type, labels and times come from the API.
  discovered(id) {
    if (!this.onFirstPage) return;
    this.pending.add(id);
    this.changed(id);
    if (!this.detailsTimer) this.detailsTimer = setTimeout(() => this.readDetails(), DETAILS_DELAY_MS);
  }

  async readDetails() {
    this.detailsTimer = null;
    const ids = [...this.pending];
    this.pending.clear();
    try {
      if (ids.length > DETAILS_ONE_BY_ONE) {
        const page = await this.app.api.list(this.filters, PAGE_SIZE, null);
        for (const job of page.items) this.app.store.put(job);
      } else {
        const jobs = await Promise.all(ids.map((id) => this.app.api.job(id).catch((error) => {
          if (error instanceof Problem && error.status === 404) return null; // deleted meanwhile
          throw error;
        })));
        for (const job of jobs) if (job) this.app.store.put(job);
      }
    } catch (error) {
      this.show(error);
    }
  }

  matches(job) {
    const { status, type, labels } = this.filters;
    if (status && job.status !== status) return false;
    if ((type || labels.length) && job.type === undefined) return false; // not read yet
    if (type && job.type !== type) return false;
    return labels.every((label) => {
      const [key, ...value] = label.split("=");
      return (job.labels || {})[key] === value.join("=");
    });
  }

  // The rows to show: this page's jobs, and on the newest page every known job as new or newer, in
  // the API's order (newest first, then by id).
  shownIds() {
    if (!this.onFirstPage) return this.pageIds;
    const store = this.app.store;
    const order = (id) => [store.get(id).job.created_at || "\uffff", id]; // not read yet: newest
    const newer = (a, b) => a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
    const oldest = this.next && this.pageIds.length ? order(this.pageIds.at(-1)) : null;
    const ids = new Set(this.pageIds);
    for (const [id, { job }] of store.jobs) {
      if (ids.has(id) || !this.matches(job)) continue;
      if (oldest && !newer(order(id), oldest)) continue; // on an older page
      ids.add(id);
    }
    const sorted = [...ids].sort((a, b) => (newer(order(a), order(b)) ? -1 : newer(order(b), order(a)) ? 1 : 0));
    return sorted.slice(0, MAX_LIVE_ROWS);
  }

  changed(id) {
    const row = this.rows.get(id);
    if (row) this.fill(row, this.app.store.get(id).job);
    else if (this.onFirstPage && this.matches(this.app.store.get(id).job)) this.scheduleRender();
  }

  scheduleRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      this.render();
    });
  }

  render() {
    const ids = this.shownIds();
    const rows = ids.map((id) => this.rows.get(id) || this.makeRow(id));
    this.rows = new Map(ids.map((id, index) => [id, rows[index]]));
    for (const id of ids) this.fill(this.rows.get(id), this.app.store.get(id).job);
    this.body.replaceChildren(...rows);
    this.empty.hidden = ids.length > 0;
    this.newer.disabled = this.onFirstPage;
    this.older.disabled = !this.next;
  }

  makeRow(id) {
    const link = el("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "mono", title: id }, id.slice(0, 8));
    const bar = el("progress", { max: 100, "aria-label": `progress of job ${id.slice(0, 8)}` });
    return el("tr", { dataset: { jobId: id } },
      el("td", {}, link), el("td", { class: "type" }), el("td", { class: "status" }),
      el("td", { class: "progress" }, bar, el("span", { class: "progress-text" })),
      el("td", { class: "labels wide" }), el("td", { class: "created wide" }), el("td", { class: "attempts wide" }));
  }

  fill(row, job) {
    row.dataset.status = job.status || "";
    const percent = job.progress?.percent;
    row.dataset.percent = percent === null || percent === undefined ? "" : String(percent);
    row.querySelector(".type").textContent = job.type ?? "…";
    const status = row.querySelector(".status");
    status.replaceChildren(el("span", { class: `badge ${job.status}` }, job.status || "…"));
    showProgress(row.querySelector("progress"), job);
    row.querySelector(".progress-text").textContent = progressText(job.progress);
    row.querySelector(".labels").replaceChildren(
      ...Object.entries(job.labels || {}).map(([key, value]) => el("span", { class: "label" }, `${key}=${value}`)));
    row.querySelector(".created").replaceChildren(timeEl(job.created_at));
    row.querySelector(".attempts").textContent =
      job.max_attempts ? `${job.attempts ?? 0} / ${job.max_attempts}` : String(job.attempts ?? 0);
  }
}

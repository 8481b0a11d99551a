// The job view: the job's resource, payload, result or error, and its event timeline (its JSON history
// from the progress service, then live over the socket from the history's last seq), with Cancel and
// Retry when the key and the job's state allow them. A refused action shows its problem's title.

import { Problem } from "./api.js";
import { el, json, progressText, showProgress, timeEl } from "./elements.js";
import { isTerminal } from "./store.js";

export class JobView {
  constructor(app, id) {
    this.app = app;
    this.id = id;
    this.lastSeq = 0;
    // Live events wait until the history is read: one arriving earlier (the tenant-wide subscription
    // sees every job) would start the timeline past seq 1, and the history read would resume after it.
    this.loadingHistory = true;
    this.element = this.build();
  }

  build() {
    this.title = el("h2", { id: "job-title" }, "Job ", el("span", { class: "mono" }, this.id));
    this.badge = el("span", { class: "badge", id: "job-status" });
    this.bar = el("progress", { max: 100, id: "job-progress", "aria-label": "progress" });
    this.progressText = el("span", { class: "progress-text", id: "job-progress-text" });
    this.cancelButton = el("button", { type: "button", id: "cancel", hidden: true, onclick: () => this.act("cancel") }, "Cancel");
    this.retryButton = el("button", { type: "button", id: "retry", hidden: true, onclick: () => this.act("retry") }, "Retry");
    this.problem = el("p", { class: "problem", role: "alert", id: "job-problem", hidden: true });
    this.note = el("p", { class: "note", role: "status", id: "job-note" });
    this.fields = el("dl", { class: "fields", id: "job-fields" });
    this.payload = el("div", { id: "job-payload" }, el("p", { class: "muted" }, "…"));
    this.outcome = el("div", { id: "job-outcome" });
    this.timeline = el("ol", { id: "timeline", class: "timeline", "aria-live": "polite" });
    this.pruned = el("p", { class: "muted", hidden: true }, "The history of this job was pruned; live events follow.");
    this.root = el("section", { "aria-labelledby": "job-title", class: "job", dataset: { jobId: this.id } },
      el("p", {}, el("a", { href: "#/jobs" }, "← All jobs")),
      this.title,
      el("div", { class: "job-head" }, this.badge, this.bar, this.progressText,
        el("span", { class: "actions" }, this.cancelButton, this.retryButton)),
      this.problem, this.note,
      el("div", { class: "job-grid" },
        el("div", {}, el("h3", {}, "Details"), this.fields,
          el("h3", {}, "Payload"), this.payload, this.outcome),
        el("div", {}, el("h3", {}, "Timeline"), this.pruned, this.timeline)));
    return this.root;
  }

  async open() {
    this.unsubscribe = this.app.store.subscribe((id) => id === this.id && this.render());
    this.app.watchers.set(this.id, 0);
    try {
      const job = await this.app.api.job(this.id);
      this.app.store.put(job);
    } catch (error) {
      return this.show(error);
    }
    this.app.api.payload(this.id).then(
      (document) => this.payload.replaceChildren(json(document.payload)),
      (error) => this.show(error));
    await this.readHistory();
    if (this.closed) return; // the reader went elsewhere meanwhile
    // Live from where the history ends: the server replays whatever came in between.
    this.loadingHistory = false;
    this.app.watchers.set(this.id, this.lastSeq);
    this.app.live.watch(this.id, this.lastSeq);
  }

  // The recorded events, a page at a time. Live events wait meanwhile: the watch that follows resumes
  // after the last one read, so none is missed or shown twice.
  async readHistory() {
    try {
      for (;;) {
        const page = await this.app.api.history(this.app.config.history_url, this.id, this.lastSeq);
        for (const event of page.events) this.record(event);
        if (!page.events.length || this.lastSeq >= page.last_seq) return;
      }
    } catch (error) {
      if (!(error instanceof Problem)) throw error;
      if (error.status === 410) this.pruned.hidden = false; // pruned: the live events still follow
      // No answer (the service is down, or the page was opened on an origin it does not answer): the
      // watch that follows replays the history over the socket instead, from where this stopped.
      else if (error.status !== 0) this.show(error);
    }
  }

  close() {
    this.closed = true;
    this.unsubscribe?.();
    this.app.watchers.delete(this.id);
    this.app.live.unwatch(this.id);
  }

  show(error) {
    if (!(error instanceof Problem)) throw error;
    this.problem.textContent = error.title + (error.detail ? `: ${error.detail}` : "");
    this.problem.hidden = false;
  }

  message(message) {
    if (message.job_id !== this.id) return;
    if (message.type === "snapshot" && message.history_pruned) this.pruned.hidden = false;
    if (message.type === "error" && message.error === "unknown_job") this.show(new Problem(404, { title: "Job not found" }));
    if (this.loadingHistory) return;
    if ((message.type === "state" || message.type === "progress") && message.seq > this.lastSeq) this.record(message);
  }

  record(event) {
    const from = event.coalesced_from ?? event.seq;
    this.lastSeq = event.seq;
    this.app.watchers.set(this.id, event.seq);
    const what = event.type === "state" ? event.status + (event.error ? `: ${event.error.type}` : "") : progressText(event.progress);
    this.timeline.append(el("li", { dataset: { seq: String(event.seq), from: String(from), type: event.type, status: event.status } },
      el("span", { class: "seq mono" }, from === event.seq ? `#${event.seq}` : `#${from}–${event.seq}`),
      timeEl(event.at, { clock: true }),
      el("span", { class: `badge ${event.type === "state" ? event.status : "progress"}` }, event.type),
      el("span", {}, what)));
  }

  render() {
    const job = this.app.store.get(this.id)?.job;
    if (!job) return;
    this.root.dataset.status = job.status;
    this.badge.className = `badge ${job.status}`;
    this.badge.textContent = job.status;
    showProgress(this.bar, job);
    this.progressText.textContent = progressText(job.progress);
    this.cancelButton.hidden = !(this.app.can("cancel") && job.status && !isTerminal(job.status));
    this.retryButton.hidden = !(this.app.can("submit") && job.status === "failed");
    const rows = [
      ["Type", job.type], ["Status", job.status], ["Priority", job.priority],
      ["Attempts", job.max_attempts ? `${job.attempts} of ${job.max_attempts}` : job.attempts],
      ["Created", timeEl(job.created_at)], ["Run at", timeEl(job.run_at)], ["Started", timeEl(job.started_at)],
      ["Updated", timeEl(job.updated_at)], ["Finished", timeEl(job.finished_at)],
      ["Timeout", job.timeout_s ? `${job.timeout_s} s` : "–"],
      ["Labels", Object.keys(job.labels || {}).length
        ? Object.entries(job.labels).map(([key, value]) => el("span", { class: "label" }, `${key}=${value}`)) : "–"],
    ];
    this.fields.replaceChildren(...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value ?? "–")]));
    const outcome = [];
    if (job.result !== null && job.result !== undefined) outcome.push(el("h3", {}, "Result"), json(job.result));
    if (job.error) {
      outcome.push(el("h3", {}, "Error"), el("div", { class: "error", id: "job-error" },
        el("p", {}, el("strong", {}, job.error.type), ` (attempt ${job.error.attempt ?? "?"})`),
        el("pre", { class: "json" }, job.error.message || "")));
    }
    this.outcome.replaceChildren(...outcome);
  }

  async act(action) {
    const button = action === "cancel" ? this.cancelButton : this.retryButton;
    button.disabled = true;
    this.problem.hidden = true;
    try {
      const job = await (action === "cancel" ? this.app.api.cancel(this.id) : this.app.api.retry(this.id));
      this.note.textContent = action === "cancel" ? `Canceled: the job is ${job.status}.` : `Retried: the job is ${job.status} again.`;
    } catch (error) {
      this.show(error);
    } finally {
      button.disabled = false;
    }
  }
}

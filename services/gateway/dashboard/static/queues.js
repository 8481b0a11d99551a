// The queues view: `GET /v1/stats` (queued and running per priority, the oldest waiting job) and the
// jobs finished per minute over the last 15 minutes as a bar chart. Read again every few seconds while
// shown, and soon after a job of the tenant finishes.

import { Problem } from "./api.js";
import { duration, el } from "./elements.js";

const REFRESH_MS = 5000;
// After a state event, read again at most this often.
const EVENT_REFRESH_MS = 1000;
const STATUSES = ["scheduled", "queued", "running"];
const SVG = "http://www.w3.org/2000/svg";

export class QueuesView {
  constructor(app) {
    this.app = app;
    this.problem = el("p", { class: "problem", role: "alert", hidden: true });
    this.body = el("tbody");
    this.totals = el("tfoot");
    this.finished = el("p", { id: "finished-last-minute" });
    this.oldest = el("p", { id: "oldest-queued" });
    this.chart = el("figure", { class: "chart", id: "finished-chart" });
    this.element = el("section", { "aria-labelledby": "queues-title", class: "queues" },
      el("h2", { id: "queues-title" }, "Queues"),
      this.problem,
      el("div", { class: "table-scroll" }, el("table", { id: "priorities" },
        el("caption", {}, "Unfinished jobs per priority (1 is the most urgent)"),
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Priority"),
          STATUSES.map((status) => el("th", { scope: "col" }, status)))),
        this.body, this.totals)),
      this.oldest, this.finished,
      el("h3", {}, "Finished per minute, last 15 minutes"), this.chart);
  }

  open() {
    this.refresh();
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  close() {
    clearInterval(this.timer);
    clearTimeout(this.soon);
  }

  message(message) {
    if (message.type !== "state" || this.soon) return;
    this.soon = setTimeout(() => {
      this.soon = null;
      this.refresh();
    }, EVENT_REFRESH_MS);
  }

  async refresh() {
    try {
      const [stats, perMinute] = await Promise.all([this.app.api.stats(), this.app.api.finishedPerMinute()]);
      this.problem.hidden = true;
      this.render(stats, perMinute);
    } catch (error) {
      if (!(error instanceof Problem)) throw error;
      this.problem.textContent = error.title + (error.detail ? `: ${error.detail}` : "");
      this.problem.hidden = false;
    }
  }

  render(stats, perMinute) {
    const row = (name, counts, header) => el("tr", { dataset: { priority: name } },
      el(header ? "th" : "td", { scope: "row" }, name),
      STATUSES.map((status) => el("td", { dataset: { status } }, String(counts[status]))));
    this.body.replaceChildren(...Object.entries(stats.priorities).map(([level, counts]) => row(level, counts)));
    this.totals.replaceChildren(row("total", stats.totals, true));
    const done = stats.finished_last_minute;
    this.finished.textContent = `Finished in the last minute: ${done.succeeded} succeeded, ${done.failed} failed, ${done.canceled} canceled.`;
    this.oldest.textContent = stats.oldest_queued_at
      ? `Oldest waiting job: queued ${duration((Date.parse(stats.at) - Date.parse(stats.oldest_queued_at)) / 1000)} ago.`
      : "No job is waiting.";
    this.drawChart(perMinute.minutes);
  }

  drawChart(minutes) {
    const width = 300, height = 80, gap = 2;
    const highest = Math.max(1, ...minutes);
    const barWidth = width / minutes.length - gap;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height + 14}`);
    svg.setAttribute("role", "img");
    const total = minutes.reduce((sum, count) => sum + count, 0);
    svg.setAttribute("aria-label", `${total} jobs finished in the last ${minutes.length} minutes; per minute, oldest first: ${minutes.join(", ")}`);
    minutes.forEach((count, index) => {
      const bar = document.createElementNS(SVG, "rect");
      const barHeight = Math.round((count / highest) * height);
      bar.setAttribute("x", String(index * (barWidth + gap)));
      bar.setAttribute("y", String(height - barHeight));
      bar.setAttribute("width", String(barWidth));
      bar.setAttribute("height", String(Math.max(barHeight, count ? 1 : 0)));
      bar.dataset.count = String(count);
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${minutes.length - index} min ago: ${count}`;
      bar.append(title);
      svg.append(bar);
    });
    const baseline = document.createElementNS(SVG, "line");
    for (const [name, value] of [["x1", 0], ["x2", width], ["y1", height + 0.5], ["y2", height + 0.5]]) {
      baseline.setAttribute(name, String(value));
    }
    svg.append(baseline);
    for (const [x, text, anchor] of [[0, "−15 min", "start"], [width, "now", "end"]]) {
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", String(x));
      label.setAttribute("y", String(height + 12));
      label.setAttribute("text-anchor", anchor);
      label.textContent = text;
      svg.append(label);
    }
    this.chart.replaceChildren(svg, el("figcaption", { class: "muted" }, `highest: ${highest} a minute`));
  }
}

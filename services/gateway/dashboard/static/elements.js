// Building DOM nodes: `el("td", {class: "x", dataset: {jobId}}, "text", child)`. Text is always set as
// text, never as HTML, so nothing a job carries (payloads, labels, messages) can inject markup.

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

// A time as the reader's local clock shows it, with the ISO value kept for machines and tooltips.
// `clock`: the time of day alone (a timeline's events are close together).
export function timeEl(iso, { clock = false } = {}) {
  if (!iso) return el("span", { class: "muted" }, "–");
  const moment = new Date(iso);
  return el("time", { datetime: iso, title: iso }, clock ? moment.toLocaleTimeString() : moment.toLocaleString());
}

export function json(value) {
  return el("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

// "3 min 20 s" for a duration in seconds.
export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// A progress bar for a job: its percent; full once it succeeded; empty once it ended otherwise; and
// moving (indeterminate) only while it runs without a percent.
export function showProgress(bar, job) {
  const percent = job.progress?.percent;
  if (percent !== null && percent !== undefined) bar.value = percent;
  else if (job.status === "succeeded") bar.value = 100;
  else if (job.status === "running") bar.removeAttribute("value");
  else bar.value = 0;
}

// "40% · step 2 of 5", or "" without either.
export function progressText(progress) {
  const percent = progress?.percent;
  return [percent === null || percent === undefined ? null : `${Math.round(percent)}%`, progress?.message]
    .filter(Boolean).join(" · ");
}

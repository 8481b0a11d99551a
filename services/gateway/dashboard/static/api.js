// The gateway's API as the signed-in key sees it. A refused request raises a Problem carrying the
// RFC 9457 document, whose title the page shows: an error is never swallowed.

export class Problem extends Error {
  constructor(status, document) {
    super(document.title || `HTTP ${status}`);
    this.status = status;
    this.title = document.title || `HTTP ${status}`;
    this.detail = document.detail || "";
    this.document = document;
  }
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  async request(method, path, body) {
    const headers = { Authorization: `Bearer ${this.key}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (error) {
      throw new Problem(0, { title: "No answer", detail: `${method} ${path}: ${error.message}` });
    }
    const text = await response.text();
    const document = text ? JSON.parse(text) : {};
    if (!response.ok) throw new Problem(response.status, document);
    return document;
  }

  me() { return this.request("GET", "/dashboard/me"); }
  config() { return this.request("GET", "/dashboard/config.json"); }
  job(id) { return this.request("GET", `/v1/jobs/${encodeURIComponent(id)}`); }
  payload(id) { return this.request("GET", `/dashboard/jobs/${encodeURIComponent(id)}/payload`); }
  cancel(id) { return this.request("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`); }
  retry(id) { return this.request("POST", `/v1/jobs/${encodeURIComponent(id)}/retry`); }
  types() { return this.request("GET", "/v1/job-types"); }
  stats() { return this.request("GET", "/v1/stats"); }
  finishedPerMinute() { return this.request("GET", "/dashboard/finished-per-minute"); }

  // One page of a job's recorded events, from the progress service (`historyUrl`, from the config).
  history(historyUrl, id, afterSeq) {
    return this.request("GET", `${historyUrl}/${encodeURIComponent(id)}/events?after_seq=${afterSeq}`);
  }

  // One page of jobs, newest first. `filters`: {status, type, labels: ["k=v", …]}.
  list(filters, limit, cursor) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (filters.status) query.append("status", filters.status);
    if (filters.type) query.append("type", filters.type);
    for (const label of filters.labels || []) query.append("label", label);
    if (cursor) query.append("cursor", cursor);
    return this.request("GET", `/v1/jobs?${query}`);
  }
}

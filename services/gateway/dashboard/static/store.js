// What the page knows of the tenant's jobs: each job's resource as last seen and the seq it was seen
// at. Live events only ever move a job forward (a higher seq); a job read over HTTP fills in fields
// that events do not carry (type, labels, times) and its state only for a job no event has reached.

// Jobs kept in memory, at most (finished ones are forgotten first, oldest first).
const MAX_JOBS = 5000;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export function isTerminal(status) {
  return TERMINAL.has(status);
}

export class JobStore {
  constructor() {
    this.jobs = new Map(); // id -> {job, seq}
    this.listeners = new Set();
  }

  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get(id) {
    return this.jobs.get(id);
  }

  emit(id) {
    for (const listener of this.listeners) listener(id);
  }

  // A job resource from the API (no seq), or from a snapshot (with its seq).
  put(job, seq = 0) {
    const known = this.jobs.get(job.id);
    if (known && known.seq > seq) {
      // Newer over the socket already: keep its live state, take the rest.
      const live = pick(known.job, ["status", "progress", "attempts", "result", "error", "updated_at", "finished_at"]);
      known.job = { ...job, ...live };
    } else {
      this.jobs.set(job.id, { job: { ...(known ? known.job : {}), ...job }, seq: Math.max(seq, known ? known.seq : 0) });
    }
    this.emit(job.id);
  }

  // An event of a job (state or progress): "new" for a job not known yet (its entry is made from the
  // event, and the caller reads the rest of its resource), true if it moved the job, false if seen.
  apply(event) {
    let known = this.jobs.get(event.job_id);
    const fresh = !known;
    if (fresh) {
      // The first event of a job is its creation: its time stands for `created_at` until read.
      known = { job: { id: event.job_id, created_at: event.seq === 1 ? event.at : null, labels: {} }, seq: 0 };
      this.jobs.set(event.job_id, known);
    }
    if (event.seq <= known.seq) return false;
    known.seq = event.seq;
    const job = { ...known.job, status: event.status, progress: event.progress };
    if (event.attempt !== undefined && event.attempt !== null) job.attempts = event.attempt;
    if ("result" in event) job.result = event.result;
    if ("error" in event) job.error = event.error;
    if (event.run_at !== undefined) job.run_at = event.run_at;
    job.updated_at = event.at;
    if (isTerminal(event.status)) job.finished_at = job.finished_at || event.at;
    known.job = job;
    this.emit(event.job_id);
    return fresh ? "new" : true;
  }

  // Forget the oldest finished jobs past MAX_JOBS, but those in `keep` (shown, or followed): a tab left
  // open on a busy tenant must not grow without end.
  trim(keep) {
    if (this.jobs.size <= MAX_JOBS) return;
    for (const [id, { job }] of this.jobs) {
      if (this.jobs.size <= MAX_JOBS) break;
      if (isTerminal(job.status) && !keep.has(id)) this.jobs.delete(id);
    }
  }

  // {id: seq} of the jobs to resume after a reconnect: those not finished when last seen.
  unfinished() {
    const points = {};
    for (const [id, { job, seq }] of this.jobs) if (seq > 0 && !isTerminal(job.status)) points[id] = seq;
    return points;
  }
}

function pick(object, names) {
  return Object.fromEntries(names.filter((name) => name in object).map((name) => [name, object[name]]));
}

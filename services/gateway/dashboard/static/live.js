// One WebSocket to the progress service's `/v1/events` for the whole page: `all` of the tenant's jobs,
// plus the jobs a view watches by id (a job view's timeline, replayed from seq 0). The key goes in the
// first message, never in the URL. When the socket drops, it reconnects by itself, with backoff, and
// resumes every job it follows with `after_seq` = the last seq it handed out, so nothing is missed.

const FIRST_RETRY_MS = 250;
const MAX_RETRY_MS = 4000;
// The server takes at most this many ids in one subscribe message.
const IDS_PER_SUBSCRIBE = 100;
// An application-level ping keeps the socket from looking idle to proxies that cut quiet connections.
const PING_EVERY_MS = 25000;

export class LiveEvents {
  // `resumePoints()` answers {jobId: lastSeq} for the jobs to resume after a reconnect.
  constructor(url, key, { onMessage, onConnection, resumePoints }) {
    this.url = url;
    this.key = key;
    this.onMessage = onMessage;
    this.onConnection = onConnection;
    this.resumePoints = resumePoints;
    this.socket = null;
    this.retryMs = FIRST_RETRY_MS;
    this.closed = false;
    this.everOpened = false;
    this.pinger = null;
  }

  start() {
    this.closed = false;
    this.connect();
  }

  stop() {
    this.closed = true;
    clearInterval(this.pinger);
    if (this.socket) this.socket.close(1000);
  }

  get online() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN && this.authenticated;
  }

  // Follow one job by id: its events after `afterSeq` (0: its whole history), then live.
  watch(jobId, afterSeq) {
    if (this.online) this.send({ op: "subscribe", job_ids: [jobId], after_seq: { [jobId]: afterSeq } });
    // Offline, the reconnect resumes it from resumePoints().
  }

  unwatch(jobId) {
    if (this.online) this.send({ op: "unsubscribe", job_ids: [jobId] });
  }

  send(message) {
    this.socket.send(JSON.stringify(message));
  }

  connect() {
    this.onConnection(this.everOpened ? "offline" : "connecting");
    const socket = new WebSocket(this.url);
    this.socket = socket;
    this.authenticated = false;
    socket.addEventListener("open", () => this.opened(socket));
    socket.addEventListener("message", (message) => this.received(socket, message));
    socket.addEventListener("close", (event) => this.dropped(socket, event));
    // An error is always followed by a close, which reconnects.
  }

  opened(socket) {
    if (socket !== this.socket) return;
    this.send({ op: "auth", token: this.key });
    this.authenticated = true;
    // On a first connect these are the jobs views already follow (a timeline opened before the socket).
    const resumeFrom = this.resumePoints();
    const ids = Object.keys(resumeFrom);
    // `all` first for a fresh start; on a resume the ids go with it, so that the server replays what
    // each missed before it snapshots the rest.
    for (let start = 0; start < Math.max(ids.length, 1); start += IDS_PER_SUBSCRIBE) {
      const chunk = ids.slice(start, start + IDS_PER_SUBSCRIBE);
      const message = { op: "subscribe" };
      if (chunk.length) {
        message.job_ids = chunk;
        message.after_seq = Object.fromEntries(chunk.map((id) => [id, resumeFrom[id]]));
      }
      if (start === 0) message.all = true;
      this.send(message);
    }
    const resumed = this.everOpened;
    this.everOpened = true;
    this.retryMs = FIRST_RETRY_MS;
    clearInterval(this.pinger);
    this.pinger = setInterval(() => this.online && this.send({ op: "ping" }), PING_EVERY_MS);
    this.onConnection("online", { resumed });
  }

  received(socket, message) {
    if (socket !== this.socket) return;
    this.onMessage(JSON.parse(message.data));
  }

  dropped(socket, event) {
    if (socket !== this.socket) return;
    clearInterval(this.pinger);
    this.socket = null;
    if (this.closed) return;
    if (event.code === 1008 && this.authenticated && event.reason !== "too_many_messages") {
      // A bad or revoked key: reconnecting would be refused again.
      this.onConnection("refused", { reason: event.reason });
      return;
    }
    this.onConnection("offline");
    setTimeout(() => this.connect(), this.retryMs);
    this.retryMs = Math.min(MAX_RETRY_MS, this.retryMs * 2);
  }
}

// One session's stream over the /v1/stream websocket, resumed across dropped connections the
// way the CLI client resumes them (service/client/stream.py).
//
// Every connection starts with the server's announcement {session_id, model, version,
// step_count}; then each client frame gets exactly one reply, in order. The page sends one step
// per frame and waits for its reply, so at most one frame is unanswered when a connection
// drops. After reconnecting with ?session_id=, the announced step_count tells whether that step
// was applied: if it was, it is not sent again (its prediction is reported lost); if not, it is
// sent again. No step is applied twice and none is skipped.
//
// Row i of the series is always session step i: a reset rewinds the series to row 0.

import { closeInWords, request, streamUrl } from "./api.js";

// Close codes after which reconnecting can succeed (the CLI's, plus 1005: a close frame without
// a code); every other code is final.
const RETRYABLE = new Set([1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014, 4503]);
const SESSION_GONE = 4404;
const RETRY = { max: 5, firstSeconds: 0.2, maxSeconds: 5 }; // the CLI's RetryPolicy defaults
const REPLY_TIMEOUT_MS = 30000; // as the CLI: no reply by then counts as a dropped connection

/** The stream's lifecycle; ``StreamSession.state`` is always one of these. */
export const State = Object.freeze({
  CONNECTING: "connecting", // opening the first connection; no session yet
  STREAMING: "streaming", // sending rows at the chosen rate
  PAUSED: "paused", // connected, sending nothing; the session keeps its state
  FINISHED: "finished", // every row answered; the session stays open (reset or close it)
  RECONNECTING: "reconnecting", // the connection dropped; resuming the same session
  CLOSED: "closed", // the session was closed (deleted)
  FAILED: "failed", // stopped by an error that reconnecting cannot fix
});

export class StreamSession {
  /**
   * Stream ``rows`` (arrays of input_size numbers) into a new session of ``target``
   * ({model, version}) at ``rate`` steps per second. ``on`` gets: hello(announcement),
   * step(index, outputs), lost(index), reset(), state(state), notice(text) and
   * error(text, closeCode or null).
   */
  constructor(target, rows, rate, on) {
    this.target = target;
    this.rows = rows;
    this.rate = rate;
    this.on = on;
    this.state = null;
    this.sessionId = null;
    this.acked = 0; // steps the session is known to have applied: the next row to send
    this.inflight = null; // the frame awaiting its reply: {kind: "step", index}, reset or close
    this.control = null; // "reset" or "close", sent once nothing is in flight
    this.ws = null;
    this.announced = false; // whether this connection's announcement has arrived
    this.failures = 0; // failed connections in a row
    this.beforeDrop = null; // the state to return to once a dropped connection is resumed
    this.lastSend = -Infinity; // performance.now() of the latest step sent
    this.timers = { step: 0, reply: 0, retry: 0 };
  }

  start() {
    this.setState(State.CONNECTING);
    this.connect();
  }

  pause() {
    if (this.state === State.STREAMING) this.setState(State.PAUSED);
  }

  resume() {
    if (this.state !== State.PAUSED) return;
    this.setState(State.STREAMING);
    this.pump();
  }

  setRate(rate) {
    this.rate = rate;
    this.pump();
  }

  /** Zero the session's state and step count once the frame in flight is answered; the series
   * rewinds to row 0 and the stream pauses. */
  reset() {
    this.control = "reset";
    this.pump();
  }

  /** Close (delete) the session: over the websocket when connected, else with HTTP DELETE. */
  close() {
    if (this.state === State.RECONNECTING || this.state === State.FAILED) {
      this.deleteOverHttp();
      return;
    }
    this.control = "close";
    this.pump();
  }

  setState(state) {
    this.state = state;
    this.on.state(state);
  }

  connect() {
    const query =
      this.sessionId === null
        ? { model: this.target.model, version: this.target.version }
        : { session_id: this.sessionId };
    const ws = new WebSocket(streamUrl(query));
    this.ws = ws;
    this.announced = false;
    // A socket given up on (see abandon) may still report; only the current one counts.
    ws.onmessage = (event) => ws === this.ws && this.receive(JSON.parse(event.data));
    ws.onclose = (event) => ws === this.ws && this.dropped(event);
  }

  receive(frame) {
    if (!this.announced) {
      this.attach(frame);
      return;
    }
    clearTimeout(this.timers.reply);
    const sent = this.inflight;
    this.inflight = null;
    if ("error" in frame) this.rejected(sent, frame.error);
    else if (sent.kind === "reset") this.wasReset(frame);
    else this.answered(sent.index, frame);
    this.pump();
  }

  /** A connection's announcement: the new session, or the resumed one. */
  attach(hello) {
    this.announced = true;
    this.failures = 0;
    if (this.sessionId === null) {
      this.sessionId = hello.session_id;
      this.acked = hello.step_count;
      this.on.hello(hello);
      this.setState(State.STREAMING);
    } else {
      this.realign(hello);
    }
    this.pump();
  }

  /** After a reconnect: settle the frame that was in flight when the connection dropped. */
  realign(hello) {
    const sent = this.inflight;
    this.inflight = null;
    const applied = hello.step_count - this.acked;
    const inFlight = sent && sent.kind === "step" ? 1 : 0;
    if (hello.session_id !== this.sessionId) {
      this.fail(`the service resumed session ${hello.session_id}, not ${this.sessionId}`);
      return;
    }
    if (sent && sent.kind !== "step") {
      this.control = this.control || sent.kind; // a reset or close sent twice acts once
    } else if (applied < 0 || applied > inFlight) {
      this.fail(
        `session ${this.sessionId} reports ${hello.step_count} steps after reconnecting, but ` +
          `${this.acked} were acknowledged and ${inFlight} was in flight; another client may ` +
          "be streaming to it",
      );
      return;
    } else if (applied === 1) {
      this.acked += 1;
      this.on.lost(sent.index);
      this.on.notice(
        `step ${sent.index} was applied but its reply was lost with the connection; ` +
          "it is not resent",
      );
    }
    this.on.notice(`resumed session ${this.sessionId} at step ${hello.step_count}`);
    this.setState(this.beforeDrop);
  }

  /** An {"error"} reply: the frame was not applied, the session is as it was; pause. */
  rejected(sent, message) {
    const what = sent.kind === "step" ? `step ${sent.index}` : `the ${sent.kind}`;
    this.on.error(`The service rejected ${what}: ${message}`);
    if (this.state === State.STREAMING) this.setState(State.PAUSED);
  }

  wasReset(reply) {
    this.acked = reply.step_count;
    this.on.reset();
    if (this.state === State.STREAMING || this.state === State.FINISHED)
      this.setState(State.PAUSED);
  }

  answered(index, reply) {
    if (
      !Array.isArray(reply.outputs) ||
      reply.outputs.length !== 1 ||
      reply.step_count !== index + 1
    ) {
      this.fail(
        `the service answered step ${index} with step_count ${reply.step_count}, expected ` +
          `${index + 1}; another client may be streaming to this session`,
      );
      return;
    }
    this.acked = reply.step_count;
    this.on.step(index, reply.outputs[0]);
  }

  /** Send what is due: a waiting reset or close first, else the next row at the chosen rate. */
  pump() {
    if (!this.announced || this.inflight || this.ws.readyState !== WebSocket.OPEN) return;
    if (this.control) {
      const kind = this.control;
      this.control = null;
      this.send({ [kind]: true }, { kind });
      return;
    }
    if (this.state !== State.STREAMING) return;
    if (this.acked >= this.rows.length) {
      this.setState(State.FINISHED);
      return;
    }
    clearTimeout(this.timers.step);
    const wait = this.lastSend + 1000 / this.rate - performance.now();
    this.timers.step = setTimeout(() => this.sendStep(), Math.max(0, wait));
  }

  sendStep() {
    if (this.state !== State.STREAMING || !this.announced || this.inflight || this.control) return;
    const index = this.acked;
    this.lastSend = performance.now();
    this.send({ inputs: [this.rows[index]] }, { kind: "step", index });
  }

  send(frame, sent) {
    this.inflight = sent;
    this.ws.send(JSON.stringify(frame));
    const seconds = REPLY_TIMEOUT_MS / 1000;
    this.timers.reply = setTimeout(
      () => this.abandon(`no reply within ${seconds} s`),
      REPLY_TIMEOUT_MS,
    );
  }

  /** Give up on the current connection as if it had dropped. */
  abandon(reason) {
    const ws = this.ws;
    this.ws = null;
    this.announced = false;
    ws.close();
    this.retry(reason);
  }

  dropped(event) {
    clearTimeout(this.timers.reply);
    clearTimeout(this.timers.step);
    this.ws = null;
    this.announced = false;
    if (this.state === State.CLOSED || this.state === State.FAILED) return;
    const closing = this.control === "close" || (this.inflight && this.inflight.kind === "close");
    if (closing && (event.code === 1000 || event.code === SESSION_GONE)) {
      this.inflight = null;
      this.control = null;
      this.setState(State.CLOSED);
      this.on.notice(`session ${this.sessionId} closed`);
    } else if (RETRYABLE.has(event.code)) {
      this.retry(
        event.code === 1006 ? "connection dropped" : closeInWords(event.code, event.reason),
      );
    } else if (event.code === SESSION_GONE && this.sessionId !== null) {
      this.fail(
        `session ${this.sessionId} is gone (expired, deleted, or the service restarted) after ` +
          `${this.acked} acknowledged steps: ${event.reason}`,
      );
    } else {
      this.fail(closeInWords(event.code, event.reason), event.code);
    }
  }

  /** Reconnect after a growing delay, or give up after too many failures in a row. */
  retry(reason) {
    this.failures += 1;
    if (this.failures > RETRY.max) {
      const where = this.sessionId
        ? ` (${this.acked} steps of session ${this.sessionId} applied)`
        : "";
      this.fail(`cannot reach the service after ${RETRY.max + 1} attempts: ${reason}${where}`);
      return;
    }
    const seconds = Math.min(RETRY.maxSeconds, RETRY.firstSeconds * 2 ** (this.failures - 1));
    if (this.state !== State.RECONNECTING && this.state !== State.CONNECTING) {
      this.beforeDrop = this.state;
      this.setState(State.RECONNECTING);
    }
    this.on.notice(
      `connection lost (${reason}); retry ${this.failures} in ${seconds.toFixed(1)} s`,
    );
    this.timers.retry = setTimeout(() => this.connect(), seconds * 1000);
  }

  /** Stop for good; ``code`` is the close code that ended the stream, if one did. */
  fail(message, code = null) {
    this.stop();
    this.setState(State.FAILED);
    this.on.error(message, code);
  }

  /** Drop the connection and every timer; the session itself is left as it is. */
  stop() {
    for (const timer of Object.values(this.timers)) clearTimeout(timer);
    const ws = this.ws;
    this.ws = null;
    this.announced = false;
    if (ws) ws.close();
  }

  async deleteOverHttp() {
    this.stop();
    this.setState(State.CLOSED);
    try {
      await request(`v1/sessions/${encodeURIComponent(this.sessionId)}`, { method: "DELETE" });
      this.on.notice(`session ${this.sessionId} closed`);
    } catch (error) {
      this.on.error(error.message);
    }
  }
}

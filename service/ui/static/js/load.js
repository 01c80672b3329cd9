// Live load: polls GET /v1/stats once a second and draws the last minute as rolling charts.
// Rates are counter deltas between two answers divided by the time between them, so an answer
// that comes late under load stretches one interval instead of skewing the rate.

import { request } from "./api.js";
import { LineChart, formatNumber } from "./chart.js";
import { versionLabel } from "./models.js";

const WINDOW = 60; // answers kept and drawn: the last minute
const PERIOD_MS = 1000; // from one answer to the next request

// Each figure's series (the figure's data-metric names it) and how its readout is written.
const METRICS = {
  steps: { series: [{ key: "steps", color: "#1f6feb" }], readout: (p) => formatNumber(p.steps) },
  batch: { series: [{ key: "batch", color: "#8250df" }], readout: (p) => formatNumber(p.batch) },
  queue: { series: [{ key: "queue", color: "#bf8700" }], readout: (p) => formatNumber(p.queue) },
  latency: {
    series: [
      { key: "p50", color: "#1a7f37" },
      { key: "p99", color: "#cf222e" },
    ],
    readout: (p) => `${formatNumber(p.p50)} / ${formatNumber(p.p99)}`,
  },
  sessions: {
    series: [{ key: "sessions", color: "#0a7ea4" }],
    readout: (p) => formatNumber(p.sessions),
  },
};

/** The counters and gauges of one /v1/stats answer for one version ("name/version") or all. */
function totals(stats, scope) {
  const models = stats.models.filter((m) => !scope || `${m.model}/${m.version}` === scope);
  const sum = (field) => models.reduce((total, m) => total + (m[field] || 0), 0);
  const slowest = (q) => {
    const values = models
      .map((m) => m.step_latency_ms && m.step_latency_ms[q])
      .filter(Number.isFinite);
    return values.length ? Math.max(...values) : null;
  };
  return {
    steps: sum("steps"),
    chunks: sum("chunks"),
    batches: sum("batches"),
    queue: sum("queue_depth"),
    sessions: scope ? sum("sessions") : stats.sessions,
    p50: slowest("p50"),
    p99: slowest("p99"),
  };
}

/** What the charts show at one answer, from it and the one before (rates need two). */
function point(previous, current, scope) {
  const now = totals(current.stats, scope);
  const shown = {
    queue: now.queue,
    sessions: now.sessions,
    p50: now.p50,
    p99: now.p99,
    steps: null,
    batch: null,
  };
  if (!previous) return shown;
  const before = totals(previous.stats, scope);
  const seconds = (current.at - previous.at) / 1000;
  const steps = now.steps - before.steps;
  const batches = now.batches - before.batches;
  if (steps >= 0 && seconds > 0) shown.steps = steps / seconds; // negative: the service restarted
  if (batches > 0) shown.batch = (now.chunks - before.chunks) / batches; // mean batch this second
  return shown;
}

export class LoadPanel {
  /** ``root`` holds the figures; ``select`` picks the version shown (its first option: all). */
  constructor(root, select, { onStats, onError }) {
    this.select = select;
    this.onStats = onStats;
    this.onError = onError;
    this.answers = []; // [{at: ms, stats}], oldest first
    this.generation = 0; // bumped by start and stop, so a stale poll loop ends
    this.figures = [...root.querySelectorAll("figure[data-metric]")].map((figure) => {
      const metric = METRICS[figure.dataset.metric];
      const canvas = figure.querySelector("canvas");
      const chart = new LineChart(canvas, metric.series, {
        window: WINDOW,
        anchorRight: true,
        includeZero: true,
      });
      return { chart, metric, output: figure.querySelector("output") };
    });
    select.addEventListener("change", () => this.draw());
  }

  start() {
    this.generation += 1;
    this.poll(this.generation);
  }

  stop() {
    this.generation += 1;
  }

  async poll(generation) {
    try {
      const stats = await request("v1/stats");
      if (generation !== this.generation) return;
      this.answers.push({ at: performance.now(), stats });
      if (this.answers.length > WINDOW + 1) this.answers.shift();
      this.listVersions(stats);
      this.draw();
      this.onStats(stats);
    } catch (error) {
      if (generation !== this.generation) return;
      this.onError(error);
      if (error.status === 401) return; // polled again once a key is given (start)
    }
    setTimeout(() => generation === this.generation && this.poll(generation), PERIOD_MS);
  }

  /** "now", "-12 s": how long before the latest answer answer ``i`` came. */
  age(i) {
    const latest = this.answers[this.answers.length - 1];
    const seconds = Math.round((latest.at - this.answers[i].at) / 1000);
    return seconds === 0 ? "now" : `−${seconds} s`;
  }

  listVersions(stats) {
    const known = new Set([...this.select.options].map((o) => o.value));
    for (const m of stats.models) {
      const scope = `${m.model}/${m.version}`;
      const label = versionLabel({ name: m.model, version: m.version });
      if (!known.has(scope)) this.select.add(new Option(label, scope));
    }
  }

  draw() {
    const scope = this.select.value;
    const points = this.answers.map((answer, i) => point(this.answers[i - 1], answer, scope));
    // The first answer only starts the rates; drop it once there is a second.
    const shown = points.length > 1 ? points.slice(1) : points;
    const offset = points.length - shown.length;
    for (const { chart, metric, output } of this.figures) {
      const values = {};
      for (const { key } of metric.series) values[key] = shown.map((p) => p[key]);
      chart.xLabel = (i) => this.age(i + offset);
      chart.draw(values, shown.length);
      output.textContent = shown.length ? metric.readout(shown[shown.length - 1]) : "";
    }
  }
}

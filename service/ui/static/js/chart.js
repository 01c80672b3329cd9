// A small canvas line chart: a few series over a shared x axis, redrawn whole on every update
// (a few hundred points at most, so drawing only what changed would gain nothing).

const PAD = { left: 46, right: 10, top: 8, bottom: 20 }; // CSS pixels around the plot
const GRID = "#e3e6ea";
const TEXT = "#5b6470";
const TICKS = 4; // about this many horizontal grid lines
const LABEL_GAP = 48; // CSS pixels the two x labels need between them

/** A round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about ``count``. */
function niceStep(span, count) {
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  return power * ([1, 2, 5].find((m) => m * power >= raw) || 10);
}

/** A number in at most ``digits`` significant digits, without exponent for everyday sizes. */
export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (Math.abs(value) >= 10 ** digits) return value.toFixed(0);
  return String(Number(value.toPrecision(digits)));
}

export class LineChart {
  /**
   * ``series``: [{key, color, dots?}]; ``draw`` takes, per key, an array of y values (or null
   * for a gap) indexed by x. The chart shows the latest ``window`` x positions, so it scrolls
   * as data grows; until the window is full the data starts at the left, or ends at the right
   * with ``anchorRight`` (a rolling chart whose latest point is "now"). ``includeZero`` keeps 0
   * on the y axis (counts and rates); ``xLabel(x)`` labels the first and last x position.
   */
  constructor(
    canvas,
    series,
    { window = 60, anchorRight = false, includeZero = false, xLabel = String } = {},
  ) {
    this.canvas = canvas;
    this.series = series;
    this.window = window;
    this.anchorRight = anchorRight;
    this.includeZero = includeZero;
    this.xLabel = xLabel;
    this.last = null; // the latest draw's arguments, to redraw on resize
    new ResizeObserver(() => this.last && this.draw(...this.last)).observe(canvas);
  }

  /** Draw x positions ``[length - window, length)`` of ``values`` ({key: [y or null]}). */
  draw(values, length) {
    this.last = [values, length];
    const { ctx, width, height } = this.context();
    ctx.clearRect(0, 0, width, height);
    const first = Math.max(0, length - this.window);
    const [low, high, step] = this.yRange(values, first, length);
    const plotWidth = width - PAD.left - PAD.right;
    const plotHeight = height - PAD.top - PAD.bottom;
    const start = this.anchorRight ? length - this.window : first; // the x at the left edge
    const toX = (i) => PAD.left + ((i - start) / Math.max(1, this.window - 1)) * plotWidth;
    const toY = (v) => PAD.top + (1 - (v - low) / (high - low)) * plotHeight;
    this.axes(ctx, { low, high, step, first, length, toX, toY, width });
    for (const series of this.series) {
      const drawn = this.line(ctx, series, values[series.key] || [], first, length, toX, toY);
      // How many points of each series are on screen, for tests and the curious.
      this.canvas.dataset[`drawn${series.key[0].toUpperCase()}${series.key.slice(1)}`] = drawn;
    }
  }

  /** A 2D context scaled to CSS pixels, the canvas resized to its box at the screen's density. */
  context() {
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth;
    const height = this.canvas.clientHeight;
    if (this.canvas.width !== Math.round(width * ratio))
      this.canvas.width = Math.round(width * ratio);
    if (this.canvas.height !== Math.round(height * ratio))
      this.canvas.height = Math.round(height * ratio);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return { ctx, width, height };
  }

  /** The y axis: [low, high, step] on round numbers around every visible value. */
  yRange(values, first, length) {
    let low = this.includeZero ? 0 : Infinity;
    let high = this.includeZero ? 0 : -Infinity;
    for (const { key } of this.series) {
      for (const v of (values[key] || []).slice(first, length)) {
        if (Number.isFinite(v)) [low, high] = [Math.min(low, v), Math.max(high, v)];
      }
    }
    if (!Number.isFinite(low)) [low, high] = [0, 1];
    if (high - low < 1e-9) high = low + Math.max(1, Math.abs(low) * 0.1); // flat: give it room
    const step = niceStep(high - low, TICKS);
    return [Math.floor(low / step) * step, Math.ceil(high / step) * step, step];
  }

  axes(ctx, { low, high, step, first, length, toX, toY, width }) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = TEXT;
    ctx.strokeStyle = GRID;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; low + i * step <= high + step / 2; i++) {
      const value = low + i * step;
      const y = Math.round(toY(value)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(PAD.left, y);
      ctx.lineTo(width - PAD.right, y);
      ctx.stroke();
      ctx.fillText(formatNumber(value), PAD.left - 6, y);
    }
    if (length === 0) return;
    const baseline = toY(low) + 12;
    const right = Math.min(toX(length - 1), width - PAD.right);
    ctx.textAlign = "right";
    ctx.fillText(this.xLabel(length - 1), right, baseline);
    if (right - toX(first) < LABEL_GAP) return; // too close to label both ends
    ctx.textAlign = "left";
    ctx.fillText(this.xLabel(first), toX(first), baseline);
  }

  /** One series as a line broken at gaps (and dots if asked); returns the points drawn. */
  line(ctx, series, ys, first, length, toX, toY) {
    ctx.strokeStyle = series.color;
    ctx.fillStyle = series.color;
    ctx.lineWidth = 1.75;
    ctx.beginPath();
    let drawn = 0;
    let open = false; // whether the path has a point to continue from
    for (let i = first; i < Math.min(length, ys.length); i++) {
      const v = ys[i];
      if (!Number.isFinite(v)) {
        open = false;
        continue;
      }
      if (open) ctx.lineTo(toX(i), toY(v));
      else ctx.moveTo(toX(i), toY(v));
      open = true;
      drawn += 1;
    }
    ctx.stroke();
    if (series.dots) {
      for (let i = first; i < Math.min(length, ys.length); i++) {
        if (!Number.isFinite(ys[i])) continue;
        ctx.beginPath();
        ctx.arc(toX(i), toY(ys[i]), 2, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    return drawn;
  }
}

// What the stream panel shows of a session: each step's input, the model's one-step-ahead
// prediction and the actual next value as a chart, the running error, and a table of exact
// values (its rows' data-* attributes hold every number at full precision, the cells round).
//
// The chart's x axis is the row of the series: the input of step t is drawn at t, the
// prediction made at step t and the actual value it is compared with at t + 1.

import { LineChart, formatNumber } from "./chart.js";

const WINDOW = 200; // most rows on the chart; it scrolls past that
const TABLE_ROWS = 1000; // rows kept in the table, the oldest dropped first
const COLORS = { input: "#6e7781", actual: "#1a7f37", prediction: "#1f6feb" };

export class Trace {
  /** ``canvas`` for the chart, ``legend`` for its key, ``table`` (a tbody), ``error`` (an
   * output element for the running error). */
  constructor({ canvas, legend, table, error }) {
    this.legend = legend;
    this.table = table;
    this.error = error;
    this.chart = new LineChart(
      canvas,
      [
        { key: "input", color: COLORS.input },
        { key: "actual", color: COLORS.actual },
        { key: "prediction", color: COLORS.prediction, dots: true },
      ],
      { window: WINDOW },
    );
    this.targets = null;
    this.clear();
  }

  /** A new series of ``length`` rows. ``targets[row]`` is the actual value at a row (null:
   * none); ``labels`` names the input, the prediction and the actual value (null: none). An
   * actual value that is the input itself is not drawn twice. */
  begin(length, targets, labels) {
    this.chart.window = Math.min(WINDOW, length + 1); // a short series fills the chart's width
    this.targets = targets;
    const merged = labels.actual === labels.input;
    this.showActual = labels.actual !== null && !merged;
    const keys = [
      [COLORS.input, `${labels.input} (${merged ? "input and actual" : "input"})`],
      ...(this.showActual ? [[COLORS.actual, `${labels.actual} (actual)`]] : []),
      [COLORS.prediction, `${labels.prediction} (one step ahead)`],
    ];
    this.legend.replaceChildren(
      ...keys.map(([color, text]) => {
        const item = document.createElement("span");
        item.style.setProperty("--swatch", color);
        item.textContent = text;
        return item;
      }),
    );
    this.clear();
  }

  /** No steps: at the start, and after a reset. */
  clear() {
    this.values = { input: [], actual: [], prediction: [] };
    this.sums = { count: 0, absolute: 0, squared: 0, last: null };
    this.length = 0;
    this.table.replaceChildren();
    this.showError();
    this.chart.draw(this.values, 0);
  }

  /** Step ``index`` answered: its inputs and outputs (null: the reply was lost). */
  step(index, inputs, outputs) {
    const actual = this.targets ? (this.targets[index + 1] ?? null) : null;
    this.values.input[index] = inputs[0];
    this.values.prediction[index + 1] = outputs ? outputs[0] : null;
    if (this.showActual) this.values.actual[index + 1] = actual;
    const error = outputs && actual !== null ? outputs[0] - actual : null;
    if (error !== null) this.addError(error);
    this.length = Math.max(this.length, index + 2);
    this.chart.draw(this.values, this.length);
    this.addRow(index, inputs, outputs, actual, error);
  }

  addError(error) {
    this.sums.count += 1;
    this.sums.absolute += Math.abs(error);
    this.sums.squared += error * error;
    this.sums.last = error;
    this.showError();
  }

  showError() {
    const { count, absolute, squared, last } = this.sums;
    const mae = count ? absolute / count : null;
    const rmse = count ? Math.sqrt(squared / count) : null;
    this.error.dataset.count = count;
    this.error.dataset.mae = mae ?? "";
    const summary = `MAE ${formatNumber(mae)} · RMSE ${formatNumber(rmse)} over ${count} steps`;
    this.error.textContent = count ? `${summary} · last ${signed(last)}` : "–";
  }

  addRow(index, inputs, outputs, actual, error) {
    const row = document.createElement("tr");
    row.dataset.step = index;
    row.dataset.inputs = JSON.stringify(inputs);
    row.dataset.outputs = outputs ? JSON.stringify(outputs) : "";
    row.dataset.actual = actual ?? "";
    const cells = [
      String(index),
      inputs.map((v) => formatNumber(v, 4)).join(", "),
      outputs ? outputs.map((v) => formatNumber(v, 4)).join(", ") : "lost",
      formatNumber(actual, 4),
      error === null ? "–" : signed(error),
    ];
    row.append(
      ...cells.map((text) => {
        const cell = document.createElement("td");
        cell.textContent = text;
        return cell;
      }),
    );
    this.table.append(row);
    if (this.table.children.length > TABLE_ROWS) this.table.firstElementChild.remove();
  }
}

function signed(value) {
  return value > 0 ? `+${formatNumber(value)}` : formatNumber(value);
}

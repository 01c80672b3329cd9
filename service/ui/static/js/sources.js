// Where the streamed rows come from: a CSV (the shipped example or an uploaded file) with a
// column picked for each model input, or a synthetic signal. Either way a series is the rows to
// send and, per row, the actual value (or null) that a prediction made one step earlier is
// compared with.

export class SeriesError extends Error {}

const PERIOD = 25; // steps per cycle of the periodic synthetic signals

/** A CSV text as {columns, records: [{line, cells}]}: comma-separated, a header row first,
 * blank lines skipped, quotes around a field dropped (commas inside quotes are not supported). */
export function parseCsv(text) {
  const split = (line) => line.split(",").map((field) => field.trim().replace(/^"(.*)"$/, "$1"));
  const lines = text.split(/\r?\n/);
  const header = lines.findIndex((line) => line.trim());
  if (header < 0) throw new SeriesError("the CSV file is empty");
  const records = [];
  lines.forEach((line, i) => {
    if (i > header && line.trim()) records.push({ line: i + 1, cells: split(line) });
  });
  if (!records.length) throw new SeriesError("the CSV file has a header but no rows");
  return { columns: split(lines[header]), records };
}

/** The columns whose first value is a number: the ones worth offering in the pickers. */
export function numericColumns(table) {
  return table.columns.filter((_, i) => Number.isFinite(parseNumber(table.records[0].cells[i])));
}

function parseNumber(raw) {
  return raw === undefined || raw.trim() === "" ? NaN : Number(raw);
}

function cellNumber(table, record, column) {
  const raw = record.cells[column];
  const value = parseNumber(raw);
  if (!Number.isFinite(value)) {
    const shown = JSON.stringify(raw === undefined ? "" : raw);
    throw new SeriesError(
      `line ${record.line}, column '${table.columns[column]}': ${shown} is not a number`,
    );
  }
  return value;
}

/** The rows of ``inputColumns`` (names, one per model input) and the actual values of
 * ``targetColumn`` (empty: none; a blank cell: no actual value for that row). */
export function csvSeries(table, inputColumns, targetColumn) {
  const inputs = inputColumns.map((name) => table.columns.indexOf(name));
  const target = targetColumn ? table.columns.indexOf(targetColumn) : -1;
  const rows = table.records.map((record) => inputs.map((i) => cellNumber(table, record, i)));
  const targets = table.records.map((record) => {
    const raw = target < 0 ? "" : record.cells[target] || "";
    return raw.trim() === "" ? null : cellNumber(table, record, target);
  });
  return { rows, targets };
}

/** Standard normal numbers from a seeded generator (mulberry32, Box-Muller), so a synthetic
 * signal is the same every time it is played with the same settings. */
function normals(seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297; // in (0, 1): log() below stays finite
  };
  return () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
}

const SHAPES = {
  sine: (t) => Math.sin((2 * Math.PI * t) / PERIOD),
  square: (t) => (t % PERIOD < PERIOD / 2 ? 1 : -1),
};

/** ``length`` rows of a sine, square wave or random walk plus Gaussian ``noise``; with several
 * inputs, each further input runs a quarter period later (the walks are independent). The
 * actual value of a row is its first input. */
export function syntheticSeries(kind, length, noise, inputSize) {
  const next = normals(1);
  const walks = new Array(inputSize).fill(0);
  const rows = [];
  for (let t = 0; t < length; t++) {
    const row = [];
    for (let k = 0; k < inputSize; k++) {
      const clean =
        kind === "walk" ? (walks[k] += 0.1 * next()) : SHAPES[kind](t + (k * PERIOD) / 4);
      row.push(clean + noise * next());
    }
    rows.push(row);
  }
  return { rows, targets: rows.map((row) => row[0]) };
}

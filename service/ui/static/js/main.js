// Wires the page together: readiness and the models table, the live load panel, the API key
// form, the error list, and the stream panel's form and buttons.

import { ApiError, apiKey, request, setApiKey } from "./api.js";
import { LoadPanel } from "./load.js";
import { renderModels, showModelsMessage, showSessions, versionLabel } from "./models.js";
import { SeriesError, csvSeries, numericColumns, parseCsv, syntheticSeries } from "./sources.js";
import { State, StreamSession } from "./stream.js";
import { Trace } from "./trace.js";

const $ = (id) => document.getElementById(id);
const MAX_ERRORS = 5; // messages kept on screen
const MAX_NOTICES = 20;
const KEY_REFUSED = 4401; // websocket close code of a missing or wrong key

const page = {
  models: [], // the latest /v1/models answer
  tables: { example: null, upload: null }, // parsed CSVs ({columns, records})
  session: null, // the StreamSession, once one is started
  rows: [], // the rows it streams
};

const load = new LoadPanel($("load"), $("load-model"), {
  onStats: (stats) => showSessions($("model-rows"), stats),
  onError: reportError,
});
const trace = new Trace({
  canvas: $("stream-chart"),
  legend: $("stream-legend"),
  table: $("steps"),
  error: $("running-error"),
});

// -- errors and notices -------------------------------------------------------------------------

/** Show a message in the error list; a repeat of the latest one counts up instead. */
function showError(message) {
  const list = $("error-list");
  const latest = list.lastElementChild;
  if (latest && latest.dataset.message === message) {
    latest.dataset.count = Number(latest.dataset.count) + 1;
    latest.querySelector("small").textContent = ` ×${latest.dataset.count}`;
  } else {
    const item = document.createElement("li");
    item.dataset.message = message;
    item.dataset.count = 1;
    item.append(message, document.createElement("small"));
    list.append(item);
    while (list.children.length > MAX_ERRORS) list.firstElementChild.remove();
  }
  $("errors").hidden = false;
}

function reportError(error) {
  showError(error.message);
  if (error instanceof ApiError && error.status === 401) askForKey();
}

function addNotice(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("notices").append(item);
  while ($("notices").children.length > MAX_NOTICES) $("notices").firstElementChild.remove();
}

// -- API key ------------------------------------------------------------------------------------

function askForKey() {
  $("key-panel").hidden = false;
  $("api-key").focus();
}

function showKeyState() {
  $("key-toggle").textContent = apiKey() ? "API key ✓" : "API key";
}

function useKey(key) {
  setApiKey(key);
  $("api-key").value = "";
  $("key-panel").hidden = Boolean(key);
  showKeyState();
  refresh();
}

// -- readiness and models -----------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitUntilReady() {
  for (;;) {
    try {
      await request("health/ready");
      $("readiness").textContent = "ready";
      $("readiness").className = "pill ready";
      return;
    } catch (error) {
      $("readiness").textContent = error.status === 503 ? "loading models…" : "unreachable";
      $("readiness").className = "pill";
      if (error.status !== 503) showError(error.message);
      showModelsMessage($("model-rows"), $("readiness").textContent);
    }
    await sleep(1000);
  }
}

async function loadModels() {
  try {
    page.models = (await request("v1/models")).models;
  } catch (error) {
    reportError(error);
    const needsKey = error.status === 401;
    showModelsMessage(
      $("model-rows"),
      needsKey ? "an API key is needed to list the models" : error.message,
    );
    return;
  }
  renderModels($("model-rows"), page.models);
  const select = $("stream-model");
  const chosen = select.value;
  select.replaceChildren(...page.models.map((m, i) => new Option(versionLabel(m), String(i))));
  if (chosen && Number(chosen) < page.models.length) select.value = chosen;
  await showColumns();
}

/** On load, and whenever a key is given: wait for the service, list the models, poll stats. */
async function refresh() {
  load.stop();
  await waitUntilReady();
  await loadModels();
  load.start();
}

// -- the series to stream -----------------------------------------------------------------------

function chosenModel() {
  return page.models[Number($("stream-model").value)];
}

function chosenSource() {
  return document.querySelector('input[name="source"]:checked').value;
}

/** The parsed CSV of the chosen source (null for a synthetic signal or no file yet). */
async function chosenTable() {
  const source = chosenSource();
  if (source === "example" && !page.tables.example) {
    const response = await fetch("co2_changes.csv");
    if (!response.ok) throw new ApiError(response.status, "the example series is not served");
    page.tables.example = parseCsv(await response.text());
  }
  return page.tables[source] || null;
}

/** A select of ``columns`` with ``chosen`` selected (``none``: an empty first option). */
function columnSelect(select, columns, chosen, none) {
  const options = columns.map((name) => new Option(name, name));
  if (none) options.unshift(new Option(none, ""));
  select.replaceChildren(...options);
  select.value = chosen;
}

/** One column picker per model input (preset to the column named like the input, else the
 * next numeric one) and the column whose next value the predictions are compared with. */
async function showColumns() {
  const source = chosenSource();
  for (const label of document.querySelectorAll("label.synthetic"))
    label.hidden = source !== "synthetic";
  const model = chosenModel();
  let table = null;
  try {
    table = await chosenTable();
  } catch (error) {
    reportError(error);
  }
  $("columns").hidden = !table || !model;
  if (!table || !model) return;
  const numeric = numericColumns(table);
  const names = model.feature_names || [];
  const pickers = [];
  for (let i = 0; i < model.input_size; i++) {
    const name = names[i] || `input ${i}`;
    const label = document.createElement("label");
    const select = document.createElement("select");
    select.dataset.input = i;
    columnSelect(
      select,
      numeric,
      numeric.includes(name) ? name : numeric[i % numeric.length] || "",
    );
    label.append(`${name} `, select);
    pickers.push(label);
  }
  $("column-pickers").replaceChildren(...pickers);
  // Compare with a column named like the output, else with the first input's next value.
  const output = (model.output_names || [])[0];
  const first = pickers.length ? pickers[0].querySelector("select").value : "";
  columnSelect($("target-column"), numeric, numeric.includes(output) ? output : first, "(none)");
}

/** The rows to stream, their actual values and the chart's labels, from the form. */
async function chosenSeries(model) {
  const limit = Math.floor(Number($("limit").value)) || Infinity; // empty: the whole series
  if (limit < 1) throw new SeriesError("stop after at least one step");
  const output = (model.output_names || [])[0] || "prediction";
  if (chosenSource() === "synthetic") {
    const length = Math.min(limit, Math.max(1, Number($("synthetic-length").value) || 1));
    const noise = Math.max(0, Number($("synthetic-noise").value) || 0);
    const series = syntheticSeries($("synthetic-kind").value, length, noise, model.input_size);
    return { ...series, labels: { input: "signal", actual: "signal", prediction: output } };
  }
  const table = await chosenTable();
  if (!table) throw new SeriesError("choose a CSV file first");
  const inputs = [...$("column-pickers").querySelectorAll("select")].map((s) => s.value);
  const target = $("target-column").value;
  const { rows, targets } = csvSeries(table, inputs, target);
  const labels = { input: inputs[0], actual: target || null, prediction: output };
  return { rows: rows.slice(0, limit), targets, labels };
}

async function readUpload() {
  const file = $("csv-file").files[0];
  if (!file) return;
  try {
    page.tables.upload = parseCsv(await file.text());
  } catch (error) {
    page.tables.upload = null;
    showError(`The CSV file cannot be used: ${error.message}`);
  }
  document.querySelector('input[name="source"][value="upload"]').checked = true;
  await showColumns();
}

// -- the stream ---------------------------------------------------------------------------------

function rate() {
  const value = Number($("rate").value);
  return Number.isFinite(value) && value > 0 ? Math.min(value, 1000) : 10;
}

async function startStream() {
  const model = chosenModel();
  if (!model) {
    showError("No model to stream to: the service lists none (or needs an API key).");
    return;
  }
  let series;
  try {
    series = await chosenSeries(model);
  } catch (error) {
    showError(
      error instanceof SeriesError
        ? `The series cannot be streamed: ${error.message}`
        : error.message,
    );
    return;
  }
  page.rows = series.rows;
  trace.begin(series.rows.length, series.targets, series.labels);
  $("notices").replaceChildren();
  $("session-id").textContent = "opening…";
  $("step-count").textContent = "0";
  const target = { model: model.name, version: model.version };
  page.session = new StreamSession(target, series.rows, rate(), {
    hello: (hello) => ($("session-id").textContent = hello.session_id),
    step: (index, outputs) => showStep(index, outputs),
    lost: (index) => showStep(index, null),
    reset: () => {
      trace.clear();
      $("step-count").textContent = "0";
    },
    state: showState,
    notice: addNotice,
    error: (message, code) => {
      showError(message);
      if (code === KEY_REFUSED) askForKey();
    },
  });
  page.session.start();
}

function showStep(index, outputs) {
  trace.step(index, page.rows[index], outputs);
  $("step-count").textContent = String(index + 1);
}

/** The state in words, and the buttons and fields that make sense in it. */
function showState(state) {
  $("stream-state").textContent = state;
  $("stream").dataset.state = state;
  const active = state !== State.CLOSED && state !== State.FAILED;
  const hasSession = page.session && page.session.sessionId !== null;
  $("start").disabled = active;
  $("pause").disabled = state !== State.STREAMING;
  $("resume").disabled = state !== State.PAUSED;
  $("reset").disabled = ![State.STREAMING, State.PAUSED, State.FINISHED].includes(state);
  $("close").disabled = !(active || (state === State.FAILED && hasSession));
  for (const id of ["stream-model", "source", "columns", "limit"]) $(id).disabled = active;
}

// -- wiring -------------------------------------------------------------------------------------

$("key-toggle").addEventListener("click", () => ($("key-panel").hidden = !$("key-panel").hidden));
$("key-panel").addEventListener("submit", (event) => {
  event.preventDefault();
  useKey($("api-key").value.trim());
});
$("key-forget").addEventListener("click", () => useKey(""));
$("errors-clear").addEventListener("click", () => {
  $("error-list").replaceChildren();
  $("errors").hidden = true;
});
$("stream-model").addEventListener("change", showColumns);
for (const radio of document.querySelectorAll('input[name="source"]'))
  radio.addEventListener("change", showColumns);
$("csv-file").addEventListener("change", readUpload);
$("rate").addEventListener("change", () => page.session && page.session.setRate(rate()));
$("start").addEventListener("click", startStream);
$("pause").addEventListener("click", () => page.session.pause());
$("resume").addEventListener("click", () => page.session.resume());
$("reset").addEventListener("click", () => page.session.reset());
$("close").addEventListener("click", () => page.session.close());

showKeyState();
refresh();

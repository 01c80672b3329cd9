// The models table: one row per served version, from GET /v1/models, with the open sessions of
// each version filled in from /v1/stats as the load panel polls it.

/** A version's label in selects and tables: "co2-forecaster v1". */
export function versionLabel(model) {
  return `${model.name} v${model.version}`;
}

/** "1 (co2_change)": a size and, when the metadata names them, the features. */
function sizeWithNames(size, names) {
  return names && names.length ? `${size} (${names.join(", ")})` : String(size);
}

function cell(text, title) {
  const td = document.createElement("td");
  td.textContent = text;
  if (title) td.title = title;
  return td;
}

/** Fill ``tbody`` with the models of a /v1/models answer (every listed version is loaded). */
export function renderModels(tbody, models) {
  const latest = new Map(); // name -> highest version, the model's default
  for (const m of models) latest.set(m.name, Math.max(latest.get(m.name) || 0, m.version));
  tbody.replaceChildren(
    ...models.map((m) => {
      const row = document.createElement("tr");
      row.dataset.name = m.name;
      row.dataset.version = m.version;
      const isDefault = latest.get(m.name) === m.version;
      const outputs = sizeWithNames(m.output_size, m.output_names);
      row.append(
        cell(m.name, m.task && m.task.description),
        cell(isDefault ? `${m.version} (default)` : String(m.version)),
        cell(m.cell),
        cell(`${m.num_layers} × ${m.hidden_size}`),
        cell(`${sizeWithNames(m.input_size, m.feature_names)} → ${outputs}`),
        cell(m.provider, `providers in order: ${(m.providers || []).join(", ")}`),
        cell("loaded"),
        cell("–"),
      );
      row.lastChild.className = "sessions";
      return row;
    }),
  );
  if (!models.length) showModelsMessage(tbody, "no model is loaded");
}

/** One line across the table instead of models: "loading models…", "API key needed". */
export function showModelsMessage(tbody, text) {
  const td = document.createElement("td");
  td.colSpan = 8;
  td.textContent = text;
  const row = document.createElement("tr");
  row.append(td);
  tbody.replaceChildren(row);
}

/** Put each version's open sessions (a /v1/stats answer) in its row. */
export function showSessions(tbody, stats) {
  for (const m of stats.models) {
    const row = tbody.querySelector(
      `tr[data-name="${CSS.escape(m.model)}"][data-version="${m.version}"]`,
    );
    if (row) row.querySelector(".sessions").textContent = String(m.sessions);
  }
}

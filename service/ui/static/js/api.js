// The service's API as the page uses it: the API key (kept for this tab only), JSON requests
// whose every {"error"} becomes an ApiError in plain words, and the /v1/stream websocket URL.

const KEY_ITEM = "rnnserve.apiKey"; // in sessionStorage: gone when the tab closes

// The service's root, from the page's own address (/ui/ sits beside /v1/), so the page also
// works behind a proxy that serves the service under a path prefix.
const ROOT = new URL("../", document.baseURI);

// What each HTTP status means (docs/reference/errors.md), put before the service's message.
const STATUS_WORDS = {
  0: "The service cannot be reached",
  400: "The service could not read the request",
  401: "API key missing or refused",
  404: "Not found",
  408: "The request did not arrive in time",
  409: "Not allowed in the session's state",
  413: "Too large",
  422: "The input does not fit the model",
  429: "This API key holds the most sessions it may",
  500: "The model failed",
  503: "The service is busy or not ready",
};

// The same for websocket close codes (docs/reference/errors.md, service/engine/errors.py).
const CLOSE_WORDS = {
  1009: "Message too large",
  1011: "Internal error in the service",
  1012: "The service restarted",
  4400: "Bad stream request",
  4401: "API key missing or refused",
  4404: "Session or model not found",
  4409: "The session was taken over by another connection",
  4429: "This API key holds the most sessions it may",
  4503: "The service is busy or not ready",
};

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

/** A failed call: ``status`` is the HTTP status (0: no answer), ``message`` says it in words. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(`${STATUS_WORDS[status] || `Error ${status}`}: ${detail}`);
    this.status = status;
    this.detail = detail; // the service's own {"error"} text
  }
}

/** A websocket close code and reason in words, e.g. "Session or model not found: session ...". */
export function closeInWords(code, reason) {
  const words = CLOSE_WORDS[code] || `Connection closed (code ${code})`;
  return reason ? `${words}: ${reason}` : words;
}

/** Call the API; resolves to the JSON answer (null for 204), rejects with an ApiError. */
export async function request(path, { method = "GET", body } = {}) {
  const headers = {};
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    response = await fetch(new URL(path, ROOT), { method, headers, body: payload });
  } catch (exc) {
    throw new ApiError(0, exc.message);
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && typeof data.error === "string" ? data.error : response.statusText;
    throw new ApiError(response.status, detail);
  }
  return data;
}

/** The websocket URL of /v1/stream with ``query``; the key goes as ?token= (browsers cannot
 * set an Authorization header on a websocket). */
export function streamUrl(query) {
  const url = new URL("v1/stream", ROOT);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null) url.searchParams.set(name, value);
  }
  if (apiKey()) url.searchParams.set("token", apiKey());
  return url.href;
}

// A /v1/mux client in plain JavaScript (Node.js 22, or Node.js 20 with --experimental-websocket):
// open 3 sessions of a model, step all of them in one binary frame per step, close them.
// Usage: node mux_client.mjs [ws://localhost:8000] [co2-forecaster]
const url = (process.argv[2] ?? "ws://localhost:8000") + "/v1/mux";
const model = process.argv[3] ?? "co2-forecaster";
const ws = new WebSocket(url);
ws.binaryType = "arraybuffer";

// Replies come in order, one per message sent: a queue of waiting promises is all we need.
const waiting = [];
ws.onmessage = (event) => waiting.shift()(event.data);
const next = () => new Promise((resolve) => waiting.push(resolve));
const control = async (message) => {
  ws.send(JSON.stringify(message));
  const reply = JSON.parse(await next());
  if (reply.op === "error") throw new Error(reply.error);
  return reply;
};

// A step frame: 24-byte header, then int32 handles, then float32 inputs (K x T x n), little-endian.
function stepFrame(handles, inputs, steps, n, requestId) {
  const k = handles.length;
  const buffer = new ArrayBuffer(24 + 4 * k + 4 * k * steps * n);
  const view = new DataView(buffer);
  new Uint8Array(buffer, 0, 4).set([0x52, 0x4e, 0x4d, 0x31]); // "RNM1"
  view.setUint8(4, 1); // kind: step
  view.setUint8(5, 0); // flags: no expected step counts
  view.setUint32(8, k, true);
  view.setUint32(12, steps, true);
  view.setUint32(16, n, true);
  view.setUint32(20, requestId, true);
  handles.forEach((h, i) => view.setInt32(24 + 4 * i, h, true));
  inputs.forEach((x, i) => view.setFloat32(24 + 4 * k + 4 * i, x, true));
  return buffer;
}

// A step reply: 24-byte header, int64 step counts, float32 outputs (K x T x o), uint8 statuses.
function readReply(buffer) {
  const view = new DataView(buffer);
  const [k, steps, o] = [view.getUint32(8, true), view.getUint32(12, true), view.getUint32(16, true)];
  const counts = [...Array(k)].map((_, i) => Number(view.getBigInt64(24 + 8 * i, true)));
  const first = 24 + 8 * k;
  const outputs = [...Array(k * steps * o)].map((_, i) => view.getFloat32(first + 4 * i, true));
  const status = [...new Uint8Array(buffer, first + 4 * k * steps * o, k)];
  return { counts, outputs, status };
}

ws.onopen = async () => {
  await next(); // {"op": "hello", ...}
  const opened = await control({ op: "open", model, count: 3 });
  for (const [t, week] of [[0.12, -0.3, 0.25], [0.41, 0.05, -0.1]].entries()) {
    ws.send(stepFrame(opened.handles, week, 1, 1, t + 1)); // one step of 3 sessions, 1 input each
    const reply = readReply(await next());
    console.log(`step ${t}: status ${reply.status} counts ${reply.counts} outputs ${reply.outputs.map((y) => y.toFixed(4))}`);
  }
  await control({ op: "close", handles: opened.handles });
  ws.close();
};

"""100 sessions streamed at once over HTTP and over the websocket against a real server: every
output equals /predict on the whole sequence."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import httpx
import numpy as np
import websockets

if TYPE_CHECKING:
    from conftest import LiveServer


SESSIONS = 100
FEATURES = 2  # input size of the tiny models


def random_sequences(seed: int) -> list[list[list[list[float]]]]:
    """Per session: its chunks (random sizes 1..8), each a list of steps."""
    rng = np.random.default_rng(seed)
    sessions = []
    for _ in range(SESSIONS):
        x = rng.normal(size=(int(rng.integers(5, 40)), FEATURES)).round(4)
        cuts = np.cumsum(rng.integers(1, 9, size=len(x)))
        sessions.append([c.tolist() for c in np.split(x, cuts[cuts < len(x)])])
    return sessions


async def predict_whole(http: httpx.AsyncClient, sessions: list) -> list[np.ndarray]:
    whole = [[step for chunk in chunks for step in chunk] for chunks in sessions]
    response = await http.post("/v1/models/tiny/predict", json={"inputs": whole})
    assert response.status_code == 200, response.text
    return [np.array(y) for y in response.json()["outputs"]]


async def stream_http(http: httpx.AsyncClient, chunks: list) -> np.ndarray:
    created = await http.post("/v1/sessions", json={"model": "tiny"})
    sid = created.json()["session_id"]
    outputs, count = [], 0
    for chunk in chunks:
        response = await http.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk})
        assert response.status_code == 200, response.text
        count += len(chunk)
        assert response.json()["step_count"] == count
        outputs += response.json()["outputs"]
    return np.array(outputs)


async def stream_ws(url: str, chunks: list) -> np.ndarray:
    outputs = []
    async with websockets.connect(url + "?model=tiny") as ws:
        await ws.recv()
        for chunk in chunks:
            await ws.send(json.dumps({"inputs": chunk}))
            reply = json.loads(await ws.recv())
            outputs += reply["outputs"]
        await ws.send(json.dumps({"close": True}))
    return np.array(outputs)


async def test_100_http_sessions_match_predict(server: LiveServer) -> None:
    sessions = random_sequences(seed=10)
    limits = httpx.Limits(max_connections=25)
    async with httpx.AsyncClient(base_url=server.http_url, limits=limits, timeout=30) as http:
        expected = await predict_whole(http, sessions)
        streamed = await asyncio.gather(*(stream_http(http, chunks) for chunks in sessions))
        stats = (await http.get("/v1/stats")).json()
    for got, want in zip(streamed, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    tiny2 = next(m for m in stats["models"] if m["version"] == 2)
    assert tiny2["batch_size_max"] > 1  # sessions shared ONNX Runtime calls


async def test_100_websocket_sessions_match_predict(server: LiveServer) -> None:
    sessions = random_sequences(seed=11)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        expected = await predict_whole(http, sessions)
    streamed = await asyncio.gather(*(stream_ws(server.ws_url, chunks) for chunks in sessions))
    for got, want in zip(streamed, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)

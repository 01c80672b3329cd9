"""The websocket API, through the test client and against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import websockets
from starlette.websockets import WebSocketDisconnect

if TYPE_CHECKING:
    from conftest import LiveServer, TestClient, TinyGRU

STEPS_A = [[0.5, -1.0], [1.5, 0.25], [-0.3, 0.8]]
STEPS_B = [[0.1, 0.2], [2.0, -2.0]]


def test_stream_announces_the_session_and_replies_in_order(
    client: TestClient, tiny: TinyGRU
) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        hello = ws.receive_json()
        assert (hello["model"], hello["version"], hello["step_count"]) == ("tiny", 2, 0)
        ws.send_json({"inputs": STEPS_A})
        first = ws.receive_json()
        ws.send_json({"inputs": STEPS_B[0]})  # a flat list is one step
        second = ws.receive_json()
    assert (first["step_count"], second["step_count"]) == (3, 4)
    expected, _ = tiny.run(STEPS_A + STEPS_B[:1])
    np.testing.assert_allclose(first["outputs"] + second["outputs"], expected, atol=1e-5)
    # the dropped connection left the session open for resume
    info = client.get(f"/v1/sessions/{hello['session_id']}").json()
    assert (info["state"], info["step_count"]) == ("open", 4)


def test_resume_by_session_id_continues_the_state(client: TestClient, tiny: TinyGRU) -> None:
    sid = client.post("/v1/sessions", json={"model": "tiny", "version": 1}).json()["session_id"]
    client.post(f"/v1/sessions/{sid}/steps", json={"inputs": STEPS_A})
    with client.websocket_connect(f"/v1/stream?session_id={sid}") as ws:
        hello = ws.receive_json()
        assert (hello["session_id"], hello["version"], hello["step_count"]) == (sid, 1, 3)
        ws.send_json({"inputs": STEPS_B})
        reply = ws.receive_json()
    assert reply["step_count"] == 5


BAD_FRAMES = [
    pytest.param("{not json", "malformed JSON frame", id="malformed"),
    pytest.param("[1, 2]", "a frame must be a JSON object", id="not-object"),
    pytest.param('{"steps": [[1, 2]]}', 'a frame needs "inputs"', id="no-inputs"),
    pytest.param('{"inputs": [[1, "x"]]}', "'inputs[0][1]' is not a number", id="string"),
    pytest.param('{"inputs": [[1, 2, 3]]}', "has 3 values; the model expects 2", id="features"),
    pytest.param('{"inputs": []}', "'inputs' is empty", id="empty"),
    pytest.param('{"inputs": [[NaN, 1]]}', "'inputs[0][0]' is nan", id="nan"),
    pytest.param('{"inputs": [[1e39, 1]]}', "beyond float32", id="overflow"),
    pytest.param(json.dumps({"inputs": [[1, 2]] * 65}), "at most 64 steps", id="too-long"),
]


@pytest.mark.parametrize(("frame", "message"), BAD_FRAMES)
def test_bad_frame_gets_an_error_frame_and_the_stream_goes_on(
    client: TestClient, tiny: TinyGRU, frame: str, message: str
) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        ws.receive_json()
        ws.send_json({"inputs": STEPS_A})
        ws.receive_json()
        ws.send_text(frame)
        error = ws.receive_json()
        assert set(error) == {"error"} and message in error["error"]
        ws.send_json({"inputs": STEPS_B})
        after = ws.receive_json()
    assert after["step_count"] == 5
    np.testing.assert_allclose(after["outputs"], tiny.run(STEPS_A + STEPS_B)[0][3:], atol=1e-5)


def close_of(client: TestClient, url: str, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect(url, **kwargs) as ws:
        ws.receive_json()
    return info.value.code, info.value.reason


@pytest.mark.parametrize(
    ("url", "code", "reason"),
    [
        pytest.param("/v1/stream?model=nope", 4404, "model 'nope' not found", id="model"),
        pytest.param("/v1/stream?model=tiny&version=9", 4404, "has no version 9", id="version"),
        pytest.param("/v1/stream?session_id=nope", 4404, "session 'nope' not found", id="session"),
        pytest.param("/v1/stream", 4400, "open /v1/stream with ?model=", id="neither"),
        pytest.param("/v1/stream?model=tiny&version=x", 4400, "positive integer", id="bad-version"),
    ],
)
def test_fatal_open_errors_close_with_documented_codes(
    client: TestClient, url: str, code: int, reason: str
) -> None:

    got_code, got_reason = close_of(client, url)
    assert got_code == code and reason in got_reason


def test_max_sessions_closes_with_4503(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_sessions=1)
    client.post("/v1/sessions", json={"model": "tiny"})
    code, reason = close_of(client, "/v1/stream?model=tiny")
    assert code == 4503 and "limit of 1 open sessions" in reason


def test_keys_are_checked_from_header_or_token(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="k1,k2")
    code, reason = close_of(client, "/v1/stream?model=tiny")
    assert code == 4401 and "needs an API key" in reason
    code, _ = close_of(client, "/v1/stream?model=tiny&token=wrong")
    assert code == 4401
    with client.websocket_connect("/v1/stream?model=tiny&token=k1") as ws:
        sid = ws.receive_json()["session_id"]
    code, reason = close_of(client, f"/v1/stream?session_id={sid}&token=k2")
    assert code == 4404  # another key's session does not exist for k2
    headers = {"Authorization": "Bearer k1"}
    with client.websocket_connect(f"/v1/stream?session_id={sid}", headers=headers) as ws:
        assert ws.receive_json()["session_id"] == sid


def test_close_frame_deletes_the_session(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        sid = ws.receive_json()["session_id"]
        ws.send_json({"close": True})
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
    assert info.value.code == 1000
    assert client.get(f"/v1/sessions/{sid}").status_code == 404


def test_reset_frame_zeroes_the_state(client: TestClient, tiny: TinyGRU) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        ws.receive_json()
        ws.send_json({"inputs": STEPS_A})
        ws.receive_json()
        ws.send_json({"reset": True})
        assert ws.receive_json() == {"reset": True, "step_count": 0}
        ws.send_json({"inputs": STEPS_B})
        reply = ws.receive_json()
    np.testing.assert_allclose(reply["outputs"], tiny.run(STEPS_B)[0], atol=1e-5)


def test_session_deleted_over_http_closes_the_stream(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        sid = ws.receive_json()["session_id"]
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
        ws.send_json({"inputs": STEPS_A})
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
    assert info.value.code == 4404


def test_a_newer_connection_takes_the_session_over(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as old:
        sid = old.receive_json()["session_id"]
        with client.websocket_connect(f"/v1/stream?session_id={sid}") as new:
            new.receive_json()
            old.send_json({"inputs": STEPS_A})
            with pytest.raises(WebSocketDisconnect) as info:
                old.receive_json()
            assert info.value.code == 4409
            new.send_json({"inputs": STEPS_A})
            assert new.receive_json()["step_count"] == 3


async def test_real_server_stream_drop_and_resume(server: LiveServer, tiny: TinyGRU) -> None:
    async with websockets.connect(server.ws_url + "?model=tiny") as ws:
        hello = json.loads(await ws.recv())
        await ws.send(json.dumps({"inputs": STEPS_A}))
        first = json.loads(await ws.recv())
    async with websockets.connect(f"{server.ws_url}?session_id={hello['session_id']}") as ws:
        assert json.loads(await ws.recv())["step_count"] == 3
        await ws.send(json.dumps({"inputs": STEPS_B}))
        second = json.loads(await ws.recv())
    expected, _ = tiny.run(STEPS_A + STEPS_B)
    np.testing.assert_allclose(first["outputs"] + second["outputs"], expected, atol=1e-5)


async def test_real_server_closes_1009_on_a_frame_over_the_limit(server: LiveServer) -> None:
    async with websockets.connect(server.ws_url + "?model=tiny") as ws:
        await ws.recv()
        await ws.send(json.dumps({"inputs": [[1.0, 2.0]] * 9000}))  # over 64 KiB
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize(
    ("extra", "reply_keys", "step_count"),
    [
        pytest.param({"reset": False, "close": False}, {"outputs", "step_count"}, 6, id="step"),
        pytest.param({"reset": True}, {"reset", "step_count"}, 0, id="reset-wins"),
    ],
)
def test_a_frame_with_inputs_and_control_keys(
    client: TestClient, extra: dict[str, bool], reply_keys: set[str], step_count: int
) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        ws.receive_json()
        ws.send_json({"inputs": STEPS_A})
        ws.receive_json()
        ws.send_json({"inputs": STEPS_A} | extra)
        reply = ws.receive_json()
    assert set(reply) == reply_keys and reply["step_count"] == step_count


def test_a_close_frame_with_inputs_closes_without_a_step(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        sid = ws.receive_json()["session_id"]
        ws.send_json({"inputs": STEPS_A, "close": True})
        with pytest.raises(WebSocketDisconnect) as info:
            ws.receive_json()
    assert info.value.code == 1000
    assert client.get(f"/v1/sessions/{sid}").status_code == 404


def test_a_client_gone_while_the_reply_is_sent_detaches_the_session(client: TestClient) -> None:
    sent: list[dict[str, Any]] = []
    incoming = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": json.dumps({"inputs": STEPS_A})},
    ]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send" and sent[1:]:  # the reply to the first frame
            raise OSError("connection lost")
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/v1/stream",
        "raw_path": b"/v1/stream",
        "root_path": "",
        "query_string": b"model=tiny",
        "headers": [],
        "subprotocols": [],
        "app": client.app,
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)  # returns: no error escapes
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    sid = json.loads(sent[1]["text"])["session_id"]
    info = client.get(f"/v1/sessions/{sid}").json()
    assert (info["state"], info["step_count"]) == ("open", 3)


async def test_real_server_replies_in_text_frames(server: LiveServer) -> None:
    async with websockets.connect(server.ws_url + "?model=tiny") as ws:
        assert isinstance(await ws.recv(), str)
        await ws.send(json.dumps({"inputs": STEPS_A}).encode())  # a binary frame is read too
        reply = await ws.recv()
    assert isinstance(reply, str) and json.loads(reply)["step_count"] == 3


def test_a_frame_at_another_step_count_gets_an_error_frame_and_the_stream_goes_on(
    client: TestClient,
) -> None:
    with client.websocket_connect("/v1/stream?model=tiny") as ws:
        ws.receive_json()
        ws.send_json({"inputs": [[1, 2]], "expected_step_count": 0})
        assert ws.receive_json()["step_count"] == 1
        ws.send_json({"inputs": [[1, 2]], "expected_step_count": 0})  # a resent frame
        refused = ws.receive_json()
        assert refused["step_count"] == 1 and "is at step 1, not 0" in refused["error"]
        ws.send_json({"inputs": [[1, 2]], "expected_step_count": 1})
        assert ws.receive_json()["step_count"] == 2

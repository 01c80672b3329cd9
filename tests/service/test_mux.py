"""The multiplexed stream ``/v1/mux`` against a live server, with ``MuxClient`` and raw frames."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service.client import ClientError
from service.client.mux import MuxClient, MuxError
from service.engine.groups import EntryStatus
from service.mux import codec

if TYPE_CHECKING:
    from conftest import LiveServer, TinyGRU

ROOT = Path(__file__).resolve().parents[2]
OK, GONE = EntryStatus.OK, EntryStatus.SESSION_GONE


@pytest.fixture
def mixed_models(models_dir: Path, tmp_path: Path) -> Path:
    """``tiny`` (2 inputs per step) and the shipped ``co2-forecaster`` (1 input per step)."""
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    shutil.copytree(ROOT / "models" / "co2-forecaster", folder / "co2-forecaster")
    return folder


def _steps(server: LiveServer, session_id: str, inputs: np.ndarray) -> dict[str, Any]:
    response = httpx.post(
        f"{server.http_url}/v1/sessions/{session_id}/steps",
        json={"inputs": inputs.tolist()},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _step_count(server: LiveServer, session_id: str) -> int:
    response = httpx.get(f"{server.http_url}/v1/sessions/{session_id}", timeout=10)
    assert response.status_code == 200, response.text
    count: int = response.json()["step_count"]
    return count


async def test_frames_step_every_session_as_v1_steps_do(server: LiveServer, tiny: TinyGRU) -> None:
    """Five sessions, three frames of two steps: outputs and counts equal the per-session API."""
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(3, 5, 2, 2)).astype(np.float32)  # (frames, K, T, n)
    async with await MuxClient.connect(server.ws_url.removesuffix("/v1/stream")) as mux:
        assert mux.hello["protocol"] == "rnnserve-mux/1"
        opened = await mux.open("tiny", count=5)
        assert opened.step_counts == [0] * 5 and opened.input_size == 2
        for f, inputs in enumerate(frames):
            reply = await mux.step(opened.handles, inputs)
            assert reply.status.tolist() == [OK] * 5 and not reply.messages
            assert reply.step_counts.tolist() == [2 * (f + 1)] * 5
            for k in range(5):
                expected = tiny.run(frames[: f + 1, k].reshape(-1, 2))[0][-2:]
                np.testing.assert_allclose(reply.outputs[k], expected, atol=1e-5)
        assert _step_count(server, opened.session_ids[3]) == 6
    # Closing the connection lets go of the sessions: the per-session API continues them.
    more = rng.normal(size=(1, 2)).astype(np.float32)
    body = _steps(server, opened.session_ids[0], more)
    assert body["step_count"] == 7
    history = np.concatenate([frames[:, 0].reshape(-1, 2), more])
    np.testing.assert_allclose(body["outputs"], tiny.run(history)[0][-1:], atol=1e-5)


async def test_the_json_form_answers_as_the_binary_one(server: LiveServer) -> None:
    inputs = np.random.default_rng(2).normal(size=(3, 1, 2)).astype(np.float32)
    answers = []
    for binary in (True, False):
        async with await MuxClient.connect(server.http_url) as mux:
            opened = await mux.open("tiny", count=3)
            if binary:
                reply = await mux.step(opened.handles, inputs)
                answers.append((reply.status.tolist(), reply.step_counts.tolist(), reply.outputs))
            else:
                answer = await mux._control(
                    {"op": "step", "handles": opened.handles, "inputs": inputs.tolist()}
                )
                outputs = np.array(answer["outputs"], np.float32)
                answers.append((answer["status"], answer["step_counts"], outputs))
    assert answers[0][:2] == answers[1][:2] == ([0, 0, 0], [1, 1, 1])
    np.testing.assert_array_equal(answers[0][2], answers[1][2])


async def test_a_bad_entry_fails_alone_and_the_others_step(
    server: LiveServer, tiny: TinyGRU
) -> None:
    async with await MuxClient.connect(server.http_url) as mux:
        opened = await mux.open("tiny", count=3)
        a, b, c = opened.handles
        inputs = np.ones((6, 1, 2), np.float32)
        inputs[5, 0, 1] = np.nan
        reply = await mux.step([a, 999, b, b, -1, c], inputs)
        assert reply.status.tolist() == [
            OK,
            EntryStatus.UNKNOWN_HANDLE,
            EntryStatus.DUPLICATE_HANDLE,
            EntryStatus.DUPLICATE_HANDLE,
            EntryStatus.UNKNOWN_HANDLE,
            EntryStatus.NOT_FINITE_INPUT,
        ]
        assert reply.step_counts.tolist() == [1, -1, 0, 0, -1, 0]
        assert "handle 999 is not open" in reply.messages[1]
        assert "appears more than once" in reply.messages[2]
        assert "NaN or infinity" in reply.messages[5]
        assert np.isnan(reply.outputs[1:]).all()
        np.testing.assert_allclose(reply.outputs[0], tiny.run([[1, 1]])[0], atol=1e-5)
        sessions = opened.session_ids
        assert [_step_count(server, s) for s in sessions] == [1, 0, 0]


async def test_an_entry_of_a_model_with_another_input_size_fails_alone(
    make_server: Callable[..., LiveServer], mixed_models: Path
) -> None:
    server = make_server(models_dir=mixed_models)
    async with await MuxClient.connect(server.http_url) as mux:
        tiny = await mux.open("tiny", count=2)
        co2 = await mux.open("co2-forecaster", count=1)
        handles = [tiny.handles[0], co2.handles[0], tiny.handles[1]]
        reply = await mux.step(handles, np.zeros((3, 1, 2), np.float32))
        assert reply.status.tolist() == [OK, EntryStatus.WRONG_SIZE, OK]
        assert "takes 1 inputs per step; the frame has 2" in reply.messages[1]
        reply = await mux.step(co2.handles, np.full((1, 4, 1), 0.25, np.float32))
        assert reply.status.tolist() == [OK] and reply.step_counts.tolist() == [4]


def _frame_bytes(handles: list[int], inputs: np.ndarray, request_id: int = 5) -> bytes:
    return codec.encode_step(codec.StepFrame(np.array(handles, np.int32), inputs, None, request_id))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        pytest.param(lambda frame: frame[:10], "needs a 24-byte header", id="truncated-header"),
        pytest.param(lambda frame: frame[:-4], "but the frame has", id="truncated-body"),
        pytest.param(lambda frame: frame + b"\0" * 8, "but the frame has", id="trailing-bytes"),
        pytest.param(lambda frame: b"XXXX" + frame[4:], "not a step frame", id="magic"),
        pytest.param(
            lambda frame: frame[:8] + struct.pack("<I", 3) + frame[12:],
            "announces 3 entries",
            id="header-lies",
        ),
        pytest.param(
            lambda frame: frame[:8] + struct.pack("<I", 5) + frame[12:],
            "1 to 4 entries, not 5",
            id="too-many-entries",
        ),
        pytest.param(
            lambda frame: frame[:12] + struct.pack("<I", 65) + frame[16:],
            "1 to 64 steps",
            id="too-many-steps",
        ),
    ],
)
async def test_a_frame_that_cannot_be_read_gets_an_error_and_changes_nothing(
    make_server: Callable[..., LiveServer], mangle: Callable[[bytes], bytes], message: str
) -> None:
    server = make_server(mux_max_entries=4)
    async with connect(server.http_url.replace("http", "ws") + "/v1/mux") as ws:
        json.loads(await ws.recv())  # hello
        await ws.send(json.dumps({"op": "open", "model": "tiny", "count": 2}))
        opened = json.loads(await ws.recv())
        frame = _frame_bytes(opened["handles"], np.ones((2, 1, 2), np.float32))
        await ws.send(mangle(frame))
        error = json.loads(await ws.recv())
        assert error["op"] == "error" and message in error["error"], error
        await ws.send(frame)  # the connection goes on, and nothing was applied before
        reply = codec.decode_reply(await ws.recv())
        assert reply.request_id == 5 and reply.step_counts.tolist() == [1, 1]


async def test_a_message_over_the_size_limit_closes_with_1009(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server(max_request_bytes=4096)
    async with connect(server.http_url.replace("http", "ws") + "/v1/mux") as ws:
        json.loads(await ws.recv())
        await ws.send(_frame_bytes(list(range(400)), np.zeros((400, 1, 2), np.float32)))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_handles_belong_to_one_connection_and_one_key(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server(api_keys=["key-a", "key-b"])
    async with await MuxClient.connect(server.http_url, api_key="key-a") as alice:
        opened = await alice.open("tiny", count=1)
        async with await MuxClient.connect(server.http_url, api_key="key-b") as bob:
            reply = await bob.step(opened.handles, np.zeros((1, 1, 2), np.float32))
            assert reply.status.tolist() == [EntryStatus.UNKNOWN_HANDLE]  # not bob's handle
            with pytest.raises(MuxError, match="not found"):
                await bob.attach(opened.session_ids)  # nor bob's session
        reply = await alice.step(opened.handles, np.zeros((1, 1, 2), np.float32))
        assert reply.status.tolist() == [OK]
    with pytest.raises(ClientError, match=r"the API key is not valid \(close code 4401\)"):
        await MuxClient.connect(server.http_url, api_key="wrong")


async def test_other_paths_refuse_a_held_session_and_an_attach_takes_it_over(
    server: LiveServer, tiny: TinyGRU
) -> None:
    async with await MuxClient.connect(server.http_url) as mux:
        opened = await mux.open("tiny", count=2)
        first = np.full((2, 1, 2), 0.5, np.float32)
        await mux.step(opened.handles, first)
        session_id = opened.session_ids[0]
        refused = httpx.post(
            f"{server.http_url}/v1/sessions/{session_id}/steps", json={"inputs": [[1, 2]]}
        )
        assert refused.status_code == 409 and "held by a mux stream" in refused.json()["error"]
        assert _step_count(server, session_id) == 1  # reading it works
        async with connect(f"{server.ws_url}?session_id={session_id}") as ws:
            hello = json.loads(await ws.recv())  # the websocket takes the session over
            assert hello["step_count"] == 1
            reply = await mux.step(opened.handles, first)
            assert reply.status.tolist() == [GONE, OK]
            assert "taken over" in reply.messages[0]
            await ws.send(json.dumps({"inputs": [[1, 2]], "expected_step_count": 1}))
            answer = json.loads(await ws.recv())
        assert answer["step_count"] == 2
        np.testing.assert_allclose(answer["outputs"], tiny.run([[0.5, 0.5], [1, 2]])[0][-1:], 1e-5)
        assert await mux.close([opened.handles[0]]) == {}  # a gone handle is just released


async def test_expected_step_counts_make_a_retried_frame_safe(server: LiveServer) -> None:
    async with await MuxClient.connect(server.http_url) as mux:
        opened = await mux.open("tiny", count=2)
        inputs = np.ones((2, 1, 2), np.float32)
        first = await mux.step(opened.handles, inputs, [0, 0])
        retry = await mux.step(opened.handles, inputs, [0, 1])  # entry 0 already applied
        assert first.status.tolist() == [OK, OK]
        assert retry.status.tolist() == [EntryStatus.STEP_COUNT_MISMATCH, OK]
        assert retry.step_counts.tolist() == [1, 2]
        assert "is at step 1, not 0" in retry.messages[0]


async def test_open_is_all_or_nothing_at_the_session_limit(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server(max_sessions=3)
    async with await MuxClient.connect(server.http_url) as mux:
        with pytest.raises(MuxError, match="limit of 3 open sessions"):
            await mux.open("tiny", count=5)
        stats = httpx.get(f"{server.http_url}/v1/stats").json()
        assert stats["sessions"] == 0
        assert len((await mux.open("tiny", count=3)).handles) == 3


async def test_close_detach_and_reset(server: LiveServer) -> None:
    async with await MuxClient.connect(server.http_url) as mux:
        opened = await mux.open("tiny", count=3)
        await mux.step(opened.handles, np.ones((3, 2, 2), np.float32))
        assert await mux.reset([opened.handles[0]]) == {}
        assert await mux.detach([opened.handles[1]]) == {}
        assert await mux.close([opened.handles[2]]) == {}
        errors = await mux.close([opened.handles[2]])
        assert "not open on this connection" in errors["0"]
        reply = await mux.step(opened.handles[:2], np.ones((2, 1, 2), np.float32))
        assert reply.status.tolist() == [OK, EntryStatus.UNKNOWN_HANDLE]
        assert reply.step_counts.tolist() == [1, -1]  # reset to 0, then one step
    assert _step_count(server, opened.session_ids[1]) == 2  # detached: alive, untouched
    gone = httpx.get(f"{server.http_url}/v1/sessions/{opened.session_ids[2]}")
    assert gone.status_code == 404


async def test_control_mistakes_are_answered_with_clear_errors(server: LiveServer) -> None:
    async with connect(server.http_url.replace("http", "ws") + "/v1/mux") as ws:
        json.loads(await ws.recv())
        for message, words in [
            ({"op": "fly"}, "unknown op 'fly'"),
            ({"op": "open"}, '"model" must be a non-empty string'),
            ({"op": "open", "model": "nope"}, "model 'nope' not found"),
            ({"op": "open", "model": "tiny", "count": 0}, '"count" must hold integers >= 1'),
            ({"op": "close", "handles": ["a"]}, '"handles" must hold 32-bit integers'),
            ({"op": "step", "handles": [0], "inputs": [[1, 2]]}, "K x T x n numbers"),
        ]:
            await ws.send(json.dumps({**message, "request_id": 3}))
            answer = json.loads(await ws.recv())
            assert answer["op"] == "error" and words in answer["error"], answer
            assert answer["request_id"] == 3
        await ws.send("[1, 2]")
        assert "must be a JSON object" in json.loads(await ws.recv())["error"]

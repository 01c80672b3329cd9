"""Hot reload: model versions load, reload and unload while a live server serves, with the files
changing under it. Every in-flight request gets its normal answer; later ones a clear 404."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import websockets
from model_files import break_sha, garbage_onnx
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

if TYPE_CHECKING:
    from conftest import LiveServer, TinyGRU

Serve = Callable[..., tuple["LiveServer", triton.InferenceServerClient]]  # the serve fixture

TOLERANCE = 1e-5
WAIT_S = 20.0  # bound on every wait for the server to notice a change (2 shared cores)


@pytest.fixture
def serve(explicit_server: Callable[..., LiveServer], triton_client: Callable[..., Any]) -> Serve:
    """``serve(**settings)``: a live server on ``own_models_dir`` (explicit mode unless told)
    and a ``tritonclient`` of it."""

    def start(**settings: Any) -> tuple[LiveServer, triton.InferenceServerClient]:
        server = explicit_server(**settings)
        return server, triton_client(server)

    return start


@pytest.fixture
def v3(new_model: Callable[..., TinyGRU]) -> TinyGRU:
    return new_model(hidden_size=6, num_layers=1, seed=3)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def chunks(count: int, seed: int) -> list[list[list[float]]]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (int(rng.integers(1, 4)), 2)).round(3).tolist() for _ in range(count)]


def reference(model: TinyGRU, sent: list[list[list[float]]]) -> np.ndarray:
    y, _ = model.run(np.array([row for chunk in sent for row in chunk]))
    return y


def open_session(http: httpx.Client, version: int) -> str:
    response = http.post("/v1/sessions", json={"model": "tiny", "version": version})
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


def step(http: httpx.Client, session_id: str, chunk: list[list[float]]) -> httpx.Response:
    return http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": chunk})


async def open_session_async(http: httpx.AsyncClient, version: int) -> str:
    response = await http.post("/v1/sessions", json={"model": "tiny", "version": version})
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


async def post_step(
    http: httpx.AsyncClient, session_id: str, chunk: list[list[float]]
) -> httpx.Response:
    return await http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": chunk})


def load_model(server: LiveServer) -> None:
    """``tritonclient``'s load of ``tiny``, from a worker thread (its gevent hub is per thread)."""
    client = triton.InferenceServerClient(
        server.http_url.removeprefix("http://"), network_timeout=30.0
    )
    try:
        client.load_model("tiny")
    finally:
        client.close()


async def test_a_new_version_loads_while_a_client_streams_to_the_old_one(
    serve: Serve,
    own_models_dir: Path,
    tiny: TinyGRU,
    v3: TinyGRU,
    add_model: Callable[..., Path],
) -> None:
    server, client = serve()
    data = chunks(400, seed=1)
    loaded = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        created = await http.post("/v1/sessions", json={"model": "tiny"})
        session_id = created.json()["session_id"]

        async def stream() -> tuple[list[Any], list[httpx.Response]]:
            sent, answers, after = [], [], 0
            for chunk in data:  # until some steps ran after the load, or the data ends
                answers.append(
                    await http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": chunk})
                )
                answers.append(await http.post("/v1/models/tiny/predict", json={"inputs": [chunk]}))
                sent.append(chunk)
                after += loaded.is_set()
                if after >= 20:
                    break
            return sent, answers

        streamer = asyncio.create_task(stream())
        await asyncio.sleep(0.1)
        add_model(own_models_dir, "tiny", 3, v3)
        await asyncio.to_thread(load_model, server)
        loaded.set()
        sent, answers = await asyncio.wait_for(streamer, timeout=WAIT_S)
        new = (await http.post("/v1/sessions", json={"model": "tiny"})).json()
    assert [a.status_code for a in answers] == [200] * len(answers)
    outputs = [row for a in answers[::2] for row in a.json()["outputs"]]
    np.testing.assert_allclose(outputs, reference(tiny, sent), atol=TOLERANCE)
    predicted = {a.json()["version"] for a in answers[1::2]}
    assert predicted <= {2, 3} and 3 in predicted  # the default moved to version 3
    assert new["version"] == 3
    assert client.is_model_ready("tiny", "2") and client.is_model_ready("tiny", "3")


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        pytest.param(break_sha, "sha256 of model.onnx is", id="sha256"),
        pytest.param(garbage_onnx, "model.onnx fails the ONNX checker", id="onnx"),
    ],
)
def test_a_broken_new_version_is_refused_and_the_old_one_keeps_serving(
    serve: Serve,
    own_models_dir: Path,
    tiny: TinyGRU,
    v3: TinyGRU,
    add_model: Callable[..., Path],
    breakage: Callable[[Path], None],
    reason: str,
) -> None:
    server, client = serve()
    sent = chunks(2, seed=2)
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        session_id = open_session(http, 2)
        assert step(http, session_id, sent[0]).status_code == 200
        breakage(add_model(own_models_dir, "tiny", 3, v3))
        with pytest.raises(InferenceServerException) as info:
            client.load_model("tiny")
        after = step(http, session_id, sent[1])
    error = info.value
    assert error.status() == "400"
    assert f"failed to load 'tiny': version 3: {reason}" in error.message()
    assert error.message().endswith("(versions serving: 1, 2)")
    entry = next(m for m in client.get_model_repository_index() if m["version"] == "3")
    assert entry["state"] == "UNAVAILABLE" and reason in entry["reason"]
    assert not client.is_model_ready("tiny", "3") and client.is_model_ready("tiny")
    assert after.status_code == 200  # the session on the old version goes on
    np.testing.assert_allclose(after.json()["outputs"], reference(tiny, sent)[-len(sent[1]) :])


def test_changed_files_reload_the_version_and_end_its_sessions(
    serve: Serve,
    own_models_dir: Path,
    v3: TinyGRU,
    add_model: Callable[..., Path],
) -> None:
    server, client = serve()
    sent = chunks(1, seed=3)
    x = triton.InferInput("x", [1, 1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 1, 2), np.float32))
    client.infer("tiny", [x], sequence_id=7, sequence_start=True)  # a V2 sequence on version 2
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        session_id = open_session(http, 2)
        shutil.rmtree(own_models_dir / "tiny" / "2")
        add_model(own_models_dir, "tiny", 2, v3)  # other weights, another sha256
        client.load_model("tiny")
        gone = step(http, session_id, sent[0])
        fresh = open_session(http, 2)
        again = step(http, fresh, sent[0])
    with pytest.raises(InferenceServerException) as sequence:
        client.infer("tiny", [x], sequence_id=7)
    assert sequence.value.status() == "404"
    assert "version 2 was reloaded from changed files" in sequence.value.message()
    assert gone.status_code == 404
    assert gone.json()["error"] == (
        "model 'tiny' version 2 was reloaded from changed files (served versions: 1, 2); "
        f"session '{session_id}' ended with it; create a new session"
    )
    np.testing.assert_allclose(again.json()["outputs"], reference(v3, sent), atol=TOLERANCE)


def test_broken_changed_files_leave_the_loaded_ones_serving(
    serve: Serve,
    own_models_dir: Path,
    tiny: TinyGRU,
) -> None:
    server, client = serve()
    (own_models_dir / "tiny" / "2" / "model.onnx").write_bytes(b"half a file")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("tiny")
    assert "version 2: sha256 of model.onnx is" in info.value.message()
    entry = next(m for m in client.get_model_repository_index() if m["version"] == "2")
    assert entry["state"] == "READY"
    assert entry["reason"].startswith("serving the files loaded before; new files refused: sha256")
    sent = chunks(1, seed=4)
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        answer = step(http, open_session(http, 2), sent[0])
    np.testing.assert_allclose(answer.json()["outputs"], reference(tiny, sent), atol=TOLERANCE)


async def test_removing_a_version_lets_its_steps_in_flight_finish_then_answers_404(
    serve: Serve,
    own_models_dir: Path,
    tiny_v1: TinyGRU,
) -> None:
    # Batches wait a second to fill, so the steps below are still in flight when version 1 goes:
    # the first step of each session queued in the batcher, the second waiting for the first.
    server, client = serve(max_batch_delay_ms=1000)
    data = [chunks(2, seed=10 + i) for i in range(6)]
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        ids = [await open_session_async(http, 1) for _ in data]
        async with websockets.connect(server.ws_url + f"?session_id={ids[0]}") as ws:
            await ws.recv()  # hello
            first = [asyncio.create_task(post_step(http, ids[i], data[i][0])) for i in range(6)]
            await asyncio.to_thread(wait_until, lambda: _queued(server) == len(ids), "queued")
            second = [asyncio.create_task(post_step(http, ids[i], data[i][1])) for i in range(1, 6)]
            await ws.send(json.dumps({"inputs": data[0][1]}))
            await asyncio.to_thread(wait_until, lambda: _steps(server) == 2 * len(ids), "waiting")
            shutil.rmtree(own_models_dir / "tiny" / "1")
            await asyncio.to_thread(load_model, server)  # returns once version 1 is gone
            answers = await asyncio.wait_for(asyncio.gather(*first, *second), timeout=WAIT_S)
            streamed = json.loads(await asyncio.wait_for(ws.recv(), timeout=WAIT_S))
            later = await post_step(http, ids[1], data[1][0])
            await ws.send(json.dumps({"inputs": data[0][0]}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=WAIT_S)
    assert [a.status_code for a in answers] == [200] * len(answers)
    for i, session_id in enumerate(ids):
        mine = [a for a in answers if a.request.url.path == f"/v1/sessions/{session_id}/steps"]
        outputs = [row for a in mine for row in a.json()["outputs"]]
        outputs += streamed["outputs"] if i == 0 else []
        np.testing.assert_allclose(outputs, reference(tiny_v1, data[i]), atol=TOLERANCE)
    message = "model 'tiny' version 1 was unloaded (served versions: 2)"
    assert later.status_code == 404 and later.json()["error"].startswith(message)
    assert f"session '{ids[1]}' ended with it" in later.json()["error"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    assert closed.value.rcvd.reason.startswith(message)
    assert [m["version"] for m in client.get_model_repository_index()] == ["2"]


def _queued(server: LiveServer) -> int:
    """Chunks waiting in the batchers."""
    stats = httpx.get(f"{server.http_url}/v1/stats", timeout=10).json()
    return sum(m["queue_depth"] for m in stats["models"])


def _steps(server: LiveServer) -> float:
    """Steps that reached the data plane (answered or not)."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rnnserve_requests_total" and sample.labels == {"kind": "step"}:
                return sample.value
    return 0.0


def test_poll_mode_picks_up_added_and_removed_versions(
    serve: Serve,
    own_models_dir: Path,
    v3: TinyGRU,
    add_model: Callable[..., Path],
) -> None:
    server, client = serve(model_control_mode="poll", repository_poll_s=0.05)
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        session_id = open_session(http, 1)
        add_model(own_models_dir, "tiny", 3, v3)  # a poll may see it half written: next poll
        wait_until(lambda: client.is_model_ready("tiny", "3"), "version 3 serves")
        shutil.rmtree(own_models_dir / "tiny" / "1")
        wait_until(lambda: not client.is_model_ready("tiny", "1"), "version 1 is gone")
        gone = step(http, session_id, [[1.0, 2.0]])
        created = http.post("/v1/sessions", json={"model": "tiny"}).json()
    assert gone.status_code == 404
    assert gone.json()["error"].startswith(
        "model 'tiny' version 1 was unloaded (served versions: 2, 3)"
    )
    assert created["version"] == 3
    index = client.get_model_repository_index()
    assert [(m["version"], m["state"]) for m in index] == [("2", "READY"), ("3", "READY")]


def test_poll_mode_refuses_a_broken_version_until_it_is_fixed(
    serve: Serve,
    own_models_dir: Path,
    tmp_path: Path,
    v3: TinyGRU,
    add_model: Callable[..., Path],
) -> None:
    _, client = serve(model_control_mode="poll", repository_poll_s=0.05)

    def version_3() -> dict[str, str]:
        return next((m for m in client.get_model_repository_index() if m["version"] == "3"), {})

    staged = add_model(tmp_path / "staging", "tiny", 3, v3)
    break_sha(staged)
    staged.rename(own_models_dir / "tiny" / "3")  # one rename: the poll sees all or nothing
    wait_until(lambda: version_3().get("state") == "UNAVAILABLE", "version 3 is refused")
    assert version_3()["reason"].startswith("sha256 of model.onnx is")
    assert client.is_model_ready("tiny", "2")
    shutil.rmtree(own_models_dir / "tiny" / "3")
    add_model(tmp_path / "fixed", "tiny", 3, v3).rename(own_models_dir / "tiny" / "3")
    wait_until(lambda: client.is_model_ready("tiny", "3"), "version 3 serves")
    assert version_3() == {"name": "tiny", "version": "3", "state": "READY", "reason": ""}


def test_poll_mode_keeps_serving_while_the_models_folder_is_gone(
    serve: Serve, own_models_dir: Path, tmp_path: Path
) -> None:
    _, client = serve(model_control_mode="poll", repository_poll_s=0.05)
    own_models_dir.rename(tmp_path / "elsewhere")  # an unmounted volume, say
    time.sleep(0.3)  # several polls
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("tiny", "2")
    assert [m["state"] for m in client.get_model_repository_index()] == ["READY", "READY"]


def test_metrics_follow_loads_and_unloads(
    serve: Serve,
    own_models_dir: Path,
    v3: TinyGRU,
    add_model: Callable[..., Path],
) -> None:
    server, client = serve()
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        for version in (1, 2):
            assert step(http, open_session(http, version), [[1.0, 2.0]]).status_code == 200
        assert {"1", "2"} <= _versions_in_metrics(server)
        shutil.rmtree(own_models_dir / "tiny" / "1")
        add_model(own_models_dir, "tiny", 3, v3)
        client.load_model("tiny")
        assert _versions_in_metrics(server) == {"2", "3"}
        client.unload_model("tiny")
        assert _versions_in_metrics(server) == set()


def test_only_its_owner_learns_that_a_session_was_unloaded(
    make_client: Callable[..., Any], own_models_dir: Path
) -> None:
    client = make_client(
        models_dir=own_models_dir, model_control_mode="explicit", api_keys=["key-a", "key-b"]
    )
    owner, other = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    created = client.post("/v1/sessions", json={"model": "tiny"}, headers=owner)
    session_id = created.json()["session_id"]
    assert client.post("/v2/repository/models/tiny/unload", headers=other).status_code == 200
    mine = client.get(f"/v1/sessions/{session_id}", headers=owner)
    theirs = client.get(f"/v1/sessions/{session_id}", headers=other)
    assert mine.status_code == 404 and mine.json()["error"].startswith(
        "model 'tiny' version 2 was unloaded (served versions: none)"
    )
    assert theirs.status_code == 404
    assert theirs.json()["error"] == f"session {session_id!r} not found"


def _versions_in_metrics(server: LiveServer) -> set[str]:
    """The model versions any series of /metrics is labelled with."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    return {
        sample.labels["version"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "version" in sample.labels
    }

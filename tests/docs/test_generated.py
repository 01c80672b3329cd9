"""The generated reference: every setting, endpoint, close code and metric reaches the docs."""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import generate
import hooks
import pytest

from service.__main__ import build_parser
from service.app import create_app
from service.engine.errors import CLOSE_CODES, ServiceError
from service.settings import Settings, describe_settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette asks for httpx2 with a UserWarning at import
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_setting_is_in_the_reference_and_in_help() -> None:
    page = generate.settings_table()
    help_text = build_parser().format_help()
    for setting in describe_settings():
        assert f"`{setting.flag}` {{#{setting.name}}}" in page
        assert setting.env in page and setting.env in help_text
    assert [s.name for s in describe_settings()] == list(Settings.model_fields)


def test_every_endpoint_is_in_the_http_reference() -> None:
    document = generate.openapi_document()
    page = generate.http_api(document)
    for path, item in document["paths"].items():
        for method in item:
            assert f"### `{method.upper()} {path}`" in page
    assert "[ErrorBody](#schema-errorbody)" in page
    assert "HTTPValidationError" not in page


def test_every_close_code_is_in_the_table() -> None:
    table = generate.close_codes_table()
    for code in CLOSE_CODES:
        assert f"| {code} |" in table


def test_every_error_status_is_in_the_errors_page() -> None:
    page = _page("reference/errors.md")
    statuses = {error.status_code for error in _subclasses(ServiceError)}
    missing = sorted(status for status in statuses if f"| {status} |" not in page)
    assert not missing, f"statuses the service answers that errors.md omits: {missing}"


def _subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("service",), id="service"),
        pytest.param(("client", "stream"), id="client"),
        pytest.param(("training", "export"), id="training-export"),
    ],
)
def test_command_help_is_rendered(command: tuple[str, ...]) -> None:
    text = generate.cli_help(*command)
    assert text.startswith("```text\nusage: python -m ")


def test_markers_are_filled_and_unknown_ones_fail() -> None:
    page = hooks.fill("# Codes\n\n<!-- generated: close-codes -->\n")
    assert "| 4401 |" in page and "generated:" not in page
    with pytest.raises(ValueError, match="unknown generated section"):
        hooks.fill("<!-- generated: nope -->")


def test_the_readme_links_to_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(readme) if "://" not in t]
    assert targets, "the README links into docs/"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_readme_quick_start_is_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make serve", "make test"]


def test_the_metrics_page_names_every_metric_a_scrape_shows() -> None:
    documented = set(re.findall(r"`(rnnserve_\w+)`", _page("reference/metrics.md")))
    settings = Settings(models_dir=ROOT / "models", providers=["CPUExecutionProvider"])
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the app did not get ready"
            time.sleep(0.05)
        session = client.post("/v1/sessions", json={"model": "co2-forecaster"}).json()
        client.post(f"/v1/sessions/{session['session_id']}/steps", json={"inputs": [[0.1]]})
        scraped = _families(client.get("/metrics").text)
    store_only = {name for name in documented if name.startswith("rnnserve_store_")}
    assert scraped == documented - store_only


def _families(text: str) -> set[str]:
    """Metric names as exposed (counters with ``_total``), less the ``_created`` timestamps."""
    names = re.findall(r"^# TYPE (rnnserve_\w+) \w+$", text, re.MULTILINE)
    return {name for name in names if not name.endswith("_created")}


def _page(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")

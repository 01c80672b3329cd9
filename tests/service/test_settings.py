"""Settings from flags and RNNSERVE_* environment variables, failing at startup on bad values."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import build_parser, settings_from_args
from service.settings import Settings


def test_environment_variables_and_comma_lists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RNNSERVE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("RNNSERVE_API_KEYS", "one, two")
    monkeypatch.setenv("RNNSERVE_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("RNNSERVE_IDLE_TTL_S", "0")
    monkeypatch.setenv("RNNSERVE_MAX_BATCH_DELAY_MS", "2.5")
    settings = Settings()
    assert settings.models_dir == tmp_path
    assert settings.api_keys == ["one", "two"]
    assert settings.providers == ["CPUExecutionProvider"]
    assert settings.idle_ttl_s == 0 and settings.max_batch_delay_s == 0.0025


def test_defaults_prefer_cuda_then_cpu(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path)
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.api_keys == []


def test_access_log_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert settings_from_args(["--models-dir", str(tmp_path)]).access_log is False
    on = settings_from_args(["--models-dir", str(tmp_path), "--access-log", "true"])
    assert on.access_log is True


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RNNSERVE_PORT", "9000")
    monkeypatch.setenv("RNNSERVE_MAX_SESSIONS", "7")
    settings = settings_from_args(["--models-dir", str(tmp_path), "--port", "8123"])
    assert (settings.port, settings.max_sessions) == (8123, 7)


def test_every_setting_has_a_flag_with_help() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == set(Settings.model_fields)
    for action in flags.values():
        assert action.help and "RNNSERVE_" in action.help


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"models_dir": "/no/such/folder"}, "does not exist", id="models-dir"),
        pytest.param({"providers": "FooProvider"}, "unknown execution provider", id="provider"),
        pytest.param({"max_sessions": 0}, "greater than or equal to 1", id="max-sessions"),
        pytest.param({"idle_ttl_s": -1}, "greater than or equal to 0", id="ttl"),
        pytest.param({"log_level": "loud"}, "Input should be", id="log-level"),
        pytest.param(
            {"max_batch_size": 10, "max_queue_depth": 5}, "must not exceed", id="batch-vs-queue"
        ),
    ],
)
def test_bad_settings_fail_at_startup(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    values = {"models_dir": tmp_path, **overrides}
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_cli_exits_with_a_readable_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--models-dir", str(tmp_path), "--max-sessions", "zero"])
    assert "invalid settings" in str(info.value) and "max_sessions" in str(info.value)

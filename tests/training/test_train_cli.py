"""The training loop and ``python -m training``: files written, early stopping, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.cli import main
from training.tasks import TaskOptions
from training.train import ConfigError, TrainConfig, train

TINY_ADDING = [
    "--task", "adding", "--seq-len", "8", "--train-size", "48", "--eval-size", "16",
    "--hidden-size", "4", "--batch-size", "16", "--no-progress",
]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_checkpoint_summary_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "train", *TINY_ADDING, "--cell", "mgu", "--epochs", "2", "--out", str(out_dir),
        "--plot",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary == json.loads((out_dir / "summary.json").read_text())
    assert summary["cell"] == "mgu" and summary["task"] == "adding"
    assert summary["epochs_run"] == 2 and summary["best_epoch"] in (1, 2)
    assert summary["data"]["train"] == {"sequences": 48, "steps": 384, "scored_steps": 48}
    assert set(summary["metrics"]["test"]) == {"mse", "baseline_mse"}
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = load_checkpoint(out_dir / "checkpoint.pt")
    assert checkpoint.config.cell == "mgu" and checkpoint.config.input_size == 2
    assert checkpoint.summary["parameters"] == summary["parameters"]
    assert checkpoint.task["name"] == "adding" and checkpoint.task["seq_len"] == 8
    assert checkpoint.task["feature_names"] == ["value", "marker"]
    assert checkpoint.summary == summary


def test_evaluate_reproduces_the_training_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY_ADDING, "--epochs", "1", "--out", str(out_dir))[0] == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    code, out, _ = run_cli(capsys, "evaluate", str(out_dir / "checkpoint.pt"), "--split", "test")
    assert code == 0
    report = json.loads(out)
    assert report["task"] == "adding" and report["split"] == "test"
    assert report["metrics"] == pytest.approx(summary["metrics"]["test"])


def small_config(tmp_path: Path, **changes: object) -> TrainConfig:
    values: dict = {
        "task": "anbn", "hidden_size": 4, "epochs": 2, "batch_size": 16, "out": tmp_path,
        "progress": False, "task_options": TaskOptions(n_train_max=3, n_test_max=5),
    }  # fmt: skip
    return TrainConfig(**{**values, **changes})


def test_training_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    first = train(small_config(tmp_path / "a", seed=3))
    again = train(small_config(tmp_path / "b", seed=3))
    other = train(small_config(tmp_path / "c", seed=4))
    assert first.train_loss == again.train_loss
    for key, value in first.model.state_dict().items():
        torch.testing.assert_close(value, again.model.state_dict()[key], rtol=0, atol=0)
    assert first.train_loss != other.train_loss


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best(tmp_path: Path) -> None:
    # A learning rate this small cannot move the validation loss: it plateaus from epoch 1.
    result = train(small_config(tmp_path, lr=1e-12, epochs=20, patience=2))
    assert result.summary["epochs_run"] == 3
    assert result.summary["best_epoch"] == 1
    assert result.summary["best_validation_loss"] == result.validation_loss[0]


def test_a_learning_run_improves_on_the_baseline(tmp_path: Path) -> None:
    options = TaskOptions(seq_len=10, train_size=256, eval_size=64)
    config = small_config(
        tmp_path, task="adding", hidden_size=16, epochs=8, lr=0.01, task_options=options
    )
    metrics = train(config).summary["metrics"]["validation"]
    assert metrics["mse"] < 0.5 * metrics["baseline_mse"]


def test_export_command_writes_the_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, model_dir = tmp_path / "run", tmp_path / "models" / "adder" / "3"
    assert run_cli(capsys, "train", *TINY_ADDING, "--epochs", "1", "--out", str(run_dir))[0] == 0
    code, _, err = run_cli(
        capsys, "export", str(run_dir / "checkpoint.pt"), "--out", str(model_dir)
    )
    assert code == 0, err
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert (metadata["name"], metadata["version"]) == ("adder", 3)
    assert metadata["feature_names"] == ["value", "marker"]
    assert (model_dir / "model.onnx").stat().st_size > 0


def unreadable_checkpoint(tmp_path: Path) -> str:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["train", "--cell", "rnn"], "--cell: invalid choice: 'rnn'", id="cell"),
        pytest.param(["train", "--task", "xor"], "--task: invalid choice: 'xor'", id="task"),
        pytest.param(["train", "--hidden-size", "0"], "hidden_size must be >= 1", id="hidden"),
        pytest.param(["train", "--epochs", "-1"], "epochs must be >= 1, got -1", id="epochs"),
        pytest.param(["train", "--dropout", "1.5"], "dropout must be in [0, 1)", id="dropout"),
        pytest.param(["train", "--hidden-size", "x"], "invalid int value: 'x'", id="not-int"),
        pytest.param(["train", "--device", "tpu"], "device must be 'cpu' or 'cuda[:N]'", id="dev"),
        pytest.param(
            ["train", "--task", "csv", "--csv", "nowhere.csv", "--target", "y"],
            "nowhere.csv does not exist", id="missing-csv",
        ),
        pytest.param(["evaluate", "{broken}"], "is not a readable checkpoint", id="evaluate"),
        pytest.param(
            ["export", "{broken}", "--out", "m/x/1"], "is not a readable checkpoint", id="export"
        ),
        pytest.param(["evaluate", "missing.pt"], "checkpoint missing.pt does not exist", id="gone"),
        pytest.param([], "required: command", id="no-command"),
    ],
)  # fmt: skip
def test_user_mistakes_exit_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    broken = unreadable_checkpoint(tmp_path)
    argv = [a.replace("{broken}", broken) for a in argv]
    code, out, err = run_cli(
        capsys, *argv, *(["--out", str(tmp_path)] if argv[:1] == ["train"] else [])
    )
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message for a machine without CUDA"
)
def test_cuda_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(small_config(tmp_path, device="cuda"))


def test_python_dash_m_training_runs_and_fails_cleanly(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "training", "train", "--task", "anbn", "--hidden-size", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr == "error: hidden_size must be >= 1, got 0\n"


def test_an_output_folder_that_cannot_be_made_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the run folder should go")
    code, out, err = run_cli(capsys, "train", *TINY_ADDING, "--out", str(blocker / "run"))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "taken" in err and err.count("\n") == 1


def test_export_refuses_to_overwrite_a_version_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, model_dir = tmp_path / "run", tmp_path / "models" / "adder" / "1"
    assert run_cli(capsys, "train", *TINY_ADDING, "--epochs", "1", "--out", str(run_dir))[0] == 0
    export = ["export", str(run_dir / "checkpoint.pt"), "--out", str(model_dir)]
    assert run_cli(capsys, *export)[0] == 0
    before = (model_dir / "metadata.json").read_text()
    code, _, err = run_cli(capsys, *export)
    assert code == 2
    assert "already holds a model version (model.onnx, metadata.json)" in err
    assert "--force" in err
    assert (model_dir / "metadata.json").read_text() == before
    assert run_cli(capsys, *export, "--force")[0] == 0
    assert (
        json.loads((model_dir / "metadata.json").read_text())["created_at"]
        >= json.loads(before)["created_at"]
    )

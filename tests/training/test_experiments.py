"""The experiment studies, each run in its tiny configuration through the command line.

A report must have a table row per cell, the expected columns, finite numbers and real PNG figures.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from matplotlib import image

from training.cli import main
from training.experiments.counting import Run
from training.experiments.efficiency import hidden_for_budget
from training.experiments.options import run_all
from training.experiments.report import mean_std

CELL_NAMES = ["gru", "gru-classic", "gru1", "gru2", "gru3", "mgu", "mgu1", "mgu2", "mgu3", "lstm"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EFFICIENCY = [
    "cell",
    "hidden",
    "parameters",
    "vs lstm",
    "train s/epoch",
    "torch µs/step",
    "ORT µs/step",
]
COUNTING = [
    "cell",
    "parameters (with head)",
    "right in training range",
    "right beyond it",
    "largest n all right",
    "seeds past training n",
    "train s",
]
CO2 = [
    "cell",
    "parameters (with head)",
    "validation RMSE",
    "test RMSE",
    "test persistence RMSE",
    "test skill",
    "train s",
]
ADDING = [
    "cell",
    "parameters (with head)",
    "validation MSE",
    "test MSE",
    "constant-guess MSE",
    "train s",
]


def parse_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table in ``text`` as (header, rows)."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip("|").split("|")])
        elif block:
            assert set("".join(block[1])) <= set("-:"), f"no separator row under {block[0]}"
            tables.append((block[0], block[2:]))
            block = []
    return tables


def numbers_in(value: str) -> list[float]:
    """The numbers of a table value: ``a ± b``, ``k/n`` or a plain number."""
    return [float(part) for part in re.split(r"±|/", value)]


def run_tiny(study: str, out: Path, capsys: pytest.CaptureFixture[str], seeds: int = 2) -> str:
    code = main(["experiments", study, "--seeds", str(seeds), "--out", str(out), "--tiny"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = out / f"{study}.md"
    assert captured.out.strip() == str(report)
    return report.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("study", "seeds", "columns"),
    [
        pytest.param("efficiency", 2, [EFFICIENCY, EFFICIENCY], id="efficiency"),
        pytest.param("counting", 2, [COUNTING, COUNTING], id="counting"),
        # one seed: every co2 run steps through the whole series, even in the tiny configuration
        pytest.param("forecast", 1, [CO2, ADDING], id="forecast"),
    ],
)
def test_study_writes_a_complete_report(
    study: str,
    seeds: int,
    columns: list[list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "reports"
    text = run_tiny(study, out, capsys, seeds)
    assert f"`python -m training experiments {study} --seeds {seeds} --out {out} --tiny`" in text
    assert re.search(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "Machine: " in text and " cores" in text
    tables = parse_tables(text)
    assert [header for header, _ in tables] == columns
    for _, rows in tables:
        assert [row[0] for row in rows] == CELL_NAMES
        for row in rows:
            values = [v for value in row[1:] for v in numbers_in(value)]
            assert all(math.isfinite(v) for v in values), row
    figures = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)
    assert figures
    for name in figures:
        png = out / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        height, width = image.imread(png).shape[:2]
        assert height > 100 and width > 100


def test_efficiency_compares_cells_at_the_lstm_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = run_tiny("efficiency", tmp_path, capsys)
    equal_hidden, equal_budget = (rows for _, rows in parse_tables(text))
    # tiny: input 8, hidden 6; the LSTM has 4 (8*6 + 6*6 + 2*6) = 384 parameters
    lstm = {row[0]: row for row in equal_hidden}["lstm"]
    assert lstm[1:4] == ["6", "384", "1.00"]
    gru = {row[0]: row for row in equal_hidden}["gru"]
    assert gru[1:3] == ["6", "288"]  # 3 (48 + 36 + 12)
    budget = {row[0]: row for row in equal_budget}
    assert budget["mgu"][1:3] == ["10", "380"]  # 2 (80 + 100 + 10)
    assert budget["gru"][1:3] == ["7", "357"]  # 3 (56 + 49 + 14); m = 8 gives 432


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        # LSTM at n = 8, m = 64: 4 (512 + 4096 + 128) = 18944
        pytest.param("lstm", 64, id="lstm-itself"),
        # GRU: m = 74 gives 18648 (296 below), m = 75 gives 19125 (181 above)
        pytest.param("gru", 75, id="gru-rounds-up"),
        # MGU: m = 93 gives 18972 (28 above), m = 92 gives 18584
        pytest.param("mgu", 93, id="mgu"),
        # MGU3: n m + m^2 + 2 m; m = 133 gives 19019 (75 above), m = 132 gives 18744
        pytest.param("mgu3", 133, id="mgu3"),
    ],
)
def test_hidden_for_budget_picks_the_nearest_count(cell: str, expected: int) -> None:
    assert hidden_for_budget(cell, 8, 18944) == expected


@pytest.mark.parametrize(
    ("accepted", "largest"),
    [
        pytest.param({1: 1.0, 2: 1.0, 3: 0.0, 4: 1.0}, 2, id="stops-at-first-error"),
        pytest.param({1: 0.0, 2: 1.0}, 0, id="wrong-from-the-start"),
        pytest.param({1: 1.0, 2: 1.0, 3: 1.0}, 3, id="all-right"),
    ],
)
def test_largest_correct_n_needs_every_smaller_n(accepted: dict[int, float], largest: int) -> None:
    assert Run(parameters=1, accepted=accepted, wall_time_s=0.0).largest_correct_n() == largest


@pytest.mark.parametrize("jobs", [pytest.param(1, id="inline"), pytest.param(2, id="processes")])
def test_run_all_returns_results_in_call_order(jobs: int) -> None:
    calls = [(2, k) for k in range(6)]
    assert run_all(pow, calls, jobs) == [1, 2, 4, 8, 16, 32]


def test_mean_std_rounds_both_to_the_mean_precision() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert mean_std([1500.0, 1700.0]) == "1600 ± 141"
    assert mean_std([0.25]) == "0.250 ± 0.000"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["experiments", "speed"], "invalid choice: 'speed'", id="unknown-study"),
        pytest.param(["experiments", "counting", "--seeds", "0"], "at least 1", id="zero-seeds"),
        pytest.param(["experiments", "counting", "--jobs", "x"], "whole number", id="bad-jobs"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_folder = tmp_path / "file.md"
    not_a_folder.write_text("x")
    assert main(["experiments", "efficiency", "--tiny", "--out", str(not_a_folder)]) == 2
    assert "is not a folder" in capsys.readouterr().err

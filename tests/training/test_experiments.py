"""The experiment studies, each run in its tiny configuration through the command line.

A report must have its tables with the expected columns and a row per cell (and per baseline),
finite numbers where numbers belong, and real PNG figures.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from matplotlib import image

from training.cli import main
from training.experiments.budget import hidden_for_budget, matched_sizes
from training.experiments.counting import Run
from training.experiments.options import run_all
from training.experiments.report import mean_std

CELL_NAMES = ["gru", "gru-classic", "gru1", "gru2", "gru3", "mgu", "mgu1", "mgu2", "mgu3", "lstm"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EFFICIENCY = [
    "cell",
    "hidden",
    "parameters",
    "vs lstm",
    "train s/epoch: project cell (Python loop)",
    "train s/epoch: torch nn.GRU/nn.LSTM",
    "torch eager µs/step",
    "ORT Scan µs/step",
    "ORT native op µs/step",
    "ORT Scan ms/sequence",
    "ORT native op ms/sequence",
]
RATIOS = ["cell", "setting", "form", "step, batch 1", "sequence", "training epoch"]
COUNTING = [
    "cell",
    "parameters (with head)",
    "seeds fitting n ≤ N",
    "largest n all right, per seed",
    "largest n all right (fitted seeds)",
    "p vs lstm",
    "right in N+1..max (fitted seeds)",
    "steps",
    "train s (all seeds)",
]
SERIES = [
    "model",
    "parameters",
    "validation RMSE",
    "test RMSE",
    "test RMSE / best baseline",
    "beats the best baseline?",
    "epochs run (best)",
]
ADDING = [
    "cell",
    "parameters (with head)",
    "validation MSE",
    "test MSE",
    "constant-guess MSE",
    "epochs run (best)",
]
CLASSIFICATION = [
    "cell",
    "hidden",
    "parameters (cell)",
    "test accuracy",
    "per seed",
    "p vs gru",
    "best epoch (median)",
    "train s (all seeds)",
    "what the papers report",
]
BASELINES = [
    "*persistence*",
    "*climatology (52 season bins)*",
    "*harmonics (K = 2)*",
    "*AR(",
    "*AR(",
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
    """The numbers of a table value: ``a ± b``, ``k/n``, ``a (b)``, ``a (b-c)`` or a number."""
    return [float(part) for part in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", value)]


def run_tiny(study: str, out: Path, capsys: pytest.CaptureFixture[str], seeds: int = 2) -> str:
    code = main(["experiments", study, "--seeds", str(seeds), "--out", str(out), "--tiny"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = out / f"{study}.md"
    assert captured.out.strip() == str(report)
    return report.read_text(encoding="utf-8")


def check_header_and_figures(text: str, study: str, seeds: int, out: Path) -> None:
    assert f"`python -m training experiments {study} --seeds {seeds} --out {out} --tiny`" in text
    assert re.search(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "Machine: " in text and " cores" in text and "torch " in text
    figures = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)
    assert figures
    for name in figures:
        png = out / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        height, width = image.imread(png).shape[:2]
        assert height > 100 and width > 100


def check_numbers(rows: list[list[str]], columns: range) -> None:
    """Every value in ``columns`` holds only finite numbers (or '—', no value)."""
    for row in rows:
        for value in (row[i] for i in columns):
            if value != "—":
                numbers = numbers_in(value)
                assert numbers and all(math.isfinite(v) for v in numbers), (row, value)


def test_efficiency_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    text = run_tiny("efficiency", out, capsys)
    check_header_and_figures(text, "efficiency", 2, out)
    assert "`aten::lstm`" in text and "`aten::gru`" in text  # the fused paths are named
    equal_hidden, equal_budget, ratios = parse_tables(text)
    for header, rows in (equal_hidden, equal_budget):
        assert header == EFFICIENCY and [row[0] for row in rows] == CELL_NAMES
        check_numbers(rows, range(1, len(EFFICIENCY)))
        by_cell = {row[0]: row for row in rows}
        # native ops and torch's fused layers exist for the GRU and the LSTM only
        assert by_cell["mgu"][5] == "—" and by_cell["mgu"][8] == "—"
        assert by_cell["gru"][8] != "—" and by_cell["lstm"][5] != "—"
    # tiny: input 8, hidden 6; the LSTM has 4 (8*6 + 6*6 + 2*6) = 384 parameters
    lstm = {row[0]: row for row in equal_hidden[1]}["lstm"]
    assert lstm[1:4] == ["6", "384", "1.00"]
    assert {row[0]: row for row in equal_hidden[1]}["gru"][1:3] == ["6", "288"]
    budget = {row[0]: row for row in equal_budget[1]}
    assert budget["mgu"][1:3] == ["10", "380"]  # 2 (80 + 100 + 10)
    assert budget["gru"][1:3] == ["7", "357"]  # 3 (56 + 49 + 14); m = 8 gives 432
    header, rows = ratios
    assert header == RATIOS
    # every cell but the LSTM in both settings, and the GRU twice (Scan and native)
    assert len(rows) == 2 * (len(CELL_NAMES) - 1 + 1)
    assert {row[2] for row in rows} == {"Scan / Scan", "native op / native op"}
    check_numbers(rows, range(3, 6))


def test_counting_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    text = run_tiny("counting", out, capsys)
    check_header_and_figures(text, "counting", 2, out)
    assert "counting-states.png" in text
    tables = parse_tables(text)
    assert [header for header, _ in tables] == [COUNTING, COUNTING]
    for _, rows in tables:
        assert [row[0] for row in rows] == CELL_NAMES
        for row in rows:
            fitted, seeds = (int(v) for v in row[2].split("/"))
            assert seeds == 2 and 0 <= fitted <= 2
            per_seed = row[3].split(", ")
            assert len(per_seed) == 2
            # unfitted seeds are bracketed and left out of the mean
            assert sum(not v.startswith("(") for v in per_seed) == fitted
            assert (row[4] == "—") == (fitted == 0)
        check_numbers(rows, range(1, 3))
        check_numbers(rows, range(4, len(COUNTING)))


def test_forecast_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    # one seed: every series run steps through the whole series, even in the tiny configuration
    text = run_tiny("forecast", out, capsys, seeds=1)
    check_header_and_figures(text, "forecast", 1, out)
    co2, sunspots, adding = parse_tables(text)
    for header, rows in (co2, sunspots):
        assert header == SERIES
        names = [row[0] for row in rows]
        assert names[5:] == CELL_NAMES
        assert all(name.startswith("*") for name in names[:5])
        assert sum(row[5] == "(the best baseline)" for row in rows) == 1
        check_numbers(rows, range(1, 5))
    assert [row[0] for row in co2[1][:3]] == BASELINES[:3]
    assert adding[0] == ADDING and [row[0] for row in adding[1]] == CELL_NAMES
    check_numbers(adding[1], range(1, len(ADDING)))


def test_classification_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    text = run_tiny("classification", out, capsys)
    check_header_and_figures(text, "classification", 2, out)
    rows_table, pixels_table = parse_tables(text)
    for (header, rows), input_size in ((rows_table, 8), (pixels_table, 1)):
        assert header == CLASSIFICATION and [row[0] for row in rows] == CELL_NAMES
        check_numbers(rows, range(1, 8))
        sizes = matched_sizes(input_size, "lstm", 3)
        assert [int(row[1]) for row in rows] == [sizes[cell] for cell in CELL_NAMES]
        for row in rows:
            accuracies = numbers_in(row[4])
            assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)


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


def test_matched_sizes_use_the_reference_cells_count() -> None:
    # pixels (n = 1), LSTM at 16 units: 4 (16 + 256 + 32) = 1216 parameters
    sizes = matched_sizes(1, "lstm", 16)
    assert sizes["lstm"] == 16
    # GRU3: m^2 + 4 m; m = 33 gives 1221 (5 above), m = 32 gives 1152
    assert sizes["gru3"] == 33


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


def test_help_documents_every_study_and_the_default_folder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["experiments", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for study in ("efficiency", "counting", "forecast", "classification"):
        assert f"{study}:" in text
    assert "docs/reports" in text and "--tiny" in text and "--jobs" in text

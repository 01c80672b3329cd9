"""Tasks: shapes, determinism, the time split, train-only normalisation, targets and CSV errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.model import ModelConfig, RecurrentModel
from training.tasks import (
    TASKS,
    CountingTask,
    CsvError,
    TaskError,
    TaskOptions,
    build_task,
    counting_split,
    counting_string,
)
from training.tasks.series import load_co2, load_sunspots

SMALL = TaskOptions(
    train_windows=8, train_size=16, eval_size=8, seq_len=12, n_train_max=3, n_test_max=5
)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def row_index_csv(tmp_path: Path, rows: int = 100) -> Path:
    """A CSV whose columns are the row index and its double: every value says where it came from."""
    lines = ["row,double"] + [f"{i},{2 * i}" for i in range(rows)]
    return write_csv(tmp_path / "rows.csv", "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("name", "inputs", "outputs", "head"),
    [
        pytest.param("co2", 1, 1, "regression", id="co2"),
        pytest.param("adding", 2, 1, "regression", id="adding"),
        pytest.param("anbn", 3, 3, "multilabel", id="anbn"),
        pytest.param("anbncn", 4, 4, "multilabel", id="anbncn"),
    ],
)
def test_task_shapes(name: str, inputs: int, outputs: int, head: str) -> None:
    task = build_task(name, SMALL)
    assert task.head == head
    assert (task.input_size, task.output_size) == (inputs, outputs)
    for split in (task.train, task.validation, task.test):
        n, t = split.x.shape[:2]
        assert split.x.shape == (n, t, inputs) and split.x.dtype == np.float32
        assert split.y.shape == (n, t, outputs) and split.y.dtype == np.float32
        assert split.weight.shape == (n, t) and split.lengths.shape == (n,)
        assert split.lengths.max() <= t and (split.weight > 0).any()
        padding = np.arange(t)[None, :] >= split.lengths[:, None]
        assert not split.weight[padding].any()


def test_unknown_task_names_the_choices() -> None:
    with pytest.raises(TaskError, match="unknown task 'nope'; choose one of co2, csv"):
        build_task("nope")
    assert set(TASKS) == {"co2", "csv", "adding", "anbn", "anbncn", "sunspots"}


@pytest.mark.parametrize("name", ["co2", "adding"])
def test_data_is_determined_by_the_seed(name: str) -> None:
    first, again = build_task(name, SMALL), build_task(name, SMALL)
    other = build_task(name, TaskOptions(**{**SMALL.__dict__, "seed": 1}))
    np.testing.assert_array_equal(first.train.x, again.train.x)
    np.testing.assert_array_equal(first.test.y, again.test.y)
    assert not np.array_equal(first.train.x, other.train.x)


def test_co2_series_is_complete() -> None:
    values = load_co2()
    assert values.shape == (2284,)
    assert np.isfinite(values).all()
    assert 310 < values.min() < values.max() < 380


def test_sunspots_are_the_yearly_series_on_levels() -> None:
    values = load_sunspots()
    assert values.shape == (309,) and np.isfinite(values).all()
    assert values.min() >= 0 and 150 < values.max() < 200  # 1957's maximum, about 190
    task = build_task("sunspots", SMALL)
    np.testing.assert_allclose(task.test.x[0, :, 0], values[:-1], rtol=1e-6)
    np.testing.assert_allclose(task.test.y[0, :, 0], values[1:], rtol=1e-6)
    assert task.feature_names == ("sunspots",) and task.output_names == ("sunspots_next",)
    with pytest.raises(TaskError, match="the sunspots task has one column"):
        build_task("sunspots", TaskOptions(features=("co2",)))


def test_co2_is_streamed_from_the_start_and_scored_on_its_own_part() -> None:
    task = build_task("co2", SMALL)
    values = load_co2()
    assert task.test.x.shape[:2] == (1, 2283)  # every position, from the first week
    np.testing.assert_allclose(task.test.x[0, :, 0], values[:-1], rtol=1e-6)
    np.testing.assert_allclose(task.test.y[0, :, 0], values[1:], rtol=1e-6)
    scored = np.flatnonzero(task.test.weight[0])
    assert scored[0] + 1 == round(0.85 * 2284) and scored[-1] == 2282


def test_time_split_has_no_leakage(tmp_path: Path) -> None:
    task = build_task("csv", TaskOptions(csv=row_index_csv(tmp_path), target="row", horizon=3))
    train_rows = task.train.x[task.train.weight > 0]
    train_targets = task.train.y[task.train.weight > 0]
    # Everything the model trains on, inputs and targets, comes from rows 0..69.
    assert train_rows.max() < 70 and train_targets.max() == 69
    val_targets = task.validation.y[task.validation.weight > 0]
    test_targets = task.test.y[task.test.weight > 0]
    np.testing.assert_array_equal(val_targets[:, 0], np.arange(70, 85))
    np.testing.assert_array_equal(test_targets[:, 0], np.arange(85, 100))
    assert task.validation.x[0, 0, 0] == 0  # streamed from the first row


def test_normalisation_is_fitted_on_the_train_part_only(tmp_path: Path) -> None:
    options = TaskOptions(csv=row_index_csv(tmp_path), features=("row", "double"), target="row")
    norm = build_task("csv", options).normalization
    # Train targets are rows 1..69, so the train inputs are rows 0..68 (mean 34).
    std = np.sqrt((69**2 - 1) / 12)
    np.testing.assert_allclose(norm.input_mean, (34.0, 68.0))
    np.testing.assert_allclose(norm.input_std, (std, 2 * std))
    np.testing.assert_allclose(norm.output_mean, (35.0,))
    np.testing.assert_allclose(norm.output_std, (std,))


def test_difference_mode_forecasts_changes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "sq.csv", "v\n" + "\n".join(str(i * i) for i in range(40)) + "\n")
    task = build_task("csv", TaskOptions(csv=path, target="v", difference=True))
    assert task.feature_names == ("v_change",) and task.output_names == ("v_change_next",)
    # position t (rows 1..38): input v[t] - v[t-1] = 2t - 1, target v[t+1] - v[t] = 2t + 1
    t = np.arange(1, 39)
    np.testing.assert_allclose(task.test.x[0, :, 0], 2 * t - 1)
    np.testing.assert_allclose(task.test.y[0, :, 0], 2 * t + 1)


def test_series_metrics_include_the_persistence_baseline(tmp_path: Path) -> None:
    task = build_task("csv", TaskOptions(csv=row_index_csv(tmp_path), target="row", horizon=2))
    model = RecurrentModel(ModelConfig("gru", 1, 4, 1))
    metrics = task.evaluate(model, task.test)
    # Persistence predicts row t for the target at row t + 2: always 2 too low.
    assert metrics["persistence_rmse"] == pytest.approx(2.0)
    assert metrics["persistence_mae"] == pytest.approx(2.0)
    assert metrics["positions"] == 15
    assert metrics["rmse"] > 0 and metrics["skill"] == pytest.approx(1 - metrics["rmse"] / 2.0)


def test_adding_targets_are_the_sum_of_the_two_marked_values() -> None:
    split = build_task("adding", SMALL).train
    values, markers = split.x[..., 0], split.x[..., 1]
    assert (markers.sum(axis=1) == 2).all()
    half = split.x.shape[1] // 2
    assert (markers[:, :half].sum(axis=1) == 1).all()
    expected = (values * markers).sum(axis=1)
    np.testing.assert_allclose(split.y[:, -1, 0], expected, rtol=1e-6)
    assert (split.weight[:, -1] == 1).all() and split.weight[:, :-1].sum() == 0
    assert ((values >= 0) & (values <= 1)).all()


# Inputs one-hot over (S, a, b[, c]); targets over (a, b[, c], E).
ANBN_N1 = ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
ANBN_N2 = (
    [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]],
    [[1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]],
)
ANBNCN_N1 = (
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
)
ANBNCN_N2 = (
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1],
     [0, 0, 0, 1]],
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0],
     [0, 0, 0, 1]],
)  # fmt: skip


@pytest.mark.parametrize(
    ("n", "with_c", "expected"),
    [
        pytest.param(1, False, ANBN_N1, id="anbn-n1"),
        pytest.param(2, False, ANBN_N2, id="anbn-n2"),
        pytest.param(1, True, ANBNCN_N1, id="anbncn-n1"),
        pytest.param(2, True, ANBNCN_N2, id="anbncn-n2"),
    ],
)
def test_counting_targets_match_hand_written_cases(n: int, with_c: bool, expected: tuple) -> None:
    split = counting_split([n], with_c)
    np.testing.assert_array_equal(split.x[0], np.array(expected[0], np.float32))
    np.testing.assert_array_equal(split.y[0], np.array(expected[1], np.float32))
    assert split.lengths.tolist() == [len(expected[0])]


def test_counting_string_reads_as_the_language() -> None:
    symbols, allowed = counting_string(3, with_c=True)
    assert "".join(symbols) == "Saaabbbccc"
    assert allowed[-1] == {"E"} and allowed[6] == {"c"} and allowed[5] == {"b"}


def test_counting_test_range_is_held_out() -> None:
    task = build_task("anbn", TaskOptions(n_train_max=4, n_test_max=7))
    assert sorted(set(task.train.lengths.tolist())) == [3, 5, 7, 9]  # 2n + 1 for n = 1..4
    assert task.test.lengths.tolist() == [11, 13, 15]  # n = 5..7


def test_counting_accuracy_by_n_covers_any_range() -> None:
    task = build_task("anbncn", SMALL)
    assert isinstance(task, CountingTask)
    model = RecurrentModel(ModelConfig("lstm", 4, 3, 4, head="multilabel"))
    by_n = task.accuracy_by_n(model, range(8, 13))
    assert list(by_n) == [8, 9, 10, 11, 12]
    assert set(by_n.values()) <= {0.0, 1.0}
    metrics = task.evaluate(model, task.test)
    assert metrics["strings"] == 2 and 0 <= metrics["step_accuracy"] <= 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"n_train_max": 5, "n_test_max": 5}, "n_test_max .5. must be larger", id="n"),
        pytest.param({"horizon": 0}, "horizon must be >= 1", id="horizon"),
        pytest.param({"seq_len": 1}, "seq_len must be >= 2", id="seq-len"),
    ],
)
def test_impossible_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        TaskOptions(**options)


GOOD = "time,load,temp\n" + "".join(f"{i},{i % 7},{i % 5}\n" for i in range(40))


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        pytest.param("", "load", "data.csv is empty", id="empty"),
        pytest.param("1,2\n3,4\n", "load", "data.csv has no header row", id="no-header"),
        pytest.param("time,load\n", "load", "data.csv has a header but no data rows", id="no-rows"),
        pytest.param(
            GOOD, "power", "data.csv has no column 'power'; available columns: time, load, temp",
            id="missing-column",
        ),
        pytest.param(
            GOOD.replace("\n15,1,0\n", "\n15,abc,0\n"), "load",
            "data.csv row 17, column 'load': 'abc' is not a number", id="not-a-number",
        ),
        pytest.param(
            GOOD.replace("\n15,1,0\n", "\n15,,0\n"), "load",
            "data.csv row 17, column 'load' is empty",
            id="empty-value",
        ),
        pytest.param(
            GOOD.replace("\n15,1,0\n", "\n15,inf,0\n"), "load",
            "data.csv row 17, column 'load': 'inf' is not a finite number", id="infinite",
        ),
        pytest.param(
            GOOD.replace("\n15,1,0\n", "\n15,1\n"), "load",
            "data.csv row 17 has 2 fields, the header has 3",
            id="short-row",
        ),
        pytest.param(
            "load\n1\n2\n3\n4\n5\n", "load",
            "data.csv has 5 data rows, too few for a 70/15/15 split",
            id="too-few-rows",
        ),
        pytest.param(
            "a,a\n1,2\n", "a", "data.csv header names column 'a' more than once", id="duplicate"
        ),
    ],
)  # fmt: skip
def test_csv_errors_name_the_file_row_and_column(
    tmp_path: Path, text: str, target: str, message: str
) -> None:
    path = write_csv(tmp_path / "data.csv", text)
    with pytest.raises(TaskError) as caught:
        build_task("csv", TaskOptions(csv=path, target=target))
    assert message in str(caught.value)


def test_csv_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CsvError, match=r"missing\.csv does not exist"):
        build_task("csv", TaskOptions(csv=tmp_path / "missing.csv", target="x"))


def test_csv_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(CsvError, match=r"data\.csv is not a UTF-8 text file"):
        build_task("csv", TaskOptions(csv=path, target="x"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"target": "load"}, "the csv task needs --csv FILE", id="no-file"),
        pytest.param({"csv": Path("x.csv")}, "needs --target COLUMN", id="no-target"),
    ],
)
def test_csv_task_needs_a_file_and_a_target(options: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        build_task("csv", TaskOptions(**options))

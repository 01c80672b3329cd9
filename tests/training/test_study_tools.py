"""The studies' tools on known inputs: statistics, the seed ensemble, the baselines, the digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.cells import CELLS
from training.experiments.baselines import (
    Positions,
    Seasons,
    climatology,
    harmonic_columns,
    lag_columns,
    least_squares,
    rmse,
)
from training.experiments.ensemble import SeedEnsemble, block_mask
from training.experiments.forecast import verdict
from training.experiments.stats import Interval, mean_ci, p_text, t_interval, welch_p
from training.model import ModelConfig, RecurrentModel
from training.tasks.digits import as_sequences, load_digit_splits, stratified_split

# --- statistics: values from a t table and worked by hand -------------------------------------


def test_t_interval_of_one_to_five() -> None:
    # mean 3, s = sqrt(2.5) = 1.5811, t(0.975, 4) = 2.7764: half-width 2.7764 * 1.5811 / sqrt(5)
    interval = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert interval.mean == 3.0 and interval.count == 5
    assert interval.half_width == pytest.approx(1.9632, abs=1e-4)
    assert (interval.low, interval.high) == pytest.approx((1.0368, 4.9632), abs=1e-4)


def test_t_interval_of_two_values_uses_twelve_point_seven() -> None:
    # t(0.975, 1) = 12.706; s = sqrt(2); half-width 12.706 * sqrt(2) / sqrt(2)
    assert t_interval([1.0, 3.0]).half_width == pytest.approx(12.706, abs=1e-3)


def test_one_value_has_no_interval() -> None:
    interval = t_interval([0.5])
    assert interval.mean == 0.5 and math.isnan(interval.half_width)
    assert mean_ci([0.5]) == "0.500"
    assert mean_ci([]) == "—"
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


def test_mean_ci_rounds_both_to_the_mean_precision() -> None:
    assert mean_ci([1.0, 2.0, 3.0, 4.0, 5.0]) == "3.00 ± 1.96"
    assert mean_ci([100.0, 120.0, 140.0]) == "120 ± 50"  # 4.3027 * 20 / sqrt(3) = 49.7


def test_welch_p_matches_a_hand_computation() -> None:
    # means 2 and 31/6, variances 1 and 19/12: t = -3.412, Welch df = 3.81, p = 0.029
    assert welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.5]) == pytest.approx(0.0291, abs=5e-4)
    assert welch_p([1.0, 2.0], [3.0]) != welch_p([1.0, 2.0], [3.0])  # nan: too few values
    assert welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0  # no spread, different means
    assert p_text(0.0004) == "< 0.001" and p_text(0.0291) == "0.029" and p_text(math.nan) == "—"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        pytest.param(1.2, "yes (interval below)", id="below"),
        pytest.param(0.8, "no (interval above)", id="above"),
        pytest.param(1.05, "no (interval overlaps)", id="overlaps"),
    ],
)
def test_verdict_needs_the_whole_interval_below(reference: float, expected: str) -> None:
    assert verdict(Interval(1.0, 0.1, 5), reference) == expected


# --- the seed ensemble: each seed trains as it would alone ------------------------------------


def test_block_mask_is_seed_diagonal() -> None:
    mask = block_mask(blocks=2, seeds=2, rows=1, cols=2)
    expected = [[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
    assert mask.tolist() == expected


@pytest.mark.parametrize("cell", list(CELLS))
def test_ensemble_members_are_the_seeded_models(cell: str) -> None:
    ensemble = SeedEnsemble(ModelConfig(cell, 3, 4, 2, head="multilabel"), seeds=[0, 1, 2])
    torch.manual_seed(1)
    alone = RecurrentModel(ensemble.member_config)
    mine = ensemble.member(1).state_dict()
    for name, value in alone.state_dict().items():
        torch.testing.assert_close(mine[name], value)
    x = torch.randn(5, 6, 3, 3)  # (B, T, S, n): each seed its own inputs
    out = ensemble(x)
    for i in range(3):
        expected, _ = ensemble.member(i).forward_normalized(x[:, :, i])
        torch.testing.assert_close(out[:, :, i], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "mgu3", "lstm"])
def test_one_ensemble_step_equals_a_step_alone(cell: str) -> None:
    """Loss, per-seed clipping and Adam on the ensemble match clip_grad_norm_ and Adam alone."""
    ensemble = SeedEnsemble(
        ModelConfig(cell, 2, 3, 1, output_mean=(0.5,), output_std=(2.0,)), seeds=[0, 1]
    )
    models = [ensemble.member(i).train() for i in range(2)]
    x, y = torch.randn(4, 5, 2, 2) * 3, torch.randn(4, 5, 2, 1) * 3  # large: clipping bites
    out = ensemble(x)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=0.1)
    ((out - y) ** 2).mean(dim=(0, 1, 3)).sum().backward()
    norms = ensemble.clip_grad_norm_(0.1)
    optimizer.step()
    for i, model in enumerate(models):
        alone_optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        prediction, _ = model.forward_normalized(x[:, :, i])
        ((prediction - y[:, :, i]) ** 2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        alone_optimizer.step()
        assert norms[i] == pytest.approx(float(norm), rel=1e-4) and norm > 0.1
        after = ensemble.member(i).state_dict()
        for name, value in model.state_dict().items():
            torch.testing.assert_close(after[name], value, atol=1e-5, rtol=1e-5)


def test_ensemble_rejects_the_wrong_shape() -> None:
    ensemble = SeedEnsemble(ModelConfig("gru", 3, 4, 2), seeds=[0, 1])
    with pytest.raises(ValueError, match=r"SeedEnsemble: x must be \(B, T, 2, 3\)"):
        ensemble(torch.zeros(1, 2, 3, 3))


# --- the forecasting baselines on series they fit exactly --------------------------------------


def positions(y: np.ndarray, x: np.ndarray | None = None) -> Positions:
    """A series of 100 positions split 70/15/15."""
    x = y if x is None else x
    return Positions(x=x, y=y, persistence=x, val_start=70, test_start=85)


def test_lag_columns_shift_the_series() -> None:
    lags = lag_columns(np.array([1.0, 2.0, 3.0, 4.0]), 2)
    assert lags.tolist() == [[1, 1], [2, 1], [3, 2], [4, 3]]


def test_harmonic_regression_recovers_a_pure_cycle() -> None:
    seasons = Seasons(period=10.0, harmonics=1, bins=10)
    t = np.arange(100)
    y = 2.0 + np.sin(2 * np.pi * t / 10)
    columns = harmonic_columns(100, seasons)
    assert columns.shape == (100, 2)
    predicted = least_squares(columns, positions(y))
    assert rmse(predicted[85:], y[85:]) < 1e-9


def test_ar_fit_recovers_a_linear_recursion() -> None:
    # y[t] = x[t + 1] with x[t + 1] = 0.5 x[t] + 1: an AR(1) with intercept fits it exactly
    x = np.empty(101)
    x[0] = 10.0
    for t in range(100):
        x[t + 1] = 0.5 * x[t] + 1.0
    p = positions(x[1:], x[:-1])
    assert rmse(least_squares(lag_columns(p.x, 1), p)[70:], p.y[70:]) < 1e-9


def test_climatology_is_the_training_mean_per_bin() -> None:
    y = np.tile([1.0, 3.0], 50)  # period 2: bin 0 always 1, bin 1 always 3
    predicted = climatology(positions(y), Seasons(period=2.0, harmonics=1, bins=2))
    assert predicted[:4].tolist() == [1.0, 3.0, 1.0, 3.0]
    one_bin = climatology(positions(y), Seasons(period=2.0, harmonics=1, bins=1))
    assert np.allclose(one_bin, 2.0)


# --- the digits, read as sequences -------------------------------------------------------------


def test_digits_are_read_by_rows_and_by_pixels() -> None:
    images = np.arange(2 * 64, dtype=np.float64).reshape(2, 8, 8) % 17
    rows, pixels = as_sequences(images, "rows"), as_sequences(images, "pixels")
    assert rows.shape == (2, 8, 8) and pixels.shape == (2, 64, 1)
    assert pixels[1, 9, 0] == rows[1, 1, 1] == images[1, 1, 1] / 16
    assert rows.dtype == np.float32 and rows.max() <= 1.0
    with pytest.raises(ValueError, match="unknown reading 'columns'"):
        as_sequences(images, "columns")  # type: ignore[arg-type]


def test_stratified_split_keeps_every_class_in_every_part() -> None:
    labels = np.repeat(np.arange(10), 20)  # 20 of each class
    train, validation, test = stratified_split(labels, seed=0)
    assert (len(train), len(validation), len(test)) == (140, 30, 30)
    assert not set(train) & set(validation) and not set(validation) & set(test)
    for part in (train, validation, test):
        assert set(labels[part]) == set(range(10))


def test_bundled_digits_split_70_15_15() -> None:
    splits = load_digit_splits("pixels")
    sizes = [len(part.label) for part in (splits.train, splits.validation, splits.test)]
    assert sum(sizes) == 1797 and sizes[1] == pytest.approx(270, abs=5)
    assert splits.test.x.shape[1:] == (64, 1)

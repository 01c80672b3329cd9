"""Study ``counting``: do the cells learn aⁿbⁿ and aⁿbⁿcⁿ, and count far past the training range?

Every cell is trained on next-symbol prediction (the ``anbn`` and ``anbncn`` tasks' strings) for
n = 1..N and scored on every n up to a much larger bound. A string is right when every next-symbol
prediction is right, which implies that the model also rejects every wrong continuation. The figure
of merit follows Weiss, Goldberg & Yahav (2018): the largest n such that every n' <= n is right.

How the training is kept affordable and honest:

- all seeds of one cell train at once as a :class:`SeedEnsemble` (the project's cells, laid out
  block-diagonally; each seed trains as it would alone);
- one optimiser step sees every string of the current range once; a curriculum starts at
  n <= ``curriculum_start`` and widens the range by ``curriculum_step`` once half of the seeds
  fit it (or after ``stage_checks`` checks without);
- Adam with a cosine learning-rate decay; every ``check_every`` steps each seed is scored on the
  whole training range, and the state kept for a seed is its lowest-loss state among those that
  get every n <= N right. Training stops when every seed has fitted the range for
  ``settle_checks`` checks in a row or stalled (its count of training strings right has not
  grown for ``stall_checks`` checks on the whole range), or at ``max_steps``; a seed that never
  fits keeps the state with the most training strings right;
- every string weighs the same in the loss, whatever its length;
- a seed that never fits n <= N is reported as such and left out of the generalisation
  statistics: "fails to generalise" is then not mixed with "failed to train".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.experiments.ensemble import SeedEnsemble
from training.experiments.options import StudyOptions, run_grid
from training.experiments.plots import CurvePanel, TracePanel, curve_figure, trace_figure
from training.experiments.report import Report, Table
from training.experiments.stats import mean_ci, p_text, welch_p
from training.model import ModelConfig, RecurrentModel
from training.tasks import counting_split, counting_string
from training.tasks.counting import alphabet

LANGUAGES = {"anbn": "aⁿbⁿ", "anbncn": "aⁿbⁿcⁿ"}
TRACE_CELLS = ("lstm", "gru")  # whose states the mechanism figure shows


@dataclass(frozen=True)
class Plan:
    hidden_size: int  # units per seed
    n_train_max: int  # train on n = 1..N
    n_eval_max: int  # score every n = 1..n_eval_max
    max_steps: int  # optimiser steps at most
    lr: float  # Adam's initial learning rate, decayed by a cosine to lr_final
    lr_final: float
    curriculum_start: int  # the first training range is n <= this
    curriculum_step: int  # the range widens by this much per stage
    stage_checks: int  # widen anyway after this many checks in a stage
    check_every: int  # steps between scorings of the whole training range
    settle_checks: int  # a seed is done once it has fitted for this many checks in a row ...
    stall_checks: int  # ... or, on the whole range, when its largest n has not grown for this many
    eval_block: int  # strings scored per batch after training
    trace_n: int  # the n of the string whose states the mechanism figure plots


FULL = Plan(
    hidden_size=10,
    n_train_max=50,
    n_eval_max=1000,
    max_steps=1500,
    lr=1e-2,
    lr_final=1e-3,
    curriculum_start=10,
    curriculum_step=10,
    stage_checks=4,
    check_every=25,
    settle_checks=4,
    stall_checks=8,
    eval_block=100,
    trace_n=200,
)
TINY = Plan(
    hidden_size=3,
    n_train_max=4,
    n_eval_max=12,
    max_steps=30,
    lr=2e-2,
    lr_final=2e-3,
    curriculum_start=2,
    curriculum_step=2,
    stage_checks=1,
    check_every=10,
    settle_checks=1,
    stall_checks=1,
    eval_block=5,
    trace_n=8,
)


@dataclass(frozen=True)
class Run:
    """One seed's results."""

    parameters: int  # of the model, head included
    accepted: dict[int, float]  # n -> 1.0 if the string for n is right, else 0.0
    wall_time_s: float  # of the whole ensemble the seed trained in
    fitted: bool = True  # every n <= N right at some check
    steps: int = 0  # optimiser steps until the ensemble stopped

    def largest_correct_n(self) -> int:
        """The largest n such that every n' <= n is right (0 if n = 1 is wrong)."""
        n = 0
        while self.accepted.get(n + 1) == 1.0:
            n += 1
        return n

    def fraction_right(self, ns: range) -> float:
        return float(np.mean([self.accepted[n] for n in ns]))


@dataclass
class CellResult:
    """Every seed of one cell on one language, and the state trace of one fitted seed."""

    runs: list[Run]
    trace: np.ndarray | None = None  # (T, states, H) along the string n = trace_n
    trace_seed: int | None = None


@dataclass
class _Best:
    """The state kept for one seed while training."""

    state: dict[str, Tensor] = field(default_factory=dict)
    fitted: bool = False
    score: tuple[float, float] = (-1.0, math.inf)  # (fitted or largest n, loss): higher, lower
    streak: int = 0  # checks in a row with the training range fitted
    right: float = 0.0  # the most strings of the training range right at one check so far
    stalled: int = 0  # checks on the whole range since ``right`` last grew


def _tensors(ns: range, with_c: bool, seeds: int) -> tuple[Tensor, ...]:
    """Inputs ``(B, T, S, n)`` shared by the seeds, targets, weights and lengths."""
    split = counting_split(ns, with_c)
    x = torch.from_numpy(split.x)[:, :, None].expand(-1, -1, seeds, -1)  # (B, T, S, n)
    return (
        x,
        torch.from_numpy(split.y),
        torch.from_numpy(split.weight),
        torch.from_numpy(split.lengths),
    )


def _losses(logits: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """``(S,)`` each seed's binary cross-entropy: the mean over a string's steps, then over strings.

    Every string weighs the same, whatever its length: n = 1 matters as much as n = 50 (a mean
    over all steps would let the long strings drown the short ones).
    """
    target = y[:, :, None].expand_as(logits)  # (B, T, S, o)
    per_step = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    per_string = (per_step * weight[..., None]).sum(dim=1) / weight.sum(dim=1)[:, None]  # (B, S)
    return per_string.mean(dim=0)


def _accepted(logits: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """``(B, S)`` True where the whole string is right for that seed."""
    step_ok = ((logits > 0) == (y[:, :, None] > 0.5)).all(dim=-1)  # (B, T, S)
    return (step_ok | (weight[..., None] == 0)).all(dim=1)


class _Trainer:
    """The training loop of one cell on one language; see the module docstring."""

    def __init__(self, cell: str, with_c: bool, seeds: range, plan: Plan) -> None:
        inputs, labels = alphabet(with_c)
        self.plan, self.with_c, self.seeds = plan, with_c, seeds
        config = ModelConfig(cell, len(inputs), plan.hidden_size, len(labels), head="multilabel")
        self.ensemble = SeedEnsemble(config, seeds)
        self.optimizer = torch.optim.Adam(self.ensemble.parameters(), lr=plan.lr)
        self.full = _tensors(range(1, plan.n_train_max + 1), with_c, len(seeds))
        self.best = [_Best() for _ in seeds]
        self.range_max = min(plan.curriculum_start, plan.n_train_max)
        self.stage_checks = 0

    def lr_at(self, step: int) -> float:
        p = self.plan
        progress = min(1.0, step / p.max_steps)
        return p.lr_final + 0.5 * (p.lr - p.lr_final) * (1 + math.cos(math.pi * progress))

    def step(self, step: int) -> None:
        x, y, weight, lengths = (t[: self.range_max] for t in self.full)
        steps = int(lengths.max())
        self.ensemble.train()
        logits = self.ensemble(x[:, :steps])
        loss = _losses(logits, y[:, :steps], weight[:, :steps]).sum()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.zero_grad()
        torch.autograd.backward(loss)
        self.ensemble.clip_grad_norm_(1.0)
        self.optimizer.step()

    @torch.no_grad()
    def check(self) -> bool:
        """Score every seed on the whole range; keep states; widen the range; True to stop."""
        x, y, weight, _ = self.full
        self.ensemble.eval()
        logits = self.ensemble(x)
        losses = _losses(logits, y, weight)
        accepted = _accepted(logits, y, weight)  # (B, S)
        right = accepted.sum(dim=0)  # (S,)
        for i, best in enumerate(self.best):
            self._keep(i, best, bool(accepted[:, i].all()), float(right[i]), float(losses[i]))
        self._widen(accepted)
        p = self.plan
        return all(b.streak >= p.settle_checks or b.stalled >= p.stall_checks for b in self.best)

    def _keep(self, i: int, best: _Best, fitted: bool, right: float, loss: float) -> None:
        best.streak = best.streak + 1 if fitted else 0
        if right > best.right:
            best.right, best.stalled = right, 0
        elif self.range_max == self.plan.n_train_max:
            best.stalled += 1
        score = (math.inf if fitted else right, loss)
        if score[0] > best.score[0] or (score[0] == best.score[0] and loss < best.score[1]):
            best.score, best.fitted = score, fitted
            best.state = {k: v.clone() for k, v in self.ensemble.member(i).state_dict().items()}

    def _widen(self, accepted: Tensor) -> None:
        p = self.plan
        if self.range_max >= p.n_train_max:
            return
        self.stage_checks += 1
        fit_now = accepted[: self.range_max].all(dim=0).float().mean()
        if fit_now >= 0.5 or self.stage_checks >= p.stage_checks:
            self.range_max = min(p.n_train_max, self.range_max + p.curriculum_step)
            self.stage_checks = 0

    def fit(self) -> int:
        """Train until every seed has settled or ``max_steps``; return the steps taken."""
        for step in range(1, self.plan.max_steps + 1):
            self.step(step)
            if step % self.plan.check_every == 0 and self.check():
                return step
        self.check()
        return self.plan.max_steps

    def members(self) -> list[RecurrentModel]:
        models = []
        for best in self.best:
            model = RecurrentModel(self.ensemble.member_config)
            model.load_state_dict(best.state)
            models.append(model.eval())
        return models


@torch.no_grad()
def accepted_by_n(models: list[RecurrentModel], with_c: bool, n_max: int, block: int) -> np.ndarray:
    """``(S, n_max)`` 1.0 where model ``s`` gets the string for n = column + 1 right."""
    ensemble = SeedEnsemble(models[0].config, range(len(models)))
    ensemble.load_members(models)
    ensemble.eval()
    columns = []
    for start in range(1, n_max + 1, block):
        x, y, weight, _ = _tensors(
            range(start, min(n_max, start + block - 1) + 1), with_c, len(models)
        )
        logits = ensemble(x)
        columns.append(_accepted(logits, y, weight).T.float().numpy())  # (S, b)
    return np.concatenate(columns, axis=1)


@torch.no_grad()
def state_trace(model: RecurrentModel, n: int, with_c: bool) -> np.ndarray:
    """``(T, states, H)`` the model's state after each symbol of ``S aⁿ bⁿ [cⁿ]``."""
    inputs, _ = alphabet(with_c)
    symbols, _ = counting_string(n, with_c)
    x = torch.zeros(len(symbols), len(inputs))  # (T, n)
    x[torch.arange(len(symbols)), [inputs.index(s) for s in symbols]] = 1.0
    cell = model.layers()[0]
    xp = cell.project_input((x - model.input_mean) / model.input_std)  # (T, k*m)
    state = cell.initial_state(1)
    trace = []
    for t in range(len(symbols)):
        state = cell.recur(xp[t : t + 1], state)
        trace.append(torch.stack([s[0] for s in state]))  # (states, H)
    return torch.stack(trace).numpy()


def train_one(language: str, cell: str, seeds: int, plan: Plan) -> CellResult:
    """Train all seeds of one cell on one language, then score every n up to n_eval_max."""
    torch.set_num_threads(1)
    with_c = language == "anbncn"
    started = time.perf_counter()
    trainer = _Trainer(cell, with_c, range(seeds), plan)
    steps = trainer.fit()
    wall_time = time.perf_counter() - started
    models = trainer.members()
    accepted = accepted_by_n(models, with_c, plan.n_eval_max, plan.eval_block)
    runs = [
        Run(
            parameters=model.parameter_count(),
            accepted={n + 1: float(v) for n, v in enumerate(row)},
            wall_time_s=wall_time,
            fitted=best.fitted,
            steps=steps,
        )
        for model, row, best in zip(models, accepted, trainer.best, strict=True)
    ]
    fitted = [i for i, run in enumerate(runs) if run.fitted]
    result = CellResult(runs)
    if cell in TRACE_CELLS:
        result.trace_seed = fitted[0] if fitted else 0
        result.trace = state_trace(models[result.trace_seed], plan.trace_n, with_c)
    return result


Results = dict[str, dict[str, CellResult]]  # {language: {cell: result}}


def train_all(plan: Plan, options: StudyOptions) -> Results:
    return run_grid(
        train_one,
        list(LANGUAGES),
        lambda lang, cell: (lang, cell, options.seeds, plan),
        options.jobs,
    )


COLUMNS = (
    "cell",
    "parameters (with head)",
    "seeds fitting n ≤ N",
    "largest n all right, per seed",
    "largest n all right (fitted seeds)",
    "p vs lstm",
    "right in N+1..max (fitted seeds)",
    "steps",
    "train s (all seeds)",
)


def _per_seed(runs: list[Run]) -> str:
    return ", ".join(
        str(r.largest_correct_n()) if r.fitted else f"({r.largest_correct_n()})" for r in runs
    )


def _row(cell: str, result: CellResult, lstm: CellResult, plan: Plan) -> tuple[str, ...]:
    fitted = [r for r in result.runs if r.fitted]
    largest = [float(r.largest_correct_n()) for r in fitted]
    lstm_largest = [float(r.largest_correct_n()) for r in lstm.runs if r.fitted]
    beyond = range(plan.n_train_max + 1, plan.n_eval_max + 1)
    runs = result.runs
    return (
        cell,
        str(runs[0].parameters),
        f"{len(fitted)}/{len(runs)}",
        _per_seed(runs),
        mean_ci(largest),
        "—" if cell == "lstm" else p_text(welch_p(largest, lstm_largest)),
        mean_ci([r.fraction_right(beyond) for r in fitted]),
        str(runs[0].steps),
        f"{runs[0].wall_time_s:.0f}",
    )


def _curves(by_cell: dict[str, CellResult], ns: range) -> dict[str, list[float]]:
    """For each cell, the fraction of all its seeds (fitted or not) that is right at each n."""
    return {
        cell: [float(np.mean([r.accepted[n] for r in result.runs])) for n in ns]
        for cell, result in by_cell.items()
    }


def _accuracy_figure(path: Path, results: Results, plan: Plan, seeds: int) -> None:
    ns = range(1, plan.n_eval_max + 1)
    panels = [
        CurvePanel(
            title=symbol,
            x=list(ns),
            curves=_curves(results[language], ns),
            marker_x=plan.n_train_max + 0.5,
            marker_label="end of training range",
        )
        for language, symbol in LANGUAGES.items()
    ]
    title = (
        f"Fraction of all {seeds} seeds (fitted or not) right at each n, trained on n ≤ "
        f"{plan.n_train_max}"
    )
    curve_figure(path, title, panels, ylabel="fraction of seeds right")


def _trace_figure(path: Path, results: Results, plan: Plan) -> None:
    panels = []
    for language, symbol in LANGUAGES.items():
        blocks = 3 if language == "anbncn" else 2
        for cell in TRACE_CELLS:
            result = results[language][cell]
            assert result.trace is not None
            state = 1 if cell == "lstm" else 0  # the LSTM's cell state c; the GRU's h
            name = "cell state c" if cell == "lstm" else "hidden state h"
            fitted = "" if result.runs[result.trace_seed or 0].fitted else ", did not fit"
            panels.append(
                TracePanel(
                    title=f"{cell} on {symbol}: {name} (seed {result.trace_seed}{fitted})",
                    values=result.trace[:, state, :],
                    boundaries=[1 + plan.trace_n * k for k in range(1, blocks)],
                )
            )
    trace_figure(path, f"Every unit's state along S aⁿbⁿ(cⁿ), n = {plan.trace_n}", panels)


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    results = train_all(plan, options)
    _accuracy_figure(options.out / "counting.png", results, plan, options.seeds)
    _trace_figure(options.out / "counting-states.png", results, plan)
    tables = [
        Table(
            title=f"{symbol}: trained on n = 1..{plan.n_train_max}, scored on n = 1.."
            f"{plan.n_eval_max}",
            caption=_caption(plan),
            columns=COLUMNS,
            rows=tuple(
                _row(cell, result, results[language]["lstm"], plan)
                for cell, result in results[language].items()
            ),
        )
        for language, symbol in LANGUAGES.items()
    ]
    return Report(
        study="counting",
        title="Counting: aⁿbⁿ and aⁿbⁿcⁿ far past the training range",
        description=_description(plan, options),
        tables=tables,
        figures=[
            (
                "counting.png",
                "Accuracy against n per cell, over all seeds (fitted or not); the dotted line "
                "ends the training range.",
            ),
            (
                "counting-states.png",
                "The mechanism: every unit of the LSTM's cell state and of "
                "the GRU's hidden state along one long string; dotted lines mark where the symbol "
                "changes.",
            ),
        ],
        notes=_notes(plan),
    )


def _caption(plan: Plan) -> str:
    return (
        f"A seed counts only if it fits the training range (every n ≤ {plan.n_train_max} right); "
        "its per-seed value is in brackets otherwise and it is left out of the means. Means are "
        "over the fitted seeds with 95% t-intervals; 'p vs lstm' is Welch's t-test of the "
        "largest n all right against the LSTM's fitted seeds. 'steps' is when the ensemble "
        "stopped; 'train s' its wall time for all seeds together."
    )


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        f"One layer of {plan.hidden_size} units per cell and a linear head, next-symbol "
        f"prediction (binary cross-entropy per symbol) on n = 1..{plan.n_train_max}, then every "
        f"n = 1..{plan.n_eval_max} scored. {options.seeds} seeds per cell, trained together as "
        "a block-diagonal ensemble of the project's cells (each seed has its own weights, "
        "gradient clipping at norm 1 and Adam state, as if alone). Every optimiser step sees "
        f"each string of the current range once; the range starts at n ≤ "
        f"{plan.curriculum_start} and widens by {plan.curriculum_step} when half of the seeds "
        f"fit it (or after {plan.stage_checks} checks). Adam, learning rate {plan.lr} decayed "
        f"by a cosine to {plan.lr_final} over {plan.max_steps} steps at most; every "
        f"{plan.check_every} steps each seed is scored on n = 1..{plan.n_train_max} and the "
        "state kept is its lowest-loss state among those that fit the whole range; training "
        f"stops once every seed has either fitted for {plan.settle_checks} checks in a row or, "
        f"on the whole range, not got more strings right for {plan.stall_checks} checks (a seed "
        "that never fits keeps its state with the most strings right). Each string weighs the "
        "same in the loss (the mean over its steps, then over strings). The figure "
        "of merit is the largest n up to which every string is right (Weiss, Goldberg & Yahav "
        "2018)."
    )


def _notes(plan: Plan) -> list[str]:
    return [
        "A string is right when every next-symbol prediction (sigmoid > 0.5 per symbol) equals "
        "the set of allowed next symbols; this implies correct rejection of every wrong "
        "continuation.",
        "Where exactly a cell stops being right past the training range depends on small "
        "differences in its weights, so it depends on the machine's floating-point numerics "
        "(the order of sums in matrix products): the per-seed values can move by a few n from "
        "one machine to another. The fitted counts and the gap between cells are what the "
        "study shows.",
        f"Scoring runs on strings of up to {3 * plan.n_eval_max + 1} steps in float32.",
    ]

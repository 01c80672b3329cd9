"""Counting languages aⁿbⁿ and aⁿbⁿcⁿ as next-symbol prediction (Gers & Schmidhuber 2001).

The input is ``S aⁿ bⁿ [cⁿ]``, one symbol per step, one-hot over (S, a, b[, c]). At every step
the multilabel target is the set of symbols that may come next among (a, b[, c], E), E ending the
string:

- after S: {a}; after any a: {a, b};
- after the j-th b: {b} while j < n, then {E} (aⁿbⁿ) or {c} (aⁿbⁿcⁿ);
- after the j-th c: {c} while j < n, then {E}.

A string is accepted when, at every step, the outputs thresholded at sigmoid 0.5 (logit 0) equal the
target set exactly. Training and validation use n = 1..n_train_max; the test uses larger n, to see
whether the counting generalises (Weiss, Goldberg & Yahav 2018: the LSTM does, the GRU does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from training.model import RecurrentModel
from training.tasks.base import Normalization, SequenceSplit, Task, TaskOptions, predict

TRAIN_COPIES = 16  # each training string is repeated so that an epoch holds several batches


def alphabet(with_c: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input symbols and output labels."""
    if with_c:
        return ("S", "a", "b", "c"), ("a", "b", "c", "E")
    return ("S", "a", "b"), ("a", "b", "E")


def counting_string(n: int, with_c: bool) -> tuple[list[str], list[set[str]]]:
    """The input symbols of ``S aⁿ bⁿ [cⁿ]`` and, for each, the set of symbols allowed next."""
    blocks = ["a", "b", "c"] if with_c else ["a", "b"]
    symbols = ["S"] + [s for s in blocks for _ in range(n)]
    allowed: list[set[str]] = [{"a"}] + [{"a", "b"}] * n
    for k, block in enumerate(blocks[1:], start=1):
        after_last = blocks[k + 1] if k + 1 < len(blocks) else "E"
        allowed += [{block}] * (n - 1) + [{after_last}]
    return symbols, allowed


def counting_split(ns: Iterable[int], with_c: bool, copies: int = 1) -> SequenceSplit:
    """One padded row per n (repeated ``copies`` times), time-aligned from the first symbol."""
    ns = [n for n in ns for _ in range(copies)]
    inputs, labels = alphabet(with_c)
    steps = max(1 + len(inputs[1:]) * n for n in ns)
    x = np.zeros((len(ns), steps, len(inputs)), np.float32)  # (N, T, |inputs|)
    y = np.zeros((len(ns), steps, len(labels)), np.float32)  # (N, T, |labels|)
    lengths = np.zeros(len(ns), np.int64)  # (N,)
    for row, n in enumerate(ns):
        symbols, allowed = counting_string(n, with_c)
        lengths[row] = len(symbols)
        for t, (symbol, nxt) in enumerate(zip(symbols, allowed, strict=True)):
            x[row, t, inputs.index(symbol)] = 1.0
            y[row, t, [labels.index(s) for s in nxt]] = 1.0
    weight = (np.arange(steps)[None, :] < lengths[:, None]).astype(np.float32)  # (N, T)
    return SequenceSplit(x=x, y=y, weight=weight, lengths=lengths)


@dataclass
class CountingTask(Task):
    """See the module docstring."""

    with_c: bool = False

    def evaluate(self, model: RecurrentModel, split: SequenceSplit) -> dict[str, float]:
        step_ok, valid = self._step_correct(model, split)
        accepted = (step_ok | ~valid).all(axis=1)  # (N,)
        return {
            "accuracy": float(accepted.mean()),
            "step_accuracy": float(step_ok[valid].mean()),
            "strings": float(len(accepted)),
        }

    def accuracy_by_n(self, model: RecurrentModel, ns: Iterable[int]) -> dict[int, float]:
        """For each n, 1.0 when the model accepts ``S aⁿ bⁿ [cⁿ]`` and 0.0 when it does not."""
        ns = list(ns)
        step_ok, valid = self._step_correct(model, counting_split(ns, self.with_c))
        accepted = (step_ok | ~valid).all(axis=1)  # (N,)
        return {n: float(ok) for n, ok in zip(ns, accepted, strict=True)}

    @staticmethod
    def _step_correct(model: RecurrentModel, split: SequenceSplit) -> tuple[np.ndarray, np.ndarray]:
        logits = predict(model, split)  # (N, T, o)
        step_ok = ((logits > 0) == (split.y > 0.5)).all(axis=-1)  # (N, T)
        return step_ok, split.weight > 0


def counting_task(options: TaskOptions, with_c: bool) -> CountingTask:
    name = "anbncn" if with_c else "anbn"
    language = "aⁿbⁿcⁿ" if with_c else "aⁿbⁿ"
    inputs, labels = alphabet(with_c)
    seen = range(1, options.n_train_max + 1)
    held_out = range(options.n_train_max + 1, options.n_test_max + 1)
    return CountingTask(
        name=name,
        description=(
            f"Next-symbol prediction on {language}: train and validate on n = 1..{seen[-1]}, "
            f"test on n = {held_out[0]}..{held_out[-1]}"
        ),
        head="multilabel",
        feature_names=inputs,
        output_names=tuple(f"next_{s}" for s in labels),
        train=counting_split(seen, with_c, copies=TRAIN_COPIES),
        validation=counting_split(seen, with_c),
        test=counting_split(held_out, with_c),
        normalization=Normalization(),  # one-hot inputs and logit outputs stay as they are
        options={"n_train_max": options.n_train_max, "n_test_max": options.n_test_max},
        with_c=with_c,
    )

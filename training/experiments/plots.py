"""Figures for the reports, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display is needed
import numpy as np
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

#: values of one quantity per cell: {cell: (mean, std)}
CellValues = Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class BarPanel:
    """One panel of grouped bars: a group per cell, a bar per series (e.g. two model sizes)."""

    ylabel: str
    series: Mapping[str, CellValues]  # {series label: {cell: (mean, std)}}
    reference: float | None = None  # a dashed horizontal line (a baseline), if any
    reference_label: str = ""
    log: bool = False


@dataclass(frozen=True)
class CurvePanel:
    """One panel of curves over x, one per cell."""

    title: str
    x: Sequence[float]
    curves: Mapping[str, Sequence[float]]  # {cell: y values aligned with x}
    marker_x: float | None = None  # a dotted vertical line (e.g. the end of the training range)
    marker_label: str = ""


def _grid(count: int, height: float) -> tuple[Figure, list[Axes]]:
    """A figure with ``count`` panels, two a row; the unused last one is hidden."""
    cols = min(2, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _save(fig: Figure, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bar_figure(path: Path, title: str, panels: Sequence[BarPanel]) -> Path:
    """Write grouped bar charts, two panels a row, to ``path``."""
    fig, axes = _grid(len(panels), 4.2)
    for ax, panel in zip(axes, panels, strict=True):
        _bars(ax, panel)
    return _save(fig, title, path)


def _bars(ax: Axes, panel: BarPanel) -> None:
    labels = list(panel.series)
    cells = list(next(iter(panel.series.values())))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        values = panel.series[label]
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(cells))]
        means = [values[c][0] for c in cells]
        stds = [values[c][1] for c in cells]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=label)
    if panel.reference is not None:
        ax.axhline(panel.reference, color="black", linestyle="--", label=panel.reference_label)
    ax.set_xticks(range(len(cells)), cells, rotation=45, ha="right")
    ax.set_ylabel(panel.ylabel)
    if panel.log:
        ax.set_yscale("log")
    if len(labels) > 1 or panel.reference is not None:
        ax.legend(fontsize="small")


def curve_figure(path: Path, title: str, panels: Sequence[CurvePanel], ylabel: str) -> Path:
    """Write one row of line charts, one curve per cell, to ``path``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, (cell, ys) in enumerate(panel.curves.items()):
            width = 2.5 if cell == "lstm" else 1.2
            ax.plot(panel.x, ys, linewidth=width, label=cell, color=f"C{i % 10}")
        if panel.marker_x is not None:
            ax.axvline(panel.marker_x, color="grey", linestyle=":", label=panel.marker_label)
        ax.set(title=panel.title, xlabel="n (log scale)", ylabel=ylabel, ylim=(-0.05, 1.05))
        ax.set_xscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.1, 1.0, 1.0))  # leave room for the shared legend
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class TracePanel:
    """One panel of state traces: every unit's value against the position in a sequence."""

    title: str
    values: np.ndarray  # (T, units)
    boundaries: Sequence[float] = ()  # dotted vertical lines (where the input changes)


def trace_figure(path: Path, title: str, panels: Sequence[TracePanel]) -> Path:
    """Write state traces, two panels a row, to ``path``."""
    fig, axes = _grid(len(panels), 3.6)
    for ax, panel in zip(axes, panels, strict=True):
        ax.plot(np.arange(len(panel.values)), panel.values, linewidth=0.9)
        for x in panel.boundaries:
            ax.axvline(x, color="grey", linestyle=":")
        ax.set(title=panel.title, xlabel="position in the string", ylabel="unit value")
        ax.title.set_fontsize("small")
    return _save(fig, title, path)

"""Matched parameter counts: the hidden size that gives a cell a given parameter budget."""

from __future__ import annotations

from training.cells import CELLS


def hidden_for_budget(cell: str, input_size: int, budget: int) -> int:
    """The hidden size whose ``parameter_count`` is nearest to ``budget`` (the smaller on a tie)."""
    count = CELLS[cell].parameter_count
    m = 1
    while count(input_size, m + 1) <= budget:
        m += 1
    above = count(input_size, m + 1)
    return m + 1 if above - budget < budget - count(input_size, m) else m


def matched_sizes(input_size: int, reference: str, reference_hidden: int) -> dict[str, int]:
    """Every cell's hidden size at the budget of ``reference`` with ``reference_hidden`` units."""
    budget = CELLS[reference].parameter_count(input_size, reference_hidden)
    return {cell: hidden_for_budget(cell, input_size, budget) for cell in CELLS}

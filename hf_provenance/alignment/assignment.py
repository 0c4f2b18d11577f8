"""Linear assignment (scipy's ``linear_sum_assignment``), imported on first use.

Importing ``scipy.optimize`` costs about 0.2-0.3 s, paid by every run; most runs never search a permutation.
"""

from __future__ import annotations


def linear_sum_assignment(cost, maximize: bool = False):
    """``scipy.optimize.linear_sum_assignment``: row and column indices of an optimal assignment."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost, maximize=maximize)


__all__ = ["linear_sum_assignment"]

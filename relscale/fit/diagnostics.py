"""Warning classes for fits that succeeded numerically but deserve a second look.

Every warning is also recorded as a flag in the result object, so code that silences warnings (or
reads results from a table) still sees it.
"""

from __future__ import annotations

import warnings


class FitWarning(UserWarning):
    """Base class of every warning raised by relscale.fit."""


class EdgeOfRangeWarning(FitWarning):
    """An optimum (IsoFLOP vertex, selected compute-optimal model, fitted parameter) lies at or beyond
    the edge of what was sampled, so it is an extrapolation or a bound, not a measured minimum."""


class ConcaveFitWarning(FitWarning):
    """An IsoFLOP parabola opens downward: its vertex is a maximum and no minimum can be read off."""


class ConvergenceWarning(FitWarning):
    """The optimiser stopped without meeting its convergence criterion."""


class BudgetSnapWarning(FitWarning):
    """Runs without a budget column were grouped into IsoFLOP budgets by their FLOPs (each merge of
    distinct FLOP values is listed)."""


class DroppedDataWarning(FitWarning):
    """Rows, groups, budgets or bootstrap draws were left out of a fit (the message says which)."""


def warn(category: type[FitWarning], message: str) -> None:
    # stacklevel 3: point at the caller of the public fit function, not at this helper.
    """Issue a fit warning of ``category`` pointing at the caller of the public fit function."""
    warnings.warn(message, category, stacklevel=3)

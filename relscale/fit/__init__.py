"""Scaling-law fits (numpy / scipy / pandas only; importing this never imports torch).

- IsoFLOP analysis, Chinchilla approach 2: fit_isoflop -> IsoFlopResult
- parametric law, approach 3: fit_parametric -> ParametricFit
- absolute per-group laws E_g(F) = a F^-beta: fit_group_laws -> GroupLaws
- relative laws G(F) = E_t / E_b = gamma F^delta_beta, paired bootstrap: fit_relative_laws -> RelativeLaws
- inputs: load / aggregate_dumps / read_results_index / from_table -> FitData
- everything at once, with tables and figures: run_fit -> FitReport
Warnings are FitWarning subclasses and are also flags in the results.
"""

from .diagnostics import (
    BudgetSnapWarning,
    ConcaveFitWarning,
    ConvergenceWarning,
    DroppedDataWarning,
    EdgeOfRangeWarning,
    FitWarning,
)
from .io import (
    FLOP_NOTE,
    FitData,
    aggregate_dumps,
    flop_note,
    from_table,
    load,
    read_dumps,
    read_results_index,
    row_filter,
)
from .isoflop import BudgetFit, IsoFlopResult, fit_isoflop, snap_budgets
from .laws import (
    ErrorMatrix,
    GroupLaws,
    RelativeLaws,
    error_matrix,
    fit_group_laws,
    fit_relative_laws,
    relative_power_laws,
    select_models,
)
from .parametric import ParametricFit, fit_parametric
from .powerlaw import PowerLawFit, fit_power_law, line_fits
from .report import FitReport, run_fit, summary_table

__all__ = [
    "FLOP_NOTE",
    "BudgetFit",
    "BudgetSnapWarning",
    "ConcaveFitWarning",
    "ConvergenceWarning",
    "DroppedDataWarning",
    "EdgeOfRangeWarning",
    "ErrorMatrix",
    "FitData",
    "FitReport",
    "FitWarning",
    "GroupLaws",
    "IsoFlopResult",
    "ParametricFit",
    "PowerLawFit",
    "RelativeLaws",
    "aggregate_dumps",
    "error_matrix",
    "fit_group_laws",
    "fit_isoflop",
    "fit_parametric",
    "fit_power_law",
    "flop_note",
    "fit_relative_laws",
    "from_table",
    "line_fits",
    "load",
    "read_dumps",
    "read_results_index",
    "relative_power_laws",
    "row_filter",
    "run_fit",
    "select_models",
    "snap_budgets",
    "summary_table",
]

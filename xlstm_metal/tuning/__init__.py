"""Tuning sweeps (``xlstm-metal tune``): Optuna search over inference settings or training
hyperparameters, run here or on Ray. See :mod:`.sweep` and :mod:`.objectives`."""

from .objectives import FunctionObjective, Objective, ObjectiveError, SpeedObjective, TrainObjective
from .sweep import SweepError, SweepResult, SweepSettings, best_record, run_sweep, search

__all__ = ["FunctionObjective", "Objective", "ObjectiveError", "SpeedObjective", "SweepError", "SweepResult",
           "SweepSettings", "TrainObjective", "best_record", "run_sweep", "search"]

"""Seesaw diagnostics logged to the active MLflow run while training; on by default in ``fit``.

* :class:`SeesawMonitor` (``seesaw:`` in the config): each task's change between validations,
  seesaw events and their rate, per-task metric curves.
* :class:`GradientConflictMonitor` (``grad_conflict:``): task-by-task gradient cosines on the
  parameters tasks share, every ``every_n_steps``.
* :class:`GateUsageMonitor` (``gate_usage:``): each task's gate weight on each expert, gate entropy.

Each takes ``enabled: false`` to turn it off. Numbers go to every logger of the trainer, figures
(``diagnostics/*.png``) to the MLflow run only, and all of it from rank 0 only; without a logger the
callbacks still compute and keep their results (``.tracker``, ``.history``, ``.last``).
"""

from cgc_lightning.callbacks.conflict import GradientConflictMonitor
from cgc_lightning.callbacks.gates import GateUsageMonitor
from cgc_lightning.callbacks.seesaw import SeesawMonitor, SeesawTracker

__all__ = ["GateUsageMonitor", "GradientConflictMonitor", "SeesawMonitor", "SeesawTracker"]

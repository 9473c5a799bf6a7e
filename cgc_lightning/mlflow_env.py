"""Where runs go by default, and MLflow settings shared by the modules that talk to a store.

Kept apart from :mod:`cgc_lightning.tracking` (the logger and callbacks) so that modules the logger itself uses,
such as :mod:`cgc_lightning.export`, can read the default store without importing it back.
"""

from __future__ import annotations

import contextlib
import os

DEFAULT_STORE = "mlruns"
DEFAULT_URI = f"sqlite:///{DEFAULT_STORE}/mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the project's SQLite store ``sqlite:///mlruns/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextlib.contextmanager
def quiet_downloads():
    """No MLflow progress bar for the small artifact downloads inside (reports, appended tables)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old

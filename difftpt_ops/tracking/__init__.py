"""MLflow tracking: a thin client wrapper (mlflow_tracker) and matplotlib figures (plots).

Never imports the database; services/reading/reporting.py decides what is logged. `mlflow` and `matplotlib`
are imported inside functions so importing this package is free.
"""

from difftpt_ops.tracking.mlflow_tracker import MlflowTracker, RunSnapshot

__all__ = ["MlflowTracker", "RunSnapshot"]

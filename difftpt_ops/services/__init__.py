"""Use cases, grouped by what the user does.

- Setting up: `workspace` (open the database at the current schema), `datasets` (register and
  describe datasets), `models_check` (find the weights a run would use, offline), `demo`.
- `running/`: submitting runs and executing their shards (plan, dispatch, leases, processors,
  online chains, finalisation, status).
- `reading/`: results, groups of runs, the paper table, statistics, SQL, MLflow reports.
"""

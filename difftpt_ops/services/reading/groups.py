"""Groups of runs read together: the sweeps a run belongs to, its seed repeats (same spec but the seed)
and, for an online method, its order repeats (same spec but the stream's order seed), each summarised
as top-1 mean, standard deviation, min and max."""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.method_specs import CORE_METHODS
from difftpt_ops.core.specs import canonical_json
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction, Run, Sweep, SweepRun


def _is_online(method: str) -> bool:
    """Whether `method` is a registered online method (methods outside the registry, like noop, are not)."""
    if method in CORE_METHODS:  # zero-shot, TPT, DiffTPT and noop: no need to import torch for the registry
        return False
    from difftpt_ops.tta.methods import ONLINE, get_method, method_names

    return method in method_names() and get_method(method).kind == ONLINE


def sweeps_of_runs(engine: Engine, run_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Per run: the sweeps it belongs to, as [{sweep_id, point}], oldest sweep first."""
    if not run_ids:
        return {}
    out: dict[int, list[dict[str, Any]]] = {}
    with session_scope(engine) as session:
        rows = session.execute(select(SweepRun.run_id, SweepRun.sweep_id, SweepRun.point)
                               .where(SweepRun.run_id.in_(run_ids)).order_by(SweepRun.sweep_id)).all()
    for run_id, sweep_id, point in rows:
        out.setdefault(int(run_id), []).append({"sweep_id": int(sweep_id), "point": point})
    return out


def sweep_run_ids(engine: Engine, sweep_id: int) -> list[int]:
    """The runs of a sweep; NotFoundError-like InputError when there is no such sweep."""
    with session_scope(engine) as session:
        if session.get(Sweep, sweep_id) is None:
            raise InputError("--sweep", sweep_id, "no such sweep")
        return [int(r) for r in session.scalars(select(SweepRun.run_id).where(SweepRun.sweep_id == sweep_id))]


def _without_seed(spec: dict[str, Any]) -> str:

    return canonical_json({k: v for k, v in spec.items() if k != "seed"})


def seed_group_stats(engine: Engine, run_id: int) -> dict[str, Any] | None:
    """Top-1 over the runs whose spec equals this run's except for the seed, on as many samples: runs, seeds,
    mean, std, min, max.

    None when no other run repeats it. Runs count with the samples they have finished; `all_finished`
    says whether the group is complete.
    """


    from difftpt_ops.db.tables import Prediction

    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            return None
        candidates = session.execute(select(Run.id, Run.spec, Run.state).where(  # on as many samples (--limit)
            Run.method == run.method, Run.dataset_version_id == run.dataset_version_id, Run.kind == run.kind,
            Run.num_samples == run.num_samples)).all()
        identity = _without_seed(run.spec)
        group = {rid: (spec.get("seed"), state) for rid, spec, state in candidates if _without_seed(spec) == identity}
        if len(group) < 2:
            return None
        right = func.sum(case((Prediction.correct, 1), else_=0))
        top1 = {int(rid): int(c or 0) / int(n) for rid, c, n in session.execute(
            select(Prediction.run_id, right, func.count()).where(Prediction.run_id.in_(list(group)))
            .group_by(Prediction.run_id)).all() if n}
    values = list(top1.values())
    if len(values) < 2:
        return None
    runs = sorted(group)
    return {"runs": runs, "seeds": [group[r][0] for r in runs], "n_runs": len(values),
            "top1_mean": statistics.fmean(values), "top1_std": statistics.stdev(values),
            "top1_min": min(values), "top1_max": max(values),
            "all_finished": all(group[r][1] in ("finished", "finished_with_failures") for r in runs)}


def run_groups(engine: Engine, run_id: int) -> dict[str, Any]:
    """For `compare`: the sweeps a run belongs to (with its grid point) and top-1 over its seed repeats."""
    out: dict[str, Any] = {}
    sweeps = sweeps_of_runs(engine, [run_id]).get(run_id)
    if sweeps:
        out["sweeps"] = sweeps
    seeds = seed_group_stats(engine, run_id)
    if seeds:
        out["seeds"] = seeds
    return out


def _identity_without_order(spec: dict[str, Any]) -> str:

    method = {k: v for k, v in spec.get("method", {}).items() if k != "order_seed"}
    return canonical_json({**spec, "method": method})


def order_group(engine: Engine, run_id: int) -> list[int]:
    """Ids of the runs whose spec equals this online run's except for the order seed, on as many samples (a run
    with another --limit covers other samples of the stream), itself included."""
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None or not _is_online(run.method):
            return []
        candidates = session.execute(select(Run.id, Run.spec).where(  # on as many samples (--limit)
            Run.method == run.method, Run.dataset_version_id == run.dataset_version_id, Run.kind == run.kind,
            Run.num_samples == run.num_samples)).all()
        identity = _identity_without_order(run.spec)
    return sorted(rid for rid, spec in candidates if _identity_without_order(spec) == identity)


def order_group_stats(engine: Engine, run_id: int) -> dict[str, Any] | None:
    """Top-1 over the runs of one online run's order group: mean, sample standard deviation, min, max.

    None when the run is not online or its group has a single run. Runs count with the samples they have
    finished (a group is comparable once every run is finished; `states` says whether it is).
    """

    from sqlalchemy import func

    group = order_group(engine, run_id)
    if len(group) < 2:
        return None
    correct = func.sum(case((Prediction.correct, 1), else_=0))
    with session_scope(engine) as session:
        rows = session.execute(select(Prediction.run_id, correct, func.count()).where(
            Prediction.run_id.in_(group)).group_by(Prediction.run_id)).all()
        states = dict(session.execute(select(Run.id, Run.state).where(Run.id.in_(group))).all())
        seeds = {rid: int(spec["method"].get("order_seed", 0))
                 for rid, spec in session.execute(select(Run.id, Run.spec).where(Run.id.in_(group))).all()}
    top1 = {rid: int(right or 0) / n for rid, right, n in rows if n}
    values = list(top1.values())
    if len(values) < 2:
        return None
    return {"runs": group, "order_seeds": [seeds[r] for r in group], "n_runs": len(values),
            "top1_mean": statistics.fmean(values), "top1_std": statistics.stdev(values),
            "top1_min": min(values), "top1_max": max(values),
            "all_finished": all(states[r] in ("finished", "finished_with_failures") for r in group)}

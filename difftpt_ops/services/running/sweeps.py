"""Sweeps: one tuning run per grid point and seed, recorded as a group.

`submit tune --sweep steps=1,2,4 --sweep selection_p=0.05,0.1 --seeds 0,1` plans the cartesian grid
(3 x 2 x 2 = 12 runs) and submits each point through `runs.submit_tune`, so every run is an ordinary
run identified by its spec: resubmitting the sweep attaches to the same runs and makes none, and all
of them share generated images (cached by content). The sweep itself is a row identified by what was
asked, and `sweep_runs` links it to its runs with their grid point. Class descriptions files are the
exception to "what was asked": they are checked and stored first and recorded by the key of their text.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.core.specs import fingerprint_of
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run, Sweep, SweepRun
from difftpt_ops.db.writes import insert_ignore, insert_new_ids
from difftpt_ops.services.reading.groups import sweeps_of_runs
from difftpt_ops.services.running.submit_checks import check_method_files, check_stream_blocks

log = logging.getLogger(__name__)

MAX_UNCONFIRMED_RUNS = 200  # a bigger sweep needs --yes: it is hours of GPU time to cancel by hand
DESCRIPTIONS = "descriptions"  # a file's path in what was asked; the key of its stored content in the sweep


def parse_sweep(items: list[str] | None) -> dict[str, list[str]]:
    """`--sweep key=v1,v2` (repeatable) -> {key: [v1, v2]}, keys in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise InputError("--sweep", item, "expected KEY=V1,V2,..., e.g. --sweep steps=1,2,4")
        if key in grid:
            raise InputError("--sweep", item, f"{key} is swept twice; give its values once")
        if key in {"seed", "seeds"}:
            raise InputError("--sweep", item, "use --seeds 0,1,2 for seeds")
        grid[key] = list(dict.fromkeys(parts))
    return grid


def parse_seeds(value: str | None) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]; non-negative integers, each once."""
    if value is None:
        return []
    try:
        seeds = [int(part) for part in value.split(",")]
    except ValueError:
        raise InputError("--seeds", value, "expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if any(s < 0 for s in seeds):
        raise InputError("--seeds", value, "seeds must be >= 0")
    return list(dict.fromkeys(seeds))


def grid_points(grid: dict[str, list[str]], seeds: list[int]) -> list[dict[str, Any]]:
    """The cartesian product of the swept values and the seeds; each point is {key: value, ..., 'seed': s}."""
    keys = list(grid)
    return [{**dict(zip(keys, values, strict=True)), "seed": seed}
            for values in itertools.product(*(grid[k] for k in keys)) for seed in seeds]


@dataclass
class SweepResult:
    """What a sweep submission did: its id, whether it is new, and each grid point's run."""

    sweep_id: int
    created: bool
    points: list[dict[str, Any]] = field(default_factory=list)  # {point, run_id, created, state}

    @property
    def new_runs(self) -> int:
        return sum(1 for p in self.points if p["created"])

    def to_dict(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "created": self.created, "runs": len(self.points),
                "new_runs": self.new_runs, "points": self.points}


def _check_plan(method: str, overrides: dict[str, Any], grid: dict[str, list[str]], points: list[dict[str, Any]],
                confirmed: bool, settings: Settings | None = None) -> None:
    """Every point's spec must be valid before the first run is submitted: nothing half-made. With `settings`,
    the files a point names (a CoOp checkpoint) must exist too."""
    for key in grid:
        if key in overrides:
            raise InputError("--sweep", key, "is also given with --set; sweep it or fix it, not both")
    if len(points) > MAX_UNCONFIRMED_RUNS and not confirmed:  # named by what made them: a grid, or seeds alone
        option, made = ("--sweep", f"{len(points)} runs") if grid else ("--seeds", f"{len(points)} seeds")
        raise InputError(option, made, f"more than {MAX_UNCONFIRMED_RUNS} runs; pass --yes to submit them")
    for point in points:
        knobs = {k: v for k, v in point.items() if k != "seed"}
        try:
            spec = method_spec_from(method, {**overrides, **knobs})
            if settings is not None:
                check_method_files(settings, spec)
        except InputError as exc:  # InvalidSpecError too: the bad value's option, as the user typed it
            typed = _as_typed(exc, knobs)
            if typed is exc:
                raise
            raise typed from None


def _as_typed(exc: InputError, knobs: dict[str, Any]) -> InputError:
    """An error about a grid point's spec, naming --sweep where the bad field or value is a swept one."""
    swept = exc.argument.removeprefix("--set ")  # method_spec_from names a prompt field as prompt.X
    if swept in knobs:  # a grid value: name the option the user typed it in
        return type(exc)(f"--sweep {swept}", exc.value, exc.problem)
    if exc.argument == "--set" and exc.value in knobs:  # an unknown field named in the grid
        return type(exc)("--sweep", exc.value, exc.problem)
    return exc


def _check_points(engine: Engine, settings: Settings, method: str, overrides: dict[str, Any],
                  points: list[dict[str, Any]], dataset_ref: str, submit_args: dict[str, Any]) -> None:
    """Every point's run spec as its own submit resolves it (the generation config it reads and its images per
    sample, in embedded mode that they exist, settings the class count bounds such as RLCF's sample_k, shards and a
    limit that split no batch of a method predicting in batches), before the sweep is recorded: a point its submit
    refuses would leave the sweep half-made, with the points before it run."""
    from difftpt_ops.services.running.runs import check_images_ready, resolve_tune_spec, tune_choice

    with session_scope(engine) as session:
        plans = []
        for point in points:
            knobs = {k: v for k, v in point.items() if k != "seed"}
            try:
                choice = tune_choice(settings, method=method, overrides={**overrides, **knobs},
                                     model=submit_args.get("model", "ViT-B-16"),
                                     pretrained=submit_args.get("pretrained", "openai"),
                                     device=submit_args.get("device"))
                plans.append(resolve_tune_spec(session, settings, choice, dataset_ref=dataset_ref,
                                               generation_id=submit_args.get("generation_id"),
                                               seed=int(point["seed"])))
            except InputError as exc:
                typed = _as_typed(exc, knobs)
                if typed is exc:
                    raise
                raise typed from None
        for plan in plans:  # after every spec resolved: a bad grid value is named before missing images are
            check_stream_blocks(plan.spec.method, limit=submit_args.get("limit"),
                                shard_size=submit_args.get("shard_size"), n_samples=plan.version.num_samples)
            check_images_ready(session, settings, plan, limit=submit_args.get("limit"), dataset_ref=dataset_ref)


def _check_seeds_matter(method: str, overrides: dict[str, Any], points: list[dict[str, Any]], seeds: list[int],
                        dataset_format: str) -> None:
    """Several seeds of a configuration that draws nothing at random would be identical runs, which `table`
    would average into a spread of 0 over "seeds": refused, naming the configuration."""
    from difftpt_ops.core.method_specs import resolve_for_dataset
    from difftpt_ops.tta.methods import find_method

    registered = find_method(method)
    if len(seeds) < 2 or registered is None:
        return
    for point in points:
        knobs = {k: v for k, v in point.items() if k != "seed"}
        if not registered.draws_at_random(resolve_for_dataset(method_spec_from(method, {**overrides, **knobs}),
                                                              dataset_format)):
            where = " ".join(f"{k}={v}" for k, v in knobs.items())
            online = registered.kind == "online"
            order = " (an online method's randomness is its stream order: --orders K)" if online else ""
            raise InputError("--seeds", ",".join(map(str, seeds)),
                             f"{method}{' ' + where if where else ''} draws nothing at random here (the original "
                             f"view only, a fixed prompt), so every seed gives the same run{order}; submit it once")


def _record_sweep(engine: Engine, identity: dict[str, Any], points: int) -> tuple[int, bool]:
    fingerprint = fingerprint_of(identity)
    with session_scope(engine) as session:
        created = bool(insert_new_ids(session, Sweep, [{"fingerprint": fingerprint, "spec": identity,
                                                        "num_runs": points}]))
        sweep_id = session.scalars(select(Sweep.id).where(Sweep.fingerprint == fingerprint)).one()
    return int(sweep_id), created


def submit_sweep(engine: Engine, settings: Settings, *, dataset_ref: str, method: str, grid: dict[str, list[str]],
                 seeds: list[int], overrides: dict[str, Any] | None = None, confirmed: bool = False,
                 **submit_args: Any) -> SweepResult:
    """Submit one run per grid point and seed (see the module docstring); `submit_args` go to `submit_tune`.

    Raises:
        InputError: a bad grid or value (before anything is written), or more than 200 runs without `confirmed`.
    """
    from difftpt_ops.services.running.runs import submit_tune

    # 1. Plan and validate the whole grid.
    overrides = dict(overrides or {})
    seeds = seeds or [int(submit_args.pop("seed", 0))]
    submit_args.pop("seed", None)
    points = grid_points(grid, seeds)
    _check_plan(method, overrides, grid, points, confirmed, settings)
    dataset, version_fp = _dataset(engine, dataset_ref)
    _check_seeds_matter(method, overrides, points, seeds, dataset.format)
    if DESCRIPTIONS in overrides or DESCRIPTIONS in grid:
        overrides, grid = _descriptions_as_keys(settings, method, dataset, overrides, grid, points)
        points = grid_points(grid, seeds)
    else:  # a method that cannot run without a descriptions file (AWT) is refused before the sweep is recorded
        from difftpt_ops.services.running.descriptions import check_method_descriptions

        check_method_descriptions(method_spec_from(method, overrides), None, dataset.class_names)
    _check_points(engine, settings, method, overrides, points, dataset_ref, submit_args)
    # 2. The sweep row, identified by what was asked (dataset as named, resolved by its fingerprint).
    identity = {"dataset_fingerprint": version_fp, "method": method, "overrides": overrides, "grid": grid,
                "seeds": seeds, "model": submit_args.get("model"), "pretrained": submit_args.get("pretrained"),
                "generation_id": submit_args.get("generation_id")}
    sweep_id, created = _record_sweep(engine, identity, len(points))
    # 3. One ordinary run per point, linked as it is submitted (an interrupted sweep keeps what it made).
    result = SweepResult(sweep_id=sweep_id, created=created)
    for point in points:
        knobs = {k: v for k, v in point.items() if k != "seed"}
        submitted = submit_tune(engine, settings, dataset_ref=dataset_ref, method=method,
                                overrides={**overrides, **knobs}, seed=int(point["seed"]), **submit_args)
        with session_scope(engine) as session:
            insert_ignore(session, SweepRun, [{"sweep_id": sweep_id, "run_id": submitted.run_id, "point": point}])
        result.points.append({"point": point, "run_id": submitted.run_id, "created": submitted.created,
                              "state": submitted.state})
    _tag_mlflow(engine, settings, [p["run_id"] for p in result.points])
    return result


def _dataset(engine: Engine, dataset_ref: str) -> tuple[Any, str]:
    """The dataset row (detached) and the fingerprint of the version `dataset_ref` names."""
    from difftpt_ops.services.datasets import resolve_dataset_version

    with session_scope(engine) as session:
        dataset, version = resolve_dataset_version(session, dataset_ref)
        session.expunge(dataset)
        return dataset, version.fingerprint


def _descriptions_as_keys(settings: Settings, method: str, dataset: Any, overrides: dict[str, Any],
                          grid: dict[str, list[str]], points: list[dict[str, Any]]
                          ) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Every descriptions file the sweep names, checked (it covers the classes; the points' prompts have text
    to average it with) before any is stored, then stored and replaced by its key: the sweep's identity is the
    text, and no point fails on its file half-way through the grid."""
    from difftpt_ops.core.method_specs import resolve_for_dataset
    from difftpt_ops.services.running.descriptions import (
        check_has_prompt_text,
        check_method_descriptions,
        checked_descriptions,
        descriptions_by_class,
        store_descriptions,
    )

    values = [overrides[DESCRIPTIONS]] if DESCRIPTIONS in overrides else grid[DESCRIPTIONS]
    try:
        checked = {value: checked_descriptions(settings, str(value), dataset.class_names) for value in values}
        for point in points:
            knobs = {k: v for k, v in point.items() if k != "seed"}
            spec = method_spec_from(method, {**overrides, **knobs})
            check_has_prompt_text(resolve_for_dataset(spec, dataset.format))
            key, data = checked[spec.descriptions]  # type: ignore[attr-defined]
            check_method_descriptions(spec, descriptions_by_class(settings, key, data), dataset.class_names)
    except InputError as exc:  # a file named in the grid: --sweep descriptions=FILE
        typed = _as_typed(exc, {k: v for k, v in grid.items() if k == DESCRIPTIONS})
        if typed is exc:
            raise
        raise typed from None
    for key, data in checked.values():
        if data is not None:
            store_descriptions(settings, key, data)
    if DESCRIPTIONS in overrides:
        return {**overrides, DESCRIPTIONS: checked[overrides[DESCRIPTIONS]][0]}, grid
    return overrides, {**grid, DESCRIPTIONS: list(dict.fromkeys(checked[v][0] for v in grid[DESCRIPTIONS]))}


def _tag_mlflow(engine: Engine, settings: Settings, run_ids: list[int]) -> None:
    """Tag each run's MLflow run with its sweep ids, so the UI can group by them. Best effort, like all tracking."""
    from difftpt_ops.services.reading.reporting import prepare_tracking, tracker_for, tracking_enabled
    from difftpt_ops.tracking.mlflow_tracker import SWEEP_TAG

    if not tracking_enabled(settings):
        return
    memberships = sweeps_of_runs(engine, run_ids)
    for run_id in run_ids:
        try:
            prepare_tracking(engine, settings, run_id)  # creates the MLflow run if no worker has yet
            with session_scope(engine) as session:
                mlflow_run_id = session.scalar(select(Run.mlflow_run_id).where(Run.id == run_id))
            if mlflow_run_id:
                ids = ",".join(str(m["sweep_id"]) for m in memberships.get(run_id, []))
                tracker_for(settings).set_tags(mlflow_run_id, {SWEEP_TAG: ids})
        except Exception as exc:  # noqa: BLE001  tracking never fails a submission; `mlflow sync` has the rest
            log.warning("could not tag the MLflow run of run %s with its sweep (%s)", run_id, exc)

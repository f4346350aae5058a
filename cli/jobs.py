"""`difftpt-ops submit | worker | status | runs list | resume | cancel`: the job system's commands (`status`
itself lives in cli/status_cmds.py).

Services are imported inside the commands, so `--help` and `status` never pay for torch or Celery.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    JsonOpt,
    engine_of,
    human_bytes,
    new_app,
    parse_run_id,
    print_json,
    print_table,
    progress_sink,
    run_label,
    settings_of,
)
from cli.status_cmds import fmt_eta, shown_state
from cli.sweep_cmds import ListSweepOpt, SeedsOpt, SweepOpt, YesOpt, group_text, submit_grid, with_groups
from difftpt_ops.core.errors import InputError

if TYPE_CHECKING:
    from difftpt_ops.config import Settings
    from difftpt_ops.services.running.runs import SubmitResult

submit_app = new_app("Plan a run, then run it here (embedded default) or enqueue it for the workers (with a broker).")
runs_app = new_app("Runs: list them (see also `status`, `resume`, `cancel`).")

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id (see `difftpt-ops runs list`).")]  # parse_run_id
DatasetOpt = Annotated[str, typer.Option("--dataset", help="Dataset name (latest version) or NAME@VERSION.")]
LimitOpt = Annotated[int | None, typer.Option(
    "--limit", help="Plan only the first N samples (an online method: the first N of its seeded stream order; "
                    "one that predicts in batches, OGA: a multiple of its batch_size); a larger limit later extends "
                    "the same run.")]
ShardSizeOpt = Annotated[int | None, typer.Option(
    "--shard-size",
    help="Samples per shard (default: the settings' shard_size, online_shard_size for online methods, rounded up "
         "to a multiple of OGA's batch_size, which a shard may not split); new runs only.")]
PlainLimitOpt = Annotated[int | None, typer.Option(
    "--limit", help="Plan only the first N samples; a larger limit later extends the same run.")]
PlainShardSizeOpt = Annotated[int | None, typer.Option(
    "--shard-size", help="Samples per shard (default: the settings' shard_size); new runs only.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="Device the run is for: auto (CUDA if this machine has it), cpu, cuda or cuda:N; resolved "
    "at submit and stored in the spec. Workers use their own GPU; a CUDA run never falls back to the CPU.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the run (part of its identity).")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Print samples, shards, images, disk and time it would take; write nothing.")]


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> a dict (the spec validates keys and values)."""
    overrides: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError("--set", item, "expected KEY=VALUE, e.g. --set steps=2")
        overrides[key.strip()] = value.strip()
    return overrides


def _none_if(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in {"", "none", "null"} else value


def _dispatcher(settings: Settings) -> Any:
    if settings.embedded:
        return None
    from workers.tasks import dispatcher_for

    return dispatcher_for(settings)


@contextmanager
def progress_bar(settings: Settings, as_json: bool) -> Iterator[Any]:
    """The embedded executor's progress sink (a bar on a terminal, plain lines otherwise); None with a broker."""
    if not settings.embedded:
        yield None
        return
    bar = progress_sink(hidden=as_json)
    try:
        yield bar
    finally:
        bar.stop()


def _print_submit(result: SubmitResult, as_json: bool, dataset_ref: str | None = None) -> None:
    if as_json:
        print_json(result.to_dict())
        return
    verb = "created" if result.created else "attached to"
    typer.echo(f"{verb} run {result.run_id} ({run_label(result.kind, result.method)} on {result.dataset}, "
               f"{result.num_samples} samples, {result.shards_total} shards, {result.shards_new} new)")
    named = (dataset_ref or "").split("@")[0]
    if named and result.dataset and result.dataset.split("@")[0] != named:
        # A run's identity is its samples' content: another name for the same samples attaches to its runs.
        typer.echo(f"{named} holds the same samples as {result.dataset}: its runs are {result.dataset}'s "
                   "(runs list and table show them under that name)")
    if result.embedded:
        typer.echo(f"run {result.run_id}: {result.state}")
        if str(result.state) == "failed":  # the README's exit codes: 1 for a run that failed
            raise typer.Exit(1)
    elif result.shards_dispatched:
        typer.echo(f"enqueued {result.shards_dispatched} shard(s); watch with `difftpt-ops status {result.run_id} "
                   "--watch`")
    else:
        typer.echo(f"nothing to enqueue; run {result.run_id} is {result.state}")


def _print_estimate(estimate: Any, as_json: bool) -> None:
    """A dry run's answer; nothing was written."""
    from difftpt_ops.services.running.estimate import NO_GENERATION

    if as_json:
        print_json({**estimate.to_dict(), "dry_run": True})
        return
    e = estimate
    attach = f"attaches to run {e.existing_run_id}" if e.existing_run_id else "creates a new run"
    typer.echo(f"dry run: {run_label(e.kind, e.method)} on {e.dataset} {attach}; nothing was written")
    typer.echo(f"  samples:  {e.samples} in scope, {e.samples_to_do} to do")
    typer.echo(f"  shards:   {e.shards_total} ({e.shards_new} new)")
    if e.kind == "generate":
        typer.echo(f"  images:   {e.images_to_generate} to generate")
        per = f"{human_bytes(e.bytes_per_image)} per image" if e.bytes_per_image else "unknown per image"
        typer.echo(f"  disk:     {human_bytes(e.disk_bytes)} ({per}, {e.bytes_source})")
    elif e.images_read:
        typer.echo(f"  images:   reads {e.images_read} generated images")
    elif e.bytes_source.startswith(NO_GENERATION):  # DiffTPT before any generation: say what to run first
        typer.echo(f"  images:   {e.bytes_source}")
    if e.seconds is None:
        typer.echo(f"  time:     unknown ({e.time_source})")
    else:
        unit = "image" if e.kind == "generate" else "sample"
        typer.echo(f"  time:     {fmt_eta({'eta_s': e.seconds})} on one worker "
                   f"({e.seconds_per_unit:.3g} s per {unit}; {e.time_source})")


@submit_app.command("tune")
def submit_tune(
    ctx: typer.Context,
    dataset: DatasetOpt,
    method: Annotated[str, typer.Option(
        "--method", help="A registered method: `difftpt-ops methods list` shows them (noop: bookkeeping only).")],
    model: Annotated[str, typer.Option("--model", help="open_clip model name or a local model directory.")]
    = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(
        "--pretrained", help="open_clip pretrained tag or a checkpoint file (none: random weights); a local "
                             "model directory loads its own weights and is recorded without a tag.")]
    = "openai",
    generation: Annotated[int | None, typer.Option(
        "--generation", help="difftpt: generation config id (default: the latest with images for the dataset).")]
    = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a method spec field, KEY=VALUE (repeatable), e.g. --set steps=2.")] = None,
    seed: SeedOpt = 0,
    limit: LimitOpt = None,
    shard_size: ShardSizeOpt = None,
    device: DeviceOpt = None,
    sweep: SweepOpt = None,
    seeds: SeedsOpt = None,
    order_seed: Annotated[int | None, typer.Option(
        "--order-seed",
        help="Online methods (tda, dmn-zs, dpe, boostadapter, onzeta, ecalp, oga, dynaprompt): the seed of the stream "
             "order (default 0).")] = None,
    orders: Annotated[int | None, typer.Option(
        "--orders", help="Online methods: submit K runs with order seeds 0..K-1 (a sweep over order_seed).")] = None,
    yes: YesOpt = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a registered method on a dataset, one prediction per sample (`methods list` shows the methods)."""
    from difftpt_ops.services.running import orders as order_options
    from difftpt_ops.services.running.runs import submit_tune as submit

    settings = settings_of(ctx)
    parsed = parse_overrides(overrides)
    if orders is not None:  # --orders K is order_seed=0..K-1: another order seed given with it names what was typed
        order_item = order_options.order_sweep(method, orders)
        swept = [item for item in sweep or [] if item.partition("=")[0].strip() == "order_seed"]
        also = (f"--order-seed={order_seed}" if order_seed is not None else
                f"--set order_seed={parsed['order_seed']}" if "order_seed" in parsed else
                f"--sweep {swept[0].strip()}" if swept else None)
        if also is not None:
            raise InputError("--orders", orders, f"runs order seeds 0..{orders - 1}; it cannot be combined with "
                             f"{also} (drop one of them)")
    if order_seed is not None:  # the spec's order_seed field, which only online specs have
        parsed = {**parsed, "order_seed": order_options.order_seed_value(method, order_seed)}
    if orders is not None:
        sweep = [*(sweep or []), order_item]
        _confirm_orders(orders, sweep, seeds, seed, yes)
    engine = engine_of(ctx)
    if dry_run and (sweep or seeds is not None):
        raise InputError("--dry-run", True, "estimates one run; drop --sweep/--seeds/--orders to estimate one grid "
                         "point (--order-seed N for one order)" if orders is not None else
                         "estimates one run; drop --sweep/--seeds to estimate one grid point")
    if dry_run:
        from difftpt_ops.services.running.estimate import estimate_tune

        _print_estimate(estimate_tune(engine, settings, dataset_ref=dataset, method=method, model=model,
                                      pretrained=_none_if(pretrained), generation_id=generation, overrides=parsed,
                                      seed=seed, limit=limit, shard_size=shard_size, device=device), as_json)
        return
    if sweep or seeds is not None:  # one run per grid point and seed (cli/sweep_cmds.py)
        with progress_bar(settings, as_json) as bar:
            submit_grid(engine, settings, grid_items=sweep, seeds=seeds, confirmed=yes, as_json=as_json,
                        dataset_ref=dataset, method=method, model=model, pretrained=_none_if(pretrained),
                        generation_id=generation, overrides=parsed, seed=seed, limit=limit, shard_size=shard_size,
                        dispatcher=_dispatcher(settings), device=device, progress=bar)
        return
    with progress_bar(settings, as_json) as bar:
        result = submit(engine, settings, dataset_ref=dataset, method=method, model=model,
                        pretrained=_none_if(pretrained), generation_id=generation, overrides=parsed, seed=seed,
                        limit=limit, shard_size=shard_size, dispatcher=_dispatcher(settings), device=device,
                        progress=bar)
    _print_submit(result, as_json, dataset)


def _confirm_orders(orders: int, sweep: list[str], seeds: str | None, seed: int, yes: bool) -> None:
    """More than 200 runs need --yes; when --orders makes them, the error names --orders (not --sweep)."""
    from difftpt_ops.services.running.sweeps import MAX_UNCONFIRMED_RUNS, grid_points, parse_seeds, parse_sweep

    runs = len(grid_points(parse_sweep(sweep), parse_seeds(seeds) or [seed]))
    if runs > MAX_UNCONFIRMED_RUNS and not yes:
        raise InputError("--orders", orders, f"makes {runs} runs, more than {MAX_UNCONFIRMED_RUNS}; pass --yes to "
                         "submit them")


@submit_app.command("generate")
def submit_generate(
    ctx: typer.Context,
    dataset: DatasetOpt,
    model: Annotated[str, typer.Option("--model", help="Diffusers model id or local directory.")]
    = "lambdalabs/sd-image-variations-diffusers",
    revision: Annotated[str | None, typer.Option("--revision", help=(
        "Model revision on the hub (default v2.0, the reference's); a local directory has none (it is the "
        "revision you downloaded)."))] = None,
    per_sample: Annotated[int, typer.Option("--per-sample", help="Variations per sample.")] = 63,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 3.0,
    scheduler: Annotated[str, typer.Option("--scheduler", help="default, dpm-solver++ or ddim.")] = "default",
    size: Annotated[int, typer.Option("--size", help="Image size in pixels (multiple of 8).")] = 512,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, fp32, fp16 or bf16.")] = "auto",
    seed: SeedOpt = 0,
    limit: PlainLimitOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")] = 4,
    shard_size: PlainShardSizeOpt = None,
    device: DeviceOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate Stable Diffusion image variations of a dataset's samples (cached by content, never twice)."""
    from difftpt_ops.core.specs import GenerationSpec
    from difftpt_ops.services.running.runs import submit_generate as submit

    settings = settings_of(ctx)
    if revision is None:  # a local directory is the revision that was downloaded into it
        revision = "none" if Path(model).expanduser().is_dir() else "v2.0"
    spec = GenerationSpec(model=model, revision=_none_if(revision), scheduler=scheduler, steps=steps,
                          guidance=guidance, per_sample=per_sample, size=size, dtype=dtype, seed=seed)
    engine = engine_of(ctx)
    if dry_run:
        from difftpt_ops.services.running.estimate import estimate_generate

        _print_estimate(estimate_generate(engine, settings, dataset_ref=dataset, spec=spec, limit=limit,
                                          shard_size=shard_size, device=device), as_json)
        return
    with progress_bar(settings, as_json) as bar:
        result = submit(engine, settings, dataset_ref=dataset, spec=spec, limit=limit, shard_size=shard_size,
                        batch_size=batch_size, dispatcher=_dispatcher(settings), device=device, progress=bar)
    _print_submit(result, as_json, dataset)


def worker(
    ctx: typer.Context,
    gpus: Annotated[str, typer.Option("--gpus", help="GPU indices (0,1,...), all, or cpu.")] = "all",
    queues: Annotated[str, typer.Option("--queues", help="Queues to consume: generate, tune.")] = "generate,tune",
    concurrency_per_gpu: Annotated[int, typer.Option("--concurrency-per-gpu", help="Worker processes per GPU.")]
    = 1,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
) -> None:
    """Start one Celery worker process per GPU and keep them running until SIGTERM or Ctrl-C."""
    from workers.launcher import run_workers

    code = run_workers(settings_of(ctx), gpus=gpus, queues=queues, concurrency_per_gpu=concurrency_per_gpu,
                       loglevel=loglevel)
    raise typer.Exit(code)


def runs_list(ctx: typer.Context, sweep: ListSweepOpt = None, as_json: JsonOpt = False) -> None:
    """List every run, newest first, with the sweep and grid point of runs submitted by a sweep."""
    from difftpt_ops.services.running.status import list_runs

    engine = engine_of(ctx)
    runs = with_groups(engine, list_runs(engine, settings_of(ctx)), sweep)
    if as_json:
        print_json(runs)
        return
    print_table(None, ["run", "kind", "method", "dataset", "model", "seed", "settings", "state", "samples", "done",
                       "failed", "created", "group"],
                [[r["run_id"], r["kind"], r["method"], r["dataset"], _model_text(r), _seed_text(r),
                  _settings_text(r), shown_state(r), r["num_samples"], r["done"], r["failed"],
                  (r["created_at"] or "")[:19], group_text(r)] for r in runs])


def _settings_text(run: dict[str, Any]) -> str:
    """The run's configuration words, and `features=recompute` for a run that encoded every view: it is another run
    than the one that read the store, with the same configuration."""
    words = [run.get("settings") or "", "features=recompute" if run.get("features") == "recompute" else ""]
    return " ".join(word for word in words if word)


def _seed_text(run: dict[str, Any]) -> str:
    """The seed, and an online run's stream order: two orders of one configuration are two runs."""
    seed = "" if run.get("seed") is None else str(run["seed"])
    return seed if run.get("order_seed") is None else f"{seed} order={run['order_seed']}"


def _model_text(run: dict[str, Any]) -> str:
    """The model as typed, with its pretrained tag and the device and precision the run is for."""
    if not run.get("model"):
        return ""
    tag = f" ({run['pretrained']})" if run.get("pretrained") else ""
    where = "/".join(str(v) for v in (run.get("device"), run.get("precision")) if v)
    return f"{run['model']}{tag}" + (f" [{where}]" if where else "")


def resume(ctx: typer.Context, run: RunArg, device: DeviceOpt = None, as_json: JsonOpt = False) -> None:
    """Finish a run: retry failed shards, re-run interrupted or stale ones, re-enqueue lost messages."""
    from difftpt_ops.services.running.runs import resume_run

    run_id = parse_run_id(run)
    settings, engine = settings_of(ctx), engine_of(ctx)
    with progress_bar(settings, as_json) as bar:
        result = resume_run(engine, settings, run_id, dispatcher=_dispatcher(settings), device=device, progress=bar)
    if as_json:
        print_json(result.to_dict())
    elif result.embedded:
        typer.echo(f"run {run_id}: {result.state}")
    else:
        typer.echo(f"run {run_id}: {result.state}, {result.shards_dispatched} shard(s) enqueued")


def cancel(ctx: typer.Context, run: RunArg, as_json: JsonOpt = False) -> None:
    """Cancel a run: open shards are cancelled; running shards stop at their next batch."""
    from difftpt_ops.services.running.runs import cancel_run

    result = cancel_run(engine_of(ctx), settings_of(ctx), parse_run_id(run))
    if as_json:
        print_json(result)
    else:
        typer.echo(f"run {result['run_id']}: cancelled ({result['shards_cancelled']} shard(s) stopped)")


def register(app: typer.Typer) -> None:
    """Mount the job commands on the root app."""
    app.add_typer(submit_app, name="submit")
    app.command("worker")(worker)
    from cli.status_cmds import status

    app.command("status")(status)
    app.command("resume")(resume)
    app.command("cancel")(cancel)
    runs_app.command("list")(runs_list)
    from cli.runs_show import runs_show

    runs_app.command("show")(runs_show)
    app.add_typer(runs_app, name="runs")

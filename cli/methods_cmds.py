"""`difftpt-ops methods list` (the method registry) and `difftpt-ops submit features` (fill the feature store)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import JsonOpt, engine_of, new_app, print_json, print_table, settings_of
from cli.jobs import (
    DatasetOpt,
    DeviceOpt,
    PlainLimitOpt,
    PlainShardSizeOpt,
    SeedOpt,
    _dispatcher,
    _none_if,
    _print_submit,
    progress_bar,
    submit_app,
)

methods_app = new_app("Test-time methods: what the registry holds (one module per method in tta/methods).")


@methods_app.command("list")
def methods_list(as_json: JsonOpt = False) -> None:
    """Every registered method: name, kind, reference defaults, paper and reference repository."""
    from difftpt_ops.tta.methods import registered

    entries = [method.describe() for method in registered()]
    if as_json:
        print_json(entries)
        return
    rows = [[e["name"], e["kind"], e["summary"], e["reference"], _defaults_text(e["defaults"])] for e in entries]
    print_table("methods", ["name", "kind", "what it does", "reference", "defaults"], rows)


def _defaults_text(defaults: dict) -> str:
    """Top-level defaults as key=value (the prompt's fields are shared by every method and left out)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(defaults.items()) if k not in {"method", "prompt"})


def submit_features(
    ctx: typer.Context,
    dataset: DatasetOpt,
    model: Annotated[str, typer.Option("--model", help="open_clip model name or a local model directory.")]
    = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(
        "--pretrained", help="open_clip pretrained tag or a checkpoint file (none: random weights); a local "
                             "model directory loads its own weights and is recorded without a tag.")]
    = "openai",
    views: Annotated[str, typer.Option(
        "--views", help="Whose default views to encode: tpt (original + 63 crops) or difftpt (original + 64 "
                        "crops + 63 generated; also serves tpt and zero-shot).")] = "tpt",
    generation: Annotated[int | None, typer.Option(
        "--generation", help="--views difftpt: generation config id (default: the latest with images).")] = None,
    seed: SeedOpt = 0,
    limit: PlainLimitOpt = None,
    shard_size: PlainShardSizeOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Encode a dataset's views once into the feature store (a sharded run on the `tune` queue); later runs
    of any method with the same model, seed and views read them instead of running the image encoder."""
    from difftpt_ops.services.running.features import check_views
    from difftpt_ops.services.running.features import submit_features as submit

    check_views(views)  # before any database or model work
    settings = settings_of(ctx)
    engine = engine_of(ctx)
    with progress_bar(settings, as_json) as bar:
        result = submit(engine, settings, dataset_ref=dataset, model=model, pretrained=_none_if(pretrained),
                        views=views, generation_id=generation, seed=seed, limit=limit, shard_size=shard_size,
                        dispatcher=_dispatcher(settings), device=device, progress=bar)
    _print_submit(result, as_json, dataset)


def register(app: typer.Typer) -> None:
    """Mount `methods` on the root app and `features` under `submit`."""
    app.add_typer(methods_app, name="methods")
    submit_app.command("features")(submit_features)

"""`difftpt-ops data`: register test splits, list and show them, import generated images.

Services are imported inside the commands: `difftpt-ops data list` must not pay for torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import JsonOpt, engine_of, err_console, new_app, print_json, print_mapping, print_table, settings_of

data_app = new_app("Datasets: register test splits (ImageNet family, cross-domain sets, ImageFolder) and inspect them.")
_SHOWN_CLASSES = 40  # per-class rows in the text view of `data show`; --json has them all

FORMAT_HELP = ("auto, imagenet, imagenet-a, imagenet-r, imagenet-v2, imagenet-sketch, flower102, dtd, pets, cars, "
               "ucf101, caltech101, food101, sun397, eurosat, aircraft, imagefolder")


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, fed by the service's (done, total) callback.

    It starts on the first callback, so input errors found before the scan print only their one line.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)
    task = progress.add_task(label, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            progress.start()
            started = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            progress.stop()


@contextmanager
def _as_dataset_argument() -> Iterator[None]:
    """A service's error about `--dataset` names the DATASET argument these commands take instead."""
    from difftpt_ops.core.errors import InputError

    try:
        yield
    except InputError as exc:
        if exc.argument != "--dataset":
            raise
        raise type(exc)("DATASET", exc.value, exc.problem) from None


def _print_add_report(report: dict[str, Any]) -> None:
    typer.echo(f"{report['status']}: {report['name']} ({report['format']}, {report['num_classes']} classes) "
               f"from {report['root']}")
    typer.echo(f"  version {report['version']}: {report['num_samples']} samples, ok={report['num_ok']} "
               f"failed={report['num_failed']}, fingerprint {report['fingerprint'][:16]}")
    for failure in report["failures"]:
        typer.echo(f"  failed: {failure['relpath']}: {failure['error']}")
    if report["num_failed"] > len(report["failures"]):
        typer.echo(f"  (see `difftpt-ops data show {report['name']}` for every failed sample)")
    if report.get("empty_folders"):
        typer.echo(f"  warning: folders without images are not classes: {', '.join(report['empty_folders'])}",
                   err=True)
    subset = report.get("subset")
    if subset:
        typer.echo(f"  subset {subset['status']}: version {subset['version']}, {subset['num_samples']} samples "
                   f"(seed {subset['seed']}), use --dataset {report['name']}@{subset['version']}")


@data_app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="DATASET", help="Name to register the dataset under.")],
    root: Annotated[Path, typer.Option("--root", help="Folder of the test split.")],
    fmt: Annotated[str, typer.Option("--format", help=f"Layout of ROOT: {FORMAT_HELP}.")] = "auto",
    class_names: Annotated[Path | None, typer.Option(
        "--class-names", help="imagefolder only: a file with one class name per line, in sorted-folder order.")] = None,
    split_file: Annotated[Path | None, typer.Option(
        "--split-file", help="CoOp split_zhou_*.json (default: looked up in ROOT and its parent).")] = None,
    subset: Annotated[int | None, typer.Option(
        "--subset", help="Also make a seeded, class-stratified subset of N samples (a new version).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the subset (default 0).")] = None,
    follow_outside_links: Annotated[bool, typer.Option(
        "--follow-outside-links", help="Follow symbolic links that lead outside ROOT (default: failed samples).")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a test split: every file hashed and checked; unreadable images are kept as failed samples."""
    from difftpt_ops.core.errors import InputError
    from difftpt_ops.services.datasets import register_dataset

    if seed is not None and subset is None:
        raise InputError("--seed", seed, "only applies with --subset N")
    engine = engine_of(ctx)
    with _progress_bar(f"registering {name}") as progress:
        report = register_dataset(engine, name=name, root=root, format=fmt, class_names_file=class_names,
                                  split_file=split_file, subset=subset, seed=seed or 0, progress=progress,
                                  follow_outside_links=follow_outside_links)
    if as_json:
        print_json(report)
    else:
        _print_add_report(report)


@data_app.command("list")
def list_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the registered datasets."""
    from difftpt_ops.services.datasets import list_datasets

    datasets = list_datasets(engine_of(ctx))
    if as_json:
        print_json(datasets)
        return
    if not datasets:
        typer.echo("no datasets; register one with `difftpt-ops data add NAME --root PATH`")
        return
    print_table("datasets", ["name", "format", "classes", "samples", "failed", "versions", "root"], [
        [d["name"], d["format"], d["num_classes"], d["num_samples"], d["num_failed"],
         ",".join(str(v) for v in d["versions"]), d["root"]] for d in datasets])


def _stored_features(store: dict[str, int] | None) -> str:
    """The feature store's share for this version: views of how many sets, and their size on disk."""
    if not store or not store["entries"]:
        return "none"
    return f"{store['views']} views in {store['entries']} sets, {store['bytes'] / 1e6:.1f} MB"


def _print_description(info: dict[str, Any]) -> None:
    version = info["version"]
    print_mapping(f"{info['name']}@{version['version']}", {
        "format": info["format"], "root": info["root"], "classes": info["num_classes"],
        "samples": version["num_samples"], "failed": version["num_failed"], "fingerprint": version["fingerprint"],
        "augmix (cross-domain)": info["cross_domain"],
        "stored features": _stored_features(info.get("feature_store"))})
    print_table("versions", ["version", "samples", "failed", "parent", "subset", "seed", "fingerprint"], [
        [v["version"], v["num_samples"], v["num_failed"], v["parent_version"], v["subset_size"], v["subset_seed"],
         v["fingerprint"][:16]] for v in info["versions"]])
    classes = info["per_class"]
    print_table("samples per class", ["label", "name", "ok", "failed"],
                [[c["label"], c["name"], c["ok"], c["failed"]] for c in classes[:_SHOWN_CLASSES]])
    if len(classes) > _SHOWN_CLASSES:
        typer.echo(f"... {len(classes) - _SHOWN_CLASSES} more classes (--json lists them all)")
    if info["failed_samples"]:
        print_table("failed samples", ["index", "relpath", "label", "error"], [
            [f["index"], f["relpath"], f["label"], f["error"]] for f in info["failed_samples"]])


@data_app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="DATASET", help="NAME (latest version) or NAME@V.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a dataset version: classes, versions, samples per class, failed samples and why."""
    from difftpt_ops.services.datasets import describe_dataset

    with _as_dataset_argument():
        info = describe_dataset(engine_of(ctx), ref)
    if as_json:
        print_json(info)
    else:
        _print_description(info)


@data_app.command("verify")
def verify(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="DATASET", help="NAME (latest version) or NAME@V.")],
    as_json: JsonOpt = False,
) -> None:
    """Hash every registered file again: exit 1 when any changed, is missing or cannot be read (runs refuse such
    samples, because results are keyed by the registered content)."""
    from difftpt_ops.services.dataset_files import verify_dataset

    with _as_dataset_argument(), _progress_bar(f"verifying {ref}") as progress:
        report = verify_dataset(engine_of(ctx), ref, progress=progress)
    if as_json:
        print_json(report)
    else:
        _print_verification(report)
    if report["checked"] != report["unchanged"]:
        raise typer.Exit(1)


def _print_verification(report: dict[str, Any]) -> None:
    typer.echo(f"{report['name']}@{report['version']} ({report['root']}): {report['checked']} files checked, "
               f"{report['unchanged']} unchanged, {report['changed']} changed, {report['missing']} missing, "
               f"{report['unreadable']} unreadable")
    problems = report["problems"]
    if problems:
        print_table("files that differ from their registration", ["index", "relpath", "problem"],
                    [[p["index"], p["relpath"], p["problem"]] for p in problems])
        listed = report["checked"] - report["unchanged"]
        if listed > len(problems):
            typer.echo(f"... {listed - len(problems)} more (the first {len(problems)} are listed)")


def _generation_spec(values: dict[str, Any]) -> Any:
    """A GenerationSpec from the options given; the rest keep the spec's defaults."""
    from difftpt_ops.core.specs import GenerationSpec

    given = {key: value for key, value in values.items() if value is not None}
    if given.get("seed", 0) < 0:
        from difftpt_ops.core.errors import InputError

        raise InputError("--seed", given["seed"], "must be >= 0")
    if isinstance(given.get("revision"), str) and given["revision"].lower() in {"", "none"}:
        given["revision"] = None  # a local model directory has no revision
    return GenerationSpec(**given)


@data_app.command("import-generated")
def import_generated_cmd(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", help="NAME or NAME@V of the source dataset.")],
    root: Annotated[Path, typer.Option("--root", help="Folder of generated images to import.")],
    model: Annotated[str | None, typer.Option(help="Generator model id or directory.")] = None,
    revision: Annotated[str | None, typer.Option(help="Model revision ('none' for a local directory).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="default, dpm-solver++ or ddim.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale.")] = None,
    per_sample: Annotated[int | None, typer.Option("--per-sample", help="Variations per source image.")] = None,
    size: Annotated[int | None, typer.Option(help="Image size in pixels.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, fp32, fp16 or bf16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Generation seed.")] = None,
    follow_outside_links: Annotated[bool, typer.Option(
        "--follow-outside-links", help="Import files whose links lead outside ROOT (default: left out, counted).")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Import images generated elsewhere as the generation cache of a dataset, under the given generator settings."""
    from difftpt_ops.core.errors import NotFoundError
    from difftpt_ops.db.session import session_scope
    from difftpt_ops.services.datasets import resolve_dataset_version

    spec = _generation_spec({"model": model, "revision": revision, "scheduler": scheduler, "steps": steps,
                             "guidance": guidance, "per_sample": per_sample, "size": size, "dtype": dtype,
                             "seed": seed})
    if not root.is_dir():
        raise NotFoundError("--root", root, "directory does not exist")
    engine = engine_of(ctx)
    with session_scope(engine) as session:
        _, version = resolve_dataset_version(session, dataset)
        version_id = version.id
    from difftpt_ops.services.running.generation import import_generated

    result = import_generated(engine, settings_of(ctx), dataset_version_id=version_id, root=root, spec=spec,
                              follow_outside_links=follow_outside_links)
    if as_json:
        print_json(result)
    else:
        print_mapping(f"imported into {dataset}", result)
        if result.get("other_size_images"):
            typer.echo(f"{result['other_size_images']} images are not {spec.size}x{spec.size} pixels and were left "
                       "out: give the --size they were generated at (another size is another generation config)")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")

"""`difftpt-ops models`: tiny random-weight models for tests and the offline demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import JsonOpt, new_app, print_json

models_app = new_app("Models: check that real weights load offline; make tiny random-weight models for tests.")


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(
        metavar="DIR", help="Output directory; DIR/clip and DIR/sd-image-variations.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write a tiny random CLIP and image-variation pipeline; pass DIR/clip wherever a model is accepted."""
    from difftpt_ops.models.quiet import silence_library_progress_bars
    from difftpt_ops.models.tiny import make_tiny_models

    if directory.exists() and not directory.is_dir():
        from difftpt_ops.core.errors import InputError

        raise InputError("DIR", directory, "is a file; give a folder (created if missing)")
    silence_library_progress_bars()  # "Writing model shards" bars for a 3 MB model are noise
    paths = {name: str(path) for name, path in make_tiny_models(directory, seed=seed).items()}
    if as_json:
        print_json(paths)
        return
    typer.echo(f"tiny CLIP:      {paths['clip']}   (use --model {paths['clip']})")
    typer.echo(f"tiny diffusion: {paths['diffusion']}   (use --model {paths['diffusion']} with submit generate)")
    typer.echo("random weights: accuracies from these models are meaningless; they exist to exercise the system")


@models_app.command("check")
def check(
    model: Annotated[str | None, typer.Option("--model", help=(
        "open_clip model name or a local open_clip directory (default ViT-B-16; with --generator alone, only "
        "the generator is checked)."))] = None,
    pretrained: Annotated[str | None, typer.Option(
        "--pretrained", help="Pretrained tag (its weights must be in the hub cache) or a checkpoint file "
                             "(default openai; none: random weights).")] = None,
    generator: Annotated[Path | None, typer.Option(
        "--generator", help="Also check a local diffusers image-variation pipeline folder.")] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device to load on.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Load the CLIP (and the generator) a run would use, without network; print what was found."""
    from difftpt_ops.models.quiet import silence_library_progress_bars
    from difftpt_ops.services.models_check import check_clip, check_generator

    silence_library_progress_bars()
    reports = []
    if generator is None or model is not None or pretrained is not None:  # `--generator DIR` alone: no CLIP
        pretrained = "openai" if pretrained is None else pretrained
        tag = None if pretrained.strip().lower() in {"", "none"} else pretrained
        reports.append(check_clip(model or "ViT-B-16", tag, device=device))
    if generator is not None:
        reports.append(check_generator(str(generator), device=device))
    if as_json:
        print_json(reports)
        return
    for report in reports:
        _print_check(report)


def _print_check(report: dict[str, Any]) -> None:
    if report["kind"] == "clip":
        typer.echo(f"CLIP {report['model']} ({report['source']}): {report['architecture']}, "
                   f"{report['activation']}, {report['precision']}, {report['parameters']:,} parameters, "
                   f"embed {report['embed_dim']}, {report['image_size']} px")
    else:
        typer.echo(f"generator {report['directory']}: {report['pipeline']}, scheduler {report['scheduler']}, "
                   f"{report['precision']}, {report['parameters']:,} parameters, {report['image_size']} px")
    for file in report["files"]:
        typer.echo(f"  {file['path']}  {file['bytes']:,} bytes  sha256 {file['sha256']}")
    if report["kind"] == "clip" and report["random_weights"]:
        typer.echo("  random weights: no pretrained tag or file was given")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")

"""`difftpt-ops models`: tiny random-weight models for tests and the offline demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import JsonOpt, new_app, print_json

models_app = new_app("Models: make tiny random-weight models for offline tests and the demo.")


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Output directory; DIR/clip and DIR/sd-image-variations.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write a tiny random CLIP and image-variation pipeline; pass DIR/clip wherever a model is accepted."""
    from difftpt_ops.models.tiny import make_tiny_models

    paths = {name: str(path) for name, path in make_tiny_models(directory, seed=seed).items()}
    if as_json:
        print_json(paths)
        return
    typer.echo(f"tiny CLIP:      {paths['clip']}   (use --model {paths['clip']})")
    typer.echo(f"tiny diffusion: {paths['diffusion']}   (use --model {paths['diffusion']} with submit generate)")
    typer.echo("random weights: accuracies from these models are meaningless; they exist to exercise the system")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")

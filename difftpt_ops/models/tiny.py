"""Tiny random-weight models for tests and the offline demo, saved with the libraries' own functions."""

from __future__ import annotations

from pathlib import Path

CLIP_SUBDIR = "clip"
DIFFUSION_SUBDIR = "sd-image-variations"


def make_tiny_models(directory: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write DIR/clip (open_clip) and DIR/sd-image-variations (diffusers), each loadable by path."""
    from difftpt_ops.models.tiny_clip import make_tiny_clip
    from difftpt_ops.models.tiny_diffusion import make_tiny_variation_pipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "clip": make_tiny_clip(directory / CLIP_SUBDIR, seed=seed),
        "diffusion": make_tiny_variation_pipeline(directory / DIFFUSION_SUBDIR, seed=seed),
    }

"""Helpers shared by the tta and CLIP-loading tests: a tiny CLIP, synthetic images, small specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from difftpt_ops.core.specs import ModelSpec
from difftpt_ops.models.clip import LoadedClip, load_clip
from difftpt_ops.models.tiny_clip import make_tiny_clip

CLASS_NAMES = ["tench", "goldfish", "great_white_shark", "tiger shark", "hammerhead shark", "electric ray",
               "a much longer class name with several extra words"]


def tiny_clip(directory: Path) -> LoadedClip:
    """Write the tiny random CLIP to `directory` and load it back through open_clip."""
    return load_clip(ModelSpec(name=str(make_tiny_clip(directory)), pretrained=None))


def random_image(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A noise image with some structure (a gradient), so crops differ from each other."""
    rng = np.random.default_rng(seed)
    width, height = size
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 128, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(gradient * 0.5 + noise, 0, 255).astype(np.uint8))

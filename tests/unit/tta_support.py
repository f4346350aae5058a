"""Helpers shared by the tta and CLIP-loading tests: a tiny CLIP, synthetic images, small specs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


def feature_stream(n: int, n_classes: int, dim: int, views: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """An online method's test stream: normalised view features (views, dim) per sample, drawn near random
    class directions (the returned text features), so predictions and entropies vary."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    samples = []
    for _ in range(n):
        label = int(torch.randint(n_classes, (1,), generator=g))
        base = text[label] + 0.9 * torch.randn(dim, generator=g) / math.sqrt(dim) * 4
        samples.append(F.normalize(base + 0.3 * torch.randn(views, dim, generator=g), dim=-1))
    return samples, text


def run_online_steps(name: str, spec: object, features: torch.Tensor, text: torch.Tensor, *,
                     state: dict | None = None, stream_length: int | None = None) -> tuple[list[torch.Tensor], dict]:
    """A registered online method's steps over `features` (one view each, (n, d)), as the engine calls them,
    from `state` or a fresh one (its floating tensors in the features' dtype): the logits of each step and the
    state after the last."""
    from difftpt_ops.tta.methods import StepInputs, get_method

    method = get_method(name)
    if state is None:
        state = method.init_state(spec, n_classes=text.shape[0], dim=text.shape[1], device=torch.device("cpu"),
                                  stream_length=stream_length or features.shape[0])
        state = {k: (v.to(features.dtype) if v.is_floating_point() else v) for k, v in state.items()}
    outputs = []
    for x in features:
        views = x[None]
        inputs = StepInputs(image_features=views, text_features=text, logit_scale=torch.tensor(100.0),
                            logits=100.0 * views @ text.T, kinds=("original",))
        output, state = method.step(spec, state, inputs)
        outputs.append(output.logits)
    return outputs, state

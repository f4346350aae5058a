"""A tiny random-weight CLIP written as an open_clip local directory: for tests and the offline demo."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from difftpt_ops.models.clip import CONFIG_FILE, WEIGHTS_FILE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    # Full CLIP vocabulary and context so the real BPE tokenizer and 77-token prompts work unchanged.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "size": 224, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic", "resize_mode": "shortest",
}


def make_tiny_clip(directory: Path, *, seed: int = 0, embed_dim: int | None = None,
                   image_size: int | None = None) -> Path:
    """Write a tiny random CLIP (3.4 M parameters) to `directory` and return it.

    The folder holds open_clip_config.json and open_clip_model.safetensors, so `load_clip(ModelSpec(name=
    str(directory), pretrained=None))` loads it back bit-exactly through open_clip's "local-dir:" path.
    The same seed gives the same weights; the global RNG state is left untouched. `embed_dim` and `image_size`
    change the joint embedding width and the input resolution (a multiple of 32), e.g. for a second model that
    must not be mistaken for the first (RLCF's reward model).
    """
    import open_clip

    cfg = copy.deepcopy(TINY_MODEL_CFG)
    preprocess = dict(TINY_PREPROCESS_CFG)
    if embed_dim is not None:
        cfg["embed_dim"] = embed_dim
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = preprocess["size"] = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(cfg))
    with torch.no_grad():
        # Pretrained CLIP has exp(logit_scale) = 100; keep that so entropies look like the real model's.
        model.logit_scale.fill_(math.log(100.0))
    return write_clip_folder(directory, model, cfg, preprocess)


def write_clip_folder(directory: Path, model: torch.nn.Module, model_cfg: dict[str, Any],
                      preprocess_cfg: dict[str, Any]) -> Path:
    """Save `model` (built from `model_cfg`) as an open_clip local folder that `load_clip` reads back bit-exactly:
    open_clip_config.json (model and preprocessing configs) and open_clip_model.safetensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory

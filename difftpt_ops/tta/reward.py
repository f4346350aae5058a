"""A second, frozen CLIP that a method's loss scores with (RLCF's reward model). Pure torch.

It encodes the class prompts once (the same texts as the policy's prompts, through its own tokenizer and text
tower) and, per sample, the views the method kept, in their normalised pixels as the policy sees them: bicubically
interpolated (align_corners=True, as the reference) to its own input size when that differs. Its weights run in
their own precision, under autocast when half, as the engine runs the policy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.tta.methods import Method, RewardInputs
from difftpt_ops.tta.text import ClipLike, TextTower, normalise


class RewardScorer:
    """The reward CLIP of one run and class list: class features once, view features on demand."""

    def __init__(self, clip: ClipLike, texts: Sequence[str]) -> None:
        self.clip = clip
        self.model = clip.model
        self.device = torch.device(clip.device)
        self.weight_dtype = TextTower(clip.model, name=clip.name).cast_dtype
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad(), self._autocast():
            tokens = clip.tokenizer(list(texts)).to(self.device)
            self.text_features = normalise(self.model.encode_text(tokens))

    def encode_raw(self, pixels: Tensor) -> Tensor:
        """The reward image tower's output (n, d_reward) for normalised views (n, 3, H, W) as the policy sees
        them, as it produced it (its dtype, not normalised, on the CPU): what the feature store keeps."""
        images = pixels.to(self.device, dtype=torch.float32)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=True)
        with torch.no_grad(), self._autocast():
            return self.model.encode_image(images.to(self.weight_dtype)).cpu()

    def inputs_for(self, pixels: Tensor) -> RewardInputs:
        """The reward model's features of the kept views `pixels` (in the method's order) and of the classes."""
        return self.inputs_from(self.encode_raw(pixels))

    def inputs_from(self, raw: Tensor) -> RewardInputs:
        """The same from the reward tower's output for the kept views (`encode_raw`, or read back from the store)."""
        return RewardInputs(image_features=normalise(raw.to(self.device)), text_features=self.text_features)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.weight_dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)
        return nullcontext()


def reward_scorer(method: Method, spec: Any, texts: Sequence[str],
                  reward: ClipLike | None) -> RewardScorer | None:
    """The method's reward model over the class prompts `texts`, or None for a method without one (which ignores
    `reward`).

    Raises:
        InvalidSpecError: the method scores with a reward model and none was passed.
    """
    if not method.needs_reward_model:
        return None
    if reward is None:
        path = method.reward_model_path(spec)
        problem = ("is named in the spec but was not loaded; pass reward=load_clip(ModelSpec(name=path, "
                   "pretrained=None))") if path else f"{method.name} scores with a second CLIP: --set reward_model=DIR"
        raise InvalidSpecError("reward_model", path, problem)
    return RewardScorer(reward, texts)


"""DMN-ZS (Zhang et al., CVPR 2024): the training-free zero-shot Dual Memory Network, i.e. its dynamic memory.

Pure torch, no I/O. The state is a dict of tensors advanced one test sample at a time by `step`. The
formulation follows the reference code (YBZh/DMN, dmn_main.py with --n_shot 0 and no fine-tuning, whose
learnable mappings then stay zero):

1. Text probabilities softmax(scale * f @ W^T) for every view; the pseudo-label comes from the mean
   probability of the `selection_p` lowest-entropy views (entropy -sum p log(p + 1e-6)).
2. The memory of the pseudo-label's class takes the original view's feature with the mean probability's
   entropy (-sum p log(p + 1e-8)): into the next free slot while the class has fewer than `memory_size`
   entries, otherwise in place of its highest-entropy entry when the new entropy is lower than some entry's.
3. Read-out (after the update): the class's memorised features plus its text feature, normalised, are
   weighted by exp(-beta * (1 - cos(f, m))) with f the original view's feature; their normalised weighted
   sum is the class's adaptive classifier, and the memory prediction is softmax(scale * classifier @ f).
4. Prediction = text probability of the original view + `dynamic_weight` * memory prediction. The
   reference picks that weight per dataset by searching a grid against the test labels (see docs/methods.md);
   here it is a setting, 1.0 by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from difftpt_ops.core.method_specs import MethodSpec, check_descriptions, check_view_count
from difftpt_ops.core.specs import require
from difftpt_ops.tta.methods.base import OnlineMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption, check_prompt_set

NAME = "dmn-zs"
PAPER = "Zhang et al., Dual Memory Networks: A Versatile Adaptation Approach for Vision-Language Models, CVPR 2024"
REFERENCE = "https://github.com/YBZh/DMN"
SELECTION_EPS = 1e-6  # in the view-selection entropy
MEMORY_EPS = 1e-8  # in the memory-ranking entropy
MAX_MEMORY_SIZE = 1024  # features kept per class: the reference keeps 50; classes x this x dim floats stay on the GPU


@dataclass(frozen=True)
class DMNParams:
    """The numbers DMN-ZS's step needs (the reference's defaults and scripts/run.sh)."""

    memory_size: int = 50
    beta: float = 5.5
    selection_p: float = 0.1
    dynamic_weight: float = 1.0


@dataclass(frozen=True)
class StepResult:
    """What one sample gets: the combined prediction and its parts."""

    logits: Tensor  # (n_classes,) combined prediction (a sum of probabilities, not a softmax input)
    text_probs: Tensor  # (n_classes,) text probability of the original view (zero-shot CLIP)
    memory_probs: Tensor  # (n_classes,) the dynamic memory's prediction
    entropy: float  # of the mean probability of the kept views (the memory ranking key)
    n_views: int
    kept: Tensor  # (k,) indices of the views whose mean probability gave the pseudo-label


def init_state(n_classes: int, dim: int, params: DMNParams) -> dict[str, Tensor]:
    """An empty memory: per class `memory_size` normalised features with their entropies."""
    return {
        "features": torch.zeros(n_classes, params.memory_size, dim),
        "entropy": torch.zeros(n_classes, params.memory_size),
        "count": torch.zeros(n_classes, dtype=torch.int64),
    }


def kept_views(probs: Tensor, selection_p: float) -> Tensor:
    """Indices of the lowest-entropy views (at least one: a single view keeps itself)."""
    entropy = -(probs * torch.log(probs + SELECTION_EPS)).sum(1)
    keep = max(1, int(probs.shape[0] * selection_p))
    return torch.argsort(entropy, stable=True)[:keep]


def _remember(state: dict[str, Tensor], label: int, feature: Tensor, entropy: float) -> None:
    features, entropies, count = state["features"], state["entropy"], state["count"]
    used, size = int(count[label]), features.shape[1]
    if used < size:
        slot = used
        count[label] = used + 1
    elif bool((entropy < entropies[label]).any()):
        # The highest-entropy slot goes: the last of equal maxima, where a stable ascending sort puts it (the
        # reference's torch.sort is not stable, so its choice among equal maxima is not defined).
        slot = size - 1 - int(torch.argmax(entropies[label].flip(0)))
    else:
        return
    features[label, slot] = F.normalize(feature, dim=-1)
    entropies[label, slot] = entropy


def memory_probs(state: dict[str, Tensor], feature: Tensor, text: Tensor, *, scale: float, beta: float) -> Tensor:
    """The dynamic memory's prediction for the query `feature` (dim,); `text` holds normalised class features.

    The reference re-normalises the (already unit) text features, query and read-out at every sample, the
    read-out twice; here each is normalised once, which changes results only at the level of rounding.
    """
    memory, count = state["features"], state["count"]
    query = F.normalize(feature, dim=-1)
    # A class's filled slots are a prefix of its row (slots fill in order and are only ever replaced), and an
    # empty slot is a zero vector, which adds nothing to the read-out (as in the reference). So the first
    # max(count) slots of every class hold all there is: read in place, without gathering (a copy of up to
    # the whole memory per sample).
    used = memory[:, : int(count.max())]  # (classes, k, dim), a view
    # (einsum: `used @ query` would copy the strided view first)
    weight_memory = torch.exp(-beta * (1.0 - torch.einsum("ckd,d->ck", used, query)))
    weight_text = torch.exp(-beta * (1.0 - text @ query))
    adaptive = weight_text.unsqueeze(1) * text + torch.bmm(weight_memory.unsqueeze(1), used).squeeze(1)
    return (scale * F.normalize(adaptive, dim=-1) @ feature).softmax(-1)


def step(state: dict[str, Tensor], features: Tensor, logits: Tensor, text: Tensor, *, scale: float,
         params: DMNParams) -> tuple[StepResult, dict[str, Tensor]]:
    """Adapt to one sample and predict it: `features` are its views' normalised features (view 0 first),
    `logits` their CLIP logits, `text` the normalised class text features (n_classes, dim) and `scale`
    CLIP's logit scale. The state is updated in place and returned.
    """
    features = features.float()
    probs = logits.float().softmax(-1)
    kept = kept_views(probs, params.selection_p)
    mean = probs[kept].mean(0)
    entropy = float(-(mean * torch.log(mean + MEMORY_EPS)).sum())
    _remember(state, int(mean.argmax()), features[0], entropy)
    memory = memory_probs(state, features[0], text.float(), scale=scale, beta=params.beta)
    combined = probs[0] + params.dynamic_weight * memory
    return StepResult(combined, probs[0], memory, entropy, int(features.shape[0]), kept), state


def state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A compact copy for a checkpoint: only the filled slots (the memory fills slowly)."""
    filled = torch.arange(state["features"].shape[1]).unsqueeze(0) < state["count"].unsqueeze(1)
    return {"count": state["count"].clone(), "features": state["features"][filled].contiguous(),
            "entropy": state["entropy"][filled].contiguous(),
            "shape": torch.tensor(state["features"].shape, dtype=torch.int64)}


def load_state_dict(saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rebuild the full state from `state_dict` output."""
    n_classes, size, dim = (int(v) for v in saved["shape"])
    state = init_state(n_classes, dim, DMNParams(memory_size=size))
    state["count"] = saved["count"].clone()
    filled = torch.arange(size).unsqueeze(0) < state["count"].unsqueeze(1)
    state["features"][filled] = saved["features"]
    state["entropy"][filled] = saved["entropy"]
    return state


# --- The registered method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DMNSpec(MethodSpec):
    """DMN-ZS with the reference's defaults (dmn_main.py and scripts/run.sh)."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    n_views: int = 32  # -b 32: the original plus 31 random crops
    augmix: bool | None = None  # None: the dataset's rule (on for the cross-domain sets), as the reference
    # The crops' smallest area share: data/datautils.py's RandomResizedCrop(224, scale=(0.5, 1)) (TPT's: 0.08).
    crop_min: float = 0.5
    selection_p: float = 0.1
    memory_size: int = 50
    beta: float = 5.5
    dynamic_weight: float = 1.0  # the reference searches it on the test labels; see docs/methods.md
    prompts: str | None = None  # None: the reference's templates for the dataset (PROMPTS_BY_FORMAT)
    # The CuPL half of the reference's classifier: a JSON file of class descriptions the user supplies.
    descriptions: str | None = None
    # Runs from before `prompts` existed used the single prompt, and those from before `crop_min` TPT's crops:
    # left out at those values, they keep their identity (and read back as them).
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "prompts": "single", "descriptions": None,
                                            "crop_min": 0.08}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order_seed >= 0, "order_seed", self.order_seed, "must be >= 0")
        check_view_count(self.n_views)
        require(0.0 < self.crop_min <= 1.0, "crop_min", self.crop_min, "must be in (0, 1]")
        require(0.0 < self.selection_p <= 1.0, "selection_p", self.selection_p, "must be in (0, 1]")
        require(1 <= self.memory_size <= MAX_MEMORY_SIZE, "memory_size", self.memory_size,
                f"must be in [1, {MAX_MEMORY_SIZE}]")
        require(self.beta >= 0, "beta", self.beta, "must be >= 0")
        require(self.dynamic_weight >= 0, "dynamic_weight", self.dynamic_weight, "must be >= 0")
        if self.prompts is not None:
            check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)

    def params(self) -> DMNParams:
        return DMNParams(memory_size=self.memory_size, beta=self.beta, selection_p=self.selection_p,
                         dynamic_weight=self.dynamic_weight)


# The template part of the reference's `--text_prompt tip_cupl` classifier (ClipFixed.get_text_features):
# the 7 Tip-Adapter templates for the ImageNet sets, Caltech101 and SUN397, one hand-written prompt for the
# other cross-domain sets (ID_to_prompts). Its CuPL half (GPT-written class descriptions, JSON files the
# reference ships) is not shipped here: `--set descriptions=FILE` averages a user-supplied file in with the
# templates, as the reference does. An image folder keeps the spec's single prompt.
PROMPTS_BY_FORMAT: dict[str, str] = {
    "imagenet": "tip", "imagenet-a": "tip", "imagenet-v2": "tip", "imagenet-r": "tip", "imagenet-sketch": "tip",
    "caltech101": "tip", "sun397": "tip", "flower102": "flower102", "dtd": "dtd", "pets": "pets", "cars": "cars",
    "ucf101": "ucf101", "food101": "food101", "aircraft": "aircraft", "eurosat": "eurosat",
}


@register
class DMNZS(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = DMNSpec
    summary: ClassVar[str] = "training-free dynamic memory of confident test features, read out by similarity"
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "YBZh/DMN"

    def views(self, spec: DMNSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution,
                        crop_scale=(spec.crop_min, 1.0))

    def resolve_for_dataset(self, spec: DMNSpec, dataset_format: str) -> DMNSpec:
        """The spec with the reference's templates for the dataset (called at submit, before the fingerprint)."""
        return dataclasses.replace(spec, prompts=spec.prompts or PROMPTS_BY_FORMAT.get(dataset_format, "single"))

    def init_state(self, spec: DMNSpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state(n_classes, dim, spec.params())

    def step(self, spec: DMNSpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        result, state = step(state, inputs.image_features.cpu(), inputs.logits.cpu(),
                             inputs.text_features.cpu(), scale=float(inputs.logit_scale), params=spec.params())
        # The prediction is a sum of probabilities; its log keeps the argmax and makes softmax its normalisation.
        logits = torch.log(result.logits).to(inputs.logits.device)
        return StepOutput(logits=logits, scores=ViewScores.of(inputs.logits, result.kept)), state

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: DMNSpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(dict(tensors))

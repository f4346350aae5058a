"""TDA (Karmanov et al., CVPR 2024): a training-free dynamic adapter with positive and negative caches.

Pure torch, no I/O. The state is a dict of tensors (`init_state`), advanced one test sample at a time by
`step`; `state_dict` / `load_state_dict` turn it into a compact dict of tensors for a safetensors
checkpoint and back. The formulation follows the reference code (kdiAAA/TDA, tda_runner.py and utils.py):

1. CLIP logits `scale * f @ W^T` for every view. With one view, its logits, softmax entropy and softmax
   are the sample's; with several, the 10% lowest-entropy views are kept and the sample's feature is the
   mean of their features (not re-normalised), its logits the mean of their logits, its entropy the
   entropy of their mean probability, its probability map the mean of their softmaxes.
2. The pseudo-label (argmax of the sample's logits) files (feature, entropy) into the positive cache of
   that class: appended while the class has fewer than `pos_shot_capacity` entries, otherwise replacing
   the highest-entropy entry when the new one is lower; entries stay sorted by entropy (ties: older first).
3. When the entropy divided by log2(n_classes) lies strictly between the entropy thresholds (the
   reference divides a natural-log entropy by log2, kept as is), (feature, entropy, mask) enters the
   negative cache the same way, where the mask marks the classes whose probability lies strictly between
   the mask thresholds.
4. Final logits = CLIP logits + pos_alpha * A(pos) @ one_hot - neg_alpha * A(neg) @ mask, with the
   affinity A = exp(-(beta - beta * f @ key)), computed after the sample updated the caches.

The reference runs in half precision on a GPU; this runs in fp32, which changes results only at the
level of rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.method_specs import MethodSpec
from difftpt_ops.tta.caches import (
    affinity,
    file_entry,
    load_two_caches,
    negative_cache_logits,
    summarise_views,
    two_caches,
    two_caches_state_dict,
)
from difftpt_ops.tta.methods._online_specs import check_stream_settings, check_two_caches, original_plus_crops
from difftpt_ops.tta.methods.base import OnlineMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption

NAME = "tda"
PAPER = "Karmanov et al., Efficient Test-Time Adaptation of Vision-Language Models, CVPR 2024"
REFERENCE = "https://github.com/kdiAAA/TDA"

# Per-dataset (alpha, beta) of the positive cache in the reference's configs/*.yaml; every other setting
# (capacities 3 and 2, negative alpha 0.117 and beta 1.0, thresholds) is the same in all of them.
POSITIVE_BY_FORMAT: dict[str, tuple[float, float]] = {
    "imagenet": (2.0, 5.0), "imagenet-a": (2.0, 5.0), "imagenet-v2": (1.0, 8.0), "imagenet-r": (1.0, 8.0),
    "imagenet-sketch": (2.363, 7.45), "caltech101": (5.0, 5.0), "dtd": (2.0, 3.0), "eurosat": (4.0, 8.0),
    "aircraft": (2.0, 2.0), "food101": (1.0, 1.0), "flower102": (1.0, 5.0), "pets": (2.0, 7.0),
    "cars": (1.0, 7.0), "sun397": (2.0, 3.0), "ucf101": (3.0, 8.0),
}
# The reference feeds 63 AugMix views plus the original for ImageNet-A, -V2, -R and -Sketch, and the
# single centre crop everywhere else (ImageNet and the cross-domain sets).
MULTI_VIEW_FORMATS = ("imagenet-a", "imagenet-v2", "imagenet-r", "imagenet-sketch")
MULTI_VIEW_COUNT = 64
# The class text features of the reference's `clip_classifier(classnames, dataset.template)`: the 7
# Tip-Adapter templates for ImageNet, -A, -V2, Caltech101, Stanford Cars and SUN397, CLIP's 80 for -R and
# -Sketch, one hand-written prompt for the other cross-domain sets. An image folder has no reference
# template: it keeps the spec's single prompt.
PROMPTS_BY_FORMAT: dict[str, str] = {
    "imagenet": "tip", "imagenet-a": "tip", "imagenet-v2": "tip", "imagenet-r": "ensemble",
    "imagenet-sketch": "ensemble", "caltech101": "tip", "cars": "tip", "sun397": "tip", "dtd": "dtd",
    "eurosat": "eurosat", "aircraft": "aircraft", "food101": "food101", "flower102": "flower102", "pets": "pets",
    "ucf101": "ucf101",
}


@dataclass(frozen=True)
class TDAParams:
    """The numbers TDA's step needs (imagenet.yaml of the reference by default)."""

    pos_enabled: bool = True
    pos_shot_capacity: int = 3
    pos_alpha: float = 2.0
    pos_beta: float = 5.0
    neg_enabled: bool = True
    neg_shot_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    entropy_lower: float = 0.2
    entropy_upper: float = 0.5
    mask_lower: float = 0.03
    mask_upper: float = 1.0
    selection_p: float = 0.1  # share of the views kept when a sample has several


@dataclass(frozen=True)
class StepResult:
    """What one sample gets: the adapted logits and what they were adapted from."""

    logits: Tensor  # (n_classes,) final logits
    clip_logits: Tensor  # (n_classes,) CLIP logits of the sample (mean over the kept views)
    entropy: float  # of the sample's CLIP prediction (the cache ranking key)
    n_views: int
    kept: Tensor  # (k,) indices of the views the sample's summary used


def init_state(n_classes: int, dim: int, params: TDAParams) -> dict[str, Tensor]:
    """Empty caches: per class `capacity` slots of (key, entropy), plus the negative masks."""
    return two_caches(n_classes, dim, params.pos_shot_capacity, params.neg_shot_capacity)


def cache_logits(state: dict[str, Tensor], feature: Tensor, params: TDAParams) -> Tensor:
    """The caches' correction to the CLIP logits for `feature`: positive minus negative."""
    correction = torch.zeros(state["pos_count"].shape[0])
    if params.pos_enabled:
        weights = affinity(feature, state["pos_keys"], state["pos_count"], params.pos_beta)
        correction = correction + params.pos_alpha * weights.sum(1)  # one-hot values: a class sums its own slots
    if params.neg_enabled:
        correction = correction - negative_cache_logits(state, feature, params.neg_alpha, params.neg_beta)
    return correction


def step(state: dict[str, Tensor], features: Tensor, logits: Tensor, *,
         params: TDAParams) -> tuple[StepResult, dict[str, Tensor]]:
    """Adapt to one sample and predict it: `features` are its views' normalised features (view 0 first),
    `logits` their CLIP logits (n_views, n_classes). The state is updated in place and returned.
    """
    feature, logits, entropy, probs, kept = summarise_views(features, logits, params.selection_p)
    label = int(logits.argmax())
    if params.pos_enabled:
        file_entry(state, "pos", label, feature, entropy, None)
    normalised = entropy / math.log2(logits.shape[-1])
    if params.neg_enabled and params.entropy_lower < normalised < params.entropy_upper:
        mask = (probs > params.mask_lower) & (probs < params.mask_upper)
        file_entry(state, "neg", label, feature, entropy, mask)
    final = logits + cache_logits(state, feature, params)
    return StepResult(final, logits, entropy, int(features.shape[0]), kept), state


def state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A compact copy for a checkpoint: only filled slots are kept (caches start almost empty)."""
    return two_caches_state_dict(state)


def load_state_dict(saved: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rebuild the full state from `state_dict` output."""
    return load_two_caches(saved)


# --- The registered method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TDASpec(MethodSpec):
    """TDA with the reference's settings. None: taken from the reference's config for the run's dataset
    (`resolve_for_format`); set a value to override it."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    n_views: int | None = None  # None: 64 (AugMix) for ImageNet-A/-V2/-R/-Sketch, 1 elsewhere
    augmix: bool | None = None  # None: on exactly when n_views > 1, as the reference's OOD loader
    selection_p: float = 0.1
    pos_enabled: bool = True
    pos_shot_capacity: int = 3
    pos_alpha: float | None = None  # None: the dataset's config (imagenet.yaml: 2.0)
    pos_beta: float | None = None  # None: the dataset's config (imagenet.yaml: 5.0)
    neg_enabled: bool = True
    neg_shot_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    entropy_lower: float = 0.2
    entropy_upper: float = 0.5
    mask_lower: float = 0.03
    mask_upper: float = 1.0
    prompts: str | None = None  # None: the reference's templates for the dataset (PROMPTS_BY_FORMAT)
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    # Runs from before `prompts` existed used the single prompt: left out at "single", they keep their identity.
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "prompts": "single", "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stream_settings(self)
        check_two_caches(self)

    def params(self) -> TDAParams:
        """The step's numbers (unresolved fields take imagenet.yaml's values)."""
        return TDAParams(pos_enabled=self.pos_enabled, pos_shot_capacity=self.pos_shot_capacity,
                         pos_alpha=2.0 if self.pos_alpha is None else self.pos_alpha,
                         pos_beta=5.0 if self.pos_beta is None else self.pos_beta,
                         neg_enabled=self.neg_enabled, neg_shot_capacity=self.neg_shot_capacity,
                         neg_alpha=self.neg_alpha, neg_beta=self.neg_beta, entropy_lower=self.entropy_lower,
                         entropy_upper=self.entropy_upper, mask_lower=self.mask_lower,
                         mask_upper=self.mask_upper, selection_p=self.selection_p)


def resolve_for_format(spec: TDASpec, dataset_format: str) -> TDASpec:
    """Fill the None fields from the reference's config for a dataset format (ImageNet's for others)."""
    alpha, beta = POSITIVE_BY_FORMAT.get(dataset_format, POSITIVE_BY_FORMAT["imagenet"])
    n_views = spec.n_views or (MULTI_VIEW_COUNT if dataset_format in MULTI_VIEW_FORMATS else 1)
    return dataclasses.replace(
        spec, n_views=n_views, augmix=n_views > 1 if spec.augmix is None else spec.augmix,
        prompts=spec.prompts or PROMPTS_BY_FORMAT.get(dataset_format, "single"),
        pos_alpha=alpha if spec.pos_alpha is None else spec.pos_alpha,
        pos_beta=beta if spec.pos_beta is None else spec.pos_beta)


@register
class TDA(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = TDASpec
    summary: ClassVar[str] = "training-free positive and negative feature caches built along the test stream"
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "kdiAAA/TDA"

    def views(self, spec: TDASpec) -> ViewPlan:
        return original_plus_crops(spec)

    def resolve_for_dataset(self, spec: TDASpec, dataset_format: str) -> TDASpec:
        """The spec with the reference's config for the dataset (called at submit, before the fingerprint)."""
        return resolve_for_format(spec, dataset_format)

    def init_state(self, spec: TDASpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state(n_classes, dim, spec.params())

    def step(self, spec: TDASpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        result, state = step(state, inputs.image_features.cpu(), inputs.logits.cpu(), params=spec.params())
        scores = ViewScores.of(inputs.logits, result.kept)
        return StepOutput(logits=result.logits.to(inputs.logits.device), scores=scores), state

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: TDASpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(tensors)

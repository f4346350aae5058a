"""BoostAdapter (Zhang et al., NeurIPS 2024): TDA's caches plus "boosting" samples drawn from the test image's
own augmented views (regional bootstrapping).

Pure torch, no I/O. The state is TDA's: a positive and a negative cache of test features per class, advanced
one test sample at a time by `step`; `caches.two_caches_state_dict` / `load_two_caches` give a compact dict of
tensors for a safetensors checkpoint and back. The formulation follows the reference code (taolinzhang/BoostAdapter,
runner.py `run_test_tda` with `--mode boostadapter`, and utils.py):

1. CLIP logits `scale * f @ W^T` for every view (the original and `n_views - 1` random resized crops with a
   flip, no AugMix). The sample's feature, logits, entropy and probability map are the original view's
   (`summary_from_original`, the reference's `infer_ori_image`, on for the cross-domain sets), or TDA's
   summary of the 10% lowest-entropy views (the ImageNet shifts).
2. Positive cache: the pseudo-label files (feature, entropy) as in TDA (append while below `pos_shot_capacity`,
   otherwise replace the highest-entropy entry when lower; sorted by entropy).
3. Boosting: a copy of the positive cache takes, one by one in ascending entropy, the 10% lowest-entropy views
   of the sample (the original among them): each view's own feature and softmax entropy, filed under its own
   argmax with a capacity of `pos_shot_capacity + delta`. The copy is used for this sample only.
4. Negative cache: when entropy / log2(n_classes) lies strictly between the entropy thresholds, (feature,
   entropy, probability mask) is appended to the class's entries, the oldest dropping out beyond
   `neg_shot_capacity` (first in, first out: unlike TDA, which keeps the lowest entropies).
5. Final logits = CLIP logits + pos_alpha * A(boosted positive cache) @ one_hot - neg_alpha * A(neg) @ mask,
   with A = exp(-(beta - beta * f @ key)), after the sample updated the caches.

The reference runs in half precision on a GPU; this runs in fp32, which changes results only at the level
of rounding.
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
from difftpt_ops.tta.losses import view_entropy
from difftpt_ops.tta.methods._online_specs import (
    check_non_negative,
    check_stream_settings,
    check_two_caches,
    or_default,
)
from difftpt_ops.tta.methods.base import OnlineMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption

NAME = "boostadapter"
PAPER = ("Zhang et al., BoostAdapter: Improving Test-Time Adaptation via Regional Bootstrapping, NeurIPS 2024")
REFERENCE = "https://github.com/taolinzhang/BoostAdapter"
BOOST_P = 0.1  # share of the views taken as boosting samples (select_confident_samples(..., 0.1))


@dataclass(frozen=True)
class BoostParams:
    """The numbers BoostAdapter's step needs (the reference's configs/imagenet_a.yaml by default)."""

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
    delta: int = 3  # extra positive slots per class for the boosting samples
    selection_p: float = 0.1  # share of the views summarising the sample when not summary_from_original
    summary_from_original: bool = False


@dataclass(frozen=True)
class StepResult:
    """What one sample gets: the adapted logits and what they were adapted from."""

    logits: Tensor  # (n_classes,) final logits
    clip_logits: Tensor  # (n_classes,) CLIP logits of the sample's summary
    entropy: float  # of the sample's summary (the cache ranking key)
    kept: Tensor  # (k,) the views the prediction used: the summary's, then the boosting samples not among them


def init_state(n_classes: int, dim: int, params: BoostParams) -> dict[str, Tensor]:
    """Empty caches: per class `capacity` slots of (key, entropy), plus the negative masks (TDA's layout)."""
    return two_caches(n_classes, dim, params.pos_shot_capacity, params.neg_shot_capacity)


def file_first_in_first_out(state: dict[str, Tensor], prefix: str, label: int, key: Tensor, entropy: float,
                            mask: Tensor) -> None:
    """Append an entry to a class's slots; beyond capacity the oldest drops out (`update_cache(..., fifo=True)`)."""
    keys, entropies, count = state[f"{prefix}_keys"], state[f"{prefix}_entropy"], state[f"{prefix}_count"]
    masks = state[f"{prefix}_mask"]
    capacity, used = keys.shape[1], int(count[label])
    if used == capacity:
        for tensor in (keys, entropies, masks):
            tensor[label, :-1] = tensor[label, 1:].clone()
        used -= 1
    keys[label, used], entropies[label, used], masks[label, used] = key, entropy, mask
    count[label] = used + 1


def boosting_views(entropies: Tensor) -> Tensor:
    """The 10% lowest-entropy views in ascending entropy (none of fewer than 10 views, as the reference)."""
    return torch.argsort(entropies, stable=True)[:int(entropies.shape[0] * BOOST_P)]


def boosted_positive_logits(state: dict[str, Tensor], feature: Tensor, views: Tensor, logits: Tensor,
                            params: BoostParams) -> tuple[Tensor, Tensor]:
    """pos_alpha * A(positive cache + this sample's boosting views) @ one_hot, and the boosting views.

    Only the classes the boosting views are filed under differ from the positive cache itself: their entries
    are rebuilt as lists (at most pos_shot_capacity + delta each), the others read in place.
    """
    per_class = affinity(feature, state["pos_keys"], state["pos_count"], params.pos_beta).sum(1)
    all_entropies = view_entropy(logits)
    chosen = boosting_views(all_entropies)
    entropies = all_entropies[chosen]
    touched: dict[int, list[tuple[Tensor, float]]] = {}
    for index, entropy in zip(chosen.tolist(), entropies.tolist(), strict=True):
        label = int(logits[index].argmax())
        if label not in touched:
            used = int(state["pos_count"][label])
            touched[label] = [(state["pos_keys"][label, slot], float(state["pos_entropy"][label, slot]))
                              for slot in range(used)]
        entries = touched[label] + [(views[index], entropy)]
        # Append, stable sort by entropy, keep the lowest: the reference's update_cache with fifo=False.
        touched[label] = sorted(entries, key=lambda entry: entry[1])[:params.pos_shot_capacity + params.delta]
    for label, entries in touched.items():
        keys = torch.stack([key for key, _ in entries])
        per_class[label] = (-(params.pos_beta - params.pos_beta * (keys @ feature))).exp().sum()
    return params.pos_alpha * per_class, chosen


def step(state: dict[str, Tensor], features: Tensor, logits: Tensor, *,
         params: BoostParams) -> tuple[StepResult, dict[str, Tensor]]:
    """Adapt to one sample and predict it: `features` are its views' normalised features (view 0 the original),
    `logits` their CLIP logits (n_views, n_classes). The state is updated in place and returned.
    """
    features, logits = features.float(), logits.float()
    summarised_views = 1 if params.summary_from_original else logits.shape[0]  # infer_ori_image: view 0 alone
    feature, clip_logits, entropy, probs, summarised = summarise_views(
        features[:summarised_views], logits[:summarised_views], params.selection_p)
    label = int(clip_logits.argmax())
    file_entry(state, "pos", label, feature, entropy, None)
    positive, chosen = boosted_positive_logits(state, feature, features, logits, params)
    normalised = entropy / math.log2(logits.shape[-1])
    if params.neg_enabled and params.entropy_lower < normalised < params.entropy_upper:
        mask = (probs > params.mask_lower) & (probs < params.mask_upper)
        file_first_in_first_out(state, "neg", label, feature, entropy, mask)
    final = clip_logits + positive
    if params.neg_enabled:
        final = final - negative_cache_logits(state, feature, params.neg_alpha, params.neg_beta)
    already = set(summarised.tolist())
    boosting = [index for index in chosen.tolist() if index not in already]
    kept = torch.cat([summarised, torch.tensor(boosting, dtype=torch.long)])
    return StepResult(final, clip_logits, entropy, kept), state


# --- The registered method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoostAdapterSpec(MethodSpec):
    """BoostAdapter with the reference's settings. None: taken from the reference for the run's dataset
    (`resolve_for_format`); set a value to override it."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    n_views: int | None = None  # None: 64 (--views 64: the original and 63 crops), 1 for ImageNet itself
    augmix: bool = False  # the reference's AugMixAugmenter(..., augmix=False): crops and flips only
    selection_p: float = 0.1  # the views summarising the sample (kept-views summary); boosting takes 10% always
    summary_from_original: bool | None = None  # None: on for the cross-domain sets (infer_ori_image)
    pos_shot_capacity: int = 3
    pos_alpha: float | None = None  # None: the dataset's config
    pos_beta: float | None = None  # None: the dataset's config
    delta: int | None = None  # None: the dataset's config (3 in most)
    neg_enabled: bool = True
    neg_shot_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    entropy_lower: float = 0.2
    entropy_upper: float = 0.5
    mask_lower: float = 0.03
    mask_upper: float = 1.0
    prompts: str | None = None  # None: the reference's templates for the dataset (TDA's)
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "prompts": "single", "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stream_settings(self)
        check_two_caches(self)
        check_non_negative(self, "delta")

    def params(self) -> BoostParams:
        """The step's numbers (unresolved fields take imagenet_a.yaml's values)."""
        alpha, beta, delta = CONFIG_BY_FORMAT[DEFAULT_CONFIG]
        return BoostParams(
            pos_shot_capacity=self.pos_shot_capacity, pos_alpha=or_default(self.pos_alpha, alpha),
            pos_beta=or_default(self.pos_beta, beta), neg_enabled=self.neg_enabled,
            neg_shot_capacity=self.neg_shot_capacity,
            neg_alpha=self.neg_alpha, neg_beta=self.neg_beta, entropy_lower=self.entropy_lower,
            entropy_upper=self.entropy_upper, mask_lower=self.mask_lower, mask_upper=self.mask_upper,
            delta=int(or_default(self.delta, delta)), selection_p=self.selection_p,
            summary_from_original=bool(self.summary_from_original))


# Per-dataset (pos_alpha, pos_beta, delta) of the reference's configs/*.yaml; the other settings (capacities
# 3 and 2, the negative cache's alpha, beta and thresholds) are the same in all of them, and TDA's. The
# repository has no imagenet.yaml: ImageNet takes TDA's (2.0, 5.0) and ImageNet-A's delta (its single view
# gives no boosting samples anyway), image folders ImageNet-A's config.
DEFAULT_CONFIG = "imagenet-a"
CONFIG_BY_FORMAT: dict[str, tuple[float, float, int]] = {
    "imagenet": (2.0, 5.0, 3), "imagenet-a": (2.0, 5.0, 3), "imagenet-v2": (1.0, 8.0, 1),
    "imagenet-r": (1.0, 8.0, 3), "imagenet-sketch": (2.363, 7.45, 1), "caltech101": (5.0, 5.0, 2),
    "dtd": (2.0, 3.0, 0), "eurosat": (4.0, 8.0, 0), "aircraft": (2.0, 2.0, 2), "food101": (1.0, 1.0, 3),
    "flower102": (1.0, 5.0, 0), "pets": (2.0, 7.0, 0), "cars": (1.0, 7.0, 3), "sun397": (2.0, 3.0, 1),
    "ucf101": (3.0, 8.0, 0),
}
# ImageNet itself goes through CLIP's plain preprocess in the reference (one view, so no boosting samples).
SINGLE_VIEW_FORMATS = ("imagenet",)
VIEW_COUNT = 64
# The reference's `infer_ori_image`: the sample is summarised by its original view on the cross-domain sets.
ORIGINAL_SUMMARY_FORMATS = ("caltech101", "dtd", "eurosat", "aircraft", "food101", "flower102", "pets", "cars",
                            "sun397", "ucf101")
# TDA's templates: the dataset modules that could be read (ImageNet-V2's and -Sketch's) set TDA's `template`
# lists, and the runner is TDA's code.
PROMPTS_BY_FORMAT: dict[str, str] = {
    "imagenet": "tip", "imagenet-a": "tip", "imagenet-v2": "tip", "imagenet-r": "ensemble",
    "imagenet-sketch": "ensemble", "caltech101": "tip", "cars": "tip", "sun397": "tip", "dtd": "dtd",
    "eurosat": "eurosat", "aircraft": "aircraft", "food101": "food101", "flower102": "flower102", "pets": "pets",
    "ucf101": "ucf101",
}


def resolve_for_format(spec: BoostAdapterSpec, dataset_format: str) -> BoostAdapterSpec:
    """Fill the None fields from the reference's config and loaders for a dataset format."""
    alpha, beta, delta = CONFIG_BY_FORMAT.get(dataset_format, CONFIG_BY_FORMAT[DEFAULT_CONFIG])
    return dataclasses.replace(
        spec, n_views=spec.n_views or (1 if dataset_format in SINGLE_VIEW_FORMATS else VIEW_COUNT),
        summary_from_original=(dataset_format in ORIGINAL_SUMMARY_FORMATS if spec.summary_from_original is None
                               else spec.summary_from_original),
        prompts=spec.prompts or PROMPTS_BY_FORMAT.get(dataset_format, "single"),
        pos_alpha=or_default(spec.pos_alpha, alpha), pos_beta=or_default(spec.pos_beta, beta),
        delta=int(or_default(spec.delta, delta)))


@register
class BoostAdapter(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = BoostAdapterSpec
    summary: ClassVar[str] = ("TDA's feature caches plus boosting samples from the test image's own most "
                              "confident crops")
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "taolinzhang/BoostAdapter"

    def views(self, spec: BoostAdapterSpec) -> ViewPlan:
        return ViewPlan(n_conventional=(spec.n_views or VIEW_COUNT) - 1, augmix=spec.augmix,
                        resolution=spec.resolution)

    def resolve_for_dataset(self, spec: BoostAdapterSpec, dataset_format: str) -> BoostAdapterSpec:
        """The spec with the reference's config for the dataset (called at submit, before the fingerprint)."""
        return resolve_for_format(spec, dataset_format)

    def init_state(self, spec: BoostAdapterSpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state(n_classes, dim, spec.params())

    def step(self, spec: BoostAdapterSpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        result, state = step(state, inputs.image_features.cpu(), inputs.logits.cpu(), params=spec.params())
        scores = ViewScores.of(inputs.logits, result.kept)
        return StepOutput(logits=result.logits.to(inputs.logits.device), scores=scores), state

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return two_caches_state_dict(state)  # slots in order: the FIFO cache's oldest entry stays first

    def load_state_dict(self, spec: BoostAdapterSpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_two_caches(tensors)

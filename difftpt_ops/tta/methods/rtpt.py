"""R-TPT (Sheng et al., CVPR 2025): TPT with the pointwise entropy only, and a reliability-weighted ensemble
of every view's tuned prediction.

Behaviour of the reference code (TomSheng21/R-TPT, `rtpt.py`, clean images: `--eps 0`), the default here:

- TPT's views (64: the original and 63 random crops, AugMix on the cross-domain sets only), its confidence
  selection (the int(64 * 0.1) = 6 lowest-entropy views, chosen once with the initial prompt) and its single
  AdamW step (lr 5e-3) on the "a photo of a" context, reset per sample;
- the loss is the mean over the kept views of each view's softmax entropy (`entropy_avg`), not TPT's entropy
  of the mean probability;
- the prediction: every view's logits with the tuned prompt, summed with weights softmax(r / 0.01), where a
  view's reliability r is the mean of its 20 largest cosine similarities to the views' image features
  (`get_top_sim`). The reference removes the view itself by setting every similarity >= 1.0 to -inf; in
  floating point a unit vector's similarity with itself lands on either side of 1.0 (about 6 views in 10 at
  or above it with fp32 CLIP-like features), so the others count themselves among their 20 neighbours.
  `exclude="threshold"` (the default) applies that rule to the similarities as computed here, which
  reproduces the rule but not, bit for bit, which views it hits on the reference's GPU; `exclude="self"`
  removes exactly each view's own similarity, the neighbourhood the paper describes. A view with fewer than
  20 similarities left has reliability -inf and weight 0; if every view does, the views weigh equally
  (the reference's softmax would give NaN).

The adversarial half of the paper (PGD attacks on the test image, TeCoA encoders) is not part of this
project: the views are those of the clean image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.method_specs import MethodSpec, check_view_count
from difftpt_ops.core.specs import require
from difftpt_ops.tta.losses import at_least_fp32, view_entropy
from difftpt_ops.tta.methods.base import StepInputs, ViewScores, register
from difftpt_ops.tta.methods.tpt import TPT

NAME = "rtpt"
EXCLUDE_RULES = ("threshold", "self")


@dataclass(frozen=True)
class RTPTSpec(MethodSpec):
    """R-TPT with the reference's defaults (its README's command: 64 views, "a photo of a")."""

    method: ClassVar[str] = NAME
    n_views: int = 64
    selection_p: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01  # AdamW's default, which the reference keeps
    augmix: bool | None = None  # None: TPT's rule, on for the cross-domain sets only
    neighbours: int = 20  # k of the reliability: the mean of a view's k largest similarities
    temperature: float = 0.01  # of the softmax over the views' reliabilities
    exclude: str = "threshold"  # "threshold": similarities >= 1.0 (the code); "self": each view's own

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_count(self.n_views, minimum=2)
        require(0.0 < self.selection_p <= 1.0, "selection_p", self.selection_p, "must be in (0, 1]")
        # The reference asserts at least one step; with none the engine would predict view 0 unweighted.
        require(self.steps >= 1, "steps", self.steps, "must be >= 1")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        # The reference's topk(k) over a row of n_views similarities: k = n_views runs (every similarity a view has
        # left counts; a view that lost one gets -inf), k above it raises.
        require(1 <= self.neighbours <= self.n_views, "neighbours", self.neighbours,
                f"must be >= 1 and at most n_views ({self.n_views})")
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        require(self.exclude in EXCLUDE_RULES, "exclude", self.exclude, f"must be one of {', '.join(EXCLUDE_RULES)}")


def mean_view_entropy(logits: Tensor) -> Tensor:
    """R-TPT's loss: the mean over rows of each row's softmax entropy."""
    return view_entropy(logits).mean()


def reliability(features: Tensor, neighbours: int, exclude: str) -> Tensor:
    """Each view's mean similarity to its `neighbours` most similar views, (n_views,).

    `features` are the views' normalised image features (n_views, d). "threshold" removes every similarity
    >= 1.0 (the reference's rule), "self" exactly the diagonal; removed entries are -inf, so a view left
    with fewer than `neighbours` similarities gets -inf.
    """
    features = at_least_fp32(features)
    similarity = features @ features.t()
    if exclude == "threshold":
        removed = similarity >= 1.0
    else:
        removed = torch.eye(len(features), dtype=torch.bool, device=features.device)
    similarity = similarity.masked_fill(removed, float("-inf"))
    return similarity.topk(neighbours, dim=-1).values.mean(dim=-1)


def reliability_weights(features: Tensor, neighbours: int, temperature: float, exclude: str) -> Tensor:
    """softmax(reliability / temperature) over the views; equal weights where every reliability is -inf."""
    scores = reliability(features, neighbours, exclude)
    if bool(torch.isneginf(scores).all()):
        return torch.full_like(scores, 1.0 / len(scores))
    return (scores / temperature).softmax(dim=-1)


def weighted_prediction(logits: Tensor, weights: Tensor) -> Tensor:
    """The views' logits (n_views, n_classes) summed with their weights, (n_classes,)."""
    return weights.to(logits.dtype) @ logits


@register
class RTPT(TPT):
    """TPT's views, selection and tuning loop; R-TPT's loss and weighted prediction."""

    name: ClassVar[str] = NAME
    spec_class = RTPTSpec
    summary: ClassVar[str] = ("mean entropy of the confident views, then every view's tuned prediction weighted "
                              "by how similar it is to the others")
    paper: ClassVar[str] = ("Sheng et al., R-TPT: Improving Adversarial Robustness of Vision-Language Models "
                            "through Test-Time Prompt Tuning, CVPR 2025")
    reference: ClassVar[str] = "TomSheng21/R-TPT"

    def select(self, spec: RTPTSpec, inputs: StepInputs) -> ViewScores:
        """TPT's selection, with each view's ensemble weight (a function of the image features only)."""
        scores = super().select(spec, inputs)
        weights = reliability_weights(inputs.image_features, spec.neighbours, spec.temperature, spec.exclude)
        return ViewScores(indices=scores.indices, entropy=scores.entropy, cosine=scores.cosine,
                          weight=weights.float())

    def loss(self, spec: RTPTSpec, logits: Tensor, text_features: Tensor) -> Tensor:
        return mean_view_entropy(logits)

    def prediction_views(self, spec: RTPTSpec) -> int:
        return spec.n_views

    def predict(self, spec: RTPTSpec, inputs: StepInputs) -> Tensor:
        weights = reliability_weights(inputs.image_features, spec.neighbours, spec.temperature, spec.exclude)
        return weighted_prediction(inputs.logits, weights)

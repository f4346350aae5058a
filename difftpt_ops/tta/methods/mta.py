"""MTA (Zanella and Ben Ayed, CVPR 2024): MeanShift over the views' image embeddings. Forward-only.

The prediction is the class of a mode of the view embeddings, found by a MeanShift whose points carry
inlierness scores y (a distribution over views). Alternating, as the reference code does (MaxZanella/MTA,
mta.py, the default here):

1. Bandwidth per view i: h_i^2 = 0.5 * mean of its squared distances to its k nearest other views,
   k = int(0.3 * (N - 1)); kernel K_i(m) = exp(-||x_i - m||^2 / (2 h_i^2)).
2. Affinity A = softmax(logits) softmax(logits)^T over views (logits at CLIP's logit scale, temperature 1).
3. y starts uniform, the mode starts at view 0's embedding; `max_iter` outer rounds, each:
   - inlierness: up to max_iter times y <- softmax((K(m) + lambda_q * A y) / lambda_y), stop when y moves
     less than `tol`;
   - mode: up to max_iter times m <- sum_i y_i K_i(m) x_i / sum_i y_i K_i(m), normalised, stop when it
     moves less than `tol`.
4. Logits of the mode against the class features, at CLIP's logit scale.

Defaults: lambda_y = 0.2, lambda_q = 4, max_iter = 5, tol = 1e-6 (main.py's argparse defaults and mta.py's
constants). Where the code has no defined result (NaN) we pick one: with fewer than 5 views k would be 0,
so k is at least 1; with one view the mode is that view; views that coincide have zero bandwidth, which is
floored at machine epsilon (see `gaussian_kernel`); a MeanShift step in which every kernel weight is 0
leaves the mode where it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import MethodSpec, check_descriptions, check_view_count
from difftpt_ops.tta.methods.base import ForwardOnlyMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption, check_prompt_set


@dataclass(frozen=True)
class MTASpec(MethodSpec):
    """MTA with the reference code's defaults."""

    method: ClassVar[str] = "mta"
    n_views: int = 64  # view 0 plus 63 random crops with flips; main.py turns AugMix off for --mta
    lambda_y: float = 0.2  # weight of the entropy of y (a softmax temperature): > 0
    lambda_q: float = 4.0  # weight of the affinity (quadratic) term: >= 0
    knn_ratio: float = 0.3  # bandwidth from the int(ratio * (N - 1)) nearest views
    max_iter: int = 5  # outer rounds, and the cap of each inner loop
    tol: float = 1e-6  # inner loops stop when the L2 change is below this
    prompts: str = "single"
    augmix: bool | None = False
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_count(self.n_views)
        if not self.lambda_y > 0:
            raise InvalidSpecError("lambda_y", self.lambda_y, "must be > 0")
        if not self.lambda_q >= 0:
            raise InvalidSpecError("lambda_q", self.lambda_q, "must be >= 0")
        if not 0.0 < self.knn_ratio <= 1.0:
            raise InvalidSpecError("knn_ratio", self.knn_ratio, "must be in (0, 1]")
        if self.max_iter < 1:
            raise InvalidSpecError("max_iter", self.max_iter, "must be >= 1")
        if not self.tol >= 0:
            raise InvalidSpecError("tol", self.tol, "must be >= 0")
        check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)


@dataclass(frozen=True)
class MTAOutput:
    """One sample's MTA outcome."""

    logits: Tensor  # (n_classes,) of the mode, at the logit scale
    mode: Tensor  # (d,) unit-norm mode of the view embeddings
    inlierness: Tensor  # (n_views,) final y, sums to 1
    bandwidth: Tensor  # (n_views,)


def mta_predict(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, *,
                lambda_y: float = 0.2, lambda_q: float = 4.0, knn_ratio: float = 0.3, max_iter: int = 5,
                tol: float = 1e-6) -> MTAOutput:
    """MTA on one sample's normalised view features (n_views, d) and class features (n_classes, d)."""
    x = image_features.float()
    text = text_features.float()
    n = x.shape[0]
    bandwidth = knn_bandwidth(x, knn_ratio)
    probs = (logit_scale * x @ text.t()).softmax(dim=-1)
    affinity = probs @ probs.t()
    y = torch.full((n,), 1.0 / n, device=x.device)
    mode = x[0]
    for _ in range(max_iter):
        density = gaussian_kernel(x, mode, bandwidth)
        for _ in range(max_iter):
            previous, y = y, ((density + lambda_q * affinity @ y) / lambda_y).softmax(dim=-1)
            if torch.linalg.vector_norm(previous - y) < tol:
                break
        for _ in range(max_iter):
            weights = gaussian_kernel(x, mode, bandwidth) * y
            if not bool(weights.sum() > 0):
                break  # no view within reach of the mode: it stays where it is
            previous, mode = mode, _unit(weights @ x / weights.sum())
            if torch.linalg.vector_norm(previous - mode) < tol:
                break
    return MTAOutput(logits=logit_scale * mode @ text.t(), mode=mode, inlierness=y, bandwidth=bandwidth)


def knn_bandwidth(x: Tensor, ratio: float) -> Tensor:
    """Per-view bandwidth: sqrt(0.5 * mean squared distance to the k nearest other views)."""
    n = x.shape[0]
    if n == 1:
        return torch.ones(1, device=x.device)  # any positive value: the only view is the mode
    k = max(1, int(ratio * (n - 1)))
    squared = torch.cdist(x, x).sort(dim=1).values[:, 1:k + 1] ** 2  # column 0 is the view itself
    return (0.5 * squared.mean(dim=1)).sqrt()


def gaussian_kernel(x: Tensor, mode: Tensor, bandwidth: Tensor) -> Tensor:
    """exp(-||x_i - mode||^2 / (2 h_i^2)) per view.

    h^2 is floored at the dtype's machine epsilon, far below the spread of real views, so that views that
    coincide (zero bandwidth, where the reference divides 0 by 0) give a kernel of 1 at rounding distance.
    """
    variance = (bandwidth ** 2).clamp(min=torch.finfo(bandwidth.dtype).eps)
    return torch.exp(-((x - mode) ** 2).sum(dim=-1) / (2 * variance))


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v)


@register
class MTA(PromptSetOption, ForwardOnlyMethod):
    name: ClassVar[str] = "mta"
    spec_class = MTASpec
    summary: ClassVar[str] = "MeanShift mode of the view embeddings, weighted by inlierness scores"
    paper: ClassVar[str] = "Zanella and Ben Ayed, On the Test-Time Zero-Shot Generalization of Vision-Language " \
                           "Models: Do We Really Need Prompt Learning?, CVPR 2024"
    reference: ClassVar[str] = "MaxZanella/MTA"

    def views(self, spec: MTASpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution)

    def step(self, spec: MTASpec, inputs: StepInputs) -> StepOutput:
        out = mta_predict(inputs.image_features, inputs.text_features, inputs.logit_scale,
                          lambda_y=spec.lambda_y, lambda_q=spec.lambda_q, knn_ratio=spec.knn_ratio,
                          max_iter=spec.max_iter, tol=spec.tol)
        # Every view shapes the mode; how much is its inlierness.
        scores = ViewScores.of(inputs.logits, torch.arange(inputs.n_views, device=inputs.logits.device),
                               weight=out.inlierness)
        return StepOutput(logits=out.logits, scores=scores)

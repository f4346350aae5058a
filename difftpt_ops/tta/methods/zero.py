"""ZERO (Farina et al., NeurIPS 2024): test-time adaptation with "zero" softmax temperature. Forward-only.

Augment the image into N views, keep the int(N * gamma) views whose softmax has the lowest entropy, let each
kept view vote for its argmax class (a softmax at zero temperature), predict the class with most votes.
Behaviour of the reference code (FarinaMatteo/zero, ttas/zero.py, ttas/base.py, utils/tools.py), which is
the default here:

- gamma = 0.3 (the code's current value; the paper and the first release used 0.1);
- the confidence filter ranks views by the entropy of softmax(logit_scale * cosine), view 0 included. The
  code takes it as -(p * log p).sum() on the float32 softmax p, so a view one of whose probabilities
  underflows to 0 (a class more than about 103 logits below its top one) gets 0 * log 0 = NaN, which the
  ascending argsort puts after every finite entropy: that view ranks last, however confident.
  vote="code" ranks that way; vote="argmax" (the paper) ranks by the entropy itself;
- a vote is softmax(cosine / eps) with eps the machine epsilon of the cosines' dtype. The reference runs
  under CUDA autocast, whose matmul returns float16 whatever the weights: eps is 2^-10 and the cosines are
  float16, so a view whose top two classes are within a few thousandths in cosine splits its vote (0.001
  apart: about 0.73 / 0.27). vote="code" reproduces that (the default); vote="argmax" is the paper's
  one-hot vote (taken at float32's eps, so only classes within about 1e-6 split);
- ties in the vote count are broken greedily: walk views int(N * gamma) .. N-1 in view order (not the
  discarded views in confidence order) and take the first argmax that is among the tied classes; if none
  is, the code takes the argmax of view int(N * gamma) after masking classes n_classes - 1 - t for each
  tied t (its `~ties` is a bitwise not on class indices), so it can return an untied class.
  tie_break="code" reproduces that; tie_break="tied" takes that view's argmax among the tied classes;
- the winner of a broken tie gets one extra vote, and the prediction is the top of those scores (the code
  reports them, p_bar, and its accuracy reads them with topk). That is the winner, except when the code's
  fallback chose a class outside the tie: with whole votes its extra vote leaves it below the tied classes
  (or level with them when it had one vote less), and the prediction is the first of the top classes by
  index (the order topk gives equal scores is not specified).

When int(N * gamma) is 0 nothing votes, every class ties, and the greedy walk gives view 0's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import MethodSpec, check_descriptions, check_view_count
from difftpt_ops.tta.losses import view_entropy
from difftpt_ops.tta.methods.base import ForwardOnlyMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption, check_prompt_set

TIE_BREAKS = ("code", "tied")
VOTES = ("code", "argmax")
_FP16_EPS = torch.finfo(torch.float16).eps  # 2^-10: the reference's "zero" temperature under autocast


@dataclass(frozen=True)
class ZeroSpec(MethodSpec):
    """ZERO with the reference code's defaults."""

    method: ClassVar[str] = "zero"
    n_views: int = 64  # view 0 (resize + center crop) plus 63 random crops with flips, no AugMix
    gamma: float = 0.3  # keep int(n_views * gamma) most confident views; the paper's value is 0.1
    prompts: str = "single"  # single | ensemble (CLIP's 80 templates) | tip (7); the code's --templates is tip
    tie_break: str = "code"  # code: as the reference, including its fallback; tied: fallback among tied classes
    vote: str = "code"  # code: the reference on a GPU (float16 cosines at temperature 2^-10, its filter); argmax: paper
    augmix: bool | None = False  # the reference never uses AugMix
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    # Runs made before `vote` existed voted at float32's eps, which is vote="argmax": their specs read as such.
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "descriptions": None, "vote": "argmax"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vote not in VOTES:
            raise InvalidSpecError("vote", self.vote, f"must be one of {', '.join(VOTES)}")
        check_view_count(self.n_views)
        if not 0.0 < self.gamma <= 1.0:
            raise InvalidSpecError("gamma", self.gamma, "must be in (0, 1]")
        check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)
        if self.tie_break not in TIE_BREAKS:
            raise InvalidSpecError("tie_break", self.tie_break, f"must be one of {', '.join(TIE_BREAKS)}")


@dataclass(frozen=True)
class ZeroOutput:
    """One sample's ZERO outcome."""

    pred: int  # the top of `scores` (the first class among equal tops), what the code reports
    scores: Tensor  # (n_classes,) votes of the kept views, +1 on the winner of a broken tie
    probs: Tensor  # (n_classes,) fraction of kept views voting each class; one-hot on pred when none voted
    entropy: Tensor  # (n_views,) of softmax(logit_scale * cosine), finite (the filter's key may be NaN: see above)
    kept: Tensor  # (n_views,) bool, the views that voted
    tie: bool  # whether the vote count tied and the tie-break decided
    ranked: Tensor  # (n_kept,) long, the kept views in the order the filter ranked them
    tie_winner: int | None = None  # the class the tie-break chose (its extra vote); None without a tie


def zero_predict(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, *,
                 gamma: float = 0.3, tie_break: str = "code", vote: str = "code") -> ZeroOutput:
    """ZERO on one sample's normalised view features (n_views, d) and class features (n_classes, d)."""
    cosine = _cosines(image_features, text_features, vote)
    entropy = view_entropy(cosine * logit_scale)
    n_kept = int(cosine.shape[0] * gamma)
    kept_idx = torch.argsort(_filter_key(cosine * logit_scale, entropy, vote), stable=True)[:n_kept]
    votes = _zero_temperature_votes(cosine[kept_idx], vote)
    tied = torch.nonzero(votes == votes.max()).flatten()
    tie = tied.numel() > 1
    winner = _break_tie(cosine, tied, start=n_kept, mode=tie_break) if tie else None
    scores = votes.clone()
    if winner is not None:
        scores[winner] += 1.0
    # The code reports these scores (its p_bar), read by topk, not the class its break returned.
    pred = int(scores.argmax())
    kept = torch.zeros(cosine.shape[0], dtype=torch.bool, device=cosine.device)
    kept[kept_idx] = True
    return ZeroOutput(pred=pred, scores=scores, probs=_vote_fractions(votes, n_kept, pred), entropy=entropy,
                      kept=kept, tie=tie, ranked=kept_idx, tie_winner=winner)


def _filter_key(logits: Tensor, entropy: Tensor, vote: str) -> Tensor:
    """What the confidence filter sorts, ascending. vote="code": the code's -(p * log p).sum() on the float32
    softmax, NaN where a probability is 0 (torch's sort puts NaN after every number). vote="argmax": the
    entropy (finite)."""
    if vote == "argmax":
        return entropy
    probs = logits.float().softmax(dim=-1)
    return -(probs * probs.log()).sum(dim=-1)


def _cosines(image_features: Tensor, text_features: Tensor, vote: str) -> Tensor:
    """float32 cosines; for vote="code" rounded as the reference's autocast matmul makes them (float16 inputs,
    float32 accumulation, float16 result), since its votes resolve differences of a few float16 steps."""
    if vote == "argmax":
        return image_features.float() @ text_features.float().t()
    half = (image_features.half().float() @ text_features.half().float().t()).half()
    return half.float()


def _zero_temperature_votes(cosine: Tensor, vote: str) -> Tensor:
    # softmax(cosine / T) at T = eps of the cosines' dtype, in float32 (autocast's softmax), summed over views.
    if cosine.shape[0] == 0:
        return torch.zeros(cosine.shape[1], device=cosine.device)
    eps = _FP16_EPS if vote == "code" else torch.finfo(torch.float32).eps
    return (cosine / eps).softmax(dim=-1).sum(dim=0)


def _break_tie(cosine: Tensor, tied: Tensor, *, start: int, mode: str) -> int:
    rest = cosine[start:]
    if rest.shape[0]:
        hits = torch.isin(rest.argmax(dim=-1), tied)
        if bool(hits.any()):
            return int(rest[int(hits.nonzero()[0])].argmax())
    # With every view kept there is no row left; the reference fails there, we read view 0.
    row = rest[0] if rest.shape[0] else cosine[0]
    if mode == "code":
        masked = row.clone()
        masked[row.shape[0] - 1 - tied] = -torch.inf
        return int(masked.argmax())
    return int(tied[row[tied].argmax()])


def _vote_fractions(votes: Tensor, n_kept: int, pred: int) -> Tensor:
    if n_kept > 0:
        return votes / n_kept
    probs = torch.zeros_like(votes)
    probs[pred] = 1.0
    return probs


def vote_logits(scores: Tensor) -> Tensor:
    """Prediction logits from vote scores: log of their shares, floored at the smallest normal float.

    softmax of these is the vote share (the confidence ZERO's calibration is measured on), argmax the
    prediction, and classes without votes stay finite so entropies are defined.
    """
    shares = scores / scores.sum()
    return shares.clamp(min=torch.finfo(shares.dtype).tiny).log()


@register
class Zero(PromptSetOption, ForwardOnlyMethod):
    name: ClassVar[str] = "zero"
    spec_class = ZeroSpec
    summary: ClassVar[str] = "majority vote of the most confident augmented views at zero temperature"
    paper: ClassVar[str] = "Farina et al., Frustratingly Easy Test-Time Adaptation of Vision-Language Models, " \
                           "NeurIPS 2024"
    reference: ClassVar[str] = "FarinaMatteo/zero"

    def views(self, spec: ZeroSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution)

    def step(self, spec: ZeroSpec, inputs: StepInputs) -> StepOutput:
        out = zero_predict(inputs.image_features, inputs.text_features, inputs.logit_scale, gamma=spec.gamma,
                           tie_break=spec.tie_break, vote=spec.vote)
        # Kept views in confidence order, as the filter ranked them.
        scores = ViewScores(indices=out.ranked, entropy=out.entropy, cosine=torch.full_like(out.entropy, float("nan")))
        return StepOutput(logits=vote_logits(out.scores), scores=scores)

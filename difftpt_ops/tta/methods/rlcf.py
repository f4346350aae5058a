"""RLCF (Zhao et al., ICLR 2024): test-time prompt tuning by REINFORCE, with a second, frozen CLIP as reward model.

The policy is the run's CLIP with its tunable prompt context. For each selected view it proposes K classes; the
reward model scores each (view, class) pair with CLIPScore, w * max(cos(image, text), 0) in the reward model's own
embedding space; the rewards minus their mean (the baseline) weight the cross-entropy of each proposed class, so the
prompt moves towards the classes the reward model prefers and away from the others. Behaviour of the reference code
(mzhaoshuai/RLCF, `TPT/tpt_cls_rl.py`, `TPT/clip_reward.py`, run by `TPT/scripts/rlcf-prompt.sh`), the default here:

- TPT's views: 64 (the original and 63 random crops, AugMix on the cross-domain sets only) and its confidence
  selection: the int(64 * 0.1) = 6 lowest-entropy views, chosen once with the initial prompt;
- 3 AdamW steps, lr 7e-3, weight decay 5e-4 (the script), on the "a photo of a" context, reset per sample (the
  script also initialises it from a CoOp checkpoint: `--set prompt.coop_checkpoint=FILE`);
- the K = 3 classes of each kept view are its top 3 logits at the current step (`torch.topk`: distinct classes, no
  randomness), as the authors' description of the classification pipeline also says; `sampling="multinomial"`
  draws 3 distinct classes from the view's softmax instead (the abstract's general wording taken literally), from
  a generator seeded by the step's logits, so a run is reproducible;
- the reward model sees the kept views only (its features computed once, after the selection), bicubically
  interpolated to its input size when that differs from the views' (224); its class texts are the policy's class
  prompts ("a photo of a {class}."); CLIPScore weight 2.5;
- the rewards of a view's K classes minus their mean (`reward_process`, per view: `process_batch` off), not divided
  by their standard deviation (`reward_amplify` off); the loss is the mean over the k * K pairs of reward times the
  cross-entropy of the class, i.e. minus the reward-weighted log-probability;
- the prediction: view 0 with the tuned prompt, after the last step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import MethodSpec, check_view_tuning
from difftpt_ops.core.specs import require
from difftpt_ops.tta.losses import at_least_fp32, marginal_entropy
from difftpt_ops.tta.methods.base import RewardInputs, register
from difftpt_ops.tta.methods.tpt import TPT

NAME = "rlcf"
SAMPLING = ("topk", "multinomial")
STD_EPS = 1e-5  # added to the rewards' standard deviation when they are standardised (reward_amplify)


@dataclass(frozen=True)
class RLCFSpec(MethodSpec):
    """RLCF's prompt-tuning classification with the defaults of the reference's rlcf-prompt.sh."""

    method: ClassVar[str] = NAME
    n_views: int = 64  # --batch_size 64
    selection_p: float = 0.1
    steps: int = 3  # --tta_steps 3
    lr: float = 7e-3
    weight_decay: float = 5e-4
    augmix: bool | None = None  # None: TPT's rule, on for the cross-domain sets only
    reward_model: str | None = None  # local open_clip folder of the reward CLIP (the reference: ViT-L/14, OpenAI)
    sample_k: int = 3
    clipscore_weight: float = 2.5
    reward_process: bool = True  # subtract the mean reward (the baseline)
    reward_amplify: bool = False  # also divide by the rewards' standard deviation (+ 1e-5)
    process_batch: bool = False  # baseline over all k * K pairs instead of each view's K
    sampling: str = "topk"  # "topk" (the code) or "multinomial" (K distinct classes drawn from the softmax)
    entropy_weight: float = 0.0  # the code's experimental --min_entropy_reg: + w * TPT's entropy (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_tuning(self)
        require(self.reward_model is None or self.reward_model.strip() != "", "reward_model", self.reward_model,
                "must be the path of a local open_clip model folder")
        require(self.sample_k >= 1, "sample_k", self.sample_k, "must be >= 1")
        require(self.clipscore_weight > 0, "clipscore_weight", self.clipscore_weight, "must be > 0")
        require(self.sampling in SAMPLING, "sampling", self.sampling, f"must be one of {', '.join(SAMPLING)}")
        require(self.entropy_weight >= 0, "entropy_weight", self.entropy_weight, "must be >= 0")


def sample_classes(logits: Tensor, k: int, sampling: str, generator: torch.Generator | None = None) -> Tensor:
    """The K classes each view proposes, (n_views, K): its K largest logits, or K distinct classes drawn from its
    softmax ("multinomial", without replacement)."""
    if k > logits.shape[-1]:
        raise InvalidSpecError("sample_k", k, f"exceeds the {logits.shape[-1]} classes")
    if sampling == "topk":
        return logits.topk(k, dim=-1).indices
    probs = at_least_fp32(logits.detach()).softmax(dim=-1)
    return torch.multinomial(probs, k, replacement=False, generator=generator)


def clip_scores(image_features: Tensor, text_features: Tensor, classes: Tensor, weight: float) -> Tensor:
    """CLIPScore of every (view, proposed class) pair, flattened view by view, (n_views * K,):
    weight * max(cos, 0) between the reward model's features of the view and of the class."""
    k = classes.shape[-1]
    text = text_features[classes.flatten()]
    image = image_features.repeat_interleave(k, dim=0)
    return (weight * (text * image).sum(dim=-1)).clamp(min=0)


def process_rewards(scores: Tensor, k: int, *, baseline: bool, amplify: bool, over_batch: bool) -> Tensor:
    """The rewards the loss weighs, (n_views * K,): the scores minus their mean (per view, or over all pairs
    with `over_batch`), divided by their standard deviation + 1e-5 with `amplify`; unchanged without `baseline`
    or when a group has a single score."""
    grouped = scores if over_batch else scores.reshape(-1, k)
    if baseline and grouped.shape[-1] > 1:
        centred = grouped - grouped.mean(dim=-1, keepdim=True)
        grouped = centred / (grouped.std(dim=-1, keepdim=True) + STD_EPS) if amplify else centred
    return grouped.flatten()


def reinforce_loss(logits: Tensor, classes: Tensor, rewards: Tensor) -> Tensor:
    """Mean over the (view, class) pairs of reward * cross-entropy of the class under the view's logits."""
    k = classes.shape[-1]
    repeated = at_least_fp32(logits).repeat_interleave(k, dim=0)
    nll = F.cross_entropy(repeated, classes.flatten(), reduction="none")
    return (rewards.to(nll.dtype) * nll).mean()


def _generator_for(logits: Tensor) -> torch.Generator:
    """A generator seeded by the step's logits: the same views (seed, sample) draw the same classes."""
    digest = hashlib.sha256(logits.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    generator = torch.Generator(device=logits.device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def rlcf_loss(spec: RLCFSpec, logits: Tensor, reward: RewardInputs) -> Tensor:
    """RLCF's objective for the kept views' logits (k, n_classes) at one step, with the reward model's features
    of the same views (in the same order) and of the classes."""
    generator = _generator_for(logits) if spec.sampling == "multinomial" else None
    classes = sample_classes(logits.detach(), spec.sample_k, spec.sampling, generator)
    with torch.no_grad():
        scores = clip_scores(reward.image_features, reward.text_features, classes, spec.clipscore_weight)
        rewards = process_rewards(scores, spec.sample_k, baseline=spec.reward_process, amplify=spec.reward_amplify,
                                  over_batch=spec.process_batch)
    loss = reinforce_loss(logits, classes, rewards)
    if spec.entropy_weight:
        loss = loss + spec.entropy_weight * marginal_entropy(logits)
    return loss


@register
class RLCF(TPT):
    """TPT's views, selection, episodic loop and view-0 prediction; the loss is REINFORCE with CLIP rewards."""

    name: ClassVar[str] = NAME
    spec_class = RLCFSpec
    summary: ClassVar[str] = ("REINFORCE on the confident views' top classes, rewarded by a second, frozen CLIP's "
                              "CLIPScore")
    paper: ClassVar[str] = ("Zhao et al., Test-Time Adaptation with CLIP Reward for Zero-Shot Generalization in "
                            "Vision-Language Models, ICLR 2024")
    reference: ClassVar[str] = "mzhaoshuai/RLCF"
    needs_reward_model: ClassVar[bool] = True

    def reward_model_path(self, spec: RLCFSpec) -> str | None:
        return spec.reward_model

    def check_classes(self, spec: RLCFSpec, n_classes: int) -> None:
        """Each view proposes `sample_k` distinct classes: more than the dataset has would fail every sample."""
        require(spec.sample_k <= n_classes, "sample_k", spec.sample_k, f"exceeds the dataset's {n_classes} classes")

    def draws_at_random(self, spec: Any) -> bool:
        """Random crops (always, with n_views > 1), and the class draws of `sampling="multinomial"`; top-K draws
        nothing."""
        return super().draws_at_random(spec) or spec.sampling == "multinomial"

    def tuning_loss(self, spec: RLCFSpec, logits: Tensor, text_features: Tensor,
                    reward: RewardInputs | None) -> Tensor:
        if reward is None:
            raise InvalidSpecError("reward_model", spec.reward_model,
                                   "RLCF needs its reward model's features; load it and pass prepare_classifier("
                                   "reward=...)")
        return rlcf_loss(spec, logits, reward)

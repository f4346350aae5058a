"""DynaPrompt (Xiao et al., ICLR 2025): online test-time prompt tuning with a buffer of prompts.

A buffer of `num_prompts` learnable contexts travels along the test stream. For each sample the prompts are
scored on its views, a few are selected, tuned on the sample with TPT's loss and predict it; the buffer remembers
which prompts were used and, once every prompt has been used, recycles the least recently used one.

Pure torch, no I/O. The formulation follows the reference code (zzzx1224/DynaPrompt: `dynap_classification.py`,
`test_time_tuning` and `test_time_adapt_eval`; the prompt learner of `clip/custom_clip_lessctx.py`; the values of
`run_dynap.sh` / `scripts/test_dynap.sh`). With P prompts, V views (row 0 the original), C classes, init the
spec's initial context ("a photo of a") and buffer residuals delta_p (the learnable part; prompt p's context is
init + delta_p, every delta_p zero at the stream's start), `order` the buffer's recency list (least recently
used first, initially 0..P-1) and `use` its use counters (initially 0), one sample does:

1. Recycle (`append`, the code's default; its `noapp` run name turns it off): when every prompt has been used
   (no counter is 0), the first prompt of `order` gets delta = 0 (back to init) and its counter 0; `order` is
   unchanged.
2. A fresh AdamW (lr 5e-3, weight decay 0.01) over the whole buffer: the reference reloads the optimiser's initial
   state before each sample, so no moment survives a sample.
3. For each of `steps` steps (1):
   a. logits (V, P, C) = logit_scale * image features @ text features of every prompt;
   b. per prompt, its entropy averaged over the V views, and "plpd": the original view's largest logit minus each
      augmented view's largest logit, averaged over the V - 1 augmented views;
   c. ent_order = prompts by decreasing entropy, plpd_order = by decreasing plpd (the code's `torch.topk`, except
      that prompts tying exactly, as the unused ones do, come in index order: torch.topk promises no order for
      ties, and a CPU's and a GPU's differ); the reference prompt r = order[0] sits at position k of ent_order;
   d. common = the prompt ids both in ent_order[min(k + 1, P - 1):] (lower entropy than r; the last prompt when
      r has the lowest) and in plpd_order[:k] (the k largest plpd), sorted; the selection is
      [ent_order[c] for c in common] + [r] - the code indexes ent_order by the common prompt *ids* as if they
      were positions (reproduced), so r may appear twice;
   e. each selected prompt, in selection order, moves to the end of `order` and its counter grows by one;
   f. the views: the int(V * selection_p) (at least 1) with the lowest entropy averaged over the selected prompts;
      the loss: TPT's entropy of the mean probability over those views, per selected prompt, averaged over the
      selection; one AdamW step. Only the selected prompts get a gradient, but the weight decay shrinks every
      residual of the buffer (towards init).
4. Prediction: the original view's logits with the tuned selected prompts of the last step, averaged over them
   (logits, not probabilities; a prompt selected twice counts twice).

The state is a flat dict of tensors: `seen` (samples stepped), and once started `delta` (P, n_ctx, width) in the
context's dtype on its device, `order` (P,) and `use` (P,) int64 on the CPU. The engine lends the text encoder as
a differentiable function of a context (`StepInputs.context`); the image features are fixed (the encoder is
frozen), so they may come from the feature store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from difftpt_ops.core.method_specs import MethodSpec, check_view_count
from difftpt_ops.core.specs import require
from difftpt_ops.tta.losses import marginal_entropy, view_entropy
from difftpt_ops.tta.methods.base import (
    ContextTuning,
    OnlineMethod,
    StepInputs,
    StepOutput,
    ViewPlan,
    ViewScores,
    register,
)

NAME = "dynaprompt"
PAPER = "Xiao et al., DynaPrompt: Dynamic Test-Time Prompt Tuning, ICLR 2025"
MAX_PROMPTS = 256  # each prompt is one text-tower pass over every class per step
MAX_STEPS = 64


@dataclass(frozen=True)
class DynaPromptSpec(MethodSpec):
    """DynaPrompt with the defaults of the reference's run_dynap.sh / test_dynap.sh and argparse."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    n_views: int = 64  # -b 64: the original and 63 augmented views (TPT's AugMixAugmenter)
    selection_p: float = 0.1  # --selection_p: the int(64 * 0.1) = 6 lowest-entropy views
    steps: int = 1  # --tta_steps (argparse default; the scripts do not set it)
    lr: float = 5e-3  # --lr 0.005
    weight_decay: float = 0.01  # torch AdamW's default, which the reference keeps
    num_prompts: int = 12  # --num_prompts (run_dynap.sh's num_p=12)
    append: bool = True  # recycle the least recently used prompt once all are used; False: the code's 'noapp' runs
    augmix: bool | None = None  # None: TPT's rule, AugMix on the cross-domain sets only (augmix=len(set_id)>1)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order_seed >= 0, "order_seed", self.order_seed, "must be >= 0")
        # plpd compares the original view with the augmented ones: at least one of those.
        check_view_count(self.n_views, minimum=2)
        require(0.0 < self.selection_p <= 1.0, "selection_p", self.selection_p, "must be in (0, 1]")
        require(1 <= self.steps <= MAX_STEPS, "steps", self.steps, f"must be in [1, {MAX_STEPS}]")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be finite and > 0")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                "must be finite and >= 0")
        # One prompt is the code's other branch, which never defines the selection it returns (it fails).
        require(2 <= self.num_prompts <= MAX_PROMPTS, "num_prompts", self.num_prompts,
                f"must be in [2, {MAX_PROMPTS}]")


def prompt_entropy(logits: Tensor) -> Tensor:
    """Entropy of each softmax over the last dimension, written as the reference's `entropy`."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    return -(log_probs * log_probs.exp()).sum(dim=-1)


def decreasing(values: Tensor) -> list[int]:
    """Indices of `values` from the largest down, exact ties in index order on every device (the code's
    `torch.topk(values, len(values))` leaves the order of ties to the device's algorithm)."""
    return torch.sort(values, descending=True, stable=True).indices.tolist()


def select_prompts(logits: Tensor, reference: int) -> list[int]:
    """The reference's prompt selection from the logits (V, P, C) of every prompt on the sample's views, r =
    `reference` the least recently used prompt: [ent_order[c] for c in common] + [r] (see the module's step 3)."""
    n_prompts = logits.shape[1]
    # Prompt by prompt, each from its own contiguous (V, C) logits: identical prompts then get bit-identical
    # statistics. A reduction over the views of all prompts at once rounds some columns differently (vector lanes
    # and their remainder), which breaks the exact ties of unused prompts in fp32.
    per_prompt = [logits[:, p].contiguous() for p in range(n_prompts)]
    entropy = torch.stack([prompt_entropy(one).mean() for one in per_prompt])
    plpd = torch.stack([(one[0].max() - one[1:].max(-1).values).mean() for one in per_prompt])
    ent_order = decreasing(entropy)
    plpd_order = decreasing(plpd)
    rank = ent_order.index(reference)
    common = sorted(set(ent_order[min(rank + 1, n_prompts - 1):]) & set(plpd_order[:rank]))
    return [ent_order[c] for c in common] + [reference]


def init_state() -> dict[str, Tensor]:
    """Before the first sample: the count only. The first step builds the buffer like the engine's context."""
    return {"seen": torch.zeros((), dtype=torch.int64)}


def _start(state: dict[str, Tensor], initial: Tensor, num_prompts: int) -> None:
    state["delta"] = torch.zeros(num_prompts, *initial.shape, dtype=initial.dtype, device=initial.device)
    state["order"] = torch.arange(num_prompts, dtype=torch.int64)
    state["use"] = torch.zeros(num_prompts, dtype=torch.int64)


def _logits(features: Tensor, scale: Tensor, text: Tensor) -> Tensor:
    """logit_scale * features @ text.T, in the features' dtype."""
    return scale.to(features.dtype) * features @ text.to(features.dtype).t()


def step(spec: DynaPromptSpec, state: dict[str, Tensor], features: Tensor, scale: Tensor,
         context: ContextTuning) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One sample: (prediction logits (C,), the views the last step's loss kept, the state after it, updated in
    place). `features` are its normalised view features (V, d), row 0 the original view."""
    if int(state["seen"]) == 0:
        _start(state, context.initial, spec.num_prompts)
    delta, initial = state["delta"], context.initial.to(state["delta"].dtype)
    order, use = state["order"].tolist(), state["use"].tolist()
    if spec.append and min(use) > 0:
        recycled = order[0]
        use[recycled] = 0
        delta[recycled] = 0
    buffer = nn.Parameter(delta.detach().clone())
    optimizer = torch.optim.AdamW([buffer], lr=spec.lr, weight_decay=spec.weight_decay)
    n_keep = max(1, int(features.shape[0] * spec.selection_p))
    selected: list[int] = []
    kept = torch.zeros(0, dtype=torch.long)
    for _ in range(spec.steps):
        with torch.no_grad():
            # One text pass and one matmul per prompt: identical prompts give identical logits, so their ties
            # are exact (the unused prompts at the stream's start).
            every = torch.stack([_logits(features, scale, context.encode(initial + buffer[p]))
                                 for p in range(spec.num_prompts)], dim=1)
        selected = select_prompts(every, order[0])
        for p in selected:
            order.remove(p)
            use[p] += 1
            order.append(p)
        text = {p: context.encode(initial + buffer[p]) for p in sorted(set(selected))}
        logits = torch.stack([_logits(features, scale, text[p]) for p in selected], dim=1)  # (V, k, C)
        kept = torch.argsort(view_entropy(logits.detach()).mean(-1), stable=True)[:n_keep]
        loss = marginal_entropy(logits[kept]).mean()
        context.minimise(loss, optimizer)
    with torch.no_grad():
        text = {p: context.encode(initial + buffer[p]) for p in sorted(set(selected))}
        prediction = torch.stack([_logits(features[:1], scale, text[p])[0] for p in selected]).mean(0)
        delta.copy_(buffer)
    state["order"] = torch.tensor(order, dtype=torch.int64)
    state["use"] = torch.tensor(use, dtype=torch.int64)
    state["seen"] = torch.tensor(int(state["seen"]) + 1)
    return prediction, kept, state


def state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def load_state_dict(saved: Mapping[str, Tensor], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The state from `state_dict` output: the buffer on `device`, the bookkeeping on the CPU."""
    if int(saved["seen"]) == 0:
        return init_state()
    return {"seen": saved["seen"].clone(), "delta": saved["delta"].to(device).clone(),
            "order": saved["order"].clone(), "use": saved["use"].clone()}


# --- The registered method ---------------------------------------------------------------------------------


@register
class DynaPrompt(OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = DynaPromptSpec
    summary: ClassVar[str] = ("a buffer of prompts carried along the stream: per sample the least recently used one "
                              "and those with lower entropy and larger prediction gap are tuned with TPT's loss")
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "zzzx1224/DynaPrompt"
    tunes_context: ClassVar[bool] = True

    def views(self, spec: DynaPromptSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution)

    def init_state(self, spec: DynaPromptSpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state()

    def step(self, spec: DynaPromptSpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        if inputs.context is None:
            raise RuntimeError("dynaprompt tunes prompt contexts: its step needs StepInputs.context (the engine's)")
        prediction, kept, state = step(spec, state, inputs.image_features, inputs.logit_scale, inputs.context)
        return StepOutput(logits=prediction.to(inputs.logits.device),
                          scores=ViewScores.of(inputs.logits, kept)), state

    def state_dict(self, state: dict[str, Any]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: DynaPromptSpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(tensors, device)

"""OnZeta (Qian et al., ECCV 2024): online zero-shot transfer with an online label-distribution estimate and
online learning of image class proxies, no views beyond the original and no gradient through CLIP.

Pure torch, no I/O. The formulation follows the reference code (idstcv/OnZeta, main_online.py). With x the
sample's normalised image feature, W0 the normalised class text features (d, C), at the i-th sample of a
stream of n (i from 0):

1. Online label learning: q = softmax(x @ W0 / tau_t), reweighted by exp(rho) and renormalised; then the
   dual variable of the label-distribution constraint steps rho -= (cr / sqrt(i + 1)) * (q - alpha / C) and
   is clipped at 0 (q used the rho from before this step).
2. Online proxy learning: p = softmax(x @ w / tau_i) with the image proxies w (d, C), initialised to W0.
   The prediction is beta_i * p + (1 - beta_i) * q with beta_i = beta * sqrt((i + 1) / n); then
   w -= (cw / sqrt(i + 1)) / tau_i * outer(x, p - q) and each proxy (column) is normalised again.

`predict=text` returns q alone (the reference's "OnLab" number). The reference evaluates ImageNet only, with
the 7 Tip-Adapter templates: those are the default prompts for every dataset here. n is the size of the
dataset version (the whole stream): a `--limit N` run is the first N positions of the full run, so a later,
larger limit extends it consistently. The reference runs these updates in fp32 on fp16 CLIP features; so
does this (its features come from the engine in fp32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.method_specs import MethodSpec, check_descriptions
from difftpt_ops.core.specs import require
from difftpt_ops.tta.methods.base import OnlineMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption, check_prompt_set

NAME = "onzeta"
PAPER = "Qian et al., Online Zero-Shot Classification with CLIP, ECCV 2024"
PREDICTIONS = ("combo", "text")


@dataclass(frozen=True)
class OnZetaParams:
    """The numbers OnZeta's step needs (the reference's argparse defaults)."""

    tau_t: float = 0.01
    tau_i: float = 0.04
    cw: float = 0.5
    cr: float = 20.0
    alpha: float = 1.0
    beta: float = 0.8
    predict: str = "combo"


def init_state(n_classes: int, dim: int, stream_length: int,
               device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Before the first sample: rho = 0, no proxies yet (the first step copies the text features), and the
    stream's length and position (on the CPU: read every step)."""
    return {"proxies": torch.zeros(dim, n_classes, device=device), "rho": torch.zeros(n_classes, device=device),
            "position": torch.zeros((), dtype=torch.int64), "stream_length": torch.tensor(stream_length)}


def step(state: dict[str, Tensor], feature: Tensor, text: Tensor, *,
         params: OnZetaParams) -> tuple[Tensor, dict[str, Tensor]]:
    """The prediction (probabilities, (C,)) for one sample, and the state after it (updated in place).

    `feature` is its normalised image feature (d,), `text` the normalised class text features (C, d).
    """
    position, n = int(state["position"]), int(state["stream_length"])
    classifier = text.T
    if position == 0:
        state["proxies"] = classifier.contiguous().clone()
    n_classes = classifier.shape[1]
    lr, rho_lr = params.cw / math.sqrt(position + 1), params.cr / math.sqrt(position + 1)
    beta = params.beta * math.sqrt((position + 1) / n)
    text_label = torch.softmax(feature @ classifier / params.tau_t, dim=0) * torch.exp(state["rho"])
    text_label = text_label / text_label.sum()
    state["rho"] = (state["rho"] - rho_lr * (text_label - params.alpha / n_classes)).clamp_min(0.0)
    vision_label = torch.softmax(feature @ state["proxies"] / params.tau_i, dim=0)
    combined = beta * vision_label + (1 - beta) * text_label
    proxies = state["proxies"] - (lr / params.tau_i) * torch.outer(feature, vision_label - text_label)
    state["proxies"] = proxies / proxies.norm(dim=0, keepdim=True)
    state["position"] = torch.tensor(position + 1)  # on the CPU, as init_state's
    return (text_label if params.predict == "text" else combined), state


def state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def load_state_dict(saved: Mapping[str, Tensor], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The state from `state_dict` output: proxies and rho on `device`, the counters on the CPU."""
    return {name: tensor.to(device if tensor.is_floating_point() else "cpu").clone() for name, tensor in saved.items()}


# --- The registered method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnZetaSpec(MethodSpec):
    """OnZeta with the reference's defaults (main_online.py's argparse defaults)."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    tau_t: float = 0.01  # temperature of the text classifier
    tau_i: float = 0.04  # temperature of the image proxies
    cw: float = 0.5  # step size of the proxies (divided by sqrt(i + 1))
    cr: float = 20.0  # step size of the dual variable rho (divided by sqrt(i + 1))
    alpha: float = 1.0  # the label-distribution constraint: each class at least alpha / C
    beta: float = 0.8  # weight of the proxies' prediction at the end of the stream
    predict: str = "combo"  # combo: OnZeta; text: the online label learning alone (OnLab)
    prompts: str = "tip"  # the reference's 7 Tip-Adapter templates
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order_seed >= 0, "order_seed", self.order_seed, "must be >= 0")
        for name in ("tau_t", "tau_i"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        for name in ("cw", "cr", "alpha"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(0.0 <= self.beta <= 1.0, "beta", self.beta, "must be in [0, 1]")
        require(self.predict in PREDICTIONS, "predict", self.predict, f"must be one of {', '.join(PREDICTIONS)}")
        check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)

    def params(self) -> OnZetaParams:
        return OnZetaParams(tau_t=self.tau_t, tau_i=self.tau_i, cw=self.cw, cr=self.cr, alpha=self.alpha,
                            beta=self.beta, predict=self.predict)


@register
class OnZeta(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = OnZetaSpec
    summary: ClassVar[str] = "online label-distribution estimate and image class proxies learned along the stream"
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "idstcv/OnZeta"

    def views(self, spec: OnZetaSpec) -> ViewPlan:
        return ViewPlan(n_conventional=0, resolution=spec.resolution)

    def init_state(self, spec: OnZetaSpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        if stream_length is None or stream_length < 1:
            # Its schedule needs the stream's length: the online runner passes the dataset version's size.
            raise ValueError(f"onzeta needs the stream length (got {stream_length!r})")
        return init_state(n_classes, dim, stream_length, device)

    def step(self, spec: OnZetaSpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        # On the features' device (a (d, C) update per sample: on a GPU it costs next to nothing).
        probabilities, state = step(state, inputs.image_features[0], inputs.text_features, params=spec.params())
        # Probabilities: their log keeps the argmax and makes softmax give them back (confidence, ECE).
        logits = torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))
        return StepOutput(logits=logits.to(inputs.logits.device),
                          scores=ViewScores.original_only(inputs.logits)), state

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: OnZetaSpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(tensors, device)


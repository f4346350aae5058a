"""TPS (Sui et al., WACV 2025): Test-time Prototype Shifting. Tune a shift of the class prototypes, not a prompt.

The class prototypes are the (fixed) class text features; per sample, a shift vector per class is added to
them, learnt with TPT's objective on TPT's views, and the original view is classified against the shifted
prototypes. Only the view features and the prototypes enter, so no encoder runs forward or backward: the
method is forward-only for the engine (its few AdamW steps happen inside `step`) and reads TPT's views from
the feature store. Behaviour of the reference code (elaine-sui/TPS, shift_classification.py,
model/learnable_shift.py, model/shifter.py, run_utils.py, args.py, scripts/shift/*.sh), the default here:

- the views are TPT's: the original plus 63 random crops (args.py's batch size 64; AugMix on the
  cross-domain sets only, datautils.AugMixAugmenter with augmix=len(set_id) > 1);
- prototypes: every text's CLIP feature L2-normalised, averaged per class (utils/save_class_embeds.py),
  normalised; the shift is added, the result normalised again, logits = logit_scale * image @ proto.T;
- one shift vector per class (`--per_label` in every per-class shift script), initialised to zero and reset to zero
  (with a fresh optimiser state) before each sample;
- loss: TPT's entropy of the mean probability over the int(64 * 0.1) = 6 lowest-entropy views, re-selected
  at every step from the current logits (run_shift_iter); AdamW, lr 5e-3 (args.py, the timing script),
  weight decay 0.01 (AdamW's default), 1 step (the scripts' --tta_steps 1);
- the prediction is the original view's logits against the shifted prototypes.

Options: `per_class=false` shares one shift across classes (shift_text_shared.sh); `prompts` and
`descriptions` choose the initial prototypes, `pooling` how descriptions join the prompt texts (the
reference's "micro" mean of the two means, its "macro" mean over all texts, or the descriptions alone).
The reference tunes under fp16 autocast with a GradScaler; here the step runs in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError, SampleError
from difftpt_ops.core.method_specs import MethodSpec, check_descriptions, check_view_tuning, prompt_has_text
from difftpt_ops.core.specs import require
from difftpt_ops.tta.losses import at_least_fp32, marginal_entropy, view_entropy
from difftpt_ops.tta.methods.base import ForwardOnlyMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import (
    PromptSetOption,
    check_prompt_set,
    class_descriptions,
    encode_texts,
    prompt_templates,
)
from difftpt_ops.tta.prompts import class_prompt_texts
from difftpt_ops.tta.selection import lowest_entropy
from difftpt_ops.tta.text import TextTower, normalise

NAME = "tps"
# How class descriptions join the prompt texts: "micro" (the README's example script): the mean of the
# prompts' mean feature and the descriptions' mean feature; "macro" (--macro_pooling): the mean over all of a
# class's texts; "descriptions": the descriptions' mean alone (--with_concepts without --with_templates).
POOLINGS = ("micro", "macro", "descriptions")


@dataclass(frozen=True)
class TPSSpec(MethodSpec):
    """TPS with the reference code's defaults (scripts/shift/shift_text_per_class.sh)."""

    method: ClassVar[str] = NAME
    n_views: int = 64  # view 0 plus 63 random crops (the scripts' -b 64)
    selection_p: float = 0.1  # keep int(n_views * p) lowest-entropy views, re-selected every step
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01  # AdamW's default, which the reference keeps
    per_class: bool = True  # one shift per class (--per_label); False: one shared shift
    augmix: bool | None = None  # None: TPT's rule, on for the cross-domain sets only
    prompts: str = "single"  # the initial prototypes: "a photo of a {}." or a prompt set (ensemble: 80 templates)
    descriptions: str | None = None  # class descriptions averaged into the initial prototypes (docs/methods.md)
    pooling: str = "micro"  # how descriptions join the prompt texts (POOLINGS); unused without descriptions
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_tuning(self)
        check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)
        require(self.pooling in POOLINGS, "pooling", self.pooling, f"must be one of {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class TPSOutput:
    """One sample's TPS outcome."""

    logits: Tensor  # (n_classes,) of view 0 against the shifted prototypes
    shift: Tensor  # (n_classes, d) or (d,), the tuned shift
    indices: Tensor  # (k,) the views the first step's loss used, lowest entropy first
    entropy: Tensor  # (n_views,) of each view's softmax with the initial prototypes


def shifted_prototypes(text_features: Tensor, shift: Tensor) -> Tensor:
    """normalise(normalise(text) + shift): the reference normalises before and after adding the shift."""
    return torch.nn.functional.normalize(torch.nn.functional.normalize(text_features, dim=-1) + shift, dim=-1)


def shifted_logits(image_features: Tensor, text_features: Tensor, shift: Tensor, logit_scale: Tensor) -> Tensor:
    """logit_scale * image @ prototypes.T, (n_views, n_classes)."""
    return logit_scale * image_features @ shifted_prototypes(text_features, shift).t()


def tps_adapt(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, *,
              selection_p: float = 0.1, steps: int = 1, lr: float = 5e-3, weight_decay: float = 0.01,
              per_class: bool = True) -> TPSOutput:
    """TPS on one sample's normalised view features (n_views, d) and class features (n_classes, d).

    Runs with gradients enabled whatever the caller's mode (the engine calls forward-only steps under
    no_grad); the shift starts at zero on every call, so samples are independent.

    Raises:
        SampleError: the loss is not finite.
    """
    dtype = at_least_fp32(image_features).dtype
    image, text = image_features.to(dtype), text_features.to(dtype)
    scale = torch.as_tensor(logit_scale, dtype=dtype, device=image.device)
    shape = tuple(text.shape) if per_class else (text.shape[1],)
    zero = torch.zeros(shape, dtype=dtype, device=image.device)
    with torch.no_grad():
        initial = shifted_logits(image, text, zero, scale)  # the first step's logits: its views are stored
    with torch.enable_grad():
        shift = torch.nn.Parameter(zero.clone())
        optimizer = torch.optim.AdamW([shift], lr=lr, weight_decay=weight_decay)
        for step in range(steps):
            loss, _ = tps_loss(image, text, shift, scale, selection_p)
            if not bool(torch.isfinite(loss)):
                raise SampleError(f"non-finite TPS loss ({float(loss.detach())}) at step {step} of {steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    shift = shift.detach()
    with torch.no_grad():
        final = shifted_logits(image[:1], text, shift, scale)[0]
    return TPSOutput(logits=final, shift=shift, indices=_select(initial, selection_p),
                     entropy=view_entropy(initial))


def tps_loss(image_features: Tensor, text_features: Tensor, shift: Tensor, logit_scale: Tensor,
             selection_p: float) -> tuple[Tensor, Tensor]:
    """The objective at the current shift and the views it used: TPT's entropy of the mean probability over
    the lowest-entropy views, selected from these logits (the reference re-selects at every step,
    run_shift_iter, where the engine's TPT selects once)."""
    logits = shifted_logits(image_features, text_features, shift, logit_scale)
    kept = _select(logits.detach(), selection_p)
    return marginal_entropy(logits[kept]), kept


def _select(logits: Tensor, selection_p: float) -> Tensor:
    # TPT's confidence selection: the int(n * p) lowest-entropy views (at least one).
    return lowest_entropy(view_entropy(logits), selection_p)


@torch.no_grad()
def mean_text_features(tower: TextTower, tokenizer: Any, texts: Sequence[Sequence[str]]) -> Tensor:
    """Per class, the mean of its texts' normalised features, (n_classes, d), not normalised again (the
    reference averages these means before normalising)."""
    if any(not own for own in texts):
        raise InvalidSpecError("descriptions", "[]", "every class needs at least one text")
    features = normalise(encode_texts(tower, tokenizer([t for own in texts for t in own])))
    rows = features.split([len(own) for own in texts])
    return torch.stack([row.mean(dim=0) for row in rows])


def prompt_texts(spec: TPSSpec, class_names: Sequence[str]) -> list[list[str]]:
    """Per class, the texts of the spec's prompts: the prompt set's templates, or its single prompt."""
    if spec.prompts != "single":
        names = [name.replace("_", " ") for name in class_names]
        return [[t.format(name) for t in prompt_templates(spec.prompts)] for name in names]
    if not prompt_has_text(spec):
        raise InvalidSpecError("descriptions", spec.descriptions, "are averaged with prompt texts; a random or "
                               "CoOp context has none: choose a prompt set, a ctx_init or pooling=descriptions")
    return [[text] for text in class_prompt_texts(class_names, spec.prompt)]


@register
class TPS(PromptSetOption, ForwardOnlyMethod):
    name: ClassVar[str] = NAME
    spec_class = TPSSpec
    summary: ClassVar[str] = ("per-class shifts of the class prototypes tuned on TPT's confident views, no "
                              "encoder backward pass")
    paper: ClassVar[str] = ("Sui et al., Just Shift It: Test-Time Prototype Shifting for Zero-Shot "
                            "Generalization with Vision-Language Models, WACV 2025")
    reference: ClassVar[str] = "elaine-sui/TPS"

    def views(self, spec: TPSSpec) -> ViewPlan:
        # TPT's plan exactly, so that TPT's stored view features serve TPS too.
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution)

    def fixed_text_features(self, spec: TPSSpec, tower: TextTower, tokenizer: Any, class_names: Sequence[str], *,
                            descriptions: Mapping[str, Sequence[str]] | None = None) -> Tensor | None:
        """The initial prototypes; "macro" pooling is the shared recipe (every text weighs the same)."""
        if descriptions is None or spec.pooling == "macro":
            return super().fixed_text_features(spec, tower, tokenizer, class_names, descriptions=descriptions)
        described = mean_text_features(tower, tokenizer, class_descriptions(descriptions, class_names))
        if spec.pooling == "descriptions":
            return normalise(described)
        prompted = mean_text_features(tower, tokenizer, prompt_texts(spec, class_names))
        return normalise((prompted + described) / 2)

    def step(self, spec: TPSSpec, inputs: StepInputs) -> StepOutput:
        out = tps_adapt(inputs.image_features, inputs.text_features, inputs.logit_scale,
                        selection_p=spec.selection_p, steps=spec.steps, lr=spec.lr,
                        weight_decay=spec.weight_decay, per_class=spec.per_class)
        # A model's logit bias is one constant over classes: it changes no softmax, so the tuning leaves it
        # out; it is added back so that the prediction is on the scale of the engine's other logits.
        # (Same expression as the engine's logits, so the offset is exactly 0 for a model without a bias.)
        unshifted = inputs.logit_scale * inputs.image_features @ inputs.text_features.t()
        logits = out.logits.to(inputs.logits.dtype) + (inputs.logits[0] - unshifted[0])
        scores = ViewScores(indices=out.indices, entropy=out.entropy.float(),
                            cosine=torch.full_like(out.entropy, float("nan")).float())
        return StepOutput(logits=logits, scores=scores)

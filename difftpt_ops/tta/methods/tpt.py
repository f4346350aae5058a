"""TPT (Shu et al. 2022): tune the prompt context on the lowest-entropy augmented views of one sample."""

from __future__ import annotations

from typing import ClassVar

import torch

from difftpt_ops.core.method_specs import TPTSpec
from difftpt_ops.tta.losses import view_entropy
from difftpt_ops.tta.methods.base import (
    PromptTuningMethod,
    StepInputs,
    StepOutput,
    ViewPlan,
    ViewScores,
    register,
)
from difftpt_ops.tta.selection import select_tpt


@register
class TPT(PromptTuningMethod):
    name: ClassVar[str] = "tpt"
    spec_class = TPTSpec
    summary: ClassVar[str] = "entropy of the mean prediction over the most confident augmented views"
    paper: ClassVar[str] = "Shu et al., Test-Time Prompt Tuning for Zero-Shot Generalization in " \
                           "Vision-Language Models, NeurIPS 2022"
    reference: ClassVar[str] = "azshue/TPT"
    has_naive: ClassVar[bool] = True

    def views(self, spec: TPTSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution)

    def select(self, spec: TPTSpec, inputs: StepInputs) -> ViewScores:
        selection = select_tpt(inputs.logits, spec.selection_p)
        return ViewScores(indices=selection.indices, entropy=selection.entropy, cosine=selection.cosine)

    def naive_step(self, spec: TPTSpec, inputs: StepInputs) -> StepOutput:
        """The reference's confidence selection: argsort of the entropies, the first int(n * p) (at least 1)."""
        entropy = view_entropy(inputs.logits)
        kept = torch.argsort(entropy)[:max(1, int(inputs.logits.shape[0] * spec.selection_p))]
        return StepOutput(logits=inputs.logits[0], scores=ViewScores.of(inputs.logits, kept))

"""DiffTPT (Feng et al. 2023): TPT over conventional and diffusion-generated views, cosine then entropy filter."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from difftpt_ops.core.method_specs import DiffTPTSpec
from difftpt_ops.tta.losses import view_entropy
from difftpt_ops.tta.methods.base import (
    PromptTuningMethod,
    StepInputs,
    StepOutput,
    ViewPlan,
    ViewScores,
    register,
)
from difftpt_ops.tta.selection import select_difftpt
from difftpt_ops.tta.views import CONVENTIONAL


@register
class DiffTPT(PromptTuningMethod):
    name: ClassVar[str] = "difftpt"
    spec_class = DiffTPTSpec
    summary: ClassVar[str] = "TPT with Stable Diffusion variations, filtered by cosine to the original and entropy"
    paper: ClassVar[str] = "Feng et al., Diverse Data Augmentation with Diffusions for Effective Test-time " \
                           "Prompt Tuning, ICCV 2023"
    reference: ClassVar[str] = "chunmeifeng/DiffTPT"
    has_naive: ClassVar[bool] = True

    def views(self, spec: DiffTPTSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_conventional, n_generated=spec.n_generated, augmix=spec.augmix,
                        resolution=spec.resolution)

    def select(self, spec: DiffTPTSpec, inputs: StepInputs) -> ViewScores:
        n_conventional = sum(kind == CONVENTIONAL for kind in inputs.kinds)
        selection = select_difftpt(inputs.logits, inputs.image_features, n_conventional=n_conventional,
                                   cosine_ratio=spec.selection_cosine, entropy_ratio=spec.selection_entropy,
                                   cosine_on=spec.cosine_on, mode=spec.filter_mode)
        return ViewScores(indices=selection.indices, entropy=selection.entropy, cosine=selection.cosine)

    def naive_step(self, spec: DiffTPTSpec, inputs: StepInputs) -> StepOutput:
        """The reference's chained filter: a per-view cosine loop, then the entropy filter (chained mode only)."""
        if spec.filter_mode != "chained":
            raise NotImplementedError("the naive formulation runs the chained filter only")
        logits = inputs.logits
        source = logits if spec.cosine_on == "logits" else inputs.image_features
        similarity = nn.CosineSimilarity(dim=0)
        scores = torch.stack([similarity(source[i].float(), source[0].float()) for i in range(1, source.shape[0])]) \
            if source.shape[0] > 1 else torch.zeros(0)
        top = torch.argsort(scores.cpu(), descending=True)[:int((source.shape[0] - 1) * spec.selection_cosine)] + 1
        candidates = torch.cat([torch.zeros(1, dtype=torch.long), top])
        entropy = view_entropy(logits[candidates.to(logits.device)])
        keep = max(1, int(candidates.shape[0] * spec.selection_entropy))
        kept = candidates[torch.argsort(entropy.cpu())[:keep]]
        return StepOutput(logits=logits[0], scores=ViewScores.of(logits, kept))

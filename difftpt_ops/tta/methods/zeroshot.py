"""Zero-shot CLIP: the original view with the initial prompt (or a prompt ensemble), no adaptation."""

from __future__ import annotations

from typing import ClassVar

from difftpt_ops.core.method_specs import ZeroShotSpec
from difftpt_ops.tta.methods.base import ForwardOnlyMethod, StepInputs, StepOutput, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption


@register
class ZeroShot(PromptSetOption, ForwardOnlyMethod):
    name: ClassVar[str] = "zeroshot"
    spec_class = ZeroShotSpec
    summary: ClassVar[str] = "CLIP's prediction on the original view with the initial prompt"
    paper: ClassVar[str] = "Radford et al., Learning Transferable Visual Models From Natural Language " \
                           "Supervision, ICML 2021"
    reference: ClassVar[str] = "openai/CLIP"

    def step(self, spec: ZeroShotSpec, inputs: StepInputs) -> StepOutput:
        return StepOutput(logits=inputs.logits[0], scores=ViewScores.original_only(inputs.logits))

"""The straightforward formulation of every registered method, as the reference code computes it.

Kept only to prove that the engine's speed-ups are exact (tests, the GPU check) and to measure them (bench):
every step re-runs the frozen image encoder on all views, every prompt is padded to the full 77-token
context, a method's selection or step is its own straightforward formulation (`naive_step`) where it has
one (TPT's argsort, DiffTPT's per-view cosine loop), and the final prediction encodes view 0 again. Views,
the initial context, fixed text features (prompt ensembles) and the loss are shared with the engine; they
are not speed-ups. Online methods run their `step` on the naive features with a state carried by the tuner; one that
tunes prompt contexts (DynaPrompt) gets the full-length text encoder as its differentiable function of a context.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difftpt_ops.core.method_specs import MethodSpec
from difftpt_ops.tta.methods import (
    ONLINE,
    PROMPT_TUNING,
    ContextTuning,
    StepInputs,
    fixed_text_of,
    method_of,
    split_prompt_sets,
)
from difftpt_ops.tta.optim import optimiser_step
from difftpt_ops.tta.prompts import class_prompt_texts, initial_context
from difftpt_ops.tta.reward import reward_scorer
from difftpt_ops.tta.text import ClipLike, TextTower, normalise
from difftpt_ops.tta.views import build_views


@dataclass(frozen=True)
class NaiveResult:
    pred: int
    top5: list[int]
    zeroshot_pred: int
    selected: list[int]
    seconds: float
    logits: Tensor | None = None  # the prediction's


class NaiveTuner:
    """Reference-style run of any registered method: full-length prompts, image encoder re-run on every
    forward, the method's naive formulation of its selection or step."""

    def __init__(self, clip: ClipLike, class_names: Sequence[str], spec: MethodSpec, *, init_seed: int = 0,
                 view_workers: int = 1, descriptions: Mapping[str, Sequence[str]] | None = None,
                 reward: ClipLike | None = None) -> None:
        self.method = method_of(spec)
        self.model = clip.model
        self.spec = spec
        self.plan = self.method.views(spec)
        self.view_workers = view_workers
        self.device = torch.device(clip.device)
        self.tower = TextTower(clip.model, name=clip.name)
        texts = class_prompt_texts(class_names, spec.prompt)
        tokens = clip.tokenizer(texts).to(self.device)
        init = initial_context(self.tower, clip.tokenizer, spec.prompt, seed=init_seed)
        n_ctx = init.shape[0]
        embeddings = self.tower.embed(tokens)
        self.prefix, self.suffix = embeddings[:, :1], embeddings[:, 1 + n_ctx:]
        self.eot = tokens.argmax(dim=-1)
        self.ctx = nn.Parameter(init.to(self.device))
        # A copy: on the CPU `.to` returns `init` itself, so the parameter and its reset value would share memory.
        self.ctx_init = init.to(self.device).clone()
        # As the engine: methods with fixed text features (prompt sets, descriptions) use them.
        self.fixed_text, self.prompt_sets = split_prompt_sets(
            fixed_text_of(self.method, spec, self.tower, clip.tokenizer, class_names, descriptions))
        # As the engine: a method's reward model (RLCF) encodes the selected views once, after the selection.
        self.reward = reward_scorer(self.method, spec, texts, reward)
        self.state: Any = None
        self.stream_length: int | None = None  # as the engine's Tuner: an online stream's length

    def run(self, image: object, *, generated: Sequence[object] = (), seed: int, sample_key: str | int,
            augmix: bool = False) -> NaiveResult:
        """One sample, the reference way. Same views as the engine for the same (seed, sample_key)."""
        start = time.perf_counter()
        plan = self.plan
        views = build_views(image, n_conventional=plan.n_conventional, generated=list(generated)[:plan.n_generated],
                            seed=seed, sample_key=sample_key,
                            augmix=plan.augmix if plan.augmix is not None else augmix,
                            resolution=plan.resolution, workers=self.view_workers, crop_scale=plan.crop_scale)
        if self.method.kind == PROMPT_TUNING:
            final, zeroshot, selected = self._tune(views.pixels, views.kinds)
        else:
            final, zeroshot, selected = self._forward(views.pixels, views.kinds)
        return NaiveResult(pred=int(final.argmax()), top5=torch.topk(final, k=min(5, final.numel())).indices.tolist(),
                           zeroshot_pred=zeroshot, selected=selected.tolist(), seconds=time.perf_counter() - start,
                           logits=final.detach().float().cpu())

    def _forward(self, pixels: Tensor, kinds: tuple[str, ...]) -> tuple[Tensor, int, Tensor]:
        """Forward-only and online methods: one pass over every view, then the method's (naive) step."""
        with torch.no_grad():
            logits, image, text = self._encode(pixels)
            inputs = StepInputs(image_features=image.float(), text_features=text.float(),
                                logit_scale=self.model.logit_scale.exp().float(), logits=logits.float(), kinds=kinds,
                                prompt_features=self.prompt_sets)
            if self.method.kind == ONLINE:
                if self.state is None:
                    self.state = self.method.init_state(  # type: ignore[attr-defined]
                        self.spec, n_classes=text.shape[0], dim=int(image.shape[-1]), device=self.device,
                        stream_length=self.stream_length)
                if getattr(self.method, "tunes_context", False):
                    # DynaPrompt tunes contexts in its step, with gradients, through the full-length prompts.
                    with torch.enable_grad():
                        inputs = dataclasses.replace(inputs, context=self._context_tuning())
                        output, self.state = self.method.step(self.spec, self.state, inputs)  # type: ignore[attr-defined]
                else:
                    output, self.state = self.method.step(self.spec, self.state, inputs)  # type: ignore[attr-defined]
            elif self.method.has_naive:
                output = self.method.naive_step(self.spec, inputs)
            else:
                output = self.method.step(self.spec, inputs)  # type: ignore[attr-defined]
        return output.logits, int(logits[0].argmax()), output.scores.indices.cpu()

    def _tune(self, pixels: Tensor, kinds: tuple[str, ...]) -> tuple[Tensor, int, Tensor]:
        method, spec = self.method, self.spec
        tuning = method.tuning(spec)  # type: ignore[attr-defined]
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)
        optimizer = torch.optim.AdamW([self.ctx], lr=tuning.lr, weight_decay=tuning.weight_decay)
        scaler = torch.amp.GradScaler("cuda", init_scale=1000.0) if self.device.type == "cuda" else None
        selected: Tensor | None = None
        reward = None
        zeroshot = -1
        for _ in range(tuning.steps):
            logits, image, text = self._encode(pixels)
            if selected is None:
                zeroshot = int(logits[0].argmax())
                selected = self._select(logits.detach(), image, text.detach(), kinds)
                if self.reward is not None:
                    reward = self.reward.inputs_for(pixels[selected.cpu()])
            loss = method.tuning_loss(spec, logits[selected], text, reward)  # type: ignore[attr-defined]
            optimiser_step(loss, optimizer, scaler)
        with torch.no_grad():
            n_predict = method.prediction_views(spec)  # type: ignore[attr-defined]
            logits, image, text = self._encode(pixels[:n_predict])
            final = method.predict(spec, StepInputs(  # type: ignore[attr-defined]
                image_features=image.float(), text_features=text.float(),
                logit_scale=self.model.logit_scale.exp().float(), logits=logits.float(), kinds=kinds[:n_predict]))
        if selected is None:
            zeroshot, selected = int(final.argmax()), torch.zeros(1, dtype=torch.long)
        return final, zeroshot, selected.cpu()

    def _select(self, logits: Tensor, image: Tensor, text: Tensor, kinds: tuple[str, ...]) -> Tensor:
        inputs = StepInputs(image_features=image.float(), text_features=text.float(),
                            logit_scale=self.model.logit_scale.exp().float(), logits=logits.float(), kinds=kinds)
        if self.method.has_naive:
            return self.method.naive_step(self.spec, inputs).scores.indices.to(logits.device)
        return self.method.select(self.spec, inputs).indices.to(logits.device)  # type: ignore[attr-defined]

    def _encode(self, views: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, image and text features of all views: image encoder re-run, text over n_classes x 77 tokens."""
        with self._autocast():
            with torch.no_grad():
                image = normalise(self.model.encode_image(views.to(self.device)))
            text = self.fixed_text.to(self.device) if self.fixed_text is not None else normalise(self._encode_text())
            logits = self.model.logit_scale.exp() * image @ text.t()
            bias = getattr(self.model, "logit_bias", None)
            return (logits + bias if bias is not None else logits), image, text

    def _context_tuning(self) -> ContextTuning:
        """For an online method tuning contexts: the full-length text encoding of a context, and AdamW steps
        with a GradScaler on CUDA (one per sample, as the engine)."""
        scaler = torch.amp.GradScaler("cuda", init_scale=1000.0) if self.device.type == "cuda" else None

        def encode(ctx: Tensor) -> Tensor:
            with self._autocast():
                return normalise(self._encode_text(ctx))

        def minimise(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
            optimiser_step(loss, optimizer, scaler)

        return ContextTuning(initial=self.ctx_init, encode=encode, minimise=minimise)

    def _encode_text(self, ctx: Tensor | None = None) -> Tensor:
        tower = self.tower
        n = self.prefix.shape[0]
        ctx = self.ctx if ctx is None else ctx
        x = torch.cat([self.prefix, ctx.unsqueeze(0).expand(n, -1, -1).to(self.prefix.dtype), self.suffix], 1)
        x = x + tower.positional_embedding
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        return tower._project(x[torch.arange(n, device=x.device), self.eot])

    def _autocast(self) -> AbstractContextManager[Any]:
        # Half-precision frozen weights (fp16 on CUDA, bf16 on the CPU) next to fp32 norms need autocast in
        # their own dtype; fp32 weights on CUDA run under fp16 autocast, as the reference code does.
        dtype = self.tower.cast_dtype
        if dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

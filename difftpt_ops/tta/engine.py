"""Zero-shot CLIP, TPT and DiffTPT on one sample at a time: the engine the services call.

`prepare_classifier` does the per-(model, class list, spec) work once: it tokenises the prompts, cuts them
after their end-of-text token and builds the prompt learner. `Tuner.run` then processes one sample
episodically: the context and the optimiser start fresh, so a result never depends on earlier samples.

Exact speed-ups over the reference formulation (tta/naive.py keeps that one for tests and the benchmark):
image features are computed once per view and reused by every step and by the final prediction; the text
transformer runs on truncated, length-grouped prompts; the filters are vectorised; later steps only score
the selected views. On CUDA the frozen weights are half precision while the context stays fp32, under
autocast with a GradScaler(init_scale=1000) as in the reference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError, SampleError
from difftpt_ops.core.specs import DiffTPTSpec, MethodSpec, TPTSpec, ZeroShotSpec
from difftpt_ops.tta.losses import marginal_entropy, view_entropy
from difftpt_ops.tta.prompts import PromptLearner, class_prompt_texts, initial_context
from difftpt_ops.tta.selection import Selection, select_difftpt, select_tpt
from difftpt_ops.tta.text import ClipLike, TextTower, normalise
from difftpt_ops.tta.views import ViewBatch, build_views

TOP_K = 5
GRAD_SCALER_INIT = 1000.0  # the reference's GradScaler(init_scale=1000)


@dataclass(frozen=True)
class ViewScore:
    """One view's scores at step 0 (initial prompt)."""

    index: int
    kind: str  # original | conventional | generated
    cosine: float | None  # similarity to view 0 where a cosine filter ran, else None
    entropy: float
    kept: bool  # used by the loss


@dataclass(frozen=True)
class SampleResult:
    """The outcome of one sample. "before" is view 0 with the initial prompt, "after" with the tuned one."""

    pred: int
    top5: list[int]
    zeroshot_pred: int
    entropy_before: float
    entropy_after: float
    confidence_before: float  # max softmax probability
    confidence_after: float
    n_views: int
    n_kept: int
    seconds: float  # views + tuning + prediction
    views: list[ViewScore]
    view_seconds: float = 0.0  # of `seconds`, building the views on the CPU


@dataclass(frozen=True)
class _Plan:
    """How a method spec maps onto the engine."""

    n_conventional: int
    n_generated: int
    steps: int
    lr: float
    weight_decay: float
    augmix: bool | None


def prepare_classifier(clip: ClipLike, class_names: Sequence[str], spec: MethodSpec, *,
                       coop_state: Mapping[str, Any] | Tensor | None = None, init_seed: int = 0,
                       image_batch: int = 128, max_text_groups: int = 4, view_workers: int = 1) -> Tuner:
    """Build the tuner for one model, class list and method spec; tokenises and embeds every prompt once.

    `coop_state` is a loaded CoOp checkpoint (models.clip.read_coop_checkpoint) when spec.prompt names one.
    `init_seed` draws a random context when spec.prompt.ctx_init is None. `image_batch` bounds how many
    views go through the image encoder at once; `max_text_groups` how many length groups the prompts form;
    `view_workers` how many threads build a sample's views (none of these change results).

    Raises:
        InputError: empty class list.
        InvalidSpecError: a method the engine does not run (noop), a CoOp ctx of the wrong size, a ctx_init
            that does not tokenise to n_ctx tokens, a checkpoint named in the spec but not passed.
    """
    plan = _plan_of(spec)
    texts = class_prompt_texts(class_names, spec.prompt)
    if spec.prompt.coop_checkpoint and coop_state is None:
        raise InvalidSpecError("coop_checkpoint", spec.prompt.coop_checkpoint,
                               "is named in the spec but was not loaded; pass coop_state=read_coop_checkpoint(path)")
    tower = TextTower(clip.model, name=clip.name)
    init = initial_context(tower, clip.tokenizer, spec.prompt, coop_state=coop_state, seed=init_seed)
    learner = PromptLearner(tower, clip.tokenizer(texts), init, max_groups=max_text_groups)
    return Tuner(clip=clip, learner=learner, spec=spec, plan=plan, image_batch=image_batch,
                 view_workers=view_workers)


def _plan_of(spec: MethodSpec) -> _Plan:
    if isinstance(spec, ZeroShotSpec):
        return _Plan(0, 0, 0, 1.0, 0.0, False)
    if isinstance(spec, TPTSpec):
        return _Plan(spec.n_views - 1, 0, spec.steps, spec.lr, spec.weight_decay, spec.augmix)
    if isinstance(spec, DiffTPTSpec):
        return _Plan(spec.n_conventional, spec.n_generated, spec.steps, spec.lr, spec.weight_decay, spec.augmix)
    raise InvalidSpecError("--method", getattr(spec, "method", type(spec).__name__),
                           "is not a tuning method; choose zeroshot, tpt or difftpt")


class Tuner:
    """Runs one method on one sample at a time. Not thread-safe: it owns the prompt's state."""

    def __init__(self, *, clip: ClipLike, learner: PromptLearner, spec: MethodSpec, plan: _Plan,
                 image_batch: int = 128, view_workers: int = 1) -> None:
        self.clip = clip
        self.model = clip.model
        self.learner = learner
        self.spec = spec
        self.plan = plan
        self.device = torch.device(clip.device)
        self.image_batch = max(1, image_batch)
        self.view_workers = view_workers
        self.weight_dtype = learner.tower.cast_dtype
        self.half = self.weight_dtype in (torch.float16, torch.bfloat16)
        self.logit_scale = self.model.logit_scale.detach().exp().float()
        self._initial_text: Tensor | None = None

    @property
    def class_count(self) -> int:
        return self.learner.n_classes

    def make_views(self, image: object, *, generated: Sequence[object] = (), seed: int, sample_key: str | int,
                   augmix: bool = False) -> ViewBatch:
        """The sample's views on the CPU (safe to build in a DataLoader worker); see `run` for the arguments."""
        use_augmix = self.plan.augmix if self.plan.augmix is not None else augmix
        return build_views(image, n_conventional=self.plan.n_conventional,
                           generated=list(generated)[:self.plan.n_generated], seed=seed, sample_key=sample_key,
                           augmix=use_augmix, resolution=self.spec.resolution, workers=self.view_workers)

    def run(self, image: object, *, generated: Sequence[object] = (), seed: int, sample_key: str | int,
            augmix: bool = False) -> SampleResult:
        """Tune on one sample and predict it.

        `image` is a PIL image (any mode, converted to RGB) or a (3, H, W) tensor. `generated` are its
        diffusion variations (DiffTPT only; the first spec.n_generated are used, fewer if fewer are given;
        other methods ignore them). DiffTPT with no generated images runs on the original and conventional
        views and filters over what exists. `seed` and `sample_key` fix every random choice of the views.
        `augmix` turns AugMix on for the conventional views unless the spec sets augmix itself.

        Raises:
            InputError: `image` or a generated image is not an image.
            SampleError: the loss is not finite.
        """
        start = time.perf_counter()
        views = self.make_views(image, generated=generated, seed=seed, sample_key=sample_key, augmix=augmix)
        view_seconds = time.perf_counter() - start
        result = self.run_views(views)
        return _with_time(result, seconds=result.seconds + view_seconds, view_seconds=view_seconds)

    def run_views(self, views: ViewBatch) -> SampleResult:
        """Tune on already built views (from `make_views`) and predict view 0."""
        start = time.perf_counter()
        # 1. Episodic reset: the context goes back to its initial value; the optimiser is created fresh below.
        self.learner.reset()
        # 2. Frozen image features, once per view: every step and the final prediction reuse them.
        features = self.encode_images(views.pixels)
        # 3. Step 0 with the initial prompt: zero-shot scores and the view selection come for free.
        tuning = self.plan.steps > 0
        logits = self._logits(features, self._text_features(grad=tuning))
        before = logits[0].detach()
        selection = self._select(logits.detach(), features, views)
        # 4. Tune the context on the selected views; the selection is fixed after step 0.
        if tuning:
            self._tune(features, logits, selection.indices)
            with torch.no_grad():
                after = self._logits(features[:1], self._text_features(grad=False))[0]
        else:
            after = before
        # 5. Predict from view 0 and report.
        return self._result(before, after, selection, views, seconds=time.perf_counter() - start)

    def zeroshot_batch(self, images: Sequence[object], *, resolution: int | None = None) -> list[SampleResult]:
        """Zero-shot predictions for many images at once (view 0 only, initial prompt)."""
        if not images:
            return []
        start = time.perf_counter()
        size = resolution or self.spec.resolution
        batches = [build_views(image, n_conventional=0, seed=0, sample_key=0, resolution=size) for image in images]
        pixels = torch.cat([b.pixels for b in batches])
        logits = self._logits(self.encode_images(pixels), self._text_features(grad=False))
        seconds = (time.perf_counter() - start) / max(1, len(batches))
        results = []
        for row, batch in zip(logits, batches, strict=True):
            selection = Selection(indices=torch.zeros(1, dtype=torch.long), entropy=view_entropy(row[None]),
                                  cosine=torch.full((1,), float("nan")))
            results.append(self._result(row, row, selection, batch, seconds=seconds))
        return results

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Normalised fp32 image features (n, embed_dim) of normalised views, without gradients."""
        chunks = []
        with torch.no_grad(), self._autocast():
            for chunk in pixels.split(self.image_batch):
                chunk = chunk.to(self.device, dtype=self.weight_dtype, non_blocking=True)
                chunks.append(self.model.encode_image(chunk))
        return normalise(torch.cat(chunks))

    def _text_features(self, *, grad: bool) -> Tensor:
        if not grad:
            # With the initial context (zero-shot, steps=0) the text features never change: cache them.
            if self.plan.steps == 0:
                if self._initial_text is None:
                    with torch.no_grad(), self._autocast():
                        self._initial_text = self.learner.text_features()
                return self._initial_text
            with torch.no_grad(), self._autocast():
                return self.learner.text_features()
        with self._autocast():
            return self.learner.text_features()

    def _logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        # fp32 outside autocast: n_views x n_classes is small, and the entropies need the precision.
        logits = self.logit_scale * image_features @ text_features.float().t()
        bias = getattr(self.model, "logit_bias", None)
        return logits + bias.float() if bias is not None else logits

    def _select(self, logits: Tensor, features: Tensor, views: ViewBatch) -> Selection:
        spec = self.spec
        if isinstance(spec, TPTSpec):
            return select_tpt(logits, spec.selection_p)
        if isinstance(spec, DiffTPTSpec):
            n_conventional = sum(kind == "conventional" for kind in views.kinds)
            return select_difftpt(logits, features, n_conventional=n_conventional,
                                  cosine_ratio=spec.selection_cosine, entropy_ratio=spec.selection_entropy,
                                  cosine_on=spec.cosine_on, mode=spec.filter_mode)
        entropy = view_entropy(logits)
        return Selection(indices=torch.zeros(1, dtype=torch.long, device=logits.device), entropy=entropy,
                         cosine=torch.full_like(entropy, float("nan")))

    def _tune(self, features: Tensor, logits: Tensor, indices: Tensor) -> None:
        optimizer = torch.optim.AdamW([self.learner.ctx], lr=self.plan.lr, weight_decay=self.plan.weight_decay)
        # A fresh scaler per sample (the reference shares one across samples) keeps samples independent.
        scaler = torch.amp.GradScaler("cuda", init_scale=GRAD_SCALER_INIT) if self._needs_scaler() else None
        kept = features[indices]
        for step in range(self.plan.steps):
            step_logits = logits[indices] if step == 0 else self._logits(kept, self._text_features(grad=True))
            loss = marginal_entropy(step_logits)
            if not bool(torch.isfinite(loss)):
                raise SampleError(f"non-finite loss ({float(loss.detach())}) at tuning step {step} "
                                  f"of {self.plan.steps}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skips the step on an fp16 overflow, as the reference does
                scaler.update()

    def _needs_scaler(self) -> bool:
        return self.device.type == "cuda" and self.weight_dtype == torch.float16

    def _autocast(self) -> AbstractContextManager[Any]:
        # Half-precision weights next to fp32 norms and embeddings (open_clip's fp16/bf16) need autocast.
        if self.half:
            return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)
        return nullcontext()

    def _result(self, before: Tensor, after: Tensor, selection: Selection, views: ViewBatch, *,
                seconds: float) -> SampleResult:
        probs_before, probs_after = before.float().softmax(-1), after.float().softmax(-1)
        kept = torch.zeros(len(views.kinds), dtype=torch.bool)
        kept[selection.indices.cpu()] = True
        entropy, cosine = selection.entropy.cpu().tolist(), selection.cosine.cpu().tolist()
        scores = [
            ViewScore(index=i, kind=kind, cosine=None if math.isnan(cosine[i]) else cosine[i], entropy=entropy[i],
                      kept=bool(kept[i]))
            for i, kind in enumerate(views.kinds)
        ]
        return SampleResult(
            pred=int(after.argmax()),
            top5=torch.topk(after, k=min(TOP_K, after.shape[-1])).indices.cpu().tolist(),
            zeroshot_pred=int(before.argmax()),
            entropy_before=float(view_entropy(before[None])[0]),
            entropy_after=float(view_entropy(after[None])[0]),
            confidence_before=float(probs_before.max()),
            confidence_after=float(probs_after.max()),
            n_views=len(views.kinds),
            n_kept=int(selection.indices.numel()),
            seconds=seconds,
            views=scores,
        )


def _with_time(result: SampleResult, *, seconds: float, view_seconds: float) -> SampleResult:
    return dataclasses.replace(result, seconds=seconds, view_seconds=view_seconds)

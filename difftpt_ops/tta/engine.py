"""The engine: the loop around a registered test-time method, one sample at a time.

`prepare_classifier` does the per-(model, class list, spec) work once: it looks the method up in the registry
(tta/methods), tokenises the prompts, cuts them after their end-of-text token and builds the prompt learner.
`Tuner.run` then processes one sample: episodic reset, build the views the method asks for, encode them
(or take their features from the caller, e.g. read from the feature store: `run_features`), call the method,
report. The engine branches on a method's kind only (forward-only, prompt-tuning, online; and an online one's
`tunes_context`, which lends its step the text tower as a differentiable function of a context), never on its
name or spec type.

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
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError, SampleError
from difftpt_ops.core.method_specs import MethodSpec
from difftpt_ops.tta.losses import view_entropy
from difftpt_ops.tta.methods import (
    ONLINE,
    PROMPT_TUNING,
    ContextTuning,
    Method,
    RewardInputs,
    StepInputs,
    TuningPlan,
    ViewPlan,
    ViewScores,
    fixed_text_of,
    method_of,
    split_prompt_sets,
)
from difftpt_ops.tta.optim import optimiser_step
from difftpt_ops.tta.prompts import PromptLearner, class_prompt_texts, initial_context
from difftpt_ops.tta.reward import RewardScorer, reward_scorer
from difftpt_ops.tta.text import ClipLike, TextTower, normalise
from difftpt_ops.tta.views import ViewBatch, build_some_views, build_views

TOP_K = 5
GRAD_SCALER_INIT = 1000.0  # the reference's GradScaler(init_scale=1000)
TEXT_GROUPS_CPU, TEXT_GROUPS_GPU = 4, 1  # see text_groups_for


@dataclass(frozen=True)
class ViewScore:
    """One view's scores at step 0 (initial prompt)."""

    index: int
    kind: str  # original | conventional | generated
    cosine: float | None  # similarity to view 0 where a cosine filter ran, else None
    entropy: float
    kept: bool  # used by the loss (prompt-tuning) or by the prediction (forward-only, online)
    weight: float | None = None  # the method's own per-view weight or score, where it has one


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
    logits: Tensor | None = dataclasses.field(default=None, repr=False, compare=False)  # the prediction's
    views_encoded: int = 0  # of n_views, run through the image encoder for this result
    views_read: int = 0  # of n_views, given as stored features (the feature store)


@dataclass(frozen=True)
class PredictionSummary:
    """What a sample's prediction logits say: the class, the top 5, the entropy and the confidence (max
    probability) of their softmax."""

    pred: int
    top5: list[int]
    entropy: float
    confidence: float


def prediction_summary(logits: Tensor) -> PredictionSummary:
    """The summary of prediction logits (n_classes,), as every result reports it."""
    logits = logits.detach().float()
    return PredictionSummary(pred=int(logits.argmax()),
                             top5=torch.topk(logits, k=min(TOP_K, logits.shape[-1])).indices.cpu().tolist(),
                             entropy=float(view_entropy(logits[None])[0]), confidence=float(logits.softmax(-1).max()))


def text_groups_for(device: torch.device | str) -> int:
    """How many length groups the class prompts form on `device`.

    Fewer groups pad more tokens but launch fewer kernels. A CPU is bound by the tokens: 4 groups. A GPU is
    bound by kernel launches at these sizes: on an H200 (ViT-B/16, 1000 classes, bench/tta_breakdown.py) one
    group cut TPT's tuning phase from 70 to 57 ms and DiffTPT's from 322 to 193 ms per sample.
    """
    return TEXT_GROUPS_GPU if torch.device(device).type == "cuda" else TEXT_GROUPS_CPU


def prepare_classifier(clip: ClipLike, class_names: Sequence[str], spec: MethodSpec, *,
                       coop_state: Mapping[str, Any] | Tensor | None = None, init_seed: int = 0,
                       image_batch: int = 128, max_text_groups: int | None = None, share_text_prefix: bool = True,
                       view_workers: int = 1,
                       descriptions: Mapping[str, Sequence[str]] | None = None,
                       reward: ClipLike | None = None) -> Tuner:
    """Build the tuner for one model, class list and method spec; tokenises and embeds every prompt once.

    `coop_state` is a loaded CoOp checkpoint (models.clip.read_coop_checkpoint) when spec.prompt names one.
    `init_seed` draws a random context when spec.prompt.ctx_init is None (the run's seed). `image_batch`
    bounds how many views go through the image encoder at once; `max_text_groups` how many length groups the
    prompts form (default: `text_groups_for(clip.device)`); `share_text_prefix` whether the [SOS][context] prefix
    all prompts share runs once (fewer tokens) or in every prompt (fewer, larger kernels); `view_workers` how
    many threads build a sample's views (none of these change results beyond float rounding).
    `descriptions` is the class descriptions file's content (class name -> sentences) when the spec names one.
    `reward` is the loaded reward CLIP (models.clip.load_clip of the folder) of a method that names one
    (`Method.reward_model_path`: RLCF); it scores the class prompts' texts and the kept views.

    Raises:
        InputError: empty class list.
        InvalidSpecError: a method that is not registered (noop), a CoOp ctx of the wrong size, a ctx_init
            that does not tokenise to n_ctx tokens, a checkpoint or descriptions named in the spec but not
            passed, a reward model named by the method but not passed.
    """
    method = method_of(spec)
    texts = class_prompt_texts(class_names, spec.prompt)
    if spec.prompt.coop_checkpoint and coop_state is None:
        raise InvalidSpecError("coop_checkpoint", spec.prompt.coop_checkpoint,
                               "is named in the spec but was not loaded; pass coop_state=read_coop_checkpoint(path)")
    tower = TextTower(clip.model, name=clip.name)
    init = initial_context(tower, clip.tokenizer, spec.prompt, coop_state=coop_state, seed=init_seed)
    groups = text_groups_for(clip.device) if max_text_groups is None else max_text_groups
    learner = PromptLearner(tower, clip.tokenizer(texts), init, max_groups=groups, share_prefix=share_text_prefix)
    fixed_text, prompt_sets = split_prompt_sets(fixed_text_of(method, spec, tower, clip.tokenizer, class_names,
                                                              descriptions))
    return Tuner(clip=clip, learner=learner, spec=spec, method=method, image_batch=image_batch,
                 view_workers=view_workers, fixed_text=fixed_text, prompt_sets=prompt_sets,
                 reward=reward_scorer(method, spec, texts, reward))


class Tuner:
    """Runs one method on one sample at a time. Not thread-safe: it owns the prompt's (and an online
    method's) state."""

    def __init__(self, *, clip: ClipLike, learner: PromptLearner, spec: MethodSpec, method: Method,
                 image_batch: int = 128, view_workers: int = 1, fixed_text: Tensor | None = None,
                 prompt_sets: Tensor | None = None, reward: RewardScorer | None = None) -> None:
        self.clip = clip
        self.model = clip.model
        self.learner = learner
        self.spec = spec
        self.method = method
        self.plan: ViewPlan = method.views(spec)
        self.tuning: TuningPlan | None = method.tuning(spec) if method.kind == PROMPT_TUNING else None  # type: ignore[attr-defined]
        self.device = torch.device(clip.device)
        self.image_batch = max(1, image_batch)
        self.view_workers = view_workers
        self.weight_dtype = learner.tower.cast_dtype
        self.half = self.weight_dtype in (torch.float16, torch.bfloat16)
        self.logit_scale = self.model.logit_scale.detach().exp().float()
        self._initial_text: Tensor | None = fixed_text.to(self.device) if fixed_text is not None else None
        # A method's per-class prompt sets (n_classes, n_prompts, d), unaveraged (AWT); None for the others.
        self._prompt_sets: Tensor | None = prompt_sets.to(self.device) if prompt_sets is not None else None
        self.state: Any = None  # an online method's state; None until the first sample (or a restore)
        # An online method that predicts its stream in blocks (OGA's batches): the inputs of the samples whose
        # final prediction waits for the block to close (`close_block`).
        self.block = method.block_size(spec) if method.kind == ONLINE else 1  # type: ignore[attr-defined]
        self._held: list[StepInputs] = []
        # An online stream's length (the dataset version's samples), set by the online runner before the first
        # sample; a method whose schedule needs it (OnZeta) refuses to start without it.
        self.stream_length: int | None = None
        # A method's reward model (RLCF): it encodes the kept views, so `run_features` needs their pixels or the
        # reward model's features of them.
        self.reward = reward

    @property
    def needs_pixels(self) -> bool:
        """Whether `run_features` needs the views' pixels, or a `reward_features` source, too (a reward model
        scores the kept ones)."""
        return self.reward is not None

    @property
    def class_count(self) -> int:
        return self.learner.n_classes

    @property
    def steps(self) -> int:
        return self.tuning.steps if self.tuning is not None else 0

    def augmix_for(self, augmix: bool) -> bool:
        """The AugMix flag the views use: the spec's when it sets one, else the dataset's rule `augmix`."""
        return self.plan.augmix if self.plan.augmix is not None else augmix

    def make_views(self, image: object, *, generated: Sequence[object] = (), seed: int, sample_key: str | int,
                   augmix: bool = False) -> ViewBatch:
        """The sample's views on the CPU (safe to build in a DataLoader worker); see `run` for the arguments."""
        return build_views(image, n_conventional=self.plan.n_conventional,
                           generated=list(generated)[:self.plan.n_generated], seed=seed, sample_key=sample_key,
                           augmix=self.augmix_for(augmix), resolution=self.plan.resolution,
                           workers=self.view_workers, crop_scale=self.plan.crop_scale)

    def make_some_views(self, load_image: Callable[[], object],
                        load_generated: Callable[[Sequence[int]], Sequence[object]], *, positions: Sequence[int],
                        seed: int, sample_key: str | int, augmix: bool = False) -> Tensor:
        """The pixels of the views at `positions` of the layout `make_views` builds (the same rows), loading
        only the images those views need (see `views.build_some_views`)."""
        return build_some_views(load_image, load_generated, n_conventional=self.plan.n_conventional,
                                n_generated=self.plan.n_generated, positions=positions, seed=seed,
                                sample_key=sample_key, augmix=self.augmix_for(augmix),
                                resolution=self.plan.resolution, workers=self.view_workers,
                                crop_scale=self.plan.crop_scale)

    def run(self, image: object, *, generated: Sequence[object] = (), seed: int, sample_key: str | int,
            augmix: bool = False) -> SampleResult:
        """Run the method on one sample and predict it.

        `image` is a PIL image (any mode, converted to RGB) or a (3, H, W) tensor. `generated` are its
        diffusion variations (used by methods whose views include generated ones: the first n_generated,
        fewer if fewer are given; other methods ignore them). `seed` and `sample_key` fix every random
        choice of the views. `augmix` turns AugMix on for the conventional views unless the spec sets
        augmix itself.

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
        """Run the method on already built views (from `make_views`)."""
        start = time.perf_counter()
        raw = self.encode_raw(views.pixels)
        result = dataclasses.replace(self.run_features(raw, views.kinds, pixels=views.pixels),
                                     views_encoded=len(views.kinds))
        return _with_time(result, seconds=time.perf_counter() - start, view_seconds=0.0)

    def run_features(self, raw_features: Tensor, kinds: Sequence[str], *, pixels: Tensor | None = None,
                     reward_features: Callable[[list[int]], Tensor] | None = None) -> SampleResult:
        """Run the method on the image encoder's output for the sample's views (from `encode_raw`, or read
        back from the feature store: the same values, so the same result).

        Only when `needs_pixels` (a reward model scores the kept views), one of: `pixels`, the views themselves
        (`make_views(...).pixels`), which the reward model encodes; or `reward_features`, which maps the kept
        views' positions to the reward model's output for them (`RewardScorer.encode_raw`, or read back from the
        feature store), so that views stored for both models need not be built at all.

        Raises:
            InvalidSpecError: the method scores with a reward model and neither was given.
        """
        start = time.perf_counter()
        features = normalise(raw_features.to(self.device))
        kinds = tuple(kinds)
        if self.needs_pixels and pixels is None and reward_features is None:
            raise InvalidSpecError("reward_model", self.method.reward_model_path(self.spec),
                                   "encodes the kept views: pass run_features(..., pixels=make_views(...).pixels)")
        if reward_features is None and pixels is not None and self.reward is not None:
            reward_features = _encoded_by(self.reward, pixels)
        if self.method.kind == PROMPT_TUNING:
            before, after, scores = self._prompt_tuning(features, kinds, reward_features)
        elif self.method.kind == ONLINE:
            before, after, scores = self._online(features, kinds)
        else:
            before, after, scores = self._forward_only(features, kinds)
        return self._result(before, after, scores, kinds, seconds=time.perf_counter() - start)

    def _inputs(self, features: Tensor, text: Tensor, kinds: tuple[str, ...]) -> StepInputs:
        return StepInputs(image_features=features, text_features=text, logit_scale=self.logit_scale,
                          logits=self._logits(features, text), kinds=kinds, prompt_features=self._prompt_sets)

    def _forward_only(self, features: Tensor, kinds: tuple[str, ...]) -> tuple[Tensor, Tensor, ViewScores]:
        with torch.no_grad():
            inputs = self._inputs(features, self._text_features(grad=False), kinds)
            output = self.method.step(self.spec, inputs)  # type: ignore[attr-defined]
        return inputs.logits[0], output.logits, output.scores

    def _online(self, features: Tensor, kinds: tuple[str, ...]) -> tuple[Tensor, Tensor, ViewScores]:
        tunes = bool(getattr(self.method, "tunes_context", False))
        with torch.no_grad():
            inputs = self._inputs(features, self._text_features(grad=False), kinds)
            if self.state is None:
                self.state = self.method.init_state(  # type: ignore[attr-defined]
                    self.spec, n_classes=self.class_count, dim=int(features.shape[-1]), device=self.device,
                    stream_length=self.stream_length)
            if not tunes:
                output, self.state = self.method.step(self.spec, self.state, inputs)  # type: ignore[attr-defined]
        if tunes:
            # A method tuning prompt contexts (DynaPrompt): its step runs with gradients, through the text tower.
            inputs = dataclasses.replace(inputs, context=self._context_tuning())
            output, self.state = self.method.step(self.spec, self.state, inputs)  # type: ignore[attr-defined]
            inputs = dataclasses.replace(inputs, context=None)
        if self.block > 1:
            self._held.append(inputs)
        return inputs.logits[0], output.logits, output.scores

    def _context_tuning(self) -> ContextTuning:
        """The text encoder as a differentiable function of a context, and an optimiser step with a fresh
        GradScaler on CUDA (per sample, as `_tune`), for an online method that tunes contexts itself."""
        scaler = torch.amp.GradScaler("cuda", init_scale=GRAD_SCALER_INIT) if self._needs_scaler() else None

        def encode(ctx: Tensor) -> Tensor:
            with self._autocast():
                return self.learner.text_features(ctx)

        def minimise(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
            optimiser_step(loss, optimizer, scaler)

        return ContextTuning(initial=self.learner.ctx_init, encode=encode, minimise=minimise)

    def _prompt_tuning(self, features: Tensor, kinds: tuple[str, ...],
                       reward_features: Callable[[list[int]], Tensor] | None = None
                       ) -> tuple[Tensor, Tensor, ViewScores]:
        method, tuning = self.method, self.tuning
        assert tuning is not None
        # 1. Episodic reset: the context goes back to its initial value; the optimiser is created fresh below.
        self.learner.reset()
        # 2. Step 0 with the initial prompt: zero-shot scores and the view selection come for free.
        tuned = tuning.steps > 0
        text = self._text_features(grad=tuned)
        logits = self._logits(features, text)
        before = logits[0].detach()
        with torch.no_grad():
            scores = method.select(self.spec, StepInputs(  # type: ignore[attr-defined]
                image_features=features, text_features=text.detach(), logit_scale=self.logit_scale,
                logits=logits.detach(), kinds=kinds))
        if not tuned:
            return before, before, scores
        # 3. Tune the context on the selected views; the selection is fixed after step 0. A reward model encodes
        #    the selected views once, here (the reference's set_image_features after its selection).
        reward = None
        if self.reward is not None and reward_features is not None:
            reward = self.reward.inputs_from(reward_features(scores.indices.cpu().tolist()))
        self._tune(features, logits, text, scores.indices, reward)
        # 4. Predict with the tuned prompt (view 0 by default).
        n_predict = method.prediction_views(self.spec)  # type: ignore[attr-defined]
        with torch.no_grad():
            inputs = self._inputs(features[:n_predict], self._text_features(grad=False), kinds[:n_predict])
            after = method.predict(self.spec, inputs)  # type: ignore[attr-defined]
        return before, after, scores

    def encode_raw(self, pixels: Tensor) -> Tensor:
        """The image encoder's output (n, embed_dim) for normalised views, as it produced it (its dtype, not
        normalised, on the CPU): what the feature store keeps, so that a read-back run is exact."""
        chunks = []
        with torch.no_grad(), self._autocast():
            for chunk in pixels.split(self.image_batch):
                chunk = chunk.to(self.device, dtype=self.weight_dtype, non_blocking=True)
                chunks.append(self.model.encode_image(chunk))
        return torch.cat(chunks).cpu()

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Normalised fp32 image features (n, embed_dim) of normalised views, without gradients."""
        return normalise(self.encode_raw(pixels).to(self.device))

    def reset_state(self) -> None:
        """Forget an online method's state (the next sample starts a fresh one)."""
        self.state = None
        self._held.clear()

    @property
    def held(self) -> int:
        """How many samples of the open block wait for their final prediction (0 unless `block` > 1)."""
        return len(self._held)

    def close_block(self) -> list[Tensor]:
        """The final prediction logits of the open block's samples, in stream order, each from the state after
        the whole block (the method's `predict`); the block is then empty. The caller closes a block at every
        multiple of `block` stream positions and at the end of its stream."""
        with torch.no_grad():
            final = [self.method.predict(self.spec, self.state, inputs).float()  # type: ignore[attr-defined]
                     for inputs in self._held]
        self._held.clear()
        return final

    def state_dict(self) -> dict[str, Tensor]:
        """An online method's state as flat tensors (empty before the first sample)."""
        return {} if self.state is None else self.method.state_dict(self.state)  # type: ignore[attr-defined]

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore an online method's state saved with `state_dict` (empty: saved before the first sample, e.g.
        after a shard whose samples all failed; the next sample starts a fresh state)."""
        self._held.clear()
        if not tensors:
            self.state = None
            return
        self.state = self.method.load_state_dict(self.spec, tensors, device=self.device)  # type: ignore[attr-defined]

    def _initial_text_features(self) -> Tensor:
        # The initial context's features (or a method's fixed ones) never change: cache them.
        if self._initial_text is None:
            with torch.no_grad(), self._autocast():
                self._initial_text = self.learner.text_features()
        return self._initial_text

    def _text_features(self, *, grad: bool) -> Tensor:
        if not grad:
            if self.steps == 0:
                return self._initial_text_features()
            with torch.no_grad(), self._autocast():
                return self.learner.text_features()
        with self._autocast():
            return self.learner.text_features()

    def _logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        # fp32 outside autocast: n_views x n_classes is small, and the entropies need the precision.
        logits = self.logit_scale * image_features @ text_features.float().t()
        bias = getattr(self.model, "logit_bias", None)
        return logits + bias.float() if bias is not None else logits

    def _tune(self, features: Tensor, logits: Tensor, text: Tensor, indices: Tensor,
              reward: RewardInputs | None = None) -> None:
        tuning = self.tuning
        assert tuning is not None
        optimizer = torch.optim.AdamW([self.learner.ctx], lr=tuning.lr, weight_decay=tuning.weight_decay)
        # A fresh scaler per sample (the reference shares one across samples) keeps samples independent.
        scaler = torch.amp.GradScaler("cuda", init_scale=GRAD_SCALER_INIT) if self._needs_scaler() else None
        kept = features[indices]
        for step in range(tuning.steps):
            if step > 0:
                text = self._text_features(grad=True)
            step_logits = logits[indices] if step == 0 else self._logits(kept, text)
            loss = self.method.tuning_loss(self.spec, step_logits, text, reward)  # type: ignore[attr-defined]
            if not bool(torch.isfinite(loss)):
                raise SampleError(f"non-finite loss ({float(loss.detach())}) at tuning step {step} "
                                  f"of {tuning.steps}")
            optimiser_step(loss, optimizer, scaler)

    def _needs_scaler(self) -> bool:
        return self.device.type == "cuda" and self.weight_dtype == torch.float16

    def _autocast(self) -> AbstractContextManager[Any]:
        # Half-precision weights next to fp32 norms and embeddings (open_clip's fp16/bf16) need autocast.
        if self.half:
            return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)
        return nullcontext()

    def _result(self, before: Tensor, after: Tensor, scores: ViewScores, kinds: Sequence[str], *,
                seconds: float) -> SampleResult:
        before, after = before.detach().float(), after.detach().float()
        initial, final = prediction_summary(before), prediction_summary(after)
        kept = torch.zeros(len(kinds), dtype=torch.bool)
        kept[scores.indices.cpu()] = True
        entropy, cosine = scores.entropy.cpu().tolist(), scores.cosine.cpu().tolist()
        weight = scores.weight.float().cpu().tolist() if scores.weight is not None else [math.nan] * len(kinds)
        views = [
            ViewScore(index=i, kind=kind, cosine=_finite_or_none(cosine[i]), entropy=entropy[i], kept=bool(kept[i]),
                      weight=_finite_or_none(weight[i]))
            for i, kind in enumerate(kinds)
        ]
        return SampleResult(
            pred=final.pred,
            top5=final.top5,
            zeroshot_pred=initial.pred,
            entropy_before=initial.entropy,
            entropy_after=final.entropy,
            confidence_before=initial.confidence,
            confidence_after=final.confidence,
            n_views=len(kinds),
            n_kept=int(scores.indices.numel()),
            seconds=seconds,
            views=views,
            logits=after.cpu(),
        )


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _encoded_by(reward: RewardScorer, pixels: Tensor) -> Callable[[list[int]], Tensor]:
    """A `reward_features` source that encodes the views at the positions asked for from their `pixels`."""
    def encode(positions: list[int]) -> Tensor:
        return reward.encode_raw(pixels[positions])
    return encode


def _with_time(result: SampleResult, *, seconds: float, view_seconds: float) -> SampleResult:
    return dataclasses.replace(result, seconds=seconds, view_seconds=view_seconds)

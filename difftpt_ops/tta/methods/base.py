"""The method registry: what a test-time method is, for the engine, the services and the CLI.

A method is one module in `difftpt_ops/tta/methods/` that defines a frozen spec class (the reference
defaults; `__post_init__` raises InvalidSpecError naming the bad field) and one `Method` subclass, and
registers it with `@register`. Every module of this package is imported by the package itself, so a new
method needs no edit anywhere else: `--method` choices, `--set` fields, `methods list`, `submit tune`
and the engine all read the registry. The engine never branches on a method's name or spec type, only on
its `kind`:

- `forward-only` (`ForwardOnlyMethod`): one pure-torch `step` over the sample's view features and the
  (fixed) text features gives the prediction. Zero-shot CLIP, ZERO, MTA, prompt ensembles.
- `prompt-tuning` (`PromptTuningMethod`): `select` picks the views at step 0 with the initial prompt,
  then the engine tunes the prompt context with the method's `loss` for `tuning(spec).steps` AdamW steps
  (the text speed-ups, the optimiser, the GradScaler and the episodic reset stay in the engine) and
  predicts view 0 with the tuned prompt (`predict`, which may read more views: `prediction_views`). TPT,
  DiffTPT, C-TPT, R-TPT, RLCF. A method whose loss scores with a second, frozen CLIP (`needs_reward_model`,
  `reward_model_path`: RLCF's reward model) gets that model's features of the kept views and of the class
  prompts in `tuning_loss` (`RewardInputs`, computed once after the selection from the views' pixels).
- `online` (`OnlineMethod`): `step(spec, state, inputs) -> (StepOutput, state)`; the state is carried
  across samples in a fixed order and checkpointed through `state_dict` / `load_state_dict` (a flat
  dict of tensors, safetensors-ready). TDA, DMN-ZS, DPE, BoostAdapter, OnZeta, ECALP, OGA, DynaPrompt. One
  that tunes prompt contexts itself (`tunes_context`: DynaPrompt's buffer of prompts) gets the engine's text
  encoder as a differentiable function of a context and its optimiser step in `StepInputs.context`
  (`ContextTuning`); its step runs with gradients enabled, the image features staying fixed.

What every step sees (`StepInputs`): the normalised fp32 image features of the sample's views, (n_views, d),
row 0 the original view; the normalised text features, (n_classes, d); the logit scale (exp applied); the
logits the engine computed from them (logit_scale * image @ text.T, plus the model's logit bias if it has
one); each row's kind (original / conventional / generated); and, for a method whose fixed text
features are per-class prompt sets (below), those sets unaveraged. A step returns `StepOutput`: the
prediction logits (n_classes,) and the per-view `ViewScores` (kept views, entropy, cosine, a generic
per-view weight), which the services store as view_scores rows.

Prompt sets: a forward-only or online method whose `fixed_text_features` returns a 3-D tensor
(n_classes, n_prompts, d) of normalised features (several prompts per class, e.g. a template and its class
descriptions, kept apart: AWT) gets them in `StepInputs.prompt_features`; `text_features` (and the logits
the engine computes, the zero-shot "before") are then their mean per class, normalised again. Every other
method returns (n_classes, d) or None and sees `prompt_features=None`. A method that cannot run without a
class descriptions file sets `requires_descriptions` and checks the file in `check_descriptions`, which
submit calls (also with None when the spec names none), so the refusal comes before any run is made.

Which views a method needs comes from `views(spec)` (`ViewPlan`: number of conventional views, number of
generated views, the AugMix rule, the resolution). View 0 is always the original. The engine builds the
views, or reads their features from the feature store, and never encodes a view twice.

`naive_step` (optional) is the straightforward formulation of `step` / `select` (loops, no shortcuts). The
equivalence tests and the GPU check run the engine against `tta.naive.NaiveTuner`, which calls
`naive_step` where a method has one (`has_naive`), else `step` / `select`.

Example, a forward-only method in `difftpt_ops/tta/methods/meanview.py`::

    from dataclasses import dataclass
    from typing import ClassVar

    from difftpt_ops.core.specs import MethodSpec, require
    from difftpt_ops.tta.methods.base import (FORWARD_ONLY, ForwardOnlyMethod, StepInputs, StepOutput,
                                              ViewPlan, ViewScores, register)


    @dataclass(frozen=True)
    class MeanViewSpec(MethodSpec):
        method: ClassVar[str] = "meanview"
        n_views: int = 8

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.n_views >= 1, "n_views", self.n_views, "must be >= 1")


    @register
    class MeanView(ForwardOnlyMethod):
        name = "meanview"
        spec_class = MeanViewSpec
        summary = "mean of the views' logits"
        paper = ""
        reference = ""

        def views(self, spec: MeanViewSpec) -> ViewPlan:
            return ViewPlan(n_conventional=spec.n_views - 1, resolution=spec.resolution)

        def step(self, spec: MeanViewSpec, inputs: StepInputs) -> StepOutput:
            scores = ViewScores.all_kept(inputs.logits)
            return StepOutput(logits=inputs.logits.mean(0), scores=scores)

Then `difftpt-ops submit tune --method meanview --set n_views=16` runs it, and `methods list` shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import MethodSpec, register_method_spec, unregister_method_spec
from difftpt_ops.tta.losses import marginal_entropy, view_entropy
from difftpt_ops.tta.text import TextTower, normalise
from difftpt_ops.tta.views import CROP_SCALE

FORWARD_ONLY = "forward-only"
PROMPT_TUNING = "prompt-tuning"
ONLINE = "online"
KINDS = (FORWARD_ONLY, PROMPT_TUNING, ONLINE)

# Text-feature options of forward-only methods (`Method.text_option`).
SINGLE_TEMPLATE = "single"  # the spec's prompt (context words + template), as zero-shot CLIP in TPT's code
ENSEMBLE = "ensemble"  # CLIP's prompt ensemble: normalised features averaged over `text_templates`


@dataclass(frozen=True)
class ViewPlan:
    """The views a method needs for one sample: [original, conventional..., generated...]."""

    n_conventional: int = 0  # random resized crops (+ flip; + AugMix when on), seeded per view
    n_generated: int = 0  # diffusion variations of the sample (the first n of its generation config)
    augmix: bool | None = None  # None: the dataset's rule (on for the cross-domain sets), as the reference
    resolution: int = 224
    crop_scale: tuple[float, float] = CROP_SCALE  # RandomResizedCrop's area range for the conventional views

    @property
    def n_views(self) -> int:
        """Views when every generated image exists."""
        return 1 + self.n_conventional + self.n_generated


@dataclass(frozen=True)
class TuningPlan:
    """How the engine tunes the prompt context of a prompt-tuning method (AdamW, episodic)."""

    steps: int
    lr: float
    weight_decay: float = 0.01


@dataclass(frozen=True)
class StepInputs:
    """One sample's features as every method step sees them."""

    image_features: Tensor  # (n_views, d) normalised fp32; row 0 is the original view
    text_features: Tensor  # (n_classes, d) normalised fp32 (carries gradients while tuning)
    logit_scale: Tensor  # scalar fp32, exp() already applied
    logits: Tensor  # (n_views, n_classes) fp32: logit_scale * image @ text.T (+ logit bias)
    kinds: tuple[str, ...]  # per row: original | conventional | generated
    # (n_classes, n_prompts, d) normalised fp32: a method's per-class prompt sets, unaveraged, when its fixed
    # text features are such sets (text_features is then their normalised mean); None otherwise.
    prompt_features: Tensor | None = None
    # An online method that tunes prompt contexts itself (`OnlineMethod.tunes_context`: DynaPrompt): the engine's
    # text encoder as a differentiable function of a context, and its optimiser step; None for every other method.
    context: ContextTuning | None = None

    @property
    def n_views(self) -> int:
        return int(self.image_features.shape[0])


@dataclass(frozen=True)
class ContextTuning:
    """What the engine lends an online step that tunes prompt contexts with gradients (`tunes_context`).

    `encode(ctx)` maps a context (n_ctx, width), fp32 on the engine's device, to the normalised fp32 class text
    features (n_classes, d) of the prompts [SOS][ctx][class name][tail][EOT], under the engine's autocast and
    differentiable in `ctx` (the frozen text tower with the engine's exact speed-ups). `initial` is the spec's
    initial context (n_ctx, width) fp32 ("a photo of a", a CoOp or a random one): `encode(initial)` gives
    `StepInputs.text_features`. `minimise(loss, optimizer)` zeroes the gradients, back-propagates `loss` and
    steps `optimizer`, with a GradScaler(init_scale=1000) on CUDA with half-precision weights (one per sample,
    as the engine's prompt tuning). The image features stay fixed: only the text side is tuned.
    """

    initial: Tensor
    encode: Callable[[Tensor], Tensor]
    minimise: Callable[[Tensor, torch.optim.Optimizer], None]


@dataclass(frozen=True)
class ViewScores:
    """Per-view scores of one sample, (n_views,) each, and the views a method kept.

    `indices` are the kept views in the method's order (a prompt-tuning loss is taken over them in that
    order); `cosine` and `weight` are NaN where a method computes none.
    """

    indices: Tensor  # (k,) long
    entropy: Tensor  # (n,) fp32, of each view's softmax
    cosine: Tensor  # (n,) fp32, similarity to view 0 where a cosine filter ran
    weight: Tensor | None = None  # (n,) fp32, a method's own per-view weight or score (MTA inlierness, ...)

    @staticmethod
    def of(logits: Tensor, indices: Tensor, *, cosine: Tensor | None = None,
           weight: Tensor | None = None) -> ViewScores:
        """Scores with the entropy of `logits` (n_views, n_classes) and the given kept `indices`."""
        entropy = view_entropy(logits)
        nan = torch.full_like(entropy, float("nan"))
        return ViewScores(indices=indices.to(logits.device, torch.long), entropy=entropy,
                          cosine=nan if cosine is None else cosine.float(), weight=weight)

    @staticmethod
    def all_kept(logits: Tensor) -> ViewScores:
        return ViewScores.of(logits, torch.arange(logits.shape[0], device=logits.device))

    @staticmethod
    def original_only(logits: Tensor) -> ViewScores:
        return ViewScores.of(logits, torch.zeros(1, dtype=torch.long, device=logits.device))


@dataclass(frozen=True)
class RewardInputs:
    """What a second, frozen CLIP (a reward model, `Method.reward_model_path`) says of one sample, computed once
    after the view selection: its features of the kept views and of the class prompts. Its own embedding space:
    never compared with the policy's features."""

    image_features: Tensor  # (k, d_reward) normalised fp32, the kept views in `ViewScores.indices` order
    text_features: Tensor  # (n_classes, d_reward) normalised fp32, the class prompts as texts


@dataclass(frozen=True)
class StepOutput:
    """What a step returns: the prediction logits of the sample and its per-view scores."""

    logits: Tensor  # (n_classes,)
    scores: ViewScores


class Method:
    """Base of every method; subclass one of ForwardOnlyMethod, PromptTuningMethod, OnlineMethod.

    Instances are stateless (all per-sample state lives in arguments or, for online methods, in the
    explicit state), so one registered instance serves every run.
    """

    name: ClassVar[str] = ""
    spec_class: ClassVar[type[MethodSpec]] = MethodSpec
    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `methods list` and --help
    paper: ClassVar[str] = ""  # citation or URL
    reference: ClassVar[str] = ""  # owner/name of the reference repository
    has_naive: ClassVar[bool] = False  # True when naive_step is the method's own straightforward formulation
    # True when the method's loss scores with a second, frozen CLIP (RLCF): prepare_classifier then needs `reward`.
    needs_reward_model: ClassVar[bool] = False
    # True: the method cannot run without a class descriptions file (AWT); the demo and the benchmark leave it out.
    requires_descriptions: ClassVar[bool] = False

    def views(self, spec: Any) -> ViewPlan:
        """The views this spec needs; default: the original view only."""
        return ViewPlan(resolution=spec.resolution)

    def draws_at_random(self, spec: Any) -> bool:
        """Whether the run's seed can change its predictions: random views (crops, AugMix), or a random initial
        prompt context. False: every seed gives the same run (an online method's randomness is its order)."""
        prompt = getattr(spec, "prompt", None)
        random_context = prompt is not None and prompt.ctx_init is None and prompt.coop_checkpoint is None
        return self.views(spec).n_conventional > 0 or random_context

    def reward_model_path(self, spec: Any) -> str | None:
        """The local model folder of a second, frozen CLIP whose scores the method's loss needs (RLCF's reward
        model), or None (every method but RLCF). The services load it next to the run's CLIP and pass it to
        `prepare_classifier(reward=...)`; the engine hands its features to `tuning_loss`."""
        return None

    def check_descriptions(self, spec: Any, descriptions: Mapping[str, Sequence[str]] | None,
                           class_names: Sequence[str]) -> None:
        """Refuse, at submit, a descriptions file (or its absence: None) this method cannot run with; the content
        is the file's class -> sentences mapping. Default: anything goes."""

    def check_classes(self, spec: Any, n_classes: int) -> None:
        """Refuse, at submit, a spec this method cannot run on a dataset of `n_classes` classes (InvalidSpecError
        naming the field, as `require` does). Default: anything goes."""

    def naive_step(self, spec: Any, inputs: StepInputs) -> StepOutput:
        """The straightforward formulation (equivalence oracle); only called when `has_naive`."""
        raise NotImplementedError(f"{self.name} has no naive formulation")

    def defaults(self) -> dict[str, Any]:
        """Every `--set` field of the spec with its reference default (for `methods list`), including the
        ones the stored spec leaves out at their default (`prompts`, `descriptions`, `features`)."""
        return self.spec_class().all_fields()

    def describe(self) -> dict[str, Any]:
        """Name, kind, summary, paper, reference and defaults: one `methods list --json` entry."""
        return {"name": self.name, "kind": self.kind, "summary": self.summary, "paper": self.paper,
                "reference": self.reference, "defaults": self.defaults()}


class ForwardOnlyMethod(Method):
    """No gradient: the prediction is a function of the view features and fixed text features."""

    kind: ClassVar[str] = FORWARD_ONLY
    # CLIP-style prompt templates for the ensemble option ("{}" is the class name), set by a method offering it.
    text_templates: ClassVar[tuple[str, ...]] = ()

    def text_option(self, spec: Any) -> str:
        """SINGLE_TEMPLATE (the spec's prompt) or ENSEMBLE (average over `text_templates`); default: the
        spec's `prompts` field when it has one."""
        return str(getattr(spec, "prompts", SINGLE_TEMPLATE))

    def fixed_text_features(self, spec: Any, tower: TextTower, tokenizer: Any,
                            class_names: Sequence[str]) -> Tensor | None:
        """Normalised text features (n_classes, d) replacing the prompt learner's, computed once per run;
        None: the spec's prompt through the prompt learner (its initial context). Default: None for
        SINGLE_TEMPLATE; CLIP's ensemble over `text_templates` for ENSEMBLE (override for other options)."""
        if self.text_option(spec) == SINGLE_TEMPLATE:
            return None
        if not self.text_templates:
            raise InvalidSpecError("prompts", self.text_option(spec), f"{self.name} has no prompt templates")
        return template_ensemble(tower, tokenizer, class_names, self.text_templates)

    def step(self, spec: Any, inputs: StepInputs) -> StepOutput:
        raise NotImplementedError


class PromptTuningMethod(Method):
    """Tunes the prompt context per sample; the engine owns the loop, the method the selection and loss."""

    kind: ClassVar[str] = PROMPT_TUNING

    def tuning(self, spec: Any) -> TuningPlan:
        """Steps, learning rate and weight decay; default: the spec's `steps`, `lr`, `weight_decay`."""
        return TuningPlan(steps=int(spec.steps), lr=float(spec.lr), weight_decay=float(spec.weight_decay))

    def select(self, spec: Any, inputs: StepInputs) -> ViewScores:
        """The views the loss uses, chosen once at step 0 with the initial prompt."""
        raise NotImplementedError

    def loss(self, spec: Any, logits: Tensor, text_features: Tensor) -> Tensor:
        """The objective over the selected views' logits (k, n_classes) and the current text features;
        default: TPT's entropy of the mean probability."""
        return marginal_entropy(logits)

    def tuning_loss(self, spec: Any, logits: Tensor, text_features: Tensor, reward: RewardInputs | None) -> Tensor:
        """What the engine minimises at each tuning step: `loss`, unless the method scores with a reward model
        (`reward` holds its features of the kept views, in the order of `logits`' rows; None without one)."""
        return self.loss(spec, logits, text_features)

    def predict(self, spec: Any, inputs: StepInputs) -> Tensor:
        """Prediction logits (n_classes,) from the tuned prompt; `inputs` hold view 0 only by default."""
        return inputs.logits[0]

    def prediction_views(self, spec: Any) -> int:
        """How many leading views `predict` needs (1: the original view)."""
        return 1


class OnlineMethod(Method):
    """Carries a state across samples in a fixed order; the engine stores and restores it, opaque."""

    kind: ClassVar[str] = ONLINE
    # True: `step` tunes prompt contexts with gradients (DynaPrompt): the engine calls it with gradients enabled and
    # `inputs.context` set (ContextTuning); the other online steps run under no_grad with `context` None.
    tunes_context: ClassVar[bool] = False

    def init_state(self, spec: Any, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> Any:
        """The state before the first sample. `stream_length`: the number of samples of the whole stream
        (the dataset version's), for a method whose schedule depends on it (OnZeta); None where unknown."""
        raise NotImplementedError

    def step(self, spec: Any, state: Any, inputs: StepInputs) -> tuple[StepOutput, Any]:
        raise NotImplementedError

    def block_size(self, spec: Any) -> int:
        """How many consecutive samples of the stream are predicted together, each with the state after all of
        them (a reference that feeds its stream in batches: OGA's `runner.py`). Blocks start at the stream's
        first sample; the last one ends with the run's stream. 1 (the default): each sample is predicted by its
        own step, as it arrives. Above 1 the step's prediction is provisional and `predict` gives the final one
        when the block closes (the runner does it; `Tuner.close_block`)."""
        return 1

    def predict(self, spec: Any, state: Any, inputs: StepInputs) -> Tensor:
        """A sample's prediction logits (n_classes,) from the state as it is now, without updating it; called
        for every sample of a block when it closes (only for a `block_size` above 1)."""
        raise NotImplementedError(f"{self.name} predicts each sample in its step")

    def state_dict(self, state: Any) -> dict[str, Tensor]:
        """A flat name -> tensor dict (safetensors-ready) from which `load_state_dict` rebuilds `state`."""
        raise NotImplementedError

    def load_state_dict(self, spec: Any, tensors: Mapping[str, Tensor], *, device: torch.device) -> Any:
        raise NotImplementedError


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of `cls` under `cls.name` (its spec class too).

    Raises:
        ValueError: no name, an unknown kind, a spec class whose `method` differs from the name, or the
            name already taken by another class (re-registering the same class is a no-op).
    """
    if not cls.name or cls.kind not in KINDS:
        raise ValueError(f"method {cls.__name__} needs a name and a kind in {KINDS}")
    if cls.spec_class.method != cls.name:
        raise ValueError(f"{cls.__name__}.spec_class.method is {cls.spec_class.method!r}, not {cls.name!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and type(existing).__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is already registered by {type(existing).__name__}")
    register_method_spec(cls.spec_class)
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget a method (tests registering throw-away methods clean up with it)."""
    _REGISTRY.pop(name, None)
    unregister_method_spec(name)


def get_method(name: str) -> Method:
    """The registered method called `name`.

    Raises:
        InvalidSpecError: no such method.
    """
    method = _REGISTRY.get(name)
    if method is None:
        raise InvalidSpecError("--method", name, f"unknown method; choose one of {', '.join(method_names())}")
    return method


def find_method(name: str) -> Method | None:
    """The registered method called `name`, or None (e.g. `noop`, which is bookkeeping, not a method)."""
    return _REGISTRY.get(name)


def method_of(spec: MethodSpec) -> Method:
    """The registered method that runs `spec`."""
    return get_method(spec.method)


def resolve_for_dataset(spec: MethodSpec, dataset_format: str) -> MethodSpec:
    """The spec with its method's dataset-dependent defaults filled in (TDA's per-dataset config, C-TPT's lambda);
    unchanged for a method without any, or a spec no registered method runs (noop)."""
    if spec.method not in _REGISTRY:
        return spec
    resolver = getattr(method_of(spec), "resolve_for_dataset", None)
    return resolver(spec, dataset_format) if resolver is not None else spec


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def registered() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def fixed_text_of(method: Method, spec: Any, tower: TextTower, tokenizer: Any, class_names: Sequence[str],
                  descriptions: Mapping[str, Sequence[str]] | None = None) -> Tensor | None:
    """The fixed class text features a method classifies with (prompt sets, descriptions), or None: the prompt
    learner's; (n_classes, d), or (n_classes, n_prompts, d) per-class prompt sets (see `split_prompt_sets`).
    `descriptions` is the content of the file the spec's `descriptions` names (None when it names
    none); the engine and the naive formulation both build their features here.

    Raises:
        InvalidSpecError: the spec names descriptions that were not passed, or a method that cannot use them.
    """
    wanted = getattr(spec, "descriptions", None)
    if wanted is not None and descriptions is None:
        raise InvalidSpecError("descriptions", wanted, "are named in the spec but were not loaded; pass "
                                                       "descriptions=the file's class -> sentences mapping")
    if method.kind not in (FORWARD_ONLY, ONLINE) or not hasattr(method, "fixed_text_features"):
        return None
    if wanted is None:
        return method.fixed_text_features(spec, tower, tokenizer, class_names)
    return method.fixed_text_features(spec, tower, tokenizer, class_names, descriptions=descriptions)


def split_prompt_sets(fixed: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(class text features (n_classes, d) or None, per-class prompt sets or None) of what `fixed_text_of`
    returned: a 3-D result is prompt sets, whose class features are their normalised mean."""
    if fixed is None or fixed.ndim == 2:
        return fixed, None
    return normalise(fixed.mean(dim=1)), fixed


@torch.no_grad()
def template_ensemble(tower: TextTower, tokenizer: Any, class_names: Sequence[str],
                      templates: Sequence[str]) -> Tensor:
    """CLIP's prompt ensemble: per template, normalised class features; their mean, normalised again."""
    names = [name.replace("_", " ") for name in class_names]
    per_template = []
    for template in templates:
        tokens = tokenizer([template.format(name) for name in names]).to(tower.token_embedding.weight.device)
        pool = tower.pool_index(tokens)
        length = int(pool.max()) + 1 if tower.causal else tokens.shape[1]  # causal: exact (see tta/text.py)
        per_template.append(normalise(tower.encode(tower.embed(tokens[:, :length]), pool).float()))
    return normalise(torch.stack(per_template).mean(dim=0))


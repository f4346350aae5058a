"""DPE (Zhang et al., NeurIPS 2024): Dual Prototype Evolving, textual and visual class prototypes that evolve
along the test stream, with residuals tuned on each test sample.

Pure torch, no I/O. The state (`init_state`) holds the evolving textual prototypes, the number of times they
evolved and a positive cache of confident features per class; `step` advances it by one test sample.
`state_dict` / `load_state_dict` turn it into a compact dict of tensors for a safetensors checkpoint and
back. The formulation follows the reference code (zhangce01/DPE-CLIP, main_dpe.py and utils.py):

1. Text prototypes W = the evolving prototypes G, each class normalised (G starts as the classifier's text
   features). CLIP logits `scale * f @ W^T` for every view; with one view, its feature, logits and softmax
   entropy are the sample's; with several, the 10% lowest-entropy views are kept and the sample's feature is
   the mean of their features (not re-normalised), its logits the mean of their logits, its entropy the
   entropy of their mean probability (TDA's summary).
2. The pseudo-label (argmax of those logits) files (feature, entropy / log2(n_classes)) into the positive
   cache of that class: appended while the class holds fewer than `shot_capacity` entries, otherwise
   replacing the highest-entropy entry when the new one is lower (TDA's positive cache). The reference
   divides a natural-log entropy by log2, kept as is.
3. A visual prototype per cached class: the mean of its cached features. Two residuals start at zero: one on
   every text prototype, one on every visual prototype. The loss is the entropy of softmax(final logits),
   where final = scale * f @ normalise(G + R_text)^T + alpha * exp(-(beta - beta * f @ normalise(P + R_vis)^T))
   @ one_hot(cached classes), plus `align` times the InfoNCE loss (temperature 0.01) between each cached
   class's visual prototype and its text prototype, the other cached classes being the negatives. One AdamW
   step (eps 1e-3, weight decay 0.1; the learning rates `lr_text` and `lr_image`) updates both residuals.
   From zero that first step is R = -lr * g / (|g| + eps) in exact arithmetic (`residual_dtype="fp32"`).
   The reference's residuals are fp16 parameters, so torch's AdamW computes the step in fp16, op by op, and
   its second moment 0.001 * g^2 underflows to zero for |g| below about 5.5e-3: the step there is
   -lr * g / eps, up to about 6.5 times the exact one. `residual_dtype="fp16"` (the default) rounds each of
   the optimiser's ops to fp16 as torch's CUDA kernels do (`adamw_first_step`; tested bit for bit against
   torch's AdamW on fp16 parameters on the CPU, with the CPU kernels' order; the GPU tier checks the CUDA
   order on CUDA).
4. The prediction: the same final logits with the updated residuals for the original view's feature (for
   ImageNet-A the reference instead selects the lowest-entropy views again with the updated text prototypes
   and predicts from their mean feature and mean logits: `predict_from_kept`).
5. Evolution: when the entropy of the prediction's softmax divided by log2(n_classes) is below
   `evolve_threshold` (0.1), G becomes the running mean of itself and the updated text prototypes:
   with k the number of evolutions so far including this one, G = G * k / (k + 1) + W' / (k + 1). G is not
   re-normalised (the reference leaves that line commented out); step 1 normalises each use.

The residuals are per sample and never kept; the visual cache evolves by its entries, the text prototypes by
the running mean. Apart from the optimiser step, the reference runs in half precision on a GPU (fp16 weights
under autocast); this runs in fp32, which changes results only at the level of rounding. The reference
multiplies by 100, OpenAI CLIP's logit scale; this uses the model's own. `step` takes its gradient with
`torch.enable_grad()`, so it runs under `torch.no_grad()` (as the engine calls it), not under
`torch.inference_mode()`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from difftpt_ops.core.method_specs import MethodSpec
from difftpt_ops.core.specs import require
from difftpt_ops.tta.caches import file_entry, summarise_views
from difftpt_ops.tta.losses import view_entropy
from difftpt_ops.tta.methods._online_specs import (
    check_non_negative,
    check_stream_settings,
    or_default,
    original_plus_crops,
)
from difftpt_ops.tta.methods.base import OnlineMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import PromptSetOption

NAME = "dpe"
PAPER = ("Zhang et al., Dual Prototype Evolving for Test-Time Generalization of Vision-Language Models, "
         "NeurIPS 2024")
REFERENCE = "https://github.com/zhangce01/DPE-CLIP"
ADAM_EPS = 1e-3  # the reference's AdamW eps for both residuals
ADAM_BETAS = (0.9, 0.999)  # torch's defaults, which the reference keeps
ADAM_WEIGHT_DECAY = 0.1  # no effect on a first step from zero
INFO_NCE_TEMPERATURE = 0.01
RESIDUAL_DTYPES = ("fp16", "fp32")


@dataclass(frozen=True)
class DPEParams:
    """The numbers DPE's step needs (the reference's configs/imagenet.yaml by default)."""

    shot_capacity: int = 3
    alpha: float = 6.0
    beta: float = 5.0
    lr_text: float = 0.0006
    lr_image: float = 0.0006
    align: float = 0.5
    selection_p: float = 0.1  # share of the views kept when a sample has several
    evolve_threshold: float = 0.1
    predict_from_kept: bool = False  # ImageNet-A in the reference: predict from the kept views, not view 0
    residual_dtype: str = "fp16"  # the precision of the optimiser's step: the reference's fp16, or exact fp32
    kernels: str = "cuda"  # whose fp16 arithmetic the step emulates: the reference's GPU, or "cpu" (for tests)


@dataclass(frozen=True)
class StepResult:
    """What one sample gets: the adapted logits and what they were adapted from."""

    logits: Tensor  # (n_classes,) final logits with the tuned residuals
    clip_logits: Tensor  # (n_classes,) the sample's logits with the evolving text prototypes, before tuning
    entropy: float  # of the sample's summary, divided by log2(n_classes) (the cache ranking key)
    evolved: bool  # whether this sample moved the text prototypes
    kept: Tensor  # (k,) indices of the views the sample's summary used
    view_logits: Tensor  # (n_views, n_classes) the views' logits with the evolving text prototypes


def init_state(n_classes: int, dim: int, params: DPEParams, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Empty cache, no text prototypes yet (the first step copies the classifier's), no evolution. `dtype`
    is the computation's (fp32; fp64 for the equivalence tests)."""
    return {
        "text": torch.zeros(0, dim, device=device, dtype=dtype),
        "evolutions": torch.zeros((), dtype=torch.int64, device=device),
        "pos_keys": torch.zeros(n_classes, params.shot_capacity, dim, device=device, dtype=dtype),
        "pos_entropy": torch.full((n_classes, params.shot_capacity), math.inf, device=device, dtype=dtype),
        "pos_count": torch.zeros(n_classes, dtype=torch.int64, device=device),
    }


def visual_prototypes(state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The cached classes in ascending order and the mean of each one's cached features, (k,) and (k, dim)."""
    count = state["pos_count"]
    classes = torch.nonzero(count > 0).flatten()
    # Empty slots are zero (they are filled in order and only replaced), so a sum over all slots is the sum of
    # the filled ones.
    sums = state["pos_keys"][classes].sum(1)
    return classes, sums / count[classes].unsqueeze(1).to(sums.dtype)


def final_logits(feature: Tensor, clip_logits: Tensor, keys: Tensor, classes: Tensor, *, alpha: float,
                 beta: float) -> Tensor:
    """CLIP logits plus the positive cache's: alpha * exp(-(beta - beta * f.k)) on each cached class."""
    affinity = (-(beta - beta * (keys @ feature))).exp()
    return clip_logits.index_add(0, classes, alpha * affinity)


def adamw_first_step(grad: Tensor, lr: float, residual_dtype: str, *, kernels: str = "cuda") -> Tensor:
    """The value of a zero parameter after torch's AdamW takes its first step with gradient `grad` (eps 1e-3).

    "fp32": the exact step, -lr * g / (|g| + eps) (the bias corrections cancel the moments' (1 - beta)
    factors; weight decay scales zero). "fp16": a parameter of that dtype, as the reference's residuals are:
    torch computes each op in fp32 and rounds its result to fp16, so the second moment 0.001 * g^2 underflows
    for small gradients and their step becomes -lr * g / eps. Within an op the order of the fp32 products
    depends on the kernels: `kernels="cuda"` (the default: the reference's GPU and its foreach AdamW) computes
    addcmul and addcdiv as value * (a * b) and value * (a / b), `"cpu"` as (value * a) * b and (value * a) / b;
    they differ by one fp16 unit on a few elements in 10,000. Returned in `grad`'s dtype.
    """
    if residual_dtype == "fp32":
        return -lr * grad / (grad.abs() + ADAM_EPS)

    def fp16(values: Tensor) -> Tensor:  # an fp16 op's result: computed in fp32, rounded once
        return values.to(torch.float16).float()

    beta1, beta2 = ADAM_BETAS
    g = fp16(grad)  # autograd casts the gradient to the parameter's dtype
    exp_avg = fp16((1 - beta1) * g)  # exp_avg.lerp_(grad, 1 - beta1) from zero
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2) from zero
    exp_avg_sq = fp16((1 - beta2) * (g * g) if kernels == "cuda" else (1 - beta2) * g * g)
    denom = fp16(fp16(fp16(exp_avg_sq.sqrt()) / math.sqrt(1 - beta2)) + ADAM_EPS)  # (sqrt / bc2_sqrt).add_(eps)
    step_size = -(lr / (1 - beta1))  # param.addcdiv_(exp_avg, denom, value=-step_size)
    step = fp16(step_size * (exp_avg / denom) if kernels == "cuda" else step_size * exp_avg / denom)
    return step.to(grad.dtype)


def _tuned_residuals(text: Tensor, feature: Tensor, prototypes: Tensor, classes: Tensor, *, scale: float,
                     params: DPEParams) -> tuple[Tensor, Tensor]:
    """The text and visual residuals after the reference's single AdamW step from zero."""
    with torch.enable_grad():
        text_residual = torch.zeros_like(text, requires_grad=True)
        visual_residual = torch.zeros_like(prototypes, requires_grad=True)
        prototypes_text = F.normalize(text + text_residual, dim=-1)
        keys = F.normalize(prototypes + visual_residual, dim=-1)
        logits = final_logits(feature, scale * (prototypes_text @ feature), keys, classes, alpha=params.alpha,
                              beta=params.beta)
        # InfoNCE between the cached classes' visual and text prototypes (both unit rows already).
        similarity = keys @ prototypes_text[classes].t() / INFO_NCE_TEMPERATURE
        alignment = F.cross_entropy(similarity, torch.arange(len(classes), device=similarity.device))
        loss = view_entropy(logits) + params.align * alignment
        grad_text, grad_visual = torch.autograd.grad(loss, [text_residual, visual_residual])
    return (adamw_first_step(grad_text, params.lr_text, params.residual_dtype, kernels=params.kernels),
            adamw_first_step(grad_visual, params.lr_image, params.residual_dtype, kernels=params.kernels))


def step(state: dict[str, Tensor], features: Tensor, text: Tensor, *, scale: float,
         params: DPEParams) -> tuple[StepResult, dict[str, Tensor]]:
    """Adapt to one sample and predict it: `features` are its views' normalised features (view 0 first),
    `text` the classifier's normalised class text features (n_classes, dim) and `scale` CLIP's logit scale.
    The state is updated in place and returned. Computes in the state's dtype (fp32 unless made otherwise).
    """
    features = features.to(state["pos_keys"].dtype)
    if state["text"].numel() == 0:
        state["text"] = text.to(state["pos_keys"].dtype).clone()
    prototypes_text = state["text"]
    n_classes = prototypes_text.shape[0]
    logits = scale * features @ F.normalize(prototypes_text, dim=-1).t()
    feature, clip_logits, entropy, _, kept = summarise_views(features, logits, params.selection_p)
    normalised_entropy = entropy / math.log2(n_classes)
    file_entry(state, "pos", int(clip_logits.argmax()), feature, normalised_entropy, None)
    classes, prototypes = visual_prototypes(state)
    text_residual, visual_residual = _tuned_residuals(prototypes_text, feature, prototypes, classes, scale=scale,
                                                      params=params)
    tuned_text = F.normalize(prototypes_text + text_residual, dim=-1)
    keys = F.normalize(prototypes + visual_residual, dim=-1)
    if params.predict_from_kept:
        query, query_logits, _, _, _ = summarise_views(features, scale * features @ tuned_text.t(), params.selection_p)
    else:
        query = features[0]
        query_logits = scale * (tuned_text @ query)
    prediction = final_logits(query, query_logits, keys, classes, alpha=params.alpha, beta=params.beta)
    evolved = float(view_entropy(prediction)) / math.log2(n_classes) < params.evolve_threshold
    if evolved:
        k = int(state["evolutions"]) + 1
        state["text"] = prototypes_text * (k / (k + 1)) + tuned_text * (1 / (k + 1))
        state["evolutions"] = state["evolutions"] + 1
    return StepResult(prediction, clip_logits, normalised_entropy, evolved, kept, logits), state


def state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A compact CPU copy for a checkpoint: the text prototypes and the filled cache slots."""
    filled = torch.arange(state["pos_keys"].shape[1], device=state["pos_count"].device).unsqueeze(0) \
        < state["pos_count"].unsqueeze(1)
    return {"text": state["text"].cpu().clone(), "evolutions": state["evolutions"].cpu().clone(),
            "pos_count": state["pos_count"].cpu().clone(), "pos_keys": state["pos_keys"][filled].cpu().contiguous(),
            "pos_entropy": state["pos_entropy"][filled].cpu().contiguous(),
            "shape": torch.tensor(state["pos_keys"].shape, dtype=torch.int64)}


def load_state_dict(saved: Mapping[str, Tensor], device: torch.device | None = None) -> dict[str, Tensor]:
    """Rebuild the full state (on `device`) from `state_dict` output."""
    n_classes, capacity, dim = (int(v) for v in saved["shape"])
    state = init_state(n_classes, dim, DPEParams(shot_capacity=capacity), dtype=saved["pos_keys"].dtype)
    state["text"] = saved["text"].clone()
    state["evolutions"] = saved["evolutions"].clone()
    state["pos_count"] = saved["pos_count"].clone()
    filled = torch.arange(capacity).unsqueeze(0) < state["pos_count"].unsqueeze(1)
    state["pos_keys"][filled] = saved["pos_keys"]
    state["pos_entropy"][filled] = saved["pos_entropy"]
    return {name: tensor.to(device) for name, tensor in state.items()} if device is not None else state


# --- The registered method ---------------------------------------------------------------------------------


# Per-dataset (alpha, beta, lr_text, lr_image, align) of the reference's configs/*.yaml (every one also has
# shot_capacity 3 and the cache enabled).
CONFIG_BY_FORMAT: dict[str, tuple[float, float, float, float, float]] = {
    "imagenet": (6.0, 5.0, 0.0006, 0.0006, 0.5), "imagenet-a": (6.0, 5.0, 0.0003, 0.0003, 2.5),
    "imagenet-v2": (3.0, 8.0, 0.0005, 0.0005, 0.5), "imagenet-r": (3.0, 8.0, 0.0006, 0.0006, 0.0),
    "imagenet-sketch": (7.0, 7.45, 0.0006, 0.0006, 0.2), "caltech101": (15.0, 5.0, 0.0006, 0.0006, 0.2),
    "dtd": (6.0, 3.0, 0.0006, 0.0006, 0.2), "eurosat": (3.0, 8.0, 0.00005, 0.00005, 0.2),
    "aircraft": (6.0, 2.0, 0.0006, 0.0006, 0.2), "food101": (3.0, 1.0, 0.0002, 0.0002, 0.2),
    "flower102": (2.5, 5.0, 0.0001, 0.0001, 0.2), "pets": (4.0, 7.0, 0.00005, 0.00005, 0.2),
    "cars": (3.0, 7.0, 0.0001, 0.0001, 1.5), "sun397": (6.0, 3.0, 0.0002, 0.0002, 0.2),
    "ucf101": (9.0, 8.0, 0.0004, 0.0004, 0.2),
}
# The reference feeds 63 AugMix views plus the original for ImageNet and its four shifts, and the single
# centre crop for the cross-domain sets.
MULTI_VIEW_FORMATS = ("imagenet", "imagenet-a", "imagenet-v2", "imagenet-r", "imagenet-sketch")
MULTI_VIEW_COUNT = 64
PREDICT_FROM_KEPT_FORMATS = ("imagenet-a",)
# The template half of the reference's classifier (its datasets' `template`: TDA's, except two templates of its
# own for Stanford Cars; its 7 Tip-Adapter templates are ours in another order, which changes the average
# only by rounding); the other half, the CuPL class descriptions it always averages in, comes from
# `--set descriptions=FILE`. An image folder has no reference template: it keeps the spec's single prompt.
PROMPTS_BY_FORMAT: dict[str, str] = {
    "imagenet": "tip", "imagenet-a": "tip", "imagenet-v2": "tip", "imagenet-r": "ensemble",
    "imagenet-sketch": "ensemble", "caltech101": "tip", "cars": "cars-dpe", "sun397": "tip", "dtd": "dtd",
    "eurosat": "eurosat", "aircraft": "aircraft", "food101": "food101", "flower102": "flower102", "pets": "pets",
    "ucf101": "ucf101",
}


@dataclass(frozen=True)
class DPESpec(MethodSpec):
    """DPE with the reference's settings. None: taken from the reference for the run's dataset
    (`resolve_for_format`); set a value to override it."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    n_views: int | None = None  # None: 64 (AugMix) for ImageNet and its shifts, 1 elsewhere
    augmix: bool | None = None  # None: on exactly when n_views > 1, as the reference's loader
    selection_p: float = 0.1
    shot_capacity: int = 3
    alpha: float | None = None  # None: the dataset's config (imagenet.yaml: 6.0)
    beta: float | None = None  # None: the dataset's config (imagenet.yaml: 5.0)
    lr_text: float | None = None  # None: the dataset's config (imagenet.yaml: 0.0006)
    lr_image: float | None = None  # None: the dataset's config (imagenet.yaml: 0.0006)
    align: float | None = None  # None: the dataset's config (imagenet.yaml: 0.5)
    evolve_threshold: float = 0.1
    predict_from_kept: bool | None = None  # None: on for ImageNet-A only, as the reference
    residual_dtype: str = "fp16"  # the optimiser step's precision: "fp16" as the reference's, "fp32" exact
    prompts: str | None = None  # None: the reference's templates for the dataset (PROMPTS_BY_FORMAT)
    descriptions: str | None = None  # the CuPL half of the reference's classifier (docs/methods.md)
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "prompts": "single", "descriptions": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stream_settings(self)
        require(self.shot_capacity >= 1, "shot_capacity", self.shot_capacity, "must be >= 1")
        check_non_negative(self, "alpha", "beta", "lr_text", "lr_image", "align")
        require(self.evolve_threshold >= 0, "evolve_threshold", self.evolve_threshold, "must be >= 0")
        require(self.residual_dtype in RESIDUAL_DTYPES, "residual_dtype", self.residual_dtype,
                f"must be one of {', '.join(RESIDUAL_DTYPES)}")

    def params(self) -> DPEParams:
        """The step's numbers (unresolved fields take imagenet.yaml's values)."""
        alpha, beta, lr_text, lr_image, align = CONFIG_BY_FORMAT["imagenet"]
        return DPEParams(
            shot_capacity=self.shot_capacity, alpha=or_default(self.alpha, alpha), beta=or_default(self.beta, beta),
            lr_text=or_default(self.lr_text, lr_text), lr_image=or_default(self.lr_image, lr_image),
            align=or_default(self.align, align),
            selection_p=self.selection_p, evolve_threshold=self.evolve_threshold,
            predict_from_kept=bool(self.predict_from_kept), residual_dtype=self.residual_dtype)


def resolve_for_format(spec: DPESpec, dataset_format: str) -> DPESpec:
    """Fill the None fields from the reference's config for a dataset format (ImageNet's for others)."""
    alpha, beta, lr_text, lr_image, align = CONFIG_BY_FORMAT.get(dataset_format, CONFIG_BY_FORMAT["imagenet"])
    n_views = spec.n_views or (MULTI_VIEW_COUNT if dataset_format in MULTI_VIEW_FORMATS else 1)
    return dataclasses.replace(
        spec, n_views=n_views, augmix=n_views > 1 if spec.augmix is None else spec.augmix,
        prompts=spec.prompts or PROMPTS_BY_FORMAT.get(dataset_format, "single"),
        alpha=or_default(spec.alpha, alpha), beta=or_default(spec.beta, beta),
        lr_text=or_default(spec.lr_text, lr_text),
        lr_image=or_default(spec.lr_image, lr_image), align=or_default(spec.align, align),
        predict_from_kept=(dataset_format in PREDICT_FROM_KEPT_FORMATS if spec.predict_from_kept is None
                           else spec.predict_from_kept))


@register
class DPE(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = DPESpec
    summary: ClassVar[str] = ("text and visual class prototypes evolving along the test stream, with residuals "
                              "tuned per sample")
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "zhangce01/DPE-CLIP"

    def views(self, spec: DPESpec) -> ViewPlan:
        return original_plus_crops(spec)

    def resolve_for_dataset(self, spec: DPESpec, dataset_format: str) -> DPESpec:
        """The spec with the reference's config for the dataset (called at submit, before the fingerprint)."""
        return resolve_for_format(spec, dataset_format)

    def init_state(self, spec: DPESpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state(n_classes, dim, spec.params(), device)

    def step(self, spec: DPESpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        result, state = step(state, inputs.image_features, inputs.text_features, scale=float(inputs.logit_scale),
                             params=spec.params())
        # The entropies DPE ranked the views by: with its evolving text prototypes, not the fixed classifier.
        scores = ViewScores.of(result.view_logits, result.kept)
        return StepOutput(logits=result.logits.to(inputs.logits.device), scores=scores), state

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: DPESpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(tensors, device)

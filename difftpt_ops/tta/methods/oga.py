"""OGA (Fuchs, Zanella and De Vleeschouwer, 2025): Online Gaussian Adaptation. A cache of low-entropy test
features per class gives class means and one shared covariance; the Gaussian likelihoods and the zero-shot
probabilities combine in a MAP rule. One view per sample, no gradient.

Pure torch, no I/O. The formulation follows the reference code (cfuchs2023/OGA, OGA/OGA_core.py as
runner.py drives it with main.py's defaults). With C classes, d dimensions, S = `shot_capacity` slots per
class, for one sample with normalised image feature x and zero-shot logits l (the engine's CLIP logits):

1. Zero-shot: q = softmax(l), its entropy h = -sum q log(q + 1e-9), its pseudo-label y = argmax l.
2. Cache: if h is below the entropy of some slot of class y, x and h replace the slot of y with the highest
   entropy (the first such slot). Slots start empty with entropy log C, so a class fills its slots in order.
3. Refit, only when the cache changed: every class with at least 2 cached features gets the mean
   sum(cached) / S (`class_mean="capacity"`, the code: empty slots count as zeros) or sum(cached) / count
   (`"stored"`), normalised when `normalize_mean`; the others keep their previous mean, at first their
   text feature. When some class holds 3 or more features, the residuals of every cached feature from its
   class's mean, centred on their own average, give the covariance M = R^T R / (n - 1) over the n cached
   features, and the precision P = d * pinv((n - 1) M + tr(M) I) (`ridge`), pinv(M) (`moore-penrose`), or
   the first while n <= 4d and the second beyond (`ridge-moore-penrose`, the default). Before any refit of
   the covariance, P = d I.
4. Prediction, after the update of the whole batch (`batch_size`, the code's 32; see below): s_k = x^T P mu_k
   - mu_k^T P mu_k / 2 (the Gaussian log-likelihood up to a term common to all classes), and the posterior
   softmax(tau * s) * q, normalised.

Batches: runner.py feeds the stream in batches of 32, caches (and refits for) the whole batch, then predicts every
sample of the batch with that model. Refitting once per batch or after each change gives the same model at the
batch's end (a class's mean and the precision are functions of the cache as it is), so the step updates per
sample and the batch only delays the prediction: the engine holds the batch's samples and `predict` gives their
final posteriors when it closes (`block_size`; `batch_size=1` predicts each sample as it arrives).

The reference stores the cache in fp16 and computes the rest in fp32; this keeps everything in the features'
dtype (fp32 from the engine), which changes results only at the level of rounding. The state is kept on the
features' device (a d x d pseudo-inverse per cache change: about 24 ms per sample at d = 512 and 200 classes
on a 2-core CPU, bench/online.py).
"""

from __future__ import annotations

import dataclasses
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

NAME = "oga"
PAPER = "Fuchs, Zanella and De Vleeschouwer, Online Gaussian Test-Time Adaptation of Vision-Language Models, 2025"
COVARIANCES = ("ridge-moore-penrose", "ridge", "moore-penrose")
CLASS_MEANS = ("capacity", "stored")
ENTROPY_EPS = 1e-9  # runner.py's zero-shot entropy
MEAN_MIN_COUNT = 2  # a class's mean leaves its text feature once it caches this many features
COVARIANCE_MIN_COUNT = 3  # the covariance is refitted once some class caches this many
RIDGE_LIMIT = 4  # ridge-moore-penrose: the ridge estimate while n <= this * d
MAX_SHOT_CAPACITY = 1024  # classes x this x dim floats stay on the device
MAX_BATCH_SIZE = 4096  # samples held for their final prediction (their inputs stay on the device)

# The reference's "standard" prompts are its dataset modules' `template`, which it did not publish with the
# code stored here; its README says it builds on TransCLIP, whose ImageNet module writes "a photo of a {}."
# and whose cross-domain modules write the one CoOp-style prompt per dataset (docs/methods.md, OGA).
PROMPTS_BY_FORMAT: dict[str, str] = {
    "imagenet": "single", "imagenet-a": "single", "imagenet-v2": "single", "imagenet-r": "single",
    "imagenet-sketch": "single", "caltech101": "single", "cars": "single", "sun397": "single", "dtd": "dtd",
    "eurosat": "eurosat", "aircraft": "aircraft", "food101": "food101", "flower102": "flower102", "pets": "pets",
    "ucf101": "ucf101",
}


@dataclass(frozen=True)
class OGAParams:
    """The numbers OGA's step needs (main.py's defaults)."""

    tau: float = 0.05
    shot_capacity: int = 8
    covariance: str = "ridge-moore-penrose"
    normalize_mean: bool = False
    class_mean: str = "capacity"


def init_state() -> dict[str, Tensor]:
    """Before the first sample: nothing but the count. The first step builds the cache where its features are,
    in their dtype, and starts the means from the text features it brings (init_state does not see them)."""
    return {"seen": torch.zeros((), dtype=torch.int64)}


def _start(state: dict[str, Tensor], text: Tensor, shot_capacity: int) -> None:
    n_classes, dim = text.shape
    like = {"dtype": text.dtype, "device": text.device}
    state["memory"] = torch.zeros(n_classes, shot_capacity, dim, **like)
    state["entropy"] = torch.full((n_classes, shot_capacity), math.log(n_classes), **like)
    state["filled"] = torch.zeros(n_classes, shot_capacity, dtype=torch.bool, device=text.device)
    state["means"] = text.clone()
    state["precision"] = dim * torch.eye(dim, **like)
    _refresh_classifier(state)


def _refresh_classifier(state: dict[str, Tensor]) -> None:
    """The linear form of the Gaussian scores, recomputed only when the means or the precision change."""
    weights = state["means"] @ state["precision"]
    state["weights"], state["bias"] = weights, -0.5 * (weights * state["means"]).sum(1)


def _remember(state: dict[str, Tensor], label: int, feature: Tensor, entropy: Tensor) -> bool:
    """File the sample in its pseudo-label's slots if it beats one of them; True when the cache changed."""
    slots = state["entropy"][label]
    if not bool((entropy < slots).any()):
        return False
    slot = int(torch.argmax(slots))  # the first of equal maxima: empty slots fill in order
    state["memory"][label, slot] = feature
    state["entropy"][label, slot] = entropy
    state["filled"][label, slot] = True
    return True


def _refit_means(state: dict[str, Tensor], params: OGAParams) -> Tensor:
    """Update the means of the classes with enough cached features; returns the per-class counts."""
    filled, memory = state["filled"], state["memory"]
    counts = filled.sum(1)
    sums = (memory * filled.unsqueeze(-1)).sum(1)
    divisor = memory.shape[1] if params.class_mean == "capacity" else counts.clamp_min(1).unsqueeze(1)
    means = sums / divisor
    if params.normalize_mean:
        means = means / means.norm(dim=-1, keepdim=True)
    refit = counts >= MEAN_MIN_COUNT
    state["means"][refit] = means[refit]
    return counts


def _precision(residuals: Tensor, covariance: str) -> Tensor:
    """The precision matrix of the cached features' residuals (n, d) under the chosen estimator."""
    n, dim = residuals.shape
    centred = residuals - residuals.mean(0)
    scatter = centred.T @ centred / (n - 1)
    # Both matrices are symmetric: their pseudo-inverse through an eigendecomposition (hermitian=True) is the
    # reference's through an SVD up to rounding, and does not fail where LAPACK's divide-and-conquer SVD does
    # ("failed to converge" on some well-conditioned 512 x 512 ridge matrices on the CPU).
    if covariance == "moore-penrose" or (covariance == "ridge-moore-penrose" and n > RIDGE_LIMIT * dim):
        return torch.linalg.pinv(scatter, hermitian=True)
    # The Bayes-ridge estimate: the scatter shrunk towards its trace times the identity.
    eye = torch.eye(dim, dtype=scatter.dtype, device=scatter.device)
    return dim * torch.linalg.pinv((n - 1) * scatter + torch.trace(scatter) * eye, hermitian=True)


def _refit(state: dict[str, Tensor], params: OGAParams) -> None:
    counts = _refit_means(state, params)
    if bool((counts >= COVARIANCE_MIN_COUNT).any()):
        filled = state["filled"]
        # Rows class by class, slot by slot (the reference's order); each minus its class's current mean.
        owner = torch.arange(filled.shape[0], device=filled.device).unsqueeze(1).expand_as(filled)[filled]
        residuals = state["memory"][filled] - state["means"][owner]
        state["precision"] = _precision(residuals, params.covariance)
    _refresh_classifier(state)


def posterior(state: dict[str, Tensor], feature: Tensor, logits: Tensor, tau: float) -> Tensor:
    """log of the MAP posterior (C,): zero-shot probabilities times softmax(tau * Gaussian scores), normalised.
    x's own quadratic term is the same for every class, so it cancels in the softmax and is left out."""
    scores = state["weights"] @ feature + state["bias"]
    joint = torch.log_softmax(logits, dim=0) + torch.log_softmax(tau * scores, dim=0)
    return joint - torch.logsumexp(joint, dim=0)


def step(state: dict[str, Tensor], feature: Tensor, logits: Tensor, text: Tensor, *,
         params: OGAParams) -> tuple[Tensor, dict[str, Tensor]]:
    """The log-posterior (C,) for one sample, and the state after it (updated in place): cache, refit, predict.

    `feature` is its normalised image feature (d,), `logits` its zero-shot logits (C,), `text` the normalised
    class text features (C, d), all in one dtype on one device.
    """
    if int(state["seen"]) == 0:
        _start(state, text, params.shot_capacity)
    probs = torch.softmax(logits, dim=0)
    entropy = -(probs * torch.log(probs + ENTROPY_EPS)).sum()
    if _remember(state, int(logits.argmax()), feature, entropy):
        _refit(state, params)
    state["seen"] = torch.tensor(int(state["seen"]) + 1)  # on the CPU, as init_state's
    return posterior(state, feature, logits, params.tau), state


def state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A compact copy for a checkpoint: the filled slots only; the linear form is rebuilt on load."""
    if int(state["seen"]) == 0:
        return {"seen": state["seen"].clone()}
    filled = state["filled"]
    saved = {"seen": state["seen"], "filled": filled, "memory": state["memory"][filled],
             "entropy": state["entropy"][filled], "means": state["means"], "precision": state["precision"]}
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in saved.items()}


def load_state_dict(saved: Mapping[str, Tensor], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The state from `state_dict` output, its tensors on `device` (the count on the CPU)."""
    if int(saved["seen"]) == 0:
        return init_state()
    filled = saved["filled"].to(device)
    means = saved["means"].to(device)
    state = {"seen": saved["seen"].clone(), "filled": filled.clone(), "means": means.clone(),
             "precision": saved["precision"].to(device).clone()}
    n_classes, slots = filled.shape
    state["memory"] = torch.zeros(n_classes, slots, means.shape[1], dtype=means.dtype, device=device)
    state["memory"][filled] = saved["memory"].to(device)
    state["entropy"] = torch.full((n_classes, slots), math.log(n_classes), dtype=means.dtype, device=device)
    state["entropy"][filled] = saved["entropy"].to(device)
    _refresh_classifier(state)
    return state


# --- The registered method ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OGASpec(MethodSpec):
    """OGA with the reference's defaults (main.py's argparse defaults and OGA_core.py's)."""

    method: ClassVar[str] = NAME
    order_seed: int = 0  # the stream order: a seeded permutation of the dataset version's samples
    tau: float = 0.05  # weight of the Gaussian log-likelihoods in the MAP (--tau)
    shot_capacity: int = 8  # cached features per class (--shot_capacity)
    covariance: str = "ridge-moore-penrose"  # the precision estimator (--sig_type)
    normalize_mean: bool = False  # normalise each refitted class mean (--normalize_mu)
    class_mean: str = "capacity"  # capacity: the code's sum / shot_capacity; stored: the mean of the cached
    batch_size: int = 32  # samples predicted together, after all of them updated the cache (--batch_size)
    prompts: str | None = None  # None: the reference's prompt for the dataset (PROMPTS_BY_FORMAT)
    descriptions: str | None = None  # class descriptions averaged in with the prompts (docs/methods.md)
    # Runs made before the batches existed predicted each sample as it arrived: their stored specs, which have no
    # batch_size, read back as batch_size 1 (and keep their fingerprints).
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT, "descriptions": None, "batch_size": 1}

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order_seed >= 0, "order_seed", self.order_seed, "must be >= 0")
        require(math.isfinite(self.tau) and self.tau >= 0, "tau", self.tau, "must be finite and >= 0")
        require(1 <= self.shot_capacity <= MAX_SHOT_CAPACITY, "shot_capacity", self.shot_capacity,
                f"must be in [1, {MAX_SHOT_CAPACITY}]")
        require(self.covariance in COVARIANCES, "covariance", self.covariance,
                f"must be one of {', '.join(COVARIANCES)}")
        require(1 <= self.batch_size <= MAX_BATCH_SIZE, "batch_size", self.batch_size,
                f"must be in [1, {MAX_BATCH_SIZE}]")
        require(self.class_mean in CLASS_MEANS, "class_mean", self.class_mean,
                f"must be one of {', '.join(CLASS_MEANS)}")
        if self.prompts is not None:
            check_prompt_set(self.prompts)
        check_descriptions(self.descriptions)

    def params(self) -> OGAParams:
        return OGAParams(tau=self.tau, shot_capacity=self.shot_capacity, covariance=self.covariance,
                         normalize_mean=self.normalize_mean, class_mean=self.class_mean)


@register
class OGA(PromptSetOption, OnlineMethod):
    name: ClassVar[str] = NAME
    spec_class = OGASpec
    summary: ClassVar[str] = ("Gaussian class likelihoods from a cache of confident test features, "
                              "combined with the zero-shot prior in a MAP rule")
    paper: ClassVar[str] = PAPER
    reference: ClassVar[str] = "cfuchs2023/OGA"

    def views(self, spec: OGASpec) -> ViewPlan:
        return ViewPlan(n_conventional=0, resolution=spec.resolution)

    def resolve_for_dataset(self, spec: OGASpec, dataset_format: str) -> OGASpec:
        """The spec with the reference's prompt for the dataset (called at submit, before the fingerprint)."""
        return dataclasses.replace(spec, prompts=spec.prompts or PROMPTS_BY_FORMAT.get(dataset_format, "single"))

    def init_state(self, spec: OGASpec, *, n_classes: int, dim: int, device: torch.device,
                   stream_length: int | None = None) -> dict[str, Tensor]:
        return init_state()

    def step(self, spec: OGASpec, state: dict[str, Tensor],
             inputs: StepInputs) -> tuple[StepOutput, dict[str, Tensor]]:
        # On the features' device: the refit's pseudo-inverse is the step's cost.
        log_posterior, state = step(state, inputs.image_features[0], inputs.logits[0], inputs.text_features,
                                    params=spec.params())
        # Log-probabilities: the argmax is the prediction and softmax gives the probabilities back.
        return StepOutput(logits=log_posterior.to(inputs.logits.device),
                          scores=ViewScores.original_only(inputs.logits)), state

    def block_size(self, spec: OGASpec) -> int:
        return spec.batch_size

    def predict(self, spec: OGASpec, state: dict[str, Tensor], inputs: StepInputs) -> Tensor:
        return posterior(state, inputs.image_features[0], inputs.logits[0], spec.tau).to(inputs.logits.device)

    def state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict(state)

    def load_state_dict(self, spec: OGASpec, tensors: Mapping[str, Tensor], *,
                        device: torch.device) -> dict[str, Tensor]:
        return load_state_dict(tensors, device)

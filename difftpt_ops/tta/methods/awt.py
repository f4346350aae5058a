"""AWT (Zhu et al., NeurIPS 2024), zero-shot: Augmentation, Weighting and Transportation. Forward-only.

Each class is described by several prompts (its template prompt and the template prompt followed by each of
its first `num_descriptor` class descriptions), each image by several views (the original and random crops).
Views are weighted by the entropy of their prediction, a class's prompts by how much each one alone lowers
the entropy of the original view's prediction; the class score is the optimal-transport distance between the
two weighted sets, computed with Sinkhorn's algorithm. Behaviour of the reference code (MCG-NJU/AWT,
AWT_zero_shot/evaluate.py, pre_extract.py, data/datautils.py, data/cls_to_names.py, scripts/*.sh), the
default here:

- texts: per class, `template.format(name) + "."` and `template.format(name) + ". " + description_i` for
  i < num_descriptor = 50 (evaluate.sh's N_DESC), the dataset's template from the reference's
  CUSTOM_TEMPLATES (no trailing period); every feature L2-normalised, kept per prompt (not averaged);
- views: the original (resize + centre crop) plus 50 RandomResizedCrop(224) + horizontal flip views of the
  full image (pre_extract.sh's batch size 50; the Augmenter returns [original] + 50 views), no AugMix;
- logits (n_views, n_prompts, n_classes) = logit_scale * image @ text.T;
- view weights: softmax over views of -entropy(softmax(mean over prompts of the logits)) / 0.5;
- prompt weights: for the original view, class c and prompt j, the entropy of the prompt-averaged logits with
  class c's entry replaced by prompt j's; per class, softmax over prompts of -entropy / 0.5;
- transport, per class: cost 1 - cosine, kernel exp(-cost / 0.1), Sinkhorn from ones with the view weights
  and the class's prompt weights as marginals, at most 100 iterations, stopping once the mean absolute
  change of the row scaling is below 1e-2 (both scalings updated first); the plan T, and the class score is
  sum over views and prompts of T * logits.

AWT needs class descriptions (the reference asserts every class has at least num_descriptor of them): a spec
without a descriptions file, or a file with fewer sentences for some class, is refused at submit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import (
    MethodSpec,
    check_descriptions,
    check_view_count,
    description_key,
    missing_descriptions,
)
from difftpt_ops.core.specs import require
from difftpt_ops.tta.losses import at_least_fp32
from difftpt_ops.tta.methods.base import ForwardOnlyMethod, StepInputs, StepOutput, ViewPlan, ViewScores, register
from difftpt_ops.tta.methods.ensemble import encode_texts
from difftpt_ops.tta.text import TextTower, normalise

NAME = "awt"
EPS = 0.1  # evaluate.py optimal_transport: eps
SINKHORN_MAX_ITER = 100  # evaluate.py Sinkhorn: range(100)
SINKHORN_THRESHOLD = 1e-2  # evaluate.py Sinkhorn: thresh, on the mean absolute change of r
DEFAULT_TEMPLATE = "a photo of a {}"  # CUSTOM_TEMPLATES' ImageNet entry, for datasets it does not list
# data/cls_to_names.py CUSTOM_TEMPLATES, by this project's dataset format (no trailing period: evaluate.py
# appends "." or ". " + description).
TEMPLATES_BY_FORMAT: dict[str, str] = {
    "imagenet": "a photo of a {}", "imagenet-a": "a photo of a {}", "imagenet-v2": "a photo of a {}",
    "imagenet-r": "a rendition photo of a {}", "imagenet-sketch": "a sketch photo of a {}",
    "pets": "a photo of a {} from OxfordPets", "flower102": "a photo of a {}, a type of flower",
    "aircraft": "a photo of a {} from Fine-Grained Visual Classification of Aircraft",
    "dtd": "a photo of a {}, which is a type of texture, or a type of pattern",
    "eurosat": "satellite photo of the {}", "cars": "a photo of a {}", "food101": "a photo of a {} from Food101",
    "sun397": "a photo of a {}", "caltech101": "a photo of a {}", "ucf101": "a photo of a person doing {}",
}
TEXT_CHUNK = 256  # classes per chunk of the prompt-weight entropies (bounds memory only)


@dataclass(frozen=True)
class AWTSpec(MethodSpec):
    """AWT (zero-shot) with the reference code's defaults."""

    method: ClassVar[str] = NAME
    n_views: int = 51  # the original plus 50 random crops with flips (pre_extract.sh: --batch-size 50)
    num_descriptor: int = 50  # descriptions per class after the template prompt (evaluate.sh: N_DESC=50)
    image_temperature: float = 0.5  # evaluate.py: image_temperature
    text_temperature: float = 0.5  # evaluate.py: text_temperature
    template: str | None = None  # None: the reference's template for the dataset (TEMPLATES_BY_FORMAT)
    augmix: bool | None = False  # the reference's Augmenter has none
    descriptions: str | None = None  # required at submit: the class descriptions file (docs/methods.md)
    OMITTED_AT: ClassVar[dict[str, Any]] = {**MethodSpec.OMITTED_AT}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_count(self.n_views)
        require(self.num_descriptor >= 0, "num_descriptor", self.num_descriptor, "must be >= 0")
        require(self.image_temperature > 0, "image_temperature", self.image_temperature, "must be > 0")
        require(self.text_temperature > 0, "text_temperature", self.text_temperature, "must be > 0")
        if self.template is not None:
            require("{}" in self.template, "template", self.template, "must contain '{}' for the class name")
            require(_formats(self.template), "template", self.template, "must hold one '{}' for the class name "
                    "and no other braces (str.format fills it; write a literal brace as '{{' or '}}')")
        check_descriptions(self.descriptions)


def _formats(template: str) -> bool:
    """Whether `template.format(name)` works, as awt_texts calls it (the reference's `template.format`)."""
    try:
        template.format("class")
    except (IndexError, KeyError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class AWTOutput:
    """One sample's AWT outcome."""

    logits: Tensor  # (n_classes,) sum over views and prompts of plan * logits
    image_weights: Tensor  # (n_views,)
    text_weights: Tensor  # (n_classes, n_prompts)
    image_entropy: Tensor  # (n_views,) of the prompt-averaged logits' softmax
    iterations: int  # Sinkhorn iterations run


def template_of(spec: AWTSpec) -> str:
    return spec.template or DEFAULT_TEMPLATE


def awt_texts(template: str, class_names: Sequence[str], descriptions: Sequence[Sequence[str]],
              num_descriptor: int) -> list[list[str]]:
    """Per class, the template prompt with a period and the prompt followed by each of its first
    `num_descriptor` descriptions (evaluate.py's prompt list)."""
    texts = []
    for name, own in zip(class_names, descriptions, strict=True):
        prompt = template.format(name.replace("_", " "))
        texts.append([prompt + "."] + [prompt + ". " + own[i] for i in range(num_descriptor)])
    return texts


def short_classes(descriptions: Mapping[str, Sequence[str]], class_names: Sequence[str],
                  num_descriptor: int) -> list[str]:
    """The description keys of the classes with fewer than `num_descriptor` descriptions, in class order."""
    return [description_key(n) for n in class_names if len(descriptions[description_key(n)]) < num_descriptor]


def check_awt_descriptions(spec: AWTSpec, descriptions: Mapping[str, Sequence[str]] | None,
                           class_names: Sequence[str]) -> None:
    """Refuse what the reference cannot run: no descriptions, or a class with fewer than num_descriptor."""
    if descriptions is None:
        raise InvalidSpecError("descriptions", None, "AWT needs class descriptions: pass --set descriptions=FILE "
                                                     f"(JSON: class -> at least num_descriptor={spec.num_descriptor} "
                                                     "sentences)")
    missing = missing_descriptions(descriptions, class_names)
    if missing:
        raise InvalidSpecError("descriptions", spec.descriptions, f"has no descriptions for {len(missing)} "
                                                                  f"classes (e.g. {missing[0]!r})")
    short = short_classes(descriptions, class_names, spec.num_descriptor)
    if short:
        fewest = min(len(descriptions[k]) for k in short)
        raise InvalidSpecError("descriptions", spec.descriptions,
                               f"AWT uses num_descriptor={spec.num_descriptor} descriptions per class and "
                               f"{len(short)} classes have fewer (e.g. {short[0]!r}, fewest {fewest}); give "
                               f"more or --set num_descriptor={fewest}")


@torch.no_grad()
def awt_prompt_features(tower: TextTower, tokenizer: Any, texts: Sequence[Sequence[str]]) -> Tensor:
    """Normalised features (n_classes, n_prompts, d) of every class's prompts (same count per class)."""
    counts = {len(own) for own in texts}
    if len(counts) != 1:
        raise InvalidSpecError("descriptions", sorted(counts), "every class needs the same number of prompts")
    flat = normalise(encode_texts(tower, tokenizer([t for own in texts for t in own])))
    return flat.reshape(len(texts), counts.pop(), -1)


def batch_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax along the last dimension (evaluate.py calculate_batch_entropy)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def entropy_weights(output: Tensor, image_temperature: float, text_temperature: float) -> tuple[Tensor, Tensor]:
    """View weights (n_views,) and prompt weights (n_classes, n_prompts) from logits (n_views, n_prompts,
    n_classes)."""
    image_entropy = batch_entropy(output.mean(1))
    image_weights = torch.softmax(-image_entropy / image_temperature, dim=-1)
    first = output[0]  # (n_prompts, n_classes): the original view
    n_prompts, n_classes = first.shape
    anchor = first.mean(0)  # (n_classes,)
    entropies = []
    for start in range(0, n_classes, TEXT_CHUNK):
        stop = min(n_classes, start + TEXT_CHUNK)
        rows = anchor.expand(n_prompts, stop - start, n_classes).clone()  # (n_prompts, k, n_classes)
        own = torch.arange(start, stop, device=output.device)
        rows[:, own - start, own] = first[:, start:stop]  # class c's entry replaced by prompt j's
        entropies.append(batch_entropy(rows))  # (n_prompts, k)
    text_entropy = torch.cat(entropies, dim=1)  # (n_prompts, n_classes)
    text_weights = torch.softmax(-text_entropy.t() / text_temperature, dim=-1)
    return image_weights, text_weights


def sinkhorn(kernel: Tensor, u: Tensor, v: Tensor, *, max_iter: int = SINKHORN_MAX_ITER,
             threshold: float = SINKHORN_THRESHOLD) -> tuple[Tensor, int]:
    """Transport plans (n_classes, n_views, n_prompts) for kernels (n_classes, n_views, n_prompts), view
    marginal u (n_views,) and per-class prompt marginals v (n_classes, n_prompts); and the iterations run."""
    r = torch.ones(kernel.shape[:2], dtype=kernel.dtype, device=kernel.device)
    c = torch.ones_like(v)
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        previous = r
        r = u / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = v / (kernel.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        if float((r - previous).abs().mean()) < threshold:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * kernel, iterations


def awt_predict(image_features: Tensor, prompt_features: Tensor, logit_scale: float | Tensor, *,
                image_temperature: float = 0.5, text_temperature: float = 0.5, eps: float = EPS,
                max_iter: int = SINKHORN_MAX_ITER, threshold: float = SINKHORN_THRESHOLD) -> AWTOutput:
    """AWT on one sample's normalised view features (n_views, d) and per-class prompt features
    (n_classes, n_prompts, d), in fp32 (fp64 for fp64 inputs)."""
    dtype = at_least_fp32(image_features).dtype
    image, prompts = image_features.to(dtype), prompt_features.to(dtype)
    scale = torch.as_tensor(logit_scale, dtype=dtype, device=image.device)
    output = scale * torch.einsum("vd,cpd->vpc", image, prompts)  # (n_views, n_prompts, n_classes)
    image_weights, text_weights = entropy_weights(output, image_temperature, text_temperature)
    similarity = (output / scale).permute(2, 0, 1)  # (n_classes, n_views, n_prompts)
    kernel = torch.exp(-(1.0 - similarity) / eps)
    plan, iterations = sinkhorn(kernel, image_weights, text_weights, max_iter=max_iter, threshold=threshold)
    if bool(torch.isnan(plan).any()):
        raise InvalidSpecError("eps", eps, "the transport plan is NaN (the kernel underflowed)")
    logits = (plan.permute(1, 2, 0) * output).sum(dim=(0, 1))
    return AWTOutput(logits=logits, image_weights=image_weights, text_weights=text_weights,
                     image_entropy=batch_entropy(output.mean(1)), iterations=iterations)


@register
class AWT(ForwardOnlyMethod):
    name: ClassVar[str] = NAME
    spec_class = AWTSpec
    summary: ClassVar[str] = ("optimal transport between entropy-weighted augmented views and "
                              "description-augmented class prompts")
    paper: ClassVar[str] = ("Zhu et al., AWT: Transferring Vision-Language Models via Augmentation, Weighting, "
                            "and Transportation, NeurIPS 2024")
    reference: ClassVar[str] = "MCG-NJU/AWT"
    requires_descriptions: ClassVar[bool] = True

    def views(self, spec: AWTSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, augmix=spec.augmix, resolution=spec.resolution)

    def resolve_for_dataset(self, spec: AWTSpec, dataset_format: str) -> AWTSpec:
        """The reference's template for the dataset (the ImageNet one for datasets it does not list)."""
        if spec.template is not None:
            return spec
        return dataclasses.replace(spec, template=TEMPLATES_BY_FORMAT.get(dataset_format, DEFAULT_TEMPLATE))

    def check_descriptions(self, spec: AWTSpec, descriptions: Mapping[str, Sequence[str]] | None,
                           class_names: Sequence[str]) -> None:
        check_awt_descriptions(spec, descriptions, class_names)

    def fixed_text_features(self, spec: AWTSpec, tower: TextTower, tokenizer: Any, class_names: Sequence[str], *,
                            descriptions: Mapping[str, Sequence[str]] | None = None) -> Tensor:
        """Per-class prompt sets (n_classes, 1 + num_descriptor, d), unaveraged."""
        check_awt_descriptions(spec, descriptions, class_names)
        assert descriptions is not None
        own = [list(descriptions[description_key(name)]) for name in class_names]
        return awt_prompt_features(tower, tokenizer, awt_texts(template_of(spec), class_names, own,
                                                               spec.num_descriptor))

    def step(self, spec: AWTSpec, inputs: StepInputs) -> StepOutput:
        if inputs.prompt_features is None:
            raise InvalidSpecError("descriptions", spec.descriptions, "AWT needs per-class prompt features")
        out = awt_predict(inputs.image_features, inputs.prompt_features, inputs.logit_scale,
                          image_temperature=spec.image_temperature, text_temperature=spec.text_temperature)
        n_views = inputs.n_views
        scores = ViewScores(indices=torch.arange(n_views, device=out.logits.device),
                            entropy=out.image_entropy.float(),
                            cosine=torch.full((n_views,), float("nan"), device=out.logits.device),
                            weight=out.image_weights.float())
        return StepOutput(logits=out.logits.to(inputs.logits.dtype), scores=scores)

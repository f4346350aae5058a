"""Prompt ensembles: class text features averaged over many templates instead of one.

CLIP's prompt-engineering recipe, as the TDA, DMN and ZERO code bases build their classifiers: encode every
(template, class) text, L2-normalise each feature, average over the templates per class, normalise again.
`single` is the one-template prompt of TPT ("a photo of a {}."), the default of the episodic methods;
`ensemble` is CLIP's 80 ImageNet templates (the list TDA uses for ImageNet-R and -Sketch); `tip` is the
7-template subset that ZERO's --templates flag, TDA's ImageNet config and DMN use; a cross-domain dataset's
format names the one prompt TDA and DMN write for it ("{} texture." for DTD); `cars-dpe` is DPE's two
Stanford Cars templates. The lists ship as data in
difftpt_ops/data/imagenet_templates.json and dataset_templates.json and are read once, on first use.

Class descriptions (CuPL: sentences per class, e.g. GPT-written) are averaged in with a class's prompt texts
when the spec names a descriptions file, as DMN's `tip_cupl` classifier does; the text comes from the user.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from difftpt_ops.core.errors import InputError, InvalidSpecError
from difftpt_ops.core.method_specs import (
    PROMPT_SETS,
    description_key,
    missing_descriptions,
    prompt_has_text,
)
from difftpt_ops.tta.prompts import class_prompt_texts
from difftpt_ops.tta.text import TextTower, normalise

TEXT_BATCH = 512  # texts per text-tower call; only bounds memory
IMAGENET_PROMPT_SETS = ("ensemble", "tip")  # in imagenet_templates.json; the others in dataset_templates.json


def check_prompt_set(value: str, *, argument: str = "prompts") -> None:
    """Reject a prompt set this module does not know, naming the setting."""
    if value not in PROMPT_SETS:
        raise InvalidSpecError(argument, value, f"unknown prompt set; choose one of {', '.join(PROMPT_SETS)}")


@cache
def prompt_templates(prompt_set: str) -> tuple[str, ...]:
    """The templates of a prompt set other than "single": "ensemble", "tip", a dataset's prompt or "cars-dpe"."""
    if prompt_set not in PROMPT_SETS[1:]:
        raise InvalidSpecError("prompts", prompt_set,
                               f"has no template list; choose one of {', '.join(PROMPT_SETS[1:])}")
    name = "imagenet_templates.json" if prompt_set in IMAGENET_PROMPT_SETS else "dataset_templates.json"
    text = resources.files("difftpt_ops.data").joinpath(name).read_text(encoding="utf-8")
    return tuple(json.loads(text)[prompt_set])


class PromptSetOption:
    """Mixin for methods that classify with fixed text features (forward-only and online methods) and whose
    spec has a `prompts` field: the class text features of that prompt set.

    "single" (or None, a spec stored before the field existed) keeps the engine's prompt (the spec's
    template through the prompt learner's initial context); the other sets replace it with their
    templates' features (normalised, averaged, normalised again), computed once per run.
    """

    def fixed_text_features(self, spec: Any, tower: TextTower, tokenizer: Any, class_names: Sequence[str], *,
                            descriptions: Mapping[str, Sequence[str]] | None = None) -> Tensor | None:
        prompt_set = str(getattr(spec, "prompts", None) or "single")
        check_prompt_set(prompt_set)
        if descriptions is not None:
            return described_text_features(tower, tokenizer, _prompt_texts(spec, prompt_set, class_names),
                                           class_descriptions(descriptions, class_names))
        if prompt_set == "single":
            return None
        return prompt_set_text_features(tower, tokenizer, class_names, prompt_templates(prompt_set))


def _prompt_texts(spec: Any, prompt_set: str, class_names: Sequence[str]) -> list[list[str]]:
    """Per class, the prompt set's texts: its templates filled with the name, or the spec's single prompt."""
    if not prompt_has_text(spec):
        raise InvalidSpecError("descriptions", spec.descriptions, "are averaged with prompt texts; a random or "
                               "CoOp context has none: choose a prompt set or a ctx_init")
    if prompt_set != "single":
        templates = prompt_templates(prompt_set)
        return [[t.format(name.replace("_", " ")) for t in templates] for name in class_names]
    return [[text] for text in class_prompt_texts(class_names, spec.prompt)]


def class_descriptions(descriptions: Mapping[str, Sequence[str]], class_names: Sequence[str]) -> list[list[str]]:
    """Each class's descriptions, looked up by its name with underscores as spaces (the reference's key)."""
    missing = missing_descriptions(descriptions, class_names)
    if missing:
        raise InputError("descriptions", missing[0], f"has no descriptions ({len(missing)} classes lack them)")
    return [list(descriptions[description_key(name)]) for name in class_names]


def described_text_features(tower: TextTower, tokenizer: Any, prompt_texts: Sequence[Sequence[str]],
                            descriptions: Sequence[Sequence[str]], *, batch: int = TEXT_BATCH) -> Tensor:
    """Normalised class features (n_classes, d) of each class's prompt texts plus its descriptions: every text
    normalised, averaged over all of that class's texts at once (templates and descriptions alike, as DMN's
    tip_cupl classifier does), normalised again. Classes may have different numbers of texts."""
    texts = [list(own) + list(extra) for own, extra in zip(prompt_texts, descriptions, strict=True)]
    if any(not own for own in texts):
        raise InputError("descriptions", "[]", "every class needs at least one text")
    owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(own) for own in texts]))
    features = normalise(encode_texts(tower, tokenizer([t for own in texts for t in own]), batch=batch))
    sums = torch.zeros(len(texts), features.shape[1], dtype=features.dtype).index_add_(0, owner, features.cpu())
    means = sums / torch.bincount(owner, minlength=len(texts)).unsqueeze(1).to(sums.dtype)
    return normalise(means).to(features.device)


def ensemble_text_features(per_template: Tensor) -> Tensor:
    """Class features from per-template features (n_templates, n_classes, d), unnormalised.

    Each feature is normalised before the mean and the mean is normalised again (the reference order);
    averaging raw features would weight templates by their norm.
    """
    if per_template.ndim != 3 or per_template.shape[0] == 0:
        raise InputError("per_template", tuple(per_template.shape), "must be (n_templates >= 1, n_classes, d)")
    return normalise(normalise(per_template).mean(dim=0))


def template_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, template-major: row t * n_classes + c."""
    if not class_names:
        raise InputError("class_names", "[]", "must name at least one class")
    if not templates or any("{}" not in t for t in templates):
        raise InvalidSpecError("templates", list(templates)[:3], "must be non-empty and each contain '{}'")
    names = [name.replace("_", " ") for name in class_names]
    return [template.format(name) for template in templates for name in names]


@torch.no_grad()
def encode_texts(tower: TextTower, tokens: Tensor, *, batch: int = TEXT_BATCH) -> Tensor:
    """Unnormalised text features (n, d) of tokenised texts (n, context), frozen tower.

    Each batch runs only up to its longest end-of-text token when the tower is causal: identical features
    to the padded 77-token pass (see tta/text.py), a fraction of the work.
    """
    device = tower.token_embedding.weight.device
    out = []
    for chunk in tokens.split(max(1, batch)):
        chunk = chunk.to(device)
        pool = tower.pool_index(chunk)
        length = int(pool.max()) + 1 if tower.causal else chunk.shape[1]
        out.append(tower.encode(tower.embed(chunk[:, :length]), pool).float())
    return torch.cat(out)


def prompt_set_text_features(tower: TextTower, tokenizer: Any, class_names: Sequence[str],
                             templates: Sequence[str], *, batch: int = TEXT_BATCH) -> Tensor:
    """Normalised class features (n_classes, d) of a template list: one template or an ensemble."""
    texts = template_texts(class_names, templates)
    raw = encode_texts(tower, tokenizer(texts), batch=batch)
    return ensemble_text_features(raw.reshape(len(templates), len(class_names), -1))

"""BoostAdapter's step against a straightforward formulation that mirrors the reference script's structure
(taolinzhang/BoostAdapter runner.py with --mode boostadapter: dict-of-lists caches, a deep copy of the
positive cache per sample for the boosting views, a first-in-first-out negative cache), plus checkpoints and
spec resolution."""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.data.formats import CROSS_DOMAIN_FORMATS, IMAGENET_FORMATS
from difftpt_ops.tta.caches import load_two_caches, two_caches_state_dict
from difftpt_ops.tta.methods import boostadapter, get_method
from tests.unit.tta_support import feature_stream

pytestmark = pytest.mark.unit


# --- The reference's loop, written out -------------------------------------------------------------------


def _update_cache(cache: dict[int, list], pred: int, item: list, capacity: int, fifo: bool) -> None:
    if pred in cache:
        cache[pred].append(item)
        if fifo:
            if len(cache[pred]) > capacity:
                cache[pred] = cache[pred][1:]
        else:
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
            cache[pred] = cache[pred][:capacity]
    else:
        cache[pred] = [item]


def _cache_logits(feature: torch.Tensor, cache: dict[int, list], alpha: float, beta: float, n_classes: int,
                  mask: tuple[float, float] | None = None) -> torch.Tensor:
    keys, values = [], []
    for label in sorted(cache):
        for item in cache[label]:
            keys.append(item[0])
            values.append(((item[2] > mask[0]) & (item[2] < mask[1])).float() if mask
                          else F.one_hot(torch.tensor(label), n_classes).float())
    if not keys:
        return torch.zeros(1)[0]
    affinity = feature @ torch.stack(keys).t()
    return alpha * ((-1) * (beta - beta * affinity)).exp() @ torch.stack(values)


def _softmax_entropy(x: torch.Tensor) -> torch.Tensor:
    return -(x.softmax(-1) * x.log_softmax(-1)).sum(-1)


def _oracle(samples: list[torch.Tensor], text: torch.Tensor, scale: float,
            p: boostadapter.BoostParams) -> list[torch.Tensor]:
    n_classes = text.shape[0]
    pos: dict[int, list] = {}
    neg: dict[int, list] = {}
    outputs = []
    for views in samples:
        logits = scale * views @ text.t()
        if views.shape[0] > 1 and not p.summary_from_original:
            chosen = torch.argsort(_softmax_entropy(logits), stable=True)[:max(1, int(views.shape[0] * 0.1))]
            output = logits[chosen]
            feature, clip_logits = views[chosen].mean(0), output.mean(0)
            log_p = output - output.logsumexp(-1, keepdim=True)
            mean_log = log_p.logsumexp(0) - math.log(output.shape[0])
            loss = float(-(mean_log * mean_log.exp()).sum())
            prob_map = output.softmax(1).mean(0)
        else:
            feature, clip_logits = views[0], logits[0]
            loss, prob_map = float(_softmax_entropy(logits[0])), logits[0].softmax(0)
        pred = int(clip_logits.argmax())
        _update_cache(pos, pred, [feature, loss], p.pos_shot_capacity, fifo=False)
        selected = torch.argsort(_softmax_entropy(logits), stable=True)[:int(views.shape[0] * 0.1)]
        boosted = copy.deepcopy(pos)
        for index in selected.tolist():
            entropy = float(_softmax_entropy(logits[index]))
            _update_cache(boosted, int(logits[index].argmax()), [views[index], entropy],
                          p.pos_shot_capacity + p.delta, fifo=False)
        if p.neg_enabled and p.entropy_lower < loss / math.log2(n_classes) < p.entropy_upper:
            _update_cache(neg, pred, [feature, loss, prob_map], p.neg_shot_capacity, fifo=True)
        final = clip_logits + _cache_logits(feature, boosted, p.pos_alpha, p.pos_beta, n_classes)
        if p.neg_enabled and neg:
            final = final - _cache_logits(feature, neg, p.neg_alpha, p.neg_beta, n_classes,
                                          (p.mask_lower, p.mask_upper))
        outputs.append(final)
    return outputs


def _run(samples: list[torch.Tensor], text: torch.Tensor, scale: float,
         params: boostadapter.BoostParams) -> tuple[list[boostadapter.StepResult], dict[str, torch.Tensor]]:
    state = boostadapter.init_state(text.shape[0], text.shape[1], params)
    results = []
    for views in samples:
        result, state = boostadapter.step(state, views, scale * views @ text.t(), params=params)
        results.append(result)
    return results, state


@pytest.mark.parametrize(("views", "from_original"), [(1, False), (30, False), (30, True), (8, True)])
def test_boostadapter_matches_the_reference_formulation(views: int, from_original: bool) -> None:
    """Every sample's final logits equal the reference loop's, with both caches full and evicting."""
    samples, text = feature_stream(300, 6, 16, views, seed=views + int(from_original))
    params = boostadapter.BoostParams(summary_from_original=from_original)
    scale = 12.0  # softer than CLIP's 100, so many samples land in the negative cache's entropy window
    expected = _oracle(samples, text, scale, params)
    results, state = _run(samples, text, scale, params)
    for index, (result, want) in enumerate(zip(results, expected, strict=True)):
        torch.testing.assert_close(result.logits, want, rtol=0, atol=1e-5, msg=f"sample {index}")
        assert int(result.logits.argmax()) == int(want.argmax())
    assert int(state["pos_count"].sum()) == 6 * params.pos_shot_capacity  # full: replacement was exercised
    assert int(state["neg_count"].sum()) == 6 * params.neg_shot_capacity  # full: the oldest dropped out
    # kept: the summary's views, then the boosting views (10%, none of fewer than 10) not among them.
    summary_size = 1 if from_original or views == 1 else max(1, views // 10)
    assert all(summary_size <= len(result.kept) <= summary_size + views // 10 for result in results)
    assert all(len(set(result.kept.tolist())) == len(result.kept) for result in results)


def test_boosting_samples_change_predictions_against_tda() -> None:
    """Not TDA under another name: on the same stream with the same cache settings, the boosting views (and the
    first-in-first-out negative cache) change some of TDA's predictions."""
    from difftpt_ops.tta.methods import tda

    samples, text = feature_stream(200, 6, 16, 30, seed=3)
    boosted, _ = _run(samples, text, 12.0, boostadapter.BoostParams())
    state = tda.init_state(6, 16, tda.TDAParams())
    changed = 0
    for views, result in zip(samples, boosted, strict=True):
        plain, state = tda.step(state, views, 12.0 * views @ text.t(), params=tda.TDAParams())
        changed += int(plain.logits.argmax() != result.logits.argmax())
    assert changed > 0


def test_checkpointed_state_continues_exactly() -> None:
    """Saving the state through safetensors bytes mid-stream and loading it changes no later result."""
    samples, text = feature_stream(120, 5, 16, 20, seed=7)
    params = boostadapter.BoostParams()
    straight, _ = _run(samples, text, 12.0, params)
    state = boostadapter.init_state(5, 16, params)
    for index, views in enumerate(samples):
        if index in (0, 37, 80):
            state = load_two_caches(load_safetensors(save_safetensors(two_caches_state_dict(state))))
        result, state = boostadapter.step(state, views, 12.0 * views @ text.t(), params=params)
        assert torch.equal(result.logits, straight[index].logits), f"sample {index}"


# --- The registered method and its spec ------------------------------------------------------------------


# The reference's configs/*.yaml (pos alpha, pos beta, delta), written out independently of the module; it has
# no imagenet.yaml (ImageNet: TDA's values).
BOOST_CONFIGS = {
    "imagenet": (2.0, 5.0, 3), "imagenet-a": (2.0, 5.0, 3), "imagenet-v2": (1.0, 8.0, 1), "imagenet-r": (1.0, 8.0, 3),
    "imagenet-sketch": (2.363, 7.45, 1), "caltech101": (5.0, 5.0, 2), "dtd": (2.0, 3.0, 0), "eurosat": (4.0, 8.0, 0),
    "aircraft": (2.0, 2.0, 2), "food101": (1.0, 1.0, 3), "flower102": (1.0, 5.0, 0), "pets": (2.0, 7.0, 0),
    "cars": (1.0, 7.0, 3), "sun397": (2.0, 3.0, 1), "ucf101": (3.0, 8.0, 0),
}


def test_each_dataset_resolves_to_the_references_views_summary_and_config() -> None:
    method = get_method("boostadapter")
    for dataset_format in (*IMAGENET_FORMATS, *CROSS_DOMAIN_FORMATS):
        spec = method.resolve_for_dataset(method_spec_from("boostadapter"), dataset_format)  # type: ignore[attr-defined]
        assert spec.n_views == (1 if dataset_format == "imagenet" else 64), dataset_format
        assert spec.augmix is False
        assert spec.summary_from_original is (dataset_format in CROSS_DOMAIN_FORMATS), dataset_format
        assert (spec.pos_alpha, spec.pos_beta, spec.delta) == BOOST_CONFIGS[dataset_format], dataset_format
    plan = method.views(method.resolve_for_dataset(method_spec_from("boostadapter"), "dtd"))  # type: ignore[attr-defined]
    assert (plan.n_conventional, plan.augmix) == (63, False)


@pytest.mark.parametrize(("field", "value"), [("pos_shot_capacity", "0"), ("delta", "-1"), ("pos_alpha", "-1"),
                                              ("n_views", "0"), ("prompts", "photos"), ("entropy_lower", "0.9")])
def test_bad_settings_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("boostadapter", {field: value})

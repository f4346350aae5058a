"""TDA and DMN-ZS steps against straightforward formulations that mirror the reference scripts' structure."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from difftpt_ops.tta.methods import dmn, tda
from tests.unit.tta_support import feature_stream

pytestmark = pytest.mark.unit


# --- TDA: dict-of-lists caches, sorted with Python's stable sort, as the reference keeps them ----------------


def _oracle_tda(samples: list[torch.Tensor], text: torch.Tensor, scale: float, p: tda.TDAParams) -> list[torch.Tensor]:
    pos: dict[int, list] = {}
    neg: dict[int, list] = {}
    outputs = []

    def update(cache: dict[int, list], label: int, item: list, capacity: int) -> None:
        if label in cache:
            if len(cache[label]) < capacity:
                cache[label].append(item)
            elif item[1] < cache[label][-1][1]:
                cache[label][-1] = item
            cache[label] = sorted(cache[label], key=operator.itemgetter(1))
        else:
            cache[label] = [item]

    def correction(feature: torch.Tensor, cache: dict[int, list], alpha: float, beta: float,
                   mask: tuple[float, float] | None) -> torch.Tensor:
        keys, values = [], []
        for label in sorted(cache):
            for item in cache[label]:
                keys.append(item[0])
                if mask is None:
                    values.append(F.one_hot(torch.tensor(label), text.shape[0]).float())
                else:
                    values.append(((item[2] > mask[0]) & (item[2] < mask[1])).float())
        affinity = feature @ torch.stack(keys).t()
        return alpha * ((-1) * (beta - beta * affinity)).exp() @ torch.stack(values)

    for views in samples:
        logits = scale * views @ text.t()
        if views.shape[0] > 1:
            entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
            chosen = torch.argsort(entropy, stable=True)[:max(1, int(views.shape[0] * p.selection_p))]
            kept = logits[chosen]
            feature, clip_logits = views[chosen].mean(0), kept.mean(0)
            log_p = kept - kept.logsumexp(-1, keepdim=True)
            mean_log = log_p.logsumexp(0) - math.log(kept.shape[0])
            loss = float(-(mean_log * mean_log.exp()).sum())
            prob_map = kept.softmax(1).mean(0)
        else:
            feature, clip_logits = views[0], logits[0]
            loss = float(-(logits.softmax(1) * logits.log_softmax(1)).sum())
            prob_map = logits[0].softmax(0)
        label = int(clip_logits.argmax())
        update(pos, label, [feature, loss], p.pos_shot_capacity)
        if p.entropy_lower < loss / math.log2(text.shape[0]) < p.entropy_upper:
            update(neg, label, [feature, loss, prob_map], p.neg_shot_capacity)
        final = clip_logits + correction(feature, pos, p.pos_alpha, p.pos_beta, None)
        if neg:
            final = final - correction(feature, neg, p.neg_alpha, p.neg_beta, (p.mask_lower, p.mask_upper))
        outputs.append(final)
    return outputs


@pytest.mark.parametrize("views", [1, 20])
def test_tda_matches_the_reference_formulation(views: int) -> None:
    """Every sample's final logits equal the dict-of-lists formulation, with both caches filled and evicting."""
    samples, text = feature_stream(300, 6, 16, views, seed=views)
    params = tda.TDAParams()
    scale = 12.0  # softer than CLIP's 100, so many samples land in the negative cache's entropy window
    expected = _oracle_tda(samples, text, scale, params)
    state = tda.init_state(6, 16, params)
    for views_features, want in zip(samples, expected, strict=True):
        result, state = tda.step(state, views_features, scale * views_features @ text.t(), params=params)
        torch.testing.assert_close(result.logits, want, rtol=0, atol=1e-5)
        assert int(result.logits.argmax()) == int(want.argmax())
    assert int(state["pos_count"].sum()) == 6 * params.pos_shot_capacity  # full: replacement was exercised
    assert int(state["neg_count"].sum()) > 0
    assert bool((state["pos_entropy"][:, :-1] <= state["pos_entropy"][:, 1:]).all())


def test_tda_caches_change_predictions() -> None:
    """The adapter is not a no-op: some predictions differ from CLIP's."""
    samples, text = feature_stream(200, 6, 16, 1, seed=3)
    params = tda.TDAParams(pos_alpha=5.0)
    state = tda.init_state(6, 16, params)
    changed = 0
    for views in samples:
        result, state = tda.step(state, views, 12.0 * views @ text.t(), params=params)
        changed += int(result.logits.argmax() != result.clip_logits.argmax())
    assert changed > 0


# --- DMN-ZS: the memory as the reference keeps it (zero slots, renormalised and masked at every read) --------


def _oracle_dmn(samples: list[torch.Tensor], text: torch.Tensor, scale: float, p: dmn.DMNParams) -> list[torch.Tensor]:
    n_classes, dim = text.shape
    memory = torch.zeros(n_classes, p.memory_size, dim)
    entropies = torch.zeros(n_classes, p.memory_size)
    count = [0] * n_classes
    outputs = []
    for views in samples:
        probs = (scale * views @ text.t()).softmax(-1)
        view_entropy = -(probs * torch.log(probs + 1e-6)).sum(1)
        chosen = torch.argsort(view_entropy, stable=True)[:max(1, int(views.shape[0] * p.selection_p))]
        mean = probs[chosen].mean(0)
        label = int(mean.argmax())
        entropy = -(mean * torch.log(mean + 1e-8)).sum()
        if count[label] == p.memory_size:
            if bool((entropy < entropies[label]).any()):
                slot = int(torch.sort(entropies[label], stable=True).indices[-1])
                memory[label, slot], entropies[label, slot] = views[0], entropy
        else:
            memory[label, count[label]], entropies[label, count[label]] = views[0], entropy
            count[label] += 1
        stacked = torch.cat([memory, text.unsqueeze(1)], dim=1)
        keys = stacked / stacked.norm(dim=-1, keepdim=True)
        keys[stacked.sum(-1) == 0] = 0
        query = views[0] / views[0].norm()
        weights = torch.exp(-p.beta * (-(query * keys).sum(-1) + 1))
        adaptive = (keys * weights.unsqueeze(-1)).sum(1)
        adaptive = adaptive / adaptive.norm(dim=-1, keepdim=True)
        adaptive = adaptive / adaptive.norm(dim=-1, keepdim=True)
        memory_probs = (scale * adaptive @ views[0]).softmax(-1)
        outputs.append(probs[0] + p.dynamic_weight * memory_probs)
    return outputs


@pytest.mark.parametrize("views", [1, 32])
def test_dmn_matches_the_reference_formulation(views: int) -> None:
    """Every sample's combined prediction equals the masked-memory formulation, with memories full and evicting."""
    samples, text = feature_stream(260, 5, 16, views, seed=10 + views)
    params = dmn.DMNParams(memory_size=8)
    expected = _oracle_dmn(samples, text, 20.0, params)
    state = dmn.init_state(5, 16, params)
    for views_features, want in zip(samples, expected, strict=True):
        result, state = dmn.step(state, views_features, 20.0 * views_features @ text.t(), text, scale=20.0,
                                 params=params)
        torch.testing.assert_close(result.logits, want, rtol=0, atol=1e-6)
        assert int(result.logits.argmax()) == int(want.argmax())
    assert int(state["count"].max()) == params.memory_size


def _advance(module, state, views, text, params):  # type: ignore[no-untyped-def]
    logits = 12.0 * views @ text.t()
    if module is tda:
        return tda.step(state, views, logits, params=params)
    return dmn.step(state, views, logits, text, scale=12.0, params=params)


@pytest.mark.parametrize("module,params", [(tda, tda.TDAParams()), (dmn, dmn.DMNParams(memory_size=8))])
def test_checkpointed_state_continues_exactly(module, params) -> None:  # type: ignore[no-untyped-def]
    """Saving the state through safetensors bytes mid-stream and loading it changes no later result."""
    samples, text = feature_stream(120, 5, 16, 4, seed=7)
    full = module.init_state(5, 16, params)
    straight = []
    for views in samples:
        result, full = _advance(module, full, views, text, params)
        straight.append(result.logits)
    state = module.init_state(5, 16, params)
    resumed = []
    for index, views in enumerate(samples):
        if index in (37, 80):
            state = module.load_state_dict(load_safetensors(save_safetensors(module.state_dict(state))))
        result, state = _advance(module, state, views, text, params)
        resumed.append(result.logits)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_order_seed_changes_predictions_on_a_crafted_stream() -> None:
    """An ambiguous sample is predicted by CLIP's logits when it comes first, and pulled to the class of three
    confident near neighbours when the order puts them before it."""
    from difftpt_ops.services.running.online import stream_order

    text = torch.eye(2, 8)
    ambiguous = F.normalize(text[0] + 0.98 * text[1], dim=-1)
    neighbours = [F.normalize(text[0] + (1.1 + 0.01 * k) * text[1], dim=-1) for k in range(3)]
    stream = [ambiguous, *neighbours]  # sample index 0 is the ambiguous one
    params = tda.TDAParams()

    def prediction_of_ambiguous(order_seed: int) -> int:
        state = tda.init_state(2, 8, params)
        for index in stream_order(len(stream), order_seed):
            views = stream[index].unsqueeze(0)
            result, state = tda.step(state, views, 100.0 * views @ text.t(), params=params)
            if index == 0:
                return int(result.logits.argmax())
        raise AssertionError("the ambiguous sample never came")

    first = next(s for s in range(100) if stream_order(4, s)[0] == 0)
    last = next(s for s in range(100) if stream_order(4, s)[-1] == 0)
    assert prediction_of_ambiguous(first) == 0  # CLIP's own answer (slightly class 0)
    assert prediction_of_ambiguous(last) == 1  # after three class-1 neighbours entered the positive cache


def test_dmn_crops_cover_half_the_image_as_the_reference_and_older_runs_keep_theirs() -> None:
    """DMN's data/datautils.py crops with RandomResizedCrop(224, scale=(0.5, 1)); runs stored before `crop_min`
    existed used TPT's 0.08 and read back as such, with their fingerprint unchanged."""
    from difftpt_ops.core.method_specs import method_spec_from, method_spec_from_dict
    from difftpt_ops.tta.methods import get_method

    spec = method_spec_from("dmn-zs")
    assert get_method("dmn-zs").views(spec).crop_scale == (0.5, 1.0) and spec.to_dict()["crop_min"] == 0.5
    old = {key: value for key, value in spec.to_dict().items() if key != "crop_min"}
    assert method_spec_from_dict(old).crop_min == 0.08 and method_spec_from_dict(old).to_dict() == old
    assert get_method("dmn-zs").views(method_spec_from_dict(old)).crop_scale == (0.08, 1.0)
    assert get_method("tda").views(method_spec_from("tda")).crop_scale == (0.08, 1.0)


# --- TDA's per-dataset settings: kdiAAA/TDA configs/*.yaml and utils.py's loaders, written out here -------------

# (positive alpha, positive beta, views) per format. The yaml files give alpha and beta (every file has
# capacities 3 and 2, negative alpha 0.117 and beta 1.0, entropy thresholds (0.2, 0.5), mask thresholds
# (0.03, 1.0)); `build_test_data_loader` gives the views: get_ood_preprocess (original + 63 AugMix) for A, V, R
# and S, CLIP's single preprocess for I and the cross-domain sets. imagenet_a, imagenet_r and sun397.yaml are read
# in taolinzhang/BoostAdapter's configs/, whose TDA entries equal upstream's wherever both are stored.
TDA_CONFIGS = {
    "imagenet": (2.0, 5.0, 1), "imagenet-a": (2.0, 5.0, 64), "imagenet-v2": (1.0, 8.0, 64),
    "imagenet-r": (1.0, 8.0, 64), "imagenet-sketch": (2.363, 7.45, 64), "caltech101": (5.0, 5.0, 1),
    "dtd": (2.0, 3.0, 1), "eurosat": (4.0, 8.0, 1), "aircraft": (2.0, 2.0, 1), "food101": (1.0, 1.0, 1),
    "flower102": (1.0, 5.0, 1), "pets": (2.0, 7.0, 1), "cars": (1.0, 7.0, 1), "sun397": (2.0, 3.0, 1),
    "ucf101": (3.0, 8.0, 1),
}


def test_tda_resolves_each_datasets_reference_config() -> None:
    """Every format gets its yaml's positive alpha and beta and its loader's views (AugMix exactly with several);
    the settings every yaml shares stay at their values; an image folder takes ImageNet's config."""
    from difftpt_ops.data.formats import CROSS_DOMAIN_FORMATS, IMAGENET_FORMATS

    assert set(TDA_CONFIGS) == {*IMAGENET_FORMATS, *CROSS_DOMAIN_FORMATS}
    for fmt, (alpha, beta, views) in {**TDA_CONFIGS, "imagefolder": TDA_CONFIGS["imagenet"]}.items():
        spec = tda.resolve_for_format(tda.TDASpec(), fmt)
        assert (spec.pos_alpha, spec.pos_beta, spec.n_views, spec.augmix) == (alpha, beta, views, views > 1), fmt
        p = spec.params()
        assert (p.pos_shot_capacity, p.neg_shot_capacity, p.neg_alpha, p.neg_beta) == (3, 2, 0.117, 1.0), fmt
        assert (p.entropy_lower, p.entropy_upper, p.mask_lower, p.mask_upper, p.selection_p) == (
            0.2, 0.5, 0.03, 1.0, 0.1), fmt


def test_tda_docs_table_states_the_resolved_configs() -> None:
    """docs/methods.md's TDA table lists, per format, what `resolve_for_format` gives."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text(encoding="utf-8")
    section = text.split("## TDA (`--method tda`)", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].replace(".", "", 1).isdigit():
            rows[cells[0].split(" ")[0]] = (float(cells[1]), float(cells[2]), cells[3])
    assert set(rows) == set(TDA_CONFIGS)
    for fmt, (alpha, beta, views) in rows.items():
        spec = tda.resolve_for_format(tda.TDASpec(), fmt)
        shown = f"{spec.n_views}, AugMix" if spec.augmix else str(spec.n_views)
        assert (alpha, beta, views) == (spec.pos_alpha, spec.pos_beta, shown), fmt

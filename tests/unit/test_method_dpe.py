"""DPE's step against a straightforward formulation that mirrors the reference script's structure
(zhangce01/DPE-CLIP main_dpe.py: dict-of-lists cache, residual modules in the (dim, classes) layout, a fresh
torch AdamW per sample, the InfoNCE package's loss written out), plus checkpoints and spec resolution."""

from __future__ import annotations

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
from difftpt_ops.tta.methods import dpe, get_method
from difftpt_ops.tta.methods.ensemble import prompt_templates
from tests.unit.tta_support import feature_stream

pytestmark = pytest.mark.unit


# --- The reference's loop, written out -------------------------------------------------------------------


def _avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def _info_nce(query: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """info_nce's loss without negative keys: the other rows' positives are the negatives."""
    query, positive = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
    logits = query @ positive.t()
    return F.cross_entropy(logits / temperature, torch.arange(len(query)), reduction="mean")


class _Residual(torch.nn.Module):
    """A zero residual added to (dim, n) prototypes, whose columns are then normalised; fp16 as the reference's
    (`.half()`), so that torch's AdamW steps it in fp16, unless `exact`."""

    def __init__(self, prototypes: torch.Tensor, exact: bool) -> None:
        super().__init__()
        self.residual = torch.nn.Parameter(torch.zeros_like(prototypes, dtype=None if exact else torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.clone() + self.residual, dim=0)


def _clip_logits(views: torch.Tensor, weights: torch.Tensor, scale: float, p: dpe.DPEParams):  # type: ignore[no-untyped-def]
    logits = scale * views @ weights
    if views.shape[0] > 1:
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        chosen = torch.argsort(entropy, stable=True)[:max(1, int(views.shape[0] * p.selection_p))]
        output = logits[chosen]
        return views[chosen].mean(0, keepdim=True), output.mean(0, keepdim=True), _avg_entropy(output)
    return views, logits, -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _oracle_dpe(samples: list[torch.Tensor], text: torch.Tensor, scale: float, p: dpe.DPEParams) -> list[torch.Tensor]:
    n_classes = text.shape[0]
    weights_global = text.t().clone()  # (dim, classes), as clip_classifier stacks them
    cache: dict[int, list] = {}
    num_avg = 0
    outputs = []
    for views in samples:
        weights_local = weights_global.clone().detach()
        text_residue = _Residual(weights_local, exact=p.residual_dtype == "fp32")
        # The reference calls text_residue again before the alignment loss; one call here, so that autograd
        # rounds the fp16 residual's gradient once (the reference's whole forward and backward are fp16, of
        # which an fp32 computation models only the optimiser's step).
        new_weights = text_residue(weights_local)
        feature, clip_logits, loss = _clip_logits(views, new_weights, scale, p)
        pred = int(clip_logits.argmax())
        entropy = float(loss.detach() / math.log2(n_classes))
        if pred in cache:
            if len(cache[pred]) < p.shot_capacity:
                cache[pred].append([feature, entropy])
            elif entropy < cache[pred][-1][1]:
                cache[pred][-1] = [feature, entropy]
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        else:
            cache[pred] = [[feature, entropy]]
        keys, values, classes = [], [], []
        for label in sorted(cache):
            prototype = torch.zeros_like(feature)
            for item in cache[label]:
                prototype += item[0] / len(cache[label])
            keys.append(prototype)
            values.append(label)
            classes.append(label)
        cache_keys = torch.cat(keys, dim=0).permute(1, 0)
        cache_values = F.one_hot(torch.tensor(values), num_classes=n_classes).to(text.dtype)
        cache_residue = _Residual(cache_keys, exact=p.residual_dtype == "fp32")

        new_keys = cache_residue(cache_keys)
        final = clip_logits.clone() + p.alpha * ((-1) * (p.beta - p.beta * (feature @ new_keys))).exp() @ cache_values
        loss = _avg_entropy(final) + p.align * _info_nce(new_keys.t(), new_weights[:, classes].t(), 0.01)
        optimizer = torch.optim.AdamW([
            {"params": text_residue.parameters(), "lr": p.lr_text, "eps": 1e-3, "weight_decay": 1e-1},
            {"params": cache_residue.parameters(), "lr": p.lr_image, "eps": 1e-3, "weight_decay": 1e-1}])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        with torch.no_grad():
            new_weights = text_residue(weights_local)
            if p.predict_from_kept:
                query, query_logits, _ = _clip_logits(views, new_weights, scale, p)
            else:
                query, query_logits, _ = _clip_logits(views[:1], new_weights, scale, p)
            new_keys = cache_residue(cache_keys)
            final = query_logits + p.alpha * ((-1) * (p.beta - p.beta * (query @ new_keys))).exp() @ cache_values
            outputs.append(final[0])
            if float(_avg_entropy(final) / math.log2(n_classes)) < p.evolve_threshold:
                num_avg += 1
                weights_global = weights_global * (num_avg / (num_avg + 1)) + new_weights * (1 / (num_avg + 1))
    return outputs


# --- Equivalence -----------------------------------------------------------------------------------------


def _run(samples: list[torch.Tensor], text: torch.Tensor, scale: float,
         params: dpe.DPEParams) -> tuple[list[dpe.StepResult], dict[str, torch.Tensor]]:
    state = dpe.init_state(text.shape[0], text.shape[1], params, dtype=text.dtype)
    results = []
    for views in samples:
        result, state = dpe.step(state, views, text, scale=scale, params=params)
        results.append(result)
    return results, state


@pytest.mark.parametrize("residual_dtype", ["fp16", "fp32"])
@pytest.mark.parametrize(("views", "predict_from_kept"), [(1, False), (20, False), (20, True)])
def test_dpe_matches_the_reference_formulation_in_fp64(views: int, predict_from_kept: bool,
                                                       residual_dtype: str) -> None:
    """Every sample's final logits equal the reference loop's to 1e-9 in fp64, with the cache full and evicting
    and the text prototypes evolving many times (both computations run in fp64, so rounding cannot hide a
    difference in the formulation; with fp16 residuals both round the optimiser's step the same way)."""
    samples, text = feature_stream(240, 6, 16, views, seed=views + int(predict_from_kept))
    samples, text = [views.double() for views in samples], text.double()
    # Larger learning rates than the reference's 0.0006, so the residuals move the predictions visibly.
    # The oracle's AdamW runs on the CPU: the step emulates the CPU kernels' fp16 arithmetic to match it.
    params = dpe.DPEParams(lr_text=0.01, lr_image=0.01, evolve_threshold=0.3, predict_from_kept=predict_from_kept,
                           residual_dtype=residual_dtype, kernels="cpu")
    expected = _oracle_dpe(samples, text, 12.0, params)
    results, state = _run(samples, text, 12.0, params)
    for index, (result, want) in enumerate(zip(results, expected, strict=True)):
        torch.testing.assert_close(result.logits, want, rtol=0, atol=1e-9, msg=f"sample {index}")
    assert int(state["pos_count"].sum()) == 6 * params.shot_capacity  # full: replacement was exercised
    assert 20 < int(state["evolutions"]) < len(samples)  # evolved often, not always
    assert bool((state["pos_entropy"][:, :-1] <= state["pos_entropy"][:, 1:]).all())


def test_the_reference_defaults_in_fp32_match_the_reference_formulation() -> None:
    """In fp32, at CLIP's scale and the reference's settings, the same predictions and logits up to rounding."""
    samples, text = feature_stream(120, 5, 16, 8, seed=4)
    params = dpe.DPEParams()
    expected = _oracle_dpe(samples, text, 100.0, params)
    results, state = _run(samples, text, 100.0, params)
    # AdamW's first step divides the gradient by |g| + 1e-3, which amplifies the two computations' gradient
    # rounding (about 1e-7), and rounding the step to fp16 now and then turns it into a whole fp16 step (1e-3
    # relative); the running mean of the text prototypes carries that along the stream. Logits are near 30.
    for result, want in zip(results, expected, strict=True):
        torch.testing.assert_close(result.logits, want, rtol=0, atol=2e-2)
        assert int(result.logits.argmax()) == int(want.argmax())
    assert 0 < int(state["evolutions"]) < len(samples)


@pytest.mark.parametrize("foreach", [False, True])
def test_the_first_step_is_torchs_adamw_on_a_zero_parameter(foreach: bool) -> None:
    """fp16 with the CPU kernels' order: bit for bit what torch's AdamW (eps 1e-3, weight decay 0.1) does to a
    zero fp16 parameter on the CPU, over gradients from 1e-8 to 1 (the second moment underflows below about
    5.5e-3); with the CUDA kernels' order (the default, the reference's GPU; checked there by the GPU tier) the
    same except on a few elements in 10,000; fp32: the same up to rounding."""
    g = torch.Generator().manual_seed(0)
    grad = torch.sign(torch.randn(50_000, generator=g)) * 10 ** (torch.rand(50_000, generator=g) * 8 - 8)
    for residual_dtype, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        parameter = torch.nn.Parameter(torch.zeros(50_000, dtype=dtype))
        optimizer = torch.optim.AdamW([parameter], lr=0.0006, eps=1e-3, weight_decay=1e-1, foreach=foreach)
        parameter.grad = grad.to(dtype)
        optimizer.step()
        if residual_dtype == "fp16":
            assert torch.equal(dpe.adamw_first_step(grad, 0.0006, "fp16", kernels="cpu").to(dtype), parameter.detach())
            cuda_order = dpe.adamw_first_step(grad, 0.0006, "fp16").to(dtype)
            assert 0 < int((cuda_order != parameter.detach()).sum()) < 50  # the products' order, on a few
        else:
            torch.testing.assert_close(dpe.adamw_first_step(grad, 0.0006, "fp32"), parameter.detach(), rtol=1e-6,
                                       atol=0)
    small = torch.tensor([1e-3, 5e-3, 1e-2])
    ratio = dpe.adamw_first_step(small, 1.0, "fp16") / dpe.adamw_first_step(small, 1.0, "fp32")
    assert ratio[0] == pytest.approx(2.0, rel=1e-3) and ratio[1] == pytest.approx(6.0, rel=1e-3)  # -lr * g / eps
    assert ratio[2] == pytest.approx(1.0, abs=0.1)


def test_tuning_and_evolution_change_predictions() -> None:
    """The residuals and the evolving prototypes are not no-ops: some predictions differ from the cache alone."""
    samples, text = feature_stream(200, 6, 16, 1, seed=3)
    tuned, _ = _run(samples, text, 12.0, dpe.DPEParams(lr_text=0.05, lr_image=0.05, evolve_threshold=0.5))
    frozen, _ = _run(samples, text, 12.0, dpe.DPEParams(lr_text=0.0, lr_image=0.0, evolve_threshold=0.0))
    assert sum(int(a.logits.argmax() != b.logits.argmax()) for a, b in zip(tuned, frozen, strict=True)) > 0
    assert not any(result.evolved for result in frozen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checkpointed_state_continues_exactly(dtype: torch.dtype) -> None:
    """Saving the state through safetensors bytes mid-stream and loading it changes no later result."""
    samples, text = feature_stream(90, 5, 16, 4, seed=7)
    samples, text = [views.to(dtype) for views in samples], text.to(dtype)
    params = dpe.DPEParams(lr_text=0.01, evolve_threshold=0.3)
    straight, final = _run(samples, text, 12.0, params)
    assert int(final["evolutions"]) > 0  # the text prototypes moved: the checkpoint must carry them
    state = dpe.init_state(5, 16, params, dtype=dtype)
    for index, views in enumerate(samples):
        if index in (0, 37, 80):
            state = dpe.load_state_dict(load_safetensors(save_safetensors(dpe.state_dict(state))))
        result, state = dpe.step(state, views, text, scale=12.0, params=params)
        assert torch.equal(result.logits, straight[index].logits), f"sample {index}"


# --- The registered method and its spec ------------------------------------------------------------------

# The reference's datasets/*.py `template` per dataset, its configs/*.yaml (alpha, beta, lr text, lr image,
# align) and its view pipeline (utils.py build_test_data_loader: get_preprocess, 63 AugMix views and the
# original, for I/A/V/R/S), written out here independently of the module.
DPE_TEMPLATES = {
    "imagenet": "tip", "imagenet-a": "tip", "imagenet-v2": "tip", "imagenet-r": "ensemble",
    "imagenet-sketch": "ensemble", "caltech101": "tip", "sun397": "tip",
    "cars": ["a photo of a {}.", "A {} featuring a wide range of color options for easy selection."],
    "dtd": ["{} texture."], "eurosat": ["a centered satellite photo of {}."],
    "aircraft": ["a photo of a {}, a type of aircraft."], "food101": ["a photo of {}, a type of food."],
    "flower102": ["a photo of a {}, a type of flower."], "pets": ["a photo of a {}, a type of pet."],
    "ucf101": ["a photo of a person doing {}."],
}


DPE_CONFIGS = {
    "imagenet": (6.0, 5.0, 0.0006, 0.0006, 0.5), "imagenet-a": (6.0, 5.0, 0.0003, 0.0003, 2.5),
    "imagenet-v2": (3.0, 8.0, 0.0005, 0.0005, 0.5), "imagenet-r": (3.0, 8.0, 0.0006, 0.0006, 0.0),
    "imagenet-sketch": (7.0, 7.45, 0.0006, 0.0006, 0.2), "caltech101": (15.0, 5.0, 0.0006, 0.0006, 0.2),
    "dtd": (6.0, 3.0, 0.0006, 0.0006, 0.2), "eurosat": (3.0, 8.0, 0.00005, 0.00005, 0.2),
    "aircraft": (6.0, 2.0, 0.0006, 0.0006, 0.2), "food101": (3.0, 1.0, 0.0002, 0.0002, 0.2),
    "flower102": (2.5, 5.0, 0.0001, 0.0001, 0.2), "pets": (4.0, 7.0, 0.00005, 0.00005, 0.2),
    "cars": (3.0, 7.0, 0.0001, 0.0001, 1.5), "sun397": (6.0, 3.0, 0.0002, 0.0002, 0.2),
    "ucf101": (9.0, 8.0, 0.0004, 0.0004, 0.2),
}


def test_each_dataset_resolves_to_the_references_views_templates_and_config() -> None:
    method = get_method("dpe")
    for dataset_format in (*IMAGENET_FORMATS, *CROSS_DOMAIN_FORMATS):
        spec = method.resolve_for_dataset(method_spec_from("dpe"), dataset_format)  # type: ignore[attr-defined]
        expected = DPE_TEMPLATES[dataset_format]
        templates = prompt_templates(expected) if isinstance(expected, str) else tuple(expected)
        assert prompt_templates(spec.prompts) == templates, dataset_format
        multi = dataset_format in IMAGENET_FORMATS
        assert (spec.n_views, spec.augmix) == ((64, True) if multi else (1, False)), dataset_format
        assert spec.predict_from_kept is (dataset_format == "imagenet-a")
        config = (spec.alpha, spec.beta, spec.lr_text, spec.lr_image, spec.align)
        assert config == DPE_CONFIGS[dataset_format], dataset_format
    folder = method.resolve_for_dataset(method_spec_from("dpe"), "imagefolder")  # type: ignore[attr-defined]
    assert (folder.prompts, folder.n_views, folder.alpha) == ("single", 1, 6.0)
    overridden = method.resolve_for_dataset(  # type: ignore[attr-defined]
        method_spec_from("dpe", {"alpha": "1.5", "n_views": "8", "predict_from_kept": "false"}), "imagenet-a")
    assert (overridden.alpha, overridden.n_views, overridden.predict_from_kept) == (1.5, 8, False)


@pytest.mark.parametrize(("field", "value"), [("shot_capacity", "0"), ("alpha", "-1"), ("lr_text", "-0.1"),
                                              ("selection_p", "0"), ("n_views", "0"), ("prompts", "photos"),
                                              ("evolve_threshold", "-1"), ("residual_dtype", "bf16")])
def test_bad_settings_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("dpe", {field: value})


def test_the_coop_variant_classifies_with_the_coop_prompt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The reference's --coop classifier (one prompt whose 4 context words are CoOp's learned vectors) is the
    single prompt with a CoOp checkpoint: the features every DPE step reads are the prompt learner's with that
    context, as TPT's initial prompt is."""
    from difftpt_ops.models.clip import read_coop_checkpoint
    from difftpt_ops.tta import prepare_classifier
    from tests.unit.tta_support import CLASS_NAMES, tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    path = tmp_path / "coop.pth"
    torch.save({"state_dict": {"ctx": torch.randn(4, 64, generator=torch.Generator().manual_seed(0))}}, path)
    coop = {"prompts": "single", "prompt.coop_checkpoint": str(path)}
    state = read_coop_checkpoint(path)
    with_coop = prepare_classifier(clip, CLASS_NAMES, method_spec_from("dpe", coop), coop_state=state)
    tpt = prepare_classifier(clip, CLASS_NAMES, method_spec_from("tpt", {"prompt.coop_checkpoint": str(path)}),
                             coop_state=state)
    plain = prepare_classifier(clip, CLASS_NAMES, method_spec_from("dpe", {"prompts": "single"}))
    text = with_coop._initial_text_features()  # noqa: SLF001 - what every online step reads
    assert torch.equal(text, tpt._initial_text_features())  # noqa: SLF001
    assert not torch.allclose(text, plain._initial_text_features(), atol=1e-3)  # noqa: SLF001

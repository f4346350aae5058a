"""RLCF against a straightforward transcription of the reference's tuning loop (mzhaoshuai/RLCF, TPT/tpt_cls_rl.py
`test_time_tuning` with TPT/clip_reward.py `CLIPRewards`), its settings, and the engine with a second tiny CLIP as
reward model (another width and input size, so that a mix-up of the two models cannot pass)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.core.specs import ModelSpec  # noqa: E402
from difftpt_ops.models.clip import LoadedClip, load_clip  # noqa: E402
from difftpt_ops.models.tiny_clip import make_tiny_clip  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.methods import RewardInputs, StepInputs, get_method  # noqa: E402
from difftpt_ops.tta.methods.rlcf import RLCFSpec, sample_classes  # noqa: E402
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402
from difftpt_ops.tta.prompts import class_prompt_texts  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image, tiny_clip  # noqa: E402

pytestmark = pytest.mark.unit

LOGIT_SCALE = 100.0


def _policy(image: torch.Tensor, text: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """A stand-in for the prompt-tuned CLIP: logits of normalised image features against the (tunable) class
    features, normalised, as CLIP's forward computes them."""
    return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def reference_tuning(image: torch.Tensor, text0: torch.Tensor, reward_image_all: torch.Tensor,
                     reward_text: torch.Tensor, *, steps: int, selection_p: float, k: int, lr: float,
                     weight_decay: float, reward_process: bool = True, amplify: bool = False,
                     process_batch: bool = False, min_entropy_w: float = 0.0, scale: float = LOGIT_SCALE
                     ) -> tuple[torch.Tensor, list[int], list[float]]:
    """tpt_cls_rl.test_time_tuning, then the prediction of view 0 (test_time_adapt_eval), written out plainly:
    the confident selection once at step 0 (argsort of the entropies, the first int(n * p)), the reward model's
    image features of the selected views set then, top-K of each selected view's output, CLIPScore one pair at a
    time (2.5 * max(cos, 0)), rewards_post_process with plain sums (mean, unbiased std + 1e-5), the loss
    mean(rewards * cross_entropy(repeat_interleave(output, K), flatten(index))), plus, with --min_entropy_reg,
    min_entropy_w * avg_entropy(output) (TPT's entropy of the mean probability, as tpt_cls_rl.py writes it), one
    AdamW step per step."""
    text = text0.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([text], lr, weight_decay=weight_decay)
    selected = None
    reward_image = None
    losses = []
    for _ in range(steps):
        if selected is not None:
            output = _policy(image[selected], text, scale)
        else:
            output = _policy(image, text, scale)
            entropy = -(output.softmax(1) * output.log_softmax(1)).sum(1)
            selected = torch.argsort(entropy, descending=False)[:int(entropy.size()[0] * selection_p)]
            output = output[selected]
            reward_image = reward_image_all[selected]  # reward_model.set_image_features(inputs[selected_idx])
        bs = output.shape[0]
        _, index = torch.topk(output, k, dim=-1)
        flatten_index = index.flatten()
        scores = []
        for row in range(bs * k):  # CLIPScore(pairwise=False): text of the sampled class . its view's image
            t, v = reward_text[flatten_index[row]].tolist(), reward_image[row // k].tolist()
            scores.append(max(2.5 * sum(a * b for a, b in zip(t, v, strict=True)), 0.0))
        groups = [scores] if process_batch else [scores[i * k:(i + 1) * k] for i in range(bs)]
        rewards: list[float] = []
        for group in groups:
            if reward_process and len(group) > 1:
                mean = sum(group) / len(group)
                std = (sum((x - mean) ** 2 for x in group) / (len(group) - 1)) ** 0.5 + 1e-5 if amplify else 1.0
                rewards.extend((x - mean) / std for x in group)
            else:
                rewards.extend(group)
        rep_output = torch.repeat_interleave(output, k, dim=0)
        all_loss = F.cross_entropy(rep_output, flatten_index, reduction="none")
        loss = torch.mean(torch.tensor(rewards, dtype=all_loss.dtype) * all_loss)
        if min_entropy_w:  # args.min_entropy_reg: + args.min_entropy_w * avg_entropy(output)
            log_p = output - output.logsumexp(dim=-1, keepdim=True)
            avg = log_p.logsumexp(dim=0) - math.log(log_p.shape[0])
            avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
            loss = loss + min_entropy_w * -(avg * torch.exp(avg)).sum(dim=-1)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = _policy(image[:1], text, scale)[0]
    return final, sorted(selected.tolist()), losses


def method_tuning(spec: RLCFSpec, image: torch.Tensor, text0: torch.Tensor, reward_image_all: torch.Tensor,
                  reward_text: torch.Tensor, scale: float = LOGIT_SCALE
                  ) -> tuple[torch.Tensor, list[int], list[float]]:
    """The registered method in the engine's loop (engine.Tuner._prompt_tuning / _tune): select at step 0 with the
    initial features, the reward model's features of the kept views once, `tuning_loss` per step, `predict`."""
    method = get_method("rlcf")
    text = text0.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([text], lr=spec.lr, weight_decay=spec.weight_decay)
    logits = _policy(image, text, scale)
    kinds = ("original",) + ("conventional",) * (len(image) - 1)
    with torch.no_grad():
        scores = method.select(spec, StepInputs(image_features=F.normalize(image, dim=-1), text_features=text.detach(),
                                                logit_scale=torch.tensor(scale), logits=logits.detach(),
                                                kinds=kinds))
    reward = RewardInputs(image_features=reward_image_all[scores.indices], text_features=reward_text)
    losses = []
    for step in range(spec.steps):
        step_logits = logits[scores.indices] if step == 0 else _policy(image[scores.indices], text, scale)
        loss = method.tuning_loss(spec, step_logits, text, reward)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = method.predict(spec, StepInputs(image_features=image[:1], text_features=text, logit_scale=torch.tensor(
            scale), logits=_policy(image[:1], text, scale), kinds=kinds[:1]))
    return final, sorted(scores.indices.tolist()), losses


def _features(seed: int, n_views: int = 64, n_classes: int = 20, dim: int = 16,
              reward_dim: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n_classes, dim, generator=g)
    image = text[torch.randint(n_classes, (n_views,), generator=g)] + 1.5 * torch.randn(n_views, dim, generator=g)
    reward_text = F.normalize(torch.randn(n_classes, reward_dim, generator=g), dim=-1)
    reward_image = F.normalize(torch.randn(n_views, reward_dim, generator=g), dim=-1)
    return image, text, reward_image, reward_text


FLAT = 5.0  # a logit scale at which the top class's cross-entropy is not ~0 (at 100 a K = 1 loss vanishes)


@pytest.mark.parametrize(("settings", "scale"), [
    ({}, LOGIT_SCALE), ({"reward_amplify": True}, LOGIT_SCALE), ({"process_batch": True}, LOGIT_SCALE),
    ({"reward_process": False}, LOGIT_SCALE), ({"sample_k": 5, "steps": 2}, LOGIT_SCALE),
    ({"selection_p": 0.25, "steps": 1}, LOGIT_SCALE), ({"entropy_weight": 0.1}, LOGIT_SCALE),
    ({"selection_p": 0.02}, LOGIT_SCALE),
    ({"selection_p": 0.02, "process_batch": True, "reward_amplify": True}, LOGIT_SCALE),
    ({}, FLAT), ({"sample_k": 1}, FLAT), ({"selection_p": 0.02, "sample_k": 1}, FLAT),
    ({"sample_k": 1, "process_batch": True}, FLAT)])
def test_tuning_equals_the_reference_transcription(settings: dict, scale: float) -> None:
    """The defaults of the reference's rlcf-prompt.sh (64 views, 10% kept, K = 3, 3 steps, AdamW lr 7e-3, weight
    decay 5e-4, per-view baseline), each reward option, the experimental entropy term (--min_entropy_reg with
    --min_entropy_w 0.1), a single kept view (int(64 * 0.02) = 1) and K = 1 (no baseline: a group of one score),
    the last with flatter logits so that the loss does not vanish: same kept views, same loss at every step, same
    tuned prediction, to 1e-5 (in fp32; the flat cases in fp64, where AdamW's normalised steps would turn fp32
    rounding of the rewards, summed in a different order, into differences of a few 1e-5)."""
    spec = RLCFSpec(**settings)
    dtype = torch.float64 if scale == FLAT else torch.float32
    for seed in range(3):
        image, text, reward_image, reward_text = (x.to(dtype) for x in _features(seed))
        expected, kept, losses = reference_tuning(
            image, text, reward_image, reward_text, steps=spec.steps, selection_p=spec.selection_p, k=spec.sample_k,
            lr=spec.lr, weight_decay=spec.weight_decay, reward_process=spec.reward_process,
            amplify=spec.reward_amplify, process_batch=spec.process_batch, min_entropy_w=spec.entropy_weight,
            scale=scale)
        got, got_kept, got_losses = method_tuning(spec, image, text, reward_image, reward_text, scale)
        assert max(abs(x) for x in losses) > 1e-3  # an informative case: the rewards reach the loss
        assert got_kept == kept
        assert got_losses == pytest.approx(losses, abs=1e-5, rel=1e-5)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def test_defaults_are_the_reference_scripts() -> None:
    method, spec = get_method("rlcf"), RLCFSpec()
    plan, tuning = method.views(spec), method.tuning(spec)
    assert (plan.n_views, plan.augmix, plan.n_generated, spec.selection_p) == (64, None, 0, 0.1)
    assert (tuning.steps, tuning.lr, tuning.weight_decay) == (3, 7e-3, 5e-4)
    assert (spec.sample_k, spec.clipscore_weight, spec.sampling) == (3, 2.5, "topk")
    assert (spec.reward_process, spec.reward_amplify, spec.process_batch, spec.entropy_weight) == (True, False,
                                                                                                  False, 0.0)
    assert spec.prompt.ctx_init == "a photo of a" and spec.reward_model is None
    assert method.needs_reward_model and method.reward_model_path(RLCFSpec(reward_model="/m")) == "/m"
    assert method.draws_at_random(spec)  # the random crops
    assert method.draws_at_random(RLCFSpec(n_views=1, sampling="multinomial"))
    assert not method.draws_at_random(RLCFSpec(n_views=1))  # top-K of the original view draws nothing


def test_multinomial_draws_distinct_classes_reproducibly() -> None:
    """`sampling="multinomial"` draws K distinct classes per view from its softmax, the same ones for the same
    logits (the generator is seeded by them), others for other logits; top-K is the K largest."""
    spec = RLCFSpec(sampling="multinomial", sample_k=4)
    image, text, reward_image, reward_text = _features(5, n_views=32, n_classes=6)
    logits = 0.05 * _policy(image, text)  # a flat softmax: draws spread over the classes
    from difftpt_ops.tta.methods.rlcf import _generator_for

    draws = sample_classes(logits, 4, "multinomial", _generator_for(logits))
    assert all(len(set(row)) == 4 for row in draws.tolist())
    assert torch.equal(draws, sample_classes(logits, 4, "multinomial", _generator_for(logits.clone())))
    assert not torch.equal(draws, sample_classes(logits * 1.01, 4, "multinomial", _generator_for(logits * 1.01)))
    assert not torch.equal(draws, logits.topk(4, dim=-1).indices)
    assert torch.equal(sample_classes(logits, 4, "topk"), logits.topk(4, dim=-1).indices)
    reward = RewardInputs(image_features=reward_image, text_features=reward_text)
    a = get_method("rlcf").tuning_loss(spec, logits, text, reward)
    assert float(a) == float(get_method("rlcf").tuning_loss(spec, logits, text, reward))
    with pytest.raises(InvalidSpecError, match="sample_k"):
        sample_classes(logits, 7, "topk")


@pytest.mark.parametrize(("field", "value"), [("sample_k", "0"), ("clipscore_weight", "0"), ("sampling", "beam"),
                                              ("entropy_weight", "-1"), ("steps", "-1"), ("selection_p", "0"),
                                              ("reward_model", " ")])
def test_bad_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidSpecError, match=field):
        method_spec_from("rlcf", {field: value})


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> LoadedClip:
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def reward_clip(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> LoadedClip:
    """Another tiny CLIP: joint width 48 (the policy's is 32) and input size 256 (the views are 224)."""
    folder = make_tiny_clip(tmp_path_factory.mktemp("tiny-reward") / "reward", seed=1, embed_dim=48, image_size=256)
    return load_clip(ModelSpec(name=str(folder), pretrained=None))


def test_engine_scores_the_kept_views_with_the_reward_model(clip: LoadedClip, reward_clip: LoadedClip,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the engine: the reward features the loss receives are the reward CLIP's (width 48) of exactly the
    kept views, interpolated to its 256 px, and of the class prompts through its own text tower; the engine and the
    naive formulation (encoder re-run, full-length prompts) predict alike; the prediction is view 0 after tuning."""
    spec = method_spec_from("rlcf", {"n_views": "16", "selection_p": "0.25", "reward_model": "/reward"})
    method = type(get_method("rlcf"))
    seen: list[RewardInputs] = []
    original = method.tuning_loss

    def spy(self, spec, logits, text, reward):  # type: ignore[no-untyped-def]
        seen.append(reward)
        return original(self, spec, logits, text, reward)

    monkeypatch.setattr(method, "tuning_loss", spy)
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, reward=reward_clip)
    with torch.no_grad():
        text = F.normalize(reward_clip.model.encode_text(
            reward_clip.tokenizer(class_prompt_texts(CLASS_NAMES, spec.prompt))).float(), dim=-1)
    for seed in range(2):
        image = random_image(30 + seed)
        seen.clear()
        fast = tuner.run(image, seed=seed, sample_key=seed)
        assert len(seen) == 3 and all(r is seen[0] for r in seen)  # computed once, used by the 3 steps
        kept = [v.index for v in fast.views if v.kept]
        pixels = tuner.make_views(image, seed=seed, sample_key=seed).pixels[sorted(kept)]
        with torch.no_grad():
            resized = F.interpolate(pixels, size=256, mode="bicubic", align_corners=True)
            expected = F.normalize(reward_clip.model.encode_image(resized).float(), dim=-1)
        order = torch.tensor(sorted(kept))
        got = seen[0].image_features
        assert got.shape == (4, 48) and seen[0].text_features.shape == (len(CLASS_NAMES), 48)
        assert torch.allclose(seen[0].text_features, text, atol=1e-5)
        by_index = {int(i): row for i, row in zip(order, expected, strict=True)}
        selection = get_method("rlcf").select(spec, _step_inputs(tuner, image, seed)).indices.tolist()
        assert torch.allclose(got, torch.stack([by_index[i] for i in selection]), atol=1e-5)
        naive = NaiveTuner(clip, CLASS_NAMES, spec, reward=reward_clip).run(image, seed=seed, sample_key=seed)
        assert (fast.pred, fast.top5, fast.zeroshot_pred) == (naive.pred, naive.top5, naive.zeroshot_pred)
        assert sorted(kept) == sorted(naive.selected)
        assert torch.allclose(fast.logits, naive.logits, atol=1e-4)


def _step_inputs(tuner, image, seed):  # type: ignore[no-untyped-def]
    """Step 0's inputs of the engine for this image (initial prompt), to read the selection's order."""
    views = tuner.make_views(image, seed=seed, sample_key=seed)
    features = tuner.encode_images(views.pixels)
    text = tuner._initial_text_features()
    return StepInputs(image_features=features, text_features=text, logit_scale=tuner.logit_scale,
                      logits=tuner._logits(features, text), kinds=views.kinds)


def test_the_reward_model_changes_the_tuning(clip: LoadedClip, reward_clip: LoadedClip) -> None:
    """Another reward model gives another tuned prediction (the rewards reach the loss); no reward model is
    refused when the classifier is built, and features without their views' pixels when a sample runs."""
    spec = method_spec_from("rlcf", {"n_views": "16", "selection_p": "0.25", "lr": "0.5"})
    image = random_image(3)
    with_reward = prepare_classifier(clip, CLASS_NAMES, spec, reward=reward_clip).run(image, seed=1, sample_key=1)
    with_self = prepare_classifier(clip, CLASS_NAMES, spec, reward=clip).run(image, seed=1, sample_key=1)
    assert not torch.allclose(with_reward.logits, with_self.logits, atol=1e-3)
    with pytest.raises(InvalidSpecError, match="reward_model"):
        prepare_classifier(clip, CLASS_NAMES, spec)
    tuner = prepare_classifier(clip, CLASS_NAMES, spec, reward=reward_clip)
    views = tuner.make_views(image, seed=1, sample_key=1)
    with pytest.raises(InvalidSpecError, match="pixels"):
        tuner.run_features(tuner.encode_raw(views.pixels), views.kinds)
    assert tuner.run_features(tuner.encode_raw(views.pixels), views.kinds, pixels=views.pixels).pred == \
        with_reward.pred


def test_docs_defaults_table_states_the_spec_defaults() -> None:
    """docs/methods.md's RLCF table gives each setting's default as RLCFSpec has it (the numbers the review
    checked against the reference's rlcf-prompt.sh, clip_reward.py and params.py)."""
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text(encoding="utf-8")
    section = text.split("## RLCF (`--method rlcf`)", 1)[1].split("\n## ", 1)[0]
    defaults = {f.name: getattr(RLCFSpec(), f.name) for f in dataclasses.fields(RLCFSpec)}
    shown = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].strip("`") in defaults:
            shown[cells[0].strip("`")] = cells[1].strip("`")
    assert set(shown) == {"n_views", "selection_p", "steps", "lr", "weight_decay", "augmix", "reward_model",
                          "sample_k", "clipscore_weight", "reward_process", "reward_amplify", "process_batch",
                          "sampling", "entropy_weight"}
    for name, value in shown.items():
        default = defaults[name]
        if default is None:
            assert value.startswith("none"), name
        elif isinstance(default, bool):
            assert value == str(default).lower(), name
        elif isinstance(default, str):
            assert value == default, name
        else:
            assert float(value) == default, name

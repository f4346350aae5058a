"""CUDA tier: the engine's fp16 frozen weights, autocast and GradScaler agree with the naive formulation,
and fp16 predicts what fp32 predicts on the real ViT-B/16 architecture.

Skipped without CUDA (tests/conftest.py). Run on a GPU machine with `python -m pytest -m gpu tests/gpu`
(bench/gpu_check.sh does).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from difftpt_ops.core.method_specs import method_spec_from
from difftpt_ops.core.specs import ModelSpec
from difftpt_ops.models.clip import LoadedClip, load_clip
from difftpt_ops.models.tiny_clip import make_tiny_clip
from difftpt_ops.tta import prepare_classifier
from difftpt_ops.tta.naive import NaiveTuner
from tests.unit.tta_support import CLASS_NAMES, random_image

pytestmark = pytest.mark.gpu

# Smaller than the defaults where a method has many views; every code path still runs.
# R-TPT: "self" because the default threshold rule turns a last-bit difference between the two paths' image
# features (other batch shapes on CUDA) into a weight change of up to e-fold (docs/methods.md, R-TPT).
SMALL = {"tpt": {"n_views": 16, "selection_p": 0.25},
         "difftpt": {"n_conventional": 8, "n_generated": 4, "steps": 2},
         "rtpt": {"n_views": 16, "selection_p": 0.25, "neighbours": 5, "exclude": "self"},
         "tps": {"n_views": 16, "selection_p": 0.25},
         "rlcf": {"n_views": 16, "selection_p": 0.25},
         "awt": {"n_views": 16, "num_descriptor": 2, "descriptions": "sha256:" + "ef" * 32},
         # OGA: a prompt set (fixed text features built by the fp16 tower) and 2 slots, so a third sample of one
         # class replaces a slot rather than filling one.
         "oga": {"prompts": "tip", "shot_capacity": 2},
         # DynaPrompt: 4 prompts, 16 views (4 kept), so three samples select, tune and recycle within the buffer.
         "dynaprompt": {"n_views": 16, "selection_p": 0.25, "num_prompts": 4}}
# AWT cannot run without class descriptions: two sentences per class.
DESCRIBED = {"awt": {n.replace("_", " "): [f"A {n} up close.", f"A {n} far away."] for n in CLASS_NAMES}}


def registered_methods() -> tuple[str, ...]:
    """Every method the registry knows (the three built-in ones before the registry existed)."""
    try:
        from difftpt_ops.tta.methods import method_names
    except ImportError:
        return ("zeroshot", "tpt", "difftpt")
    return tuple(name for name in method_names() if name != "noop")


@pytest.fixture(scope="module")
def tiny_auto_clip(tmp_path_factory: pytest.TempPathFactory, device: str) -> LoadedClip:
    """The tiny CLIP at precision auto, as runs load it: fp16 frozen weights on CUDA, fp32 on a CPU."""
    directory = make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")
    return load_clip(ModelSpec(name=str(directory), pretrained=None, precision="auto"), device=device)


def test_auto_precision_is_fp16_on_cuda(tiny_auto_clip: LoadedClip, on_cuda: bool) -> None:
    """precision auto gives fp16 frozen weights on CUDA (and fp32 on a CPU rehearsal)."""
    expected = torch.float16 if on_cuda else torch.float32
    assert tiny_auto_clip.precision == ("fp16" if on_cuda else "fp32")
    assert tiny_auto_clip.model.visual.conv1.weight.dtype == expected


def needs_reward_model(method: str) -> bool:
    """Whether the method scores with a second CLIP (RLCF); methods from before the option have none."""
    try:
        from difftpt_ops.tta.methods import get_method
    except ImportError:
        return False
    return bool(getattr(get_method(method), "needs_reward_model", False))


def is_online(method: str) -> bool:
    """Online methods carry a state from sample to sample; episodic ones start fresh on each."""
    try:
        from difftpt_ops.tta.methods import ONLINE, get_method
    except ImportError:
        return False
    return get_method(method).kind == ONLINE


@pytest.mark.parametrize("method", registered_methods())
def test_fast_equals_naive_on_cuda(tiny_auto_clip: LoadedClip, method: str) -> None:
    """fp16 frozen weights, fp32 prompt: the engine predicts what the naive formulation predicts, sample by
    sample. One engine tuner serves all samples (its per-sample reset is under test too); the naive
    reference is built afresh per sample, except for online methods, whose state both carry in order."""
    spec = method_spec_from(method, SMALL.get(method, {}))
    generated = [random_image(10 + i) for i in range(4)]
    reward = tiny_auto_clip if needs_reward_model(method) else None  # RLCF: the same CLIP as its reward model
    described = {"descriptions": DESCRIBED[method]} if method in DESCRIBED else {}
    fast = prepare_classifier(tiny_auto_clip, CLASS_NAMES, spec, reward=reward, **described)
    naive = NaiveTuner(tiny_auto_clip, CLASS_NAMES, spec, reward=reward, **described)
    fast.stream_length = naive.stream_length = 3  # online methods: a stream of the 3 samples below
    for sample in range(3):
        if sample and not is_online(method):
            naive = NaiveTuner(tiny_auto_clip, CLASS_NAMES, spec, reward=reward, **described)
        image = random_image(sample)
        a = fast.run(image, generated=generated, seed=5, sample_key=sample)
        b = naive.run(image, generated=generated, seed=5, sample_key=sample)
        assert a.zeroshot_pred == b.zeroshot_pred, f"{method}, sample {sample}"
        assert_same_ranking_up_to_ties(a, b, f"{method}, sample {sample}")


def assert_same_ranking_up_to_ties(a: Any, b: Any, label: str) -> None:
    """The same top-1 and top-5 order, except where two classes are a near-tie: within twice the largest
    difference between the two paths' logits, on both sides. In fp16 the two formulations round
    differently, and a tuning step's sign-like first Adam update can flip near-zero gradient components,
    so an exact match on every near-tie would test the rounding, not the method. Disagreements are printed."""
    if (a.pred, a.top5) == (b.pred, b.top5):
        return
    logits_a, logits_b = a.logits.float().cpu().flatten(), b.logits.float().cpu().flatten()
    error = float((logits_a - logits_b).abs().max())
    pairs = [(x, y) for x, y in zip([a.pred, *a.top5], [b.pred, *b.top5], strict=True) if x != y]
    spread = float(logits_a.max() - logits_a.min())
    print(f"{label}: top-5 {a.top5} vs {b.top5}, largest logit difference {error:.3g} "  # noqa: T201
          f"(logits spread over {spread:.3g})")
    assert error <= 0.25 * spread, f"{label}: the two paths' logits differ by {error:.3g}, over a quarter of " \
                                   f"their spread {spread:.3g}: not rounding"
    for x, y in pairs:
        for logits in (logits_a, logits_b):
            gap = abs(float(logits[x] - logits[y]))
            assert gap <= 2 * error, f"{label}: classes {x} and {y} differ by {gap:.3g} > 2 x {error:.3g}, not a tie"


def _zeroshot_scores(clip: LoadedClip, names: list[str], images: list) -> tuple[Tensor, Tensor, Tensor]:
    """(image features, text features, cosine logits) of the engine's zero-shot path, all fp32."""
    from difftpt_ops.tta.views import build_views

    tuner = prepare_classifier(clip, names, method_spec_from("zeroshot"))
    pixels = torch.cat([build_views(image, n_conventional=0, seed=0, sample_key=0).pixels for image in images])
    half = clip.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad(), torch.autocast(clip.device.type, dtype=clip.dtype, enabled=half):
        text = tuner.learner.text_features()
    image = tuner.encode_images(pixels)
    return image, text, image @ text.t()


def test_fp16_agrees_with_fp32_on_vit_b16(device: str, half: str) -> None:
    """The real ViT-B/16 architecture with random weights: half frozen weights give the fp32 features to
    rounding, and the same zero-shot top-1 except on near-ties (1000 classes on CUDA)."""
    from bench.tta_speed import class_names

    torch.manual_seed(0)
    full = load_clip(ModelSpec(name="ViT-B-16", pretrained=None, precision="fp32"), device=device)
    low = load_clip(ModelSpec(name="ViT-B-16", pretrained=None, precision=half), device=device)
    low.model.load_state_dict(full.model.state_dict())  # same weights, rounded to half
    on_cuda = device.startswith("cuda")
    names = class_names(1000 if on_cuda else 200)
    images = [random_image(i, (224, 224)) for i in range(32 if on_cuda else 8)]
    image_a, text_a, cos_a = _zeroshot_scores(full, names, images)
    image_b, text_b, cos_b = _zeroshot_scores(low, names, images)
    assert (image_a * image_b).sum(-1).min() > 0.995 and (text_a * text_b).sum(-1).min() > 0.995
    # Random weights give near-uniform scores, where rounding may swap two close classes: every
    # disagreement must be such a near-tie, within twice the largest rounding error of any score.
    error = float((cos_a - cos_b).abs().max())
    top_a, top_b = cos_a.argmax(-1), cos_b.argmax(-1)
    rows = torch.arange(len(images), device=cos_a.device)
    gaps = (cos_a[rows, top_a] - cos_a[rows, top_b])[top_a != top_b]
    assert bool((gaps <= 2 * error).all()), f"fp32 vs {half}: non-tie disagreements, gaps {gaps.tolist()}"
    agreement = float((top_a == top_b).float().mean())
    print(f"fp32 vs {half}: zero-shot top-1 agreement {agreement:.3f} on {len(images)} images, "  # noqa: T201
          f"largest score difference {error:.2e}")


def test_dpe_fp16_step_is_torchs_adamw_on_the_device(device: str) -> None:
    """DPE's default optimiser step emulates the reference's fp16 residuals: bit for bit what torch's AdamW, as
    the reference calls it (default arguments: the foreach kernels on CUDA), does to a zero fp16 parameter on
    this device, over gradients from 1e-8 to 1 (the CPU rehearsal checks the CPU kernels' order)."""
    from difftpt_ops.tta.methods.dpe import adamw_first_step

    generator = torch.Generator().manual_seed(0)
    grad = torch.sign(torch.randn(100_000, generator=generator)) * 10 ** (
        torch.rand(100_000, generator=generator) * 8 - 8)
    grad = grad.to(device)
    parameter = torch.nn.Parameter(torch.zeros(100_000, dtype=torch.float16, device=device))
    optimizer = torch.optim.AdamW([parameter], lr=0.0006, eps=1e-3, weight_decay=1e-1)
    parameter.grad = grad.half()
    optimizer.step()
    kernels = "cuda" if device.startswith("cuda") else "cpu"
    ours = adamw_first_step(grad, 0.0006, "fp16", kernels=kernels).half()
    differing = int((ours != parameter.detach()).sum())
    assert differing == 0, f"{differing} of {grad.numel()} steps differ from torch's fp16 AdamW on {device}"


def test_zero_votes_as_its_reference_under_autocast(device: str) -> None:
    """ZERO's default vote ("code") is what the reference's `zero` computes under `torch.cuda.amp.autocast()`
    (its run.py), written out here as it is there: the matmul returns float16 whether the features are float16
    (OpenAI's CLIP) or float32 (open_clip's), so the "zero" temperature `torch.finfo(l.dtype).eps` is 2^-10 and
    near-tied views split their votes. Same kept views up to one swap at the entropy boundary (the reference
    ranks float16 logits), the same vote counts where the kept views agree, the same prediction where the
    reference's count has one winner (ties go to the greedy break, which the unit tests compare).
    The softmaxes are written `.float().softmax`: what CUDA autocast does to them, and what makes the CPU
    rehearsal's float16 autocast (whose softmax would stay float16) compute the same."""
    from difftpt_ops.tta.methods.zero import zero_predict

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    generator = torch.Generator().manual_seed(0)
    same_prediction, decided, split, compared = 0, 0, 0, 0
    for draw in range(8):
        # Views of one image resemble each other: a shared direction plus noise, so the kept views mostly agree.
        base = torch.randn(1, 512, generator=generator)
        image = torch.nn.functional.normalize(base + 0.7 * torch.randn(64, 512, generator=generator), dim=-1).half()
        text = torch.nn.functional.normalize(torch.randn(1000, 512, generator=generator), dim=-1).half()
        features = (image.to(device), text.to(device))
        if draw % 2:  # an fp32 model's features: autocast still multiplies in float16
            features = (features[0].float(), features[1].float())
        temp = torch.tensor(0.01, dtype=features[0].dtype, device=device)  # 1 / logit_scale.exp(), model dtype
        with torch.autocast(device_type, dtype=torch.float16):
            logits = features[0] @ features[1].t()
            probs = (logits / temp).float().softmax(1)  # CUDA autocast's softmax is float32 (CPU's is not)
            entropy = -(probs * probs.log()).sum(1)
            kept_ref = torch.argsort(entropy, descending=False)[:int(64 * 0.3)]
            eps = torch.finfo(logits[kept_ref].dtype).eps
            votes_ref = (logits[kept_ref] / eps).float().softmax(1).sum(0).cpu()
        assert eps == 2.0 ** -10, f"autocast's matmul gave {logits.dtype} on {device}"
        ours = zero_predict(image, text, 100.0)
        kept_ours = set(torch.nonzero(ours.kept).flatten().tolist())
        assert len(kept_ours ^ set(kept_ref.cpu().tolist())) <= 2, f"draw {draw}: kept views differ"
        if kept_ours == set(kept_ref.cpu().tolist()):
            compared += 1
            difference = float((ours.probs * len(kept_ours) - votes_ref).abs().max())
            assert difference < 0.1, f"draw {draw}: votes differ by {difference}"
        if int((votes_ref == votes_ref.max()).sum()) == 1:  # a tie goes to the greedy break (unit-tested)
            decided += 1
            same_prediction += int(ours.pred == int(votes_ref.argmax()))
        split += int(bool(((votes_ref - votes_ref.round()).abs() > 0.01).any()))
    print(f"ZERO vs its reference under autocast on {device}: kept views equal in {compared}/8 draws, "  # noqa: T201
          f"one winner in {decided}, same prediction in {same_prediction}, split votes in {split}")
    assert compared >= 4 and decided >= 4 and same_prediction >= decided - 1 and split >= 2, (
        compared, decided, same_prediction, split)

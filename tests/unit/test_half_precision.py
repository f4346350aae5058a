"""Half precision without a GPU: bf16 frozen weights under CPU autocast, as fp16 runs under CUDA autocast.

On CUDA the engine keeps the frozen CLIP in fp16 and the prompt context in fp32 (tests/gpu covers that);
every dtype boundary of that path — half weights next to an fp32 parameter, the shared-prefix text
transformer, the selection on half-precision scores, the diffusion pipeline in half — is exercised here
with bf16, which CPU autocast supports, so a dtype error shows up in CI and not first on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from difftpt_ops.core.method_specs import method_spec_from  # noqa: E402
from difftpt_ops.core.specs import GenerationSpec, ModelSpec  # noqa: E402
from difftpt_ops.models import diffusion  # noqa: E402
from difftpt_ops.models.clip import LoadedClip, load_clip  # noqa: E402
from difftpt_ops.models.tiny_clip import make_tiny_clip  # noqa: E402
from difftpt_ops.models.tiny_diffusion import TINY_SIZE, make_tiny_variation_pipeline  # noqa: E402
from difftpt_ops.tta import prepare_classifier  # noqa: E402
from difftpt_ops.tta.prompts import PromptLearner, initial_context  # noqa: E402
from difftpt_ops.tta.selection import select_difftpt, select_tpt  # noqa: E402
from difftpt_ops.tta.text import TextTower  # noqa: E402
from tests.unit.tta_support import CLASS_NAMES, random_image  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

METHODS = [
    ("zeroshot", {}),
    ("tpt", {"n_views": 16, "selection_p": 0.25}),
    ("difftpt", {"n_conventional": 8, "n_generated": 4, "steps": 2}),
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def clip32(clip_dir: Path) -> LoadedClip:
    return load_clip(ModelSpec(name=str(clip_dir), pretrained=None, precision="fp32"))


@pytest.fixture(scope="module")
def clip16(clip_dir: Path) -> LoadedClip:
    return load_clip(ModelSpec(name=str(clip_dir), pretrained=None, precision="bf16"))


def test_bf16_load_gives_half_weights(clip16: LoadedClip) -> None:
    """The bf16 model really is half precision, so the tests below do not compare fp32 with itself."""
    assert clip16.precision == "bf16" and clip16.dtype == torch.bfloat16
    assert clip16.model.visual.conv1.weight.dtype == torch.bfloat16
    assert clip16.model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=[m for m, _ in METHODS])
def test_bf16_engine_agrees_with_fp32(clip32: LoadedClip, clip16: LoadedClip, method: str,
                                      overrides: dict[str, object]) -> None:
    """bf16 frozen weights under CPU autocast, fp32 prompt: same top-1, zero-shot top-1 and kept count as fp32."""
    spec = method_spec_from(method, overrides)
    generated = [random_image(10 + i, (64, 64)) for i in range(4)]
    tuner16 = prepare_classifier(clip16, CLASS_NAMES, spec)
    tuner32 = prepare_classifier(clip32, CLASS_NAMES, spec)
    assert tuner16.half and tuner16.learner.share_prefix  # the shared-prefix text path runs in half
    assert tuner16.learner.ctx.dtype == torch.float32  # only the frozen weights are half
    for sample in range(3):
        image = random_image(sample)
        half = tuner16.run(image, generated=generated, seed=5, sample_key=sample)
        full = tuner32.run(image, generated=generated, seed=5, sample_key=sample)
        assert (half.pred, half.zeroshot_pred, half.n_kept) == (full.pred, full.zeroshot_pred, full.n_kept)
        assert np.isfinite([half.entropy_before, half.entropy_after, half.confidence_after]).all()
        # bf16 keeps 8 mantissa bits: with logits scaled by 100 the zero-shot entropies differed by up to 0.054 on
        # an AVX2 CPU (no native bf16 arithmetic); a tighter bound tests the CPU, not the engine.
        assert abs(half.entropy_after - full.entropy_after) < 0.1


def _learner(clip: LoadedClip, **options: bool) -> PromptLearner:
    spec = method_spec_from("tpt")
    tower = TextTower(clip.model)
    init = initial_context(tower, clip.tokenizer, spec.prompt)
    texts = [f"a photo of a {name.replace('_', ' ')}." for name in CLASS_NAMES]
    return PromptLearner(tower, clip.tokenizer(texts), init, **options)


def test_shared_prefix_text_path_in_bf16(clip16: LoadedClip) -> None:
    """Shared prefix, per-prompt and untruncated text paths agree in bf16; the fp32 context gets an fp32 gradient."""
    shared = _learner(clip16)
    plain = _learner(clip16, share_prefix=False)
    full = _learner(clip16, truncate=False)
    assert shared.share_prefix and not plain.share_prefix
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = shared.text_features()
        with torch.no_grad():
            others = [plain.text_features(), full.text_features()]
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    for other in others:
        assert (features.detach() * other).sum(-1).min() > 0.99  # unit vectors: cosine similarity
    features.sum().backward()
    assert shared.ctx.grad is not None and shared.ctx.grad.dtype == torch.float32
    assert torch.isfinite(shared.ctx.grad).all() and shared.ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("cosine_on", ["logits", "features"])
@pytest.mark.parametrize("mode", ["chained", "parallel"])
def test_selection_on_half_precision_scores(mode: str, cosine_on: str) -> None:
    """bf16 logits and features select exactly the views their fp32 values select, with fp32 scores."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(21, 7, generator=generator) * 5).to(torch.bfloat16)
    features = torch.nn.functional.normalize(torch.randn(21, 32, generator=generator), dim=-1).to(torch.bfloat16)
    half = select_difftpt(logits, features, n_conventional=12, cosine_ratio=0.8, entropy_ratio=0.3,
                          cosine_on=cosine_on, mode=mode)
    full = select_difftpt(logits.float(), features.float(), n_conventional=12, cosine_ratio=0.8, entropy_ratio=0.3,
                          cosine_on=cosine_on, mode=mode)
    assert half.entropy.dtype == half.cosine.dtype == torch.float32
    assert half.indices.tolist() == full.indices.tolist()
    assert torch.equal(select_tpt(logits, 0.1).indices, select_tpt(logits.float(), 0.1).indices)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_variation_pipeline(tmp_path_factory.mktemp("tiny") / "sd-image-variations")


def test_diffusion_pipeline_runs_once_in_bf16(tiny_sd: Path) -> None:
    """The tiny image-variation pipeline loaded in bf16: finite latents, seeded images close to fp32's."""
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    seeds = [diffusion.variant_seed(0, "0" * 64, index) for index in range(3)]
    images = {}
    for dtype in ("fp32", "bf16"):
        pipe = diffusion.load_variation_pipeline(str(tiny_sd), dtype=dtype, device="cpu")
        spec = GenerationSpec(model=str(tiny_sd), revision=None, steps=3, size=TINY_SIZE, per_sample=3, dtype=dtype)
        images[dtype] = np.stack([np.asarray(img, dtype=np.float32)
                                  for img in diffusion.generate_variations(pipe, source, seeds=seeds, spec=spec,
                                                                           batch_size=3)])
    pipe_dtype = pipe.unet.dtype
    assert pipe_dtype == torch.bfloat16
    # PIL output would hide a NaN as black pixels: look at the raw decoder output too.
    raw = pipe(diffusion.conditioning_tensor(source), height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=3,
               guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(seeds[0]), output_type="np").images
    assert np.isfinite(raw).all()
    assert images["bf16"].shape == (3, TINY_SIZE, TINY_SIZE, 3)
    assert np.abs(images["bf16"] - images["fp32"]).mean() < 8.0  # out of 255: the same images, rounded differently
    assert np.abs(images["bf16"][0] - images["bf16"][1]).mean() > 1.0  # and each seed its own image


@pytest.mark.parametrize(("method", "overrides"), METHODS[1:], ids=[m for m, _ in METHODS[1:]])
def test_feature_store_round_trip_in_bf16(clip16: LoadedClip, tmp_path: Path, method: str,
                                          overrides: dict[str, object]) -> None:
    """bf16 encoder output is stored as bf16 and read back bit-exactly; a run from it equals a run from the views."""
    from difftpt_ops.storage.features import FeatureFiles, StoredFeatures

    tuner = prepare_classifier(clip16, CLASS_NAMES, method_spec_from(method, overrides))
    views = tuner.make_views(random_image(1), generated=[random_image(20 + i, (64, 64)) for i in range(4)], seed=5,
                             sample_key="s")
    raw = tuner.encode_raw(views.pixels)
    assert raw.dtype == torch.bfloat16  # the store keeps what the encoder produced, not an fp32 copy
    files = FeatureFiles(tmp_path / "artifacts")
    artifact = files.put(raw)
    back = files.read(StoredFeatures(artifact.key, artifact.sha256, artifact.size_bytes))
    assert back.dtype == torch.bfloat16 and torch.equal(back, raw)
    stored, direct = tuner.run_features(back, views.kinds), tuner.run_views(views)
    assert (stored.pred, stored.top5, stored.n_kept) == (direct.pred, direct.top5, direct.n_kept)
    assert abs(stored.entropy_after - direct.entropy_after) < 1e-6


def test_onzeta_in_bf16(clip32: LoadedClip, clip16: LoadedClip) -> None:
    """OnZeta's fp32 updates on bf16-encoded features and bf16-built 7-template text features: finite
    probabilities and the fp32 run's predictions over a short stream."""
    spec = method_spec_from("onzeta")
    tuner16, tuner32 = prepare_classifier(clip16, CLASS_NAMES, spec), prepare_classifier(clip32, CLASS_NAMES, spec)
    tuner16.stream_length = tuner32.stream_length = 4
    for sample in range(4):
        image = random_image(sample)
        half, full = tuner16.run(image, seed=5, sample_key=sample), tuner32.run(image, seed=5, sample_key=sample)
        assert half.pred == full.pred and torch.isfinite(half.logits).all(), f"sample {sample}"
    assert tuner16.state["proxies"].dtype == torch.float32


def test_ecalp_in_bf16(clip32: LoadedClip, clip16: LoadedClip) -> None:
    """ECALP's graph on bf16-encoded features (the engine hands them over in fp32): finite scores, the fp32 run's
    predictions over a short stream, and an fp32 state."""
    spec = method_spec_from("ecalp")
    tuner16, tuner32 = prepare_classifier(clip16, CLASS_NAMES, spec), prepare_classifier(clip32, CLASS_NAMES, spec)
    for sample in range(6):
        image = random_image(sample)
        half, full = tuner16.run(image, seed=5, sample_key=sample), tuner32.run(image, seed=5, sample_key=sample)
        assert half.pred == full.pred and torch.isfinite(half.logits).all(), f"sample {sample}"
    assert tuner16.state["keys"].dtype == torch.float32 and tuner16.state["keys"].shape[0] == 6


@pytest.mark.parametrize("prompts", ["single", "tip"])
def test_oga_in_bf16(clip32: LoadedClip, clip16: LoadedClip, prompts: str) -> None:
    """OGA's cache, refits and MAP on bf16-encoded features (and, for `tip`, bf16-built prompt-set text
    features): the state in the features' fp32, finite posteriors and the fp32 run's predictions over a short
    stream in which a class fills its 3 slots, so the covariance is refitted in both."""
    spec = method_spec_from("oga", {"prompts": prompts, "shot_capacity": "3"})
    tuner16, tuner32 = prepare_classifier(clip16, CLASS_NAMES, spec), prepare_classifier(clip32, CLASS_NAMES, spec)
    for sample in range(6):
        image = random_image(sample)
        half, full = tuner16.run(image, seed=5, sample_key=sample), tuner32.run(image, seed=5, sample_key=sample)
        assert half.pred == full.pred and torch.isfinite(half.logits).all(), f"sample {sample}"
    assert tuner16.state["precision"].dtype == torch.float32 and tuner16.state["memory"].dtype == torch.float32
    assert int(tuner16.state["filled"].sum(1).max()) == int(tuner32.state["filled"].sum(1).max()) == 3


def test_naive_formulation_runs_in_bf16(clip32: LoadedClip, clip16: LoadedClip) -> None:
    """The reference-style oracle also runs with bf16 frozen weights on the CPU and agrees with its fp32 self."""
    from difftpt_ops.tta.naive import NaiveTuner

    spec = method_spec_from("tpt", {"n_views": "8", "steps": "1"})
    half, full = NaiveTuner(clip16, CLASS_NAMES, spec), NaiveTuner(clip32, CLASS_NAMES, spec)
    for sample in range(2):
        image = random_image(sample)
        a = half.run(image, seed=5, sample_key=sample)
        b = full.run(image, seed=5, sample_key=sample)
        assert (a.pred, a.zeroshot_pred) == (b.pred, b.zeroshot_pred)


@pytest.mark.parametrize("prompts", ["tip", "dtd"])
@pytest.mark.parametrize("method", ["tda", "dmn-zs", "dpe", "boostadapter"])
def test_online_methods_with_a_prompt_set_in_bf16(clip32: LoadedClip, clip16: LoadedClip, method: str,
                                                  prompts: str) -> None:
    """The prompt-set text features are built by the bf16 tower (finite, fp32 out) and the online step carries
    its state in order: the same predictions as fp32 over a short stream."""
    spec = method_spec_from(method, {"prompts": prompts, "n_views": "4"})
    tuner16 = prepare_classifier(clip16, CLASS_NAMES, spec)
    tuner32 = prepare_classifier(clip32, CLASS_NAMES, spec)
    text = tuner16._initial_text_features()  # noqa: SLF001 - the fixed features every online step reads
    assert text.dtype == torch.float32 and torch.isfinite(text).all()
    for sample in range(4):
        image = random_image(sample)
        half = tuner16.run(image, seed=5, sample_key=sample)
        full = tuner32.run(image, seed=5, sample_key=sample)
        assert half.pred == full.pred, f"sample {sample}"
        assert np.isfinite([half.entropy_after, half.confidence_after]).all()

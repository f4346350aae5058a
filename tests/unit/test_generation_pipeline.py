"""The image-variation pipeline on the tiny random model, loaded back through `from_pretrained`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftpt_ops.core.errors import InputError, NotFoundError, ServiceUnavailableError
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.models import diffusion
from difftpt_ops.models.tiny_diffusion import TINY_SIZE, make_tiny_variation_pipeline

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_variation_pipeline(tmp_path_factory.mktemp("tiny") / "sd-image-variations")


@pytest.fixture(scope="module")
def source() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _spec(tiny_dir: Path, **overrides: object) -> GenerationSpec:
    fields: dict[str, object] = {"model": str(tiny_dir), "revision": None, "steps": 2, "size": TINY_SIZE,
                                 "per_sample": 4}
    fields.update(overrides)
    return GenerationSpec(**fields)  # type: ignore[arg-type]


def test_tiny_pipeline_is_fast_to_build_and_loads_offline(tmp_path: Path, tiny_dir: Path) -> None:
    """make-tiny writes a save_pretrained folder in well under 2 s (imports aside); it loads by path."""
    started = time.perf_counter()
    make_tiny_variation_pipeline(tmp_path / "again", seed=1)
    assert time.perf_counter() - started < 2.0
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImageVariationPipeline"
    pipe = diffusion.load_variation_pipeline(str(tiny_dir), device="cpu")
    assert pipe.safety_checker is None
    assert pipe.image_encoder.config.image_size == 224
    assert pipe.unet.dtype == torch.float32  # auto on CPU
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}  # SDPA


def test_loading_draws_no_library_progress_bars(tiny_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """An embedded `submit generate` loads the pipeline in the CLI's own process: diffusers' and transformers'
    loading bars would land between its progress lines, and print under --quiet."""
    import diffusers
    import transformers

    diffusers.utils.logging.enable_progress_bar()  # as in a fresh process
    transformers.utils.logging.enable_progress_bar()
    capfd.readouterr()
    diffusion.load_variation_pipeline(str(tiny_dir), device="cpu")
    captured = capfd.readouterr()
    assert "Loading" not in captured.err + captured.out


@pytest.mark.parametrize(("name", "scheduler_class"), [
    ("default", "PNDMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler"),
])
def test_each_scheduler_generates_at_few_steps(tiny_dir: Path, source: Image.Image, name: str,
                                              scheduler_class: str) -> None:
    """default (PNDM with SD-v1 settings), DPM-Solver++ and DDIM all run at 2 steps at the output size."""
    pipe = diffusion.load_variation_pipeline(str(tiny_dir), scheduler=name, device="cpu")
    assert type(pipe.scheduler).__name__ == scheduler_class
    if name == "default":
        assert pipe.scheduler.config.skip_prk_steps
    if name == "dpm-solver++":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    images = diffusion.generate_variations(pipe, source, seeds=[1, 2, 3], spec=_spec(tiny_dir, scheduler=name),
                                           batch_size=2)
    assert [img.size for img in images] == [(TINY_SIZE, TINY_SIZE)] * 3
    assert all(img.mode == "RGB" for img in images)


def test_conditioning_squashes_to_224_and_normalises(source: Image.Image) -> None:
    """The reference's preprocessing: 224x224 regardless of aspect ratio, CLIP mean/std applied."""
    tensor = diffusion.conditioning_tensor(source)
    assert tensor.shape == (1, 3, 224, 224) and tensor.dtype == torch.float32
    grey = diffusion.conditioning_tensor(Image.new("RGB", (30, 90), (128, 128, 128)))
    expected = [(128 / 255 - m) / s for m, s in zip(diffusion.CLIP_MEAN, diffusion.CLIP_STD, strict=True)]
    assert torch.allclose(grey[0, :, 100, 100], torch.tensor(expected), atol=1e-5)


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def test_images_do_not_depend_on_batch_size_or_order(tiny_dir: Path, source: Image.Image) -> None:
    """Per-image generators: same batches give identical pixels; other batchings differ by <= 1/255."""
    pipe = diffusion.load_variation_pipeline(str(tiny_dir), device="cpu")
    spec = _spec(tiny_dir)
    seeds = [diffusion.variant_seed(0, "ab" * 32, index) for index in range(4)]
    batched = _pixels(diffusion.generate_variations(pipe, source, seeds=seeds, spec=spec, batch_size=4))
    again = _pixels(diffusion.generate_variations(pipe, source, seeds=seeds, spec=spec, batch_size=4))
    assert np.array_equal(batched, again)
    one_by_one = _pixels(diffusion.generate_variations(pipe, source, seeds=seeds[::-1], spec=spec, batch_size=1))
    one_by_one = one_by_one[::-1]
    # BLAS kernels sum in another order for other batch shapes (documented in iter_variation_batches).
    difference = np.abs(batched - one_by_one)
    assert difference.max() <= 1
    assert (difference > 0).mean() < 1e-3
    assert not np.array_equal(batched[0], batched[1])  # different seeds, different images


def test_missing_local_model_directory_is_not_found(tmp_path: Path) -> None:
    """A path that does not exist fails at once, naming --model and the path."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFoundError) as info:
        diffusion.load_variation_pipeline(str(missing))
    assert info.value.argument == "--model" and str(missing) in str(info.value)


def test_directory_without_pipeline_is_rejected(tmp_path: Path) -> None:
    """An existing folder that holds no model_index.json is bad input, not a hub lookup."""
    with pytest.raises(InputError, match="model_index.json"):
        diffusion.load_variation_pipeline(str(tmp_path))


def test_unreachable_hub_says_to_pass_a_local_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a hub id that is not cached gives ServiceUnavailableError with what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ServiceUnavailableError, match="local directory"):
        diffusion.load_variation_pipeline("difftpt-ops-tests/not-a-cached-model", revision="main")


def test_unknown_scheduler_on_a_loaded_pipeline(tiny_dir: Path) -> None:
    """set_scheduler validates too (specs normally stop this earlier)."""
    pipe = diffusion.load_variation_pipeline(str(tiny_dir), device="cpu")
    with pytest.raises(InputError, match="--scheduler"):
        diffusion.set_scheduler(pipe, "euler")


def test_dtype_auto_is_fp16_on_gpu_and_fp32_on_cpu() -> None:
    """`auto` resolves by device; explicit dtypes pass through; unknown ones are refused."""
    assert diffusion.resolve_dtype_name("auto", "cuda") == "fp16"
    assert diffusion.resolve_dtype_name("auto", "cuda:1") == "fp16"
    assert diffusion.resolve_dtype_name("auto", "cpu") == "fp32"
    assert diffusion.resolve_dtype_name("bf16", "cpu") == "bf16"
    with pytest.raises(InputError):
        diffusion.resolve_dtype_name("fp8", "cpu")
    assert dataclasses.replace(GenerationSpec(), dtype="fp16").dtype == "fp16"

"""Stable Diffusion image variations (diffusers' `StableDiffusionImageVariationPipeline`).

Loading from a hub id or a local `save_pretrained` directory, the scheduler options, and seeded,
batched generation. What differs from the reference generator (DiffTPT's image-variation script):

* every variant has its own seed, derived from (config seed, source image hash, variant index), and
  its own `torch.Generator`: the initial noise of an image never depends on the batch it ran in;
* several variants of one source run in one pipeline call (the reference made one call per image);
* fp16 on GPU (the reference ran fp32); attention uses PyTorch's SDPA (diffusers' default on torch 2);
* images are stored losslessly (PNG); the reference saved them under the source image's extension with
  Pillow's defaults (JPEG at quality 75 for ImageNet-R), and DiffTPT runs re-encode them that way when they
  read them (`generated_format`, services/running/generated_views.py `GeneratedViews`).

The conditioning preprocessing, guidance, step count and disabled safety checker follow the reference.
Heavy imports (torch, diffusers) happen inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftpt_ops.core.errors import InputError, NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionImageVariationPipeline
    from PIL import Image

    from difftpt_ops.core.specs import GenerationSpec

# The CLIP image encoder's input: 224 px, normalised with CLIP's mean and std (as the reference does).
CONDITIONING_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A hub id is `name` or `owner/name`; anything else that is not an existing directory is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# What to do when the weights are not here (an offline GPU machine): fetch the real pipeline once, elsewhere.
HOW_TO_DOWNLOAD = ("download the pipeline where the hub is reachable (`hf download lambdalabs/sd-image-variations-"
                   "diffusers --revision v2.0 --local-dir DIR`), copy DIR here and pass --model DIR")


def resolve_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype_name(dtype: str, device: str) -> str:
    """The concrete dtype a spec's `dtype` means on `device`: `auto` is fp16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPE_NAMES:
        raise InputError("--dtype", dtype, f"must be one of auto, {', '.join(DTYPE_NAMES)}")
    return dtype


def torch_dtype(name: str) -> torch.dtype:
    """`fp32` / `fp16` / `bf16` -> the torch dtype."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def variant_seed(config_seed: int, source_hash: str, variant_index: int) -> int:
    """The seed of one generated image: 63 bits of sha256(config seed, source hash, variant index).

    63 bits fit a signed BIGINT column and `torch.Generator.manual_seed`. The seed depends only on
    what the image is, never on the batch, worker or order that produced it.
    """
    digest = hashlib.sha256(f"{config_seed}:{source_hash}:{variant_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def load_variation_pipeline(
    model: str,
    *,
    revision: str | None = None,
    scheduler: str = "default",
    dtype: str = "auto",
    device: str = "cpu",
) -> StableDiffusionImageVariationPipeline:
    """Load the image-variation pipeline from a local `save_pretrained` directory or a hub id.

    The safety checker is off (as in the reference): generated images are inputs to a classifier,
    never shown to anyone, and the checker would blank some of them.

    Args:
        model: A local directory (tried first) or a hub id such as `lambdalabs/sd-image-variations-diffusers`.
        revision: Hub revision (branch, tag or commit); ignored for a local directory.
        scheduler: `default` (the model's own), `dpm-solver++` or `ddim`.
        dtype: `auto` (fp16 on GPU, fp32 on CPU), `fp32`, `fp16` or `bf16`.
        device: A torch device string.

    Raises:
        NotFoundError: `model` names a missing local directory, or a hub repository/revision that does not exist.
        InputError: `model` is a directory that holds no diffusers pipeline.
        ServiceUnavailableError: the hub cannot be reached and the model is not cached locally.
    """
    from diffusers import StableDiffusionImageVariationPipeline

    from difftpt_ops.models.quiet import silence_loading_progress_bars

    silence_loading_progress_bars()  # an embedded `submit generate` would print them between its own progress lines
    source, local = _model_source(model)
    kwargs: dict[str, Any] = {
        "safety_checker": None,
        "requires_safety_checker": False,
        _dtype_keyword(): torch_dtype(resolve_dtype_name(dtype, device)),
    }
    if not local:
        kwargs["revision"] = revision
    try:
        pipe = StableDiffusionImageVariationPipeline.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise _load_error(model, revision, local, exc) from exc
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name now warns); older releases know only the old one."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def check_pipeline_source(model: str) -> None:
    """Raise when `model` is a local path that is not a diffusers pipeline directory (reads no weights; a hub
    id is not checked here). `submit generate` calls it before it writes a run."""
    _model_source(model)


def _model_source(model: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InputError("--model", model, "is a directory but not a diffusers pipeline (no model_index.json)")
        return str(path), True
    if path.exists() or not _HUB_ID.match(model):
        raise NotFoundError("--model", model, "no such local model directory; " + HOW_TO_DOWNLOAD)
    return model, False


def _load_error(model: str, revision: str | None, local: bool, exc: OSError) -> Exception:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError):
        return NotFoundError("--model", f"{model}@{revision}", "no such repository or revision on the hub")
    if local:
        return InputError("--model", model, f"cannot load the pipeline from this directory ({exc})")
    return ServiceUnavailableError(
        f"--model={model}@{revision}: cannot download it from the Hugging Face hub and it is not cached "
        f"locally ({str(exc).splitlines()[0]}); no local directory of that name exists either: " + HOW_TO_DOWNLOAD
    )


def set_scheduler(pipe: StableDiffusionImageVariationPipeline, name: str) -> None:
    """Replace the pipeline's scheduler by the named option, built from the model's own configuration.

    `default` keeps the model's scheduler; a PNDM scheduler gets the Stable Diffusion v1 settings
    (PLMS only, no Runge-Kutta warm-up), without which it fails at a handful of steps.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    config = pipe.scheduler.config
    if name == "default":
        if isinstance(pipe.scheduler, PNDMScheduler):
            pipe.scheduler = PNDMScheduler.from_config(
                config, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
            )
    elif name == "dpm-solver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    else:
        raise InputError("--scheduler", name, "unknown scheduler; choose one of default, dpm-solver++, ddim")


def conditioning_tensor(image: Image.Image) -> torch.Tensor:
    """The reference's conditioning input: squash to 224x224 (bicubic, no antialias), CLIP-normalise.

    Returns:
        A float32 tensor of shape (1, 3, 224, 224).
    """
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.ToTensor(),
        # (224, 224), not 224: the reference squashes the image, it does not keep the aspect ratio.
        transforms.Resize((CONDITIONING_SIZE, CONDITIONING_SIZE),
                          interpolation=transforms.InterpolationMode.BICUBIC, antialias=False),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return transform(image.convert("RGB")).unsqueeze(0)


def iter_variation_batches(
    pipe: StableDiffusionImageVariationPipeline,
    image: Image.Image,
    *,
    seeds: Sequence[int],
    spec: GenerationSpec,
    batch_size: int,
) -> Iterator[list[Image.Image]]:
    """Generate one variation of `image` per seed, `batch_size` variants per pipeline call.

    Each variant gets its own CPU `torch.Generator`, so its initial noise is the same in any batch,
    order or worker, and on CPU and GPU alike. The pixels then agree exactly for the same batch
    composition on the same hardware; across batch sizes, BLAS and convolution kernels sum in another
    order, which moved at most 1/255 on about 1e-5 of the pixel values in our CPU tests.

    Yields:
        One list of `spec.size` x `spec.size` RGB images per pipeline call, in the order of `seeds`.
    """
    import torch

    if batch_size < 1:
        raise InputError("--batch-size", batch_size, "must be >= 1")
    condition = conditioning_tensor(image)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in chunk]
        output = pipe(
            condition,
            height=spec.size,
            width=spec.size,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            num_images_per_prompt=len(chunk),
            generator=generators,
            output_type="pil",
        )
        yield list(output.images)


def generate_variations(
    pipe: StableDiffusionImageVariationPipeline,
    image: Image.Image,
    *,
    seeds: Sequence[int],
    spec: GenerationSpec,
    batch_size: int,
) -> list[Image.Image]:
    """All variations of `image` for `seeds` (see `iter_variation_batches`), in seed order."""
    return [img for batch in iter_variation_batches(pipe, image, seeds=seeds, spec=spec, batch_size=batch_size)
            for img in batch]

"""The views of one test sample: the original, random crops (TPT), and generated variations (DiffTPT).

Layout of a sample's batch: index 0 is the original (bicubic resize of the shorter side + center crop);
then the conventional views (RandomResizedCrop from the full-resolution image + horizontal flip, AugMix
on top when asked); then the generated views (resize + center crop only). Every random choice of view i
comes from a generator seeded with hash(seed, sample_key, i), so a sample gets the same views on any
worker, in any order, whatever ran before.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from difftpt_ops.core.errors import InputError
from difftpt_ops.tta.augmix import augmix

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, as TPT uses them
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

ORIGINAL, CONVENTIONAL, GENERATED = "original", "conventional", "generated"


@dataclass(frozen=True)
class ViewBatch:
    """Normalised views (n, 3, R, R) and the kind of each row."""

    pixels: Tensor
    kinds: tuple[str, ...]


def view_seed(seed: int, sample_key: str | int, view_index: int) -> int:
    """A 63-bit seed for one view, stable across processes and platforms (Python's hash() is salted)."""
    digest = hashlib.sha256(f"{seed}\x1f{sample_key}\x1f{view_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def as_rgb_image(image: object, *, argument: str = "image") -> Image.Image:
    """Accept a PIL image (any mode) or a (C, H, W) tensor with C in {1, 3}; return an RGB PIL image.

    Raises:
        InputError: anything else, or an image with a zero side.
    """
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise InputError(argument, tuple(image.shape), "a tensor image must have shape (3, H, W) or (1, H, W)")
        image = TF.to_pil_image(image.detach().cpu())
    if not isinstance(image, Image.Image):
        raise InputError(argument, type(image).__name__, "must be a PIL image or a (3, H, W) tensor")
    if min(image.size) < 1:
        raise InputError(argument, image.size, "has a zero-sized side")
    return image if image.mode == "RGB" else image.convert("RGB")


_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None]
_STD = np.asarray(CLIP_STD, dtype=np.float32)[:, None]
# (3, 256): channel c's normalised value of each 8-bit level, computed with to_tensor/normalize's float32 steps
# (level / 255, minus the mean, over the std), so a lookup gives the very bits the arithmetic would.
_LEVELS = ((np.arange(256, dtype=np.float32) / np.float32(255.0))[None, :] - _MEAN) / _STD


def to_normalised_array(image: Image.Image) -> np.ndarray:
    """ToTensor + CLIP Normalize as a (3, H, W) float32 array.

    Same values as torchvision's to_tensor/normalize, bit for bit, through a per-channel table of the 256
    levels (half the time of the arithmetic, which was most of building a view without AugMix). In numpy:
    per-view tensors are small, and torch's thread pool costs more than it saves on them.
    """
    pixels = np.asarray(image, dtype=np.uint8)
    out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
    for channel in range(3):
        np.take(_LEVELS[channel], pixels[:, :, channel], out=out[channel])
    return out


def center_view(image: Image.Image, resolution: int = 224) -> np.ndarray:
    """Bicubic resize of the shorter side to `resolution`, center crop, CLIP normalisation."""
    resized = TF.resize(image, resolution, interpolation=InterpolationMode.BICUBIC)
    return to_normalised_array(TF.center_crop(resized, resolution))


def random_crop_box(width: int, height: int, generator: torch.Generator,
                    scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop with torchvision's ratio range and the area `scale` range
    (torchvision's default unless a method's reference sets another, as DMN's (0.5, 1))."""
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback after failed attempts: the largest centred crop whose aspect ratio is within range.
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def conventional_view(image: Image.Image, *, seed: int, resolution: int = 224, use_augmix: bool = False,
                      crop_scale: tuple[float, float] = CROP_SCALE) -> np.ndarray:
    """RandomResizedCrop (bilinear) + horizontal flip p=0.5 [+ AugMix], all drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    top, left, h, w = random_crop_box(image.size[0], image.size[1], generator, crop_scale)
    crop = TF.resized_crop(image, top, left, h, w, [resolution, resolution],
                           interpolation=InterpolationMode.BILINEAR)
    if float(torch.rand(1, generator=generator)) < 0.5:
        crop = TF.hflip(crop)
    if not use_augmix:
        return to_normalised_array(crop)
    return augmix(crop, to_normalised_array, random.Random(seed))


def build_views(image: object, *, n_conventional: int, generated: Sequence[object] = (), seed: int,
                sample_key: str | int, augmix: bool = False, resolution: int = 224, workers: int = 1,
                crop_scale: tuple[float, float] = CROP_SCALE) -> ViewBatch:
    """All views of one sample: [original, n_conventional random crops, one view per generated image].

    `workers` > 1 builds the views in a thread pool (PIL and numpy release the GIL); each view has its own
    generator, so the result does not depend on it.

    Raises:
        InputError: `image` or a generated image is not an image (see `as_rgb_image`).
    """
    generated = list(generated)
    positions = range(1 + n_conventional + len(generated))
    pixels = build_some_views(lambda: image, lambda indices: [generated[i] for i in indices],
                              n_conventional=n_conventional, n_generated=len(generated), positions=positions,
                              seed=seed, sample_key=sample_key, augmix=augmix, resolution=resolution,
                              workers=workers, crop_scale=crop_scale)
    kinds = (ORIGINAL,) + (CONVENTIONAL,) * n_conventional + (GENERATED,) * len(generated)
    return ViewBatch(pixels=pixels, kinds=kinds)


def build_some_views(load_image: Callable[[], object], load_generated: Callable[[Sequence[int]], Sequence[object]],
                     *, n_conventional: int, n_generated: int, positions: Sequence[int], seed: int,
                     sample_key: str | int, augmix: bool = False, resolution: int = 224, workers: int = 1,
                     crop_scale: tuple[float, float] = CROP_SCALE) -> Tensor:
    """The views at `positions` (in that order) of the layout `build_views` builds, equal to its rows there.

    Only what those views need is loaded: `load_image()` when the original or a conventional view is among
    them, `load_generated(variant indices)` for the generated ones asked for. A sample whose other views are
    stored (the feature store) builds no more than the views it lacks.

    Raises:
        InputError: an image is not an image (see `as_rgb_image`), or a position is outside the layout.
    """
    total = 1 + n_conventional + n_generated
    bad = [p for p in positions if not 0 <= p < total]
    if bad:
        raise InputError("positions", bad, f"outside the sample's {total} views")
    original = as_rgb_image(load_image()) if any(p <= n_conventional for p in positions) else None
    variants = sorted({p - n_conventional - 1 for p in positions if p > n_conventional})
    loaded = list(load_generated(variants)) if variants else []
    images = {v: as_rgb_image(g, argument=f"generated[{v}]") for v, g in zip(variants, loaded, strict=True)}

    def job(position: int) -> Callable[[], np.ndarray]:
        if position == 0:
            return lambda: center_view(original, resolution)  # type: ignore[arg-type]
        if position <= n_conventional:
            return lambda: conventional_view(original, seed=view_seed(seed, sample_key, position),  # type: ignore[arg-type]
                                             resolution=resolution, use_augmix=augmix, crop_scale=crop_scale)
        image = images[position - n_conventional - 1]
        return lambda: center_view(image, resolution)

    jobs = [job(p) for p in positions]
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            views = list(pool.map(lambda run: run(), jobs))
    else:
        views = [run() for run in jobs]
    if not views:
        return torch.empty((0, 3, resolution, resolution))
    return torch.from_numpy(np.stack(views))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))

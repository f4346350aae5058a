"""AugMix at severity 1 on a PIL crop, as TPT applies it on the cross-domain sets.

Three chains, each of 1-3 operations drawn from nine PIL operations (no colour, contrast, brightness or
sharpness ops, which would overlap the test sets' corruptions); chain outputs are mixed with Dirichlet(1,1,1)
weights in normalised-tensor space and blended with the plain crop with m ~ Beta(1,1). All randomness
comes from the `random.Random` passed in, never from a global generator.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

Op = Callable[[Image.Image, float, random.Random], Image.Image]

N_CHAINS = 3
MAX_DEPTH = 3
MAX_LEVEL = 10.0  # AugMix expresses an op's magnitude as level / 10 of its maximum


def _magnitude(severity: float, rng: random.Random) -> float:
    """A random level in [0.1, severity], as a fraction of the op's maximum."""
    return rng.uniform(0.1, severity) / MAX_LEVEL


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _autocontrast(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    return ImageOps.equalize(img)


def _posterize(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    bits = int(_magnitude(severity, rng) * 4)
    return ImageOps.posterize(img, 4 - bits)


def _rotate(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    degrees = _signed(int(_magnitude(severity, rng) * 30), rng)
    return img.rotate(degrees, resample=Image.BILINEAR)


def _solarize(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    threshold = int(_magnitude(severity, rng) * 256)
    return ImageOps.solarize(img, 256 - threshold)


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coefficients, resample=Image.BILINEAR)


def _shear_x(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    shear = _signed(_magnitude(severity, rng) * 0.3, rng)
    return _affine(img, (1, shear, 0, 0, 1, 0))


def _shear_y(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    shear = _signed(_magnitude(severity, rng) * 0.3, rng)
    return _affine(img, (1, 0, 0, shear, 1, 0))


def _translate_x(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    shift = _signed(int(_magnitude(severity, rng) * img.size[0] / 3), rng)
    return _affine(img, (1, 0, shift, 0, 1, 0))


def _translate_y(img: Image.Image, severity: float, rng: random.Random) -> Image.Image:
    shift = _signed(int(_magnitude(severity, rng) * img.size[1] / 3), rng)
    return _affine(img, (1, 0, 0, 0, 1, shift))


AUGMIX_OPS: tuple[Op, ...] = (
    _autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y, _translate_x, _translate_y,
)


def augmix(crop: Image.Image, to_array: Callable[[Image.Image], np.ndarray], rng: random.Random, *,
           severity: float = 1.0) -> np.ndarray:
    """Mix three augmentation chains of `crop` with the plain crop; returns a normalised (3, H, W) array.

    `to_array` turns a PIL image into the normalised array (mixing happens after normalisation, as in
    TPT). The Dirichlet(1, 1, 1) weights are normalised Gamma(1) draws; m ~ Beta(1, 1).
    """
    plain = to_array(crop)
    gammas = [rng.gammavariate(1.0, 1.0) for _ in range(N_CHAINS)]
    weights = [g / sum(gammas) for g in gammas]
    blend = rng.betavariate(1.0, 1.0)
    mix = np.zeros_like(plain)
    for weight in weights:
        image = crop
        for _ in range(rng.randint(1, MAX_DEPTH)):
            image = rng.choice(AUGMIX_OPS)(image, severity, rng)
        mix += np.float32(weight) * to_array(image)
    return np.float32(blend) * plain + np.float32(1.0 - blend) * mix

"""Reading images and hashing files: the one place that decodes a sample from disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from difftpt_ops.core.errors import SampleError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def hash_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes (read in chunks by hashlib)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully into RGB. Raises SampleError naming the file when it cannot."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise SampleError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from exc

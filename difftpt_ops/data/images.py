"""Reading images and hashing files: the one place that decodes a sample from disk."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from difftpt_ops.core.errors import SampleError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def hash_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes (read in chunks by hashlib)."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load_rgb(path: Path, *, sha256: str | None = None) -> Image.Image:
    """Decode an image fully into RGB. Raises SampleError naming the file when it cannot.

    With `sha256` (a registered sample's content hash) the bytes read must hash to it: a file replaced or edited
    since its dataset was registered is refused, because runs, views, generated images and stored features are all
    keyed by the registered content, and a result computed from other pixels would be filed under it.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise SampleError(f"{path}: file not found") from exc
    except OSError as exc:
        raise SampleError(f"{path}: cannot read file ({exc.__class__.__name__}: {exc})") from exc
    if sha256 is not None:
        require_registered_content(path, data, sha256)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from exc


def require_registered_content(path: Path, data: bytes, sha256: str) -> None:
    """SampleError when `data` (the bytes of `path`) no longer hash to `sha256`, the hash registration stored."""
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise SampleError(f"{path}: the file changed since its dataset was registered (sha256 {found[:12]}, "
                          f"registered {sha256[:12]}); restore the registered file, or register the changed "
                          "files as a dataset under another name")

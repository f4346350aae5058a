"""Stored image features: the image encoder's output for a set of views of one sample, as a safetensors file.

What identifies stored features (the services keep one database row per stored set):

- the model: `model_fingerprint` hashes the image tower's weights (names, dtypes, bytes), the precision
  they run in, the device type and the activation functions the tower is built with, so a changed model,
  precision or activation never meets another model's features;
- the sample: the content hash of its image;
- the views: one recipe per view (`view_recipes`): the original (resolution), a conventional view (seed,
  index, AugMix flag, resolution, and its crop's area range when not torchvision's default, as DMN's), a
  generated view (the generated image's content hash, resolution).
  The recipe is everything `tta.views.build_views` draws the view from, so equal recipes are equal pixels.

A file holds one tensor `features` (n_views, d) in the dtype the encoder produced (exact reuse: a run that
reads it computes what a run that encodes computes). Files are content-addressed through the artifact
store (namespace `features`): temp file, fsync, atomic publish that never overwrites, so a worker killed
mid-write leaves no truncated file and two workers writing the same key leave one valid copy. A read checks
the size and the sha256 of the bytes against what the row recorded, and reports a mismatch instead of
returning wrong features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from difftpt_ops.core.specs import canonical_json, fingerprint_of
from difftpt_ops.storage.artifacts import Artifact, ArtifactStore

NAMESPACE = "features"
SUFFIX = ".st"  # safetensors; the artifact store allows suffixes of at most 8 characters
TENSOR_NAME = "features"
FORMAT_VERSION = 1  # of the recipe and file layout; part of every key
ORIGINAL, CONVENTIONAL, GENERATED = "original", "conventional", "generated"  # the view kinds of tta.views
DEFAULT_CROP_SCALE = (0.08, 1.0)  # tta.views.CROP_SCALE (tests check they agree; storage does not import tta)
_ACTIVATION_WORDS = ("gelu", "relu", "silu", "act")


class CorruptFeaturesError(Exception):
    """Stored bytes that do not match their row (size or hash), or that do not parse."""


def model_fingerprint(model: nn.Module, *, precision: str, device: str | torch.device,
                      tower_digest: str | None = None) -> str:
    """sha256 identifying the image encoder as it computes: weights, precision, device type, activations.

    Hashes every parameter and buffer of the image tower (`image_tower`) in its stored dtype, unless the caller
    passes that hash (`tower_digest`, from `weights_digest(image_tower(model))`); about a second for ViT-B/16
    on a CPU, so callers cache it per loaded model.
    """
    tower = image_tower(model)
    activations = sorted({type(m).__name__ for m in tower.modules()
                          if any(word in type(m).__name__.lower() for word in _ACTIVATION_WORDS)})
    return fingerprint_of({"format": FORMAT_VERSION, "weights": tower_digest or weights_digest(tower),
                           "precision": precision, "device": torch.device(device).type, "activations": activations})


def image_tower(model: nn.Module) -> nn.Module:
    """A CLIP's image encoder (`model.visual`), else the whole model."""
    return getattr(model, "visual", model)


def clip_weights_digest(model: nn.Module, tower_digest: str) -> str:
    """sha256 of a whole CLIP's weights as loaded, from its image tower's `weights_digest` and the rest's (each
    parameter hashed once when the caller also needs the tower's)."""
    rest = weights_digest(model, skip_prefix="visual.") if image_tower(model) is not model else ""
    return hashlib.sha256(f"{tower_digest}\x1e{rest}".encode()).hexdigest()


def weights_digest(module: nn.Module, *, skip_prefix: str | None = None) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes) as they are loaded; those
    whose name starts with `skip_prefix` are left out."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\x1f{data.dtype}\x1f{tuple(data.shape)}\x1e".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def view_recipes(*, n_conventional: int, generated_hashes: Sequence[str], seed: int, augmix: bool,
                 resolution: int, crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                 generated_reencode: str | None = None) -> list[dict[str, Any]]:
    """One recipe per view, in the engine's order: [original, conventional..., generated...]. A crop's area
    range is part of its recipe only when it is not the default, and a generated image's re-encoding (the
    Pillow format it goes through before its view is built, see `GeneratedViews`) only when there is one, so
    recipes stored before either existed stay."""
    recipes: list[dict[str, Any]] = [{"kind": ORIGINAL, "resolution": resolution}]
    scale = {} if tuple(crop_scale) == DEFAULT_CROP_SCALE else {"scale": [float(v) for v in crop_scale]}
    recipes += [{"kind": CONVENTIONAL, "seed": seed, "index": i, "augmix": bool(augmix), "resolution": resolution,
                 **scale} for i in range(1, n_conventional + 1)]
    reencode = {} if generated_reencode is None else {"reencode": generated_reencode}
    recipes += [{"kind": GENERATED, "hash": h, "resolution": resolution, **reencode} for h in generated_hashes]
    return recipes


def recipe_key(recipe: dict[str, Any]) -> str:
    """A view recipe as canonical text (a dict key for matching views across stored sets)."""
    return canonical_json(recipe)


def recipes_fingerprint(recipes: Sequence[dict[str, Any]]) -> str:
    return fingerprint_of({"format": FORMAT_VERSION, "views": list(recipes)})


def kinds_of(recipes: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(str(r["kind"]) for r in recipes)


def encode_features(features: Tensor) -> bytes:
    """The file bytes for (n_views, d) features, deterministic for equal tensors (no metadata)."""
    return save_safetensors({TENSOR_NAME: features.detach().cpu().contiguous()})


@dataclass(frozen=True)
class StoredFeatures:
    """Where a stored set lives and what its bytes must be."""

    key: str
    sha256: str
    size_bytes: int


class FeatureFiles:
    """Feature tensors under content keys in the artifact store."""

    def __init__(self, root: Path) -> None:
        self.store = ArtifactStore(Path(root), namespace=NAMESPACE)

    def put(self, features: Tensor) -> Artifact:
        """Store `features` (written like generated images: temp, fsync, publish without overwrite)."""
        data = encode_features(features)
        digest = hashlib.sha256(data).hexdigest()
        return self.store.put(f"{digest}{SUFFIX}", data)

    def read(self, stored: StoredFeatures) -> Tensor:
        """The stored tensor, after checking size and hash against `stored`.

        Raises:
            FileNotFoundError: the file is gone.
            CorruptFeaturesError: size, hash or format do not match (cut short, overwritten, damaged).
        """
        data = self.store.read_bytes(stored.key)
        if len(data) != stored.size_bytes:
            raise CorruptFeaturesError(f"{stored.key}: {len(data)} bytes on disk, {stored.size_bytes} recorded")
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            raise CorruptFeaturesError(f"{stored.key}: sha256 differs from the recorded one")
        try:
            return load_safetensors(data)[TENSOR_NAME]
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise CorruptFeaturesError(f"{stored.key}: unreadable ({exc})") from exc

    def discard(self, key: str) -> None:
        """Remove a damaged file so that the recomputed bytes can be published under its key again."""
        self.store.path(key).unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        return self.store.path(key)

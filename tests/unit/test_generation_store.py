"""The artifact store, artifact keys and per-image seeds: pure code, no model, no database."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.models.diffusion import variant_seed
from difftpt_ops.services.running.generation import artifact_key
from difftpt_ops.storage.artifacts import TEMP_SUFFIX, ArtifactStore, encode_png

pytestmark = pytest.mark.unit

KEY = "ab" * 32 + ".png"


def test_put_then_read_back(tmp_path: Path) -> None:
    """Stored bytes come back under the key, in the two-digit fan-out layout, with their hash."""
    store = ArtifactStore(tmp_path)
    artifact = store.put(KEY, b"hello")
    assert artifact.created
    assert artifact.path == tmp_path / "generated" / "ab" / KEY
    assert store.exists(KEY)
    assert store.read_bytes(KEY) == b"hello"
    assert artifact.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert store.put_bytes(KEY, b"hello") == artifact.path


def test_put_never_replaces_a_stored_key(tmp_path: Path) -> None:
    """The first complete copy wins, and the returned hash is that of the bytes on disk."""
    store = ArtifactStore(tmp_path)
    store.put(KEY, b"first")
    second = store.put(KEY, b"second")
    assert not second.created
    assert store.read_bytes(KEY) == b"first"
    assert second.sha256 == hashlib.sha256(b"first").hexdigest()


def test_temporary_files_are_never_taken_as_stored(tmp_path: Path) -> None:
    """A half-written temp file (a killed writer) is invisible, is not left by a good put, and is cleaned."""
    store = ArtifactStore(tmp_path)
    folder = store.path(KEY).parent
    folder.mkdir(parents=True)
    stray = folder / f".{KEY}.999.deadbeef{TEMP_SUFFIX}"
    stray.write_bytes(b"trunc")
    assert not store.exists(KEY) and store.get(KEY) is None
    store.put(KEY, b"complete")
    assert store.read_bytes(KEY) == b"complete"
    assert sorted(p.name for p in folder.iterdir()) == sorted([KEY, stray.name])
    assert store.remove_stale_temp(older_than_s=3600) == 0  # may belong to a live writer
    os.utime(stray, (0, 0))
    assert store.remove_stale_temp(older_than_s=3600) == 1
    assert [p.name for p in folder.iterdir()] == [KEY]


@pytest.mark.parametrize("bad", ["../etc/passwd", "ab" * 32, "AB" * 32 + ".png", "ab/cd.png"])
def test_malformed_keys_are_rejected(tmp_path: Path, bad: str) -> None:
    """Keys that could leave the root or are not digests raise ValueError naming the key."""
    with pytest.raises(ValueError, match="key"):
        ArtifactStore(tmp_path).path(bad)


def test_png_encoding_is_lossless_and_deterministic() -> None:
    """Equal pixels give equal bytes (a stable content hash) and decode to the same pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    first, second = encode_png(Image.fromarray(pixels)), encode_png(Image.fromarray(pixels.copy()))
    assert first == second
    from io import BytesIO

    assert np.array_equal(np.asarray(Image.open(BytesIO(first))), pixels)


def test_variant_seed_is_63_bit_and_depends_on_every_input() -> None:
    """Seeds fit a signed BIGINT, repeat for equal inputs and change with each input."""
    base = variant_seed(0, "ab" * 32, 0)
    assert 0 <= base < 2**63
    assert variant_seed(0, "ab" * 32, 0) == base
    others = {variant_seed(1, "ab" * 32, 0), variant_seed(0, "cd" * 32, 0), variant_seed(0, "ab" * 32, 1)}
    assert base not in others and len(others) == 3


def test_artifact_key_covers_the_generation_inputs() -> None:
    """Every pixel-changing field changes the key; per_sample does not; imported files get their own keys."""
    spec = GenerationSpec()
    key = artifact_key(spec, "ab" * 32, 3)
    assert key.endswith(".png") and len(key) == 68
    assert artifact_key(spec, "ab" * 32, 3) == key
    changes = {"model": "other/model", "revision": "v1.0", "scheduler": "ddim", "steps": 20, "guidance": 7.5,
               "size": 256, "dtype": "fp16", "seed": 1}
    keys = {artifact_key(dataclasses.replace(spec, **{name: value}), "ab" * 32, 3)
            for name, value in changes.items()}
    keys |= {artifact_key(spec, "cd" * 32, 3), artifact_key(spec, "ab" * 32, 4)}
    assert key not in keys and len(keys) == len(changes) + 2
    assert artifact_key(dataclasses.replace(spec, per_sample=8), "ab" * 32, 3) == key
    assert artifact_key(spec, "ab" * 32, 3, origin="imported", suffix=".jpg") != key.replace(".png", ".jpg")


@pytest.mark.parametrize(("field", "value", "argument"), [
    ("scheduler", "euler-a", "--scheduler"),
    ("per_sample", 0, "--per-sample"),
    ("steps", 0, "--steps"),
    ("size", 100, "--size"),
])
def test_bad_generation_options_name_the_argument(field: str, value: object, argument: str) -> None:
    """Unknown scheduler, zero images per sample and the like fail before any work, naming the option."""
    with pytest.raises(InvalidSpecError) as info:
        GenerationSpec(**{field: value})
    assert info.value.argument == argument
    assert str(value) in str(info.value)

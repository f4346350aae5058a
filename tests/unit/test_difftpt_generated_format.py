"""DiffTPT reads its generated views as the reference's generator left them on disk.

The reference image-variation script (chunmeifeng/DiffTPT `image_generator_R.py`) saves every variation under
the source image's own extension (`<stem>_<i>.<ext of the source>`) with Pillow's defaults, and its loader
(`difftpt_utils.diffuData`) opens those files again: for a JPEG source the generated views it tunes on went
through JPEG at Pillow's default quality. We store variations losslessly (PNG) and, by default, re-encode them
the same way when a DiffTPT run reads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from difftpt_ops.core.errors import InvalidSpecError, SampleError
from difftpt_ops.core.method_specs import DiffTPTSpec, method_spec_from, method_spec_from_dict
from difftpt_ops.services.running.generated_views import GeneratedViews, as_saved_beside_source
from difftpt_ops.storage.artifacts import encode_png
from difftpt_ops.storage.features import view_recipes

pytestmark = pytest.mark.unit


def _variation(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8), "RGB")


def _reference_round_trip(image: Image.Image, source_name: str, folder: Path) -> Image.Image:
    """A transcription of the reference: save under `<stem>_0.<source ext>` with Pillow's defaults, open, RGB."""
    stem, ext = source_name.split(".")[0], source_name.split(".")[1]
    path = folder / f"{stem}_0.{ext}"
    image.save(path)
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("source_name", ["art_1.jpg", "ILSVRC2012_val_00000001.JPEG", "img.jpeg", "tile.png"])
def test_generated_view_pixels_are_what_the_reference_read_back(tmp_path: Path, source_name: str) -> None:
    image = _variation()
    expected = np.asarray(_reference_round_trip(image, source_name, tmp_path))
    got = np.asarray(as_saved_beside_source(image, source_name))
    assert np.array_equal(got, expected)
    if source_name.endswith("png"):
        assert np.array_equal(got, np.asarray(image))  # a PNG source: the reference kept the pixels
    else:
        assert not np.array_equal(got, np.asarray(image))  # a JPEG source: lossy, as the reference's files


def test_generated_views_reencode_stored_png_by_default_and_keep_imported_files(tmp_path: Path) -> None:
    image = _variation(1)
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    png.write_bytes(encode_png(image))
    image.save(jpg)  # an imported file the reference wrote: read as it is, never compressed twice
    sample = SimpleNamespace(relpath="n01443537/art_1.jpg", content_hash="h", index=0)
    settings = SimpleNamespace(artifact_root=tmp_path)

    default = GeneratedViews(None, settings, 1, 2, generated_format=DiffTPTSpec().generated_format)  # type: ignore[arg-type]
    default.paths_for = lambda _sample: [png, jpg]  # type: ignore[method-assign]
    reference = np.asarray(_reference_round_trip(image, "art_1.jpg", tmp_path))
    assert [np.array_equal(np.asarray(v), reference) for v in default.images_for(sample)] == [True, True]
    assert default.reencoded_as(sample) == "JPEG"

    lossless = GeneratedViews(None, settings, 1, 2, generated_format="lossless")  # type: ignore[arg-type]
    lossless.paths_for = lambda _sample: [png]  # type: ignore[method-assign]
    assert np.array_equal(np.asarray(lossless.images_for(sample)[0]), np.asarray(image))
    assert lossless.reencoded_as(sample) is None


def test_threads_read_a_samples_generated_images_as_one_thread_does(tmp_path: Path) -> None:
    """Same images, same order, re-encoded alike; with unreadable files, the first one in variant order fails the
    sample, as reading in order would."""
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode_png(_variation(10 + i)))
    sample = SimpleNamespace(relpath="n01443537/art_1.jpg", content_hash="h", index=7)
    settings = SimpleNamespace(artifact_root=tmp_path)
    readers = []
    for threads in (1, 4):
        views = GeneratedViews(None, settings, 1, 6, generated_format="source")  # type: ignore[arg-type]
        views.paths_for = lambda _sample: list(paths)  # type: ignore[method-assign]
        views.read_threads = threads
        readers.append(views)
    one, many = (reader.images_for(sample) for reader in readers)
    assert len(one) == 6 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one, many, strict=True))
    assert not np.array_equal(np.asarray(one[0]), np.asarray(_variation(10)))  # re-encoded (a JPEG source)
    paths[2].write_bytes(b"not an image")
    paths[4].unlink()
    errors = []
    for reader in readers:
        with pytest.raises(SampleError) as caught:
            reader.images_for(sample)
        errors.append(re.sub(r" at 0x[0-9a-f]+", "", str(caught.value)))  # an object's address differs
    assert errors[0] == errors[1] and "2.png" in errors[0]


def test_stored_specs_keep_their_meaning_and_fingerprint() -> None:
    """Runs stored before the option read their views losslessly; their spec dict (fingerprint) is unchanged."""
    old = {key: value for key, value in DiffTPTSpec().to_dict().items() if key != "generated_format"}
    spec = method_spec_from_dict(old)
    assert isinstance(spec, DiffTPTSpec) and spec.generated_format == "lossless"
    assert spec.to_dict() == old
    assert DiffTPTSpec().generated_format == "source"
    assert DiffTPTSpec().to_dict()["generated_format"] == "source"
    assert method_spec_from("difftpt", {"generated_format": "lossless"}).to_dict() == old
    with pytest.raises(InvalidSpecError):
        DiffTPTSpec(generated_format="webp")


def test_reencoded_generated_views_have_their_own_feature_recipes() -> None:
    plain = view_recipes(n_conventional=1, generated_hashes=["g"], seed=0, augmix=False, resolution=224)
    jpeg = view_recipes(n_conventional=1, generated_hashes=["g"], seed=0, augmix=False, resolution=224,
                        generated_reencode="JPEG")
    assert plain[:2] == jpeg[:2] and plain[2] == {"kind": "generated", "hash": "g", "resolution": 224}
    assert jpeg[2] == {"kind": "generated", "hash": "g", "resolution": 224, "reencode": "JPEG"}

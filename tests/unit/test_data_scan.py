"""Probing files and scanning a layout: failed samples keep their reason, fingerprints follow content."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from difftpt_ops.data.formats import open_layout
from difftpt_ops.data.probe import probe_file
from difftpt_ops.data.scan import read_spool, scan_layout

pytestmark = pytest.mark.unit


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_probe_reports_hash_size_and_decode_failures(tmp_path: Path) -> None:
    """A good JPEG gives its size; garbage, a truncated JPEG and a missing file give reasons."""
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes())
    probe = probe_file(good)
    assert probe.ok and (probe.width, probe.height) == (64, 48) and len(probe.content_hash or "") == 64
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"definitely not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes((256, 256))[:400])
    for path in (garbage, truncated):
        probe = probe_file(path)
        assert not probe.ok and probe.error and probe.error.startswith("cannot decode image")
        assert probe.content_hash is not None  # the bytes exist; only decoding failed
    missing = probe_file(tmp_path / "missing.jpg")
    assert missing.error == "file not found" and missing.content_hash is None


def test_load_rgb_refuses_bytes_that_are_not_the_registered_ones(tmp_path: Path) -> None:
    """With the registered hash, the file must still hash to it: the probe's hash is accepted, a rewritten file is
    a SampleError saying so, and without a hash nothing is compared."""
    from difftpt_ops.core.errors import SampleError
    from difftpt_ops.data.images import load_rgb

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes())
    registered = probe_file(path).content_hash
    assert registered is not None and load_rgb(path, sha256=registered).size == (64, 48)
    path.write_bytes(jpeg_bytes((64, 49)))
    with pytest.raises(SampleError, match=f"changed since its dataset was registered .*registered {registered[:12]}"):
        load_rgb(path, sha256=registered)
    assert load_rgb(path).size == (64, 49)
    with pytest.raises(SampleError, match="file not found"):
        load_rgb(tmp_path / "gone.jpg", sha256=registered)


def make_tree(root: Path) -> Path:
    for label, color in enumerate([(255, 0, 0), (0, 255, 0)]):
        for i in range(3):
            path = root / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (5, 4), (color[0], color[1], i)).save(path)
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def scan(root: Path, **kwargs):  # type: ignore[no-untyped-def]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        summary = scan_layout(open_layout(root, "imagefolder"), spool, **kwargs)
        rows = [row for batch in read_spool(spool, batch_rows=3) for row in batch]
    return summary, rows


def test_scan_spools_every_row_and_counts_failures(tmp_path: Path) -> None:
    """Rows come back in listing order with indices, labels kept for failed files; progress ends at total."""
    calls: list[tuple[int, int]] = []
    summary, rows = scan(make_tree(tmp_path / "ds"), progress=lambda done, total: calls.append((done, total)))
    assert (summary.num_samples, summary.num_failed, summary.num_ok) == (7, 1, 6)
    assert [row["index"] for row in rows] == list(range(7))
    broken = next(row for row in rows if row["relpath"] == "class1/broken.png")
    assert broken["status"] == "failed" and broken["label"] == 1 and "cannot decode" in broken["error"]
    assert summary.failures == [{"index": broken["index"], "relpath": "class1/broken.png", "label": 1,
                                 "error": broken["error"]}]
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)
    assert all(row["width"] == 5 and row["height"] == 4 for row in rows if row["status"] == "ok")


def test_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    """The same files elsewhere give the same fingerprint; one changed pixel changes it."""
    first, _ = scan(make_tree(tmp_path / "a"), workers=1)
    second, _ = scan(make_tree(tmp_path / "b"), workers=3)
    assert first.fingerprint == second.fingerprint
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "b" / "class0" / "0.png")
    changed, _ = scan(tmp_path / "b")
    assert changed.fingerprint != first.fingerprint

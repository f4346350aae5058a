"""The generated views a DiffTPT run reads: exactly its `count` images of each sample, as the reference read them.

The reference's generator saved each variation beside its source under the source's extension with Pillow's
defaults (JPEG at quality 75 for a JPEG source) and its loader read those files back; the store keeps them
losslessly, so a run whose spec says `generated_format="source"` re-encodes them that way when it reads them.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import NotReadyError, SampleError
from difftpt_ops.data.images import load_rgb
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run
from difftpt_ops.services.running.generation import find_generated_paths
from difftpt_ops.services.running.waiting import generation_failure
from difftpt_ops.storage.artifacts import IMAGE_SUFFIX, ArtifactStore

READ_THREADS = min(8, os.cpu_count() or 1)  # threads reading a sample's generated images (GeneratedViews)


def generated_views_for(engine: Engine, settings: Settings, run: Run, method: Any, n_generated: int
                        ) -> GeneratedViews | None:
    """The generated views `run` reads with its method spec `method` (its `generated_format`; specs without one
    read losslessly), or None when it reads none or has no generation config."""
    if run.generation_config_id is None or n_generated <= 0:
        return None
    return GeneratedViews(engine, settings, run.generation_config_id, n_generated,
                          generated_format=getattr(method, "generated_format", "lossless"))


def saved_format(source_name: str) -> str | None:
    """The Pillow format the reference's generator wrote a variation of `source_name` in: it saved each one as
    `<stem>_<i>.<the source's extension>`, so Pillow chose the format by that extension (JPEG for .jpg, .jpeg,
    .JPEG). None where that keeps the pixels as they are (PNG) or the name has no known image extension."""
    fmt = Image.registered_extensions().get(Path(source_name).suffix.lower())
    return None if fmt in (None, "PNG") else fmt


def as_saved_beside_source(image: Image.Image, source_name: str) -> Image.Image:
    """`image` as the reference's loader read it back: encoded in `saved_format(source_name)` with Pillow's
    default settings (JPEG: quality 75, 4:2:0 chroma subsampling), decoded, RGB; unchanged where that format
    is None."""
    fmt = saved_format(source_name)
    if fmt is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.convert("RGB")


class GeneratedViews:
    """Reads exactly `count` generated images of a sample (variants 0..count-1): DiffTPT's extra views.

    A sample never gets fewer: if its generation failed the sample fails with that reason, and if its
    images are not there yet the shard waits (NotReadyError) instead of tuning with fewer views.

    `generated_format` is the DiffTPT spec's: "source" re-encodes each image stored here losslessly (PNG) the
    way the reference's generator saved it beside its source (`as_saved_beside_source`; JPEG at quality 75 for
    a JPEG source); an imported file is read as it is, since it is what the reference wrote. "lossless" reads
    the stored pixels.
    """

    def __init__(self, engine: Engine, settings: Settings, config_id: int, count: int, *,
                 generated_format: str = "lossless") -> None:
        self.engine, self.config_id, self.count = engine, config_id, count
        self.generated_format = generated_format
        self.store = ArtifactStore(settings.artifact_root)
        self.read_threads = READ_THREADS

    def reencoded_as(self, sample: Any) -> str | None:
        """The Pillow format this sample's generated images stored here go through before their views are
        built (part of their feature-store recipes), or None."""
        return saved_format(sample.relpath) if self.generated_format == "source" else None

    def images_for(self, sample: Any) -> list[Any]:
        """The sample's `count` generated images, in variant order, read (and re-encoded) by `read_threads`
        threads: decoding and encoding release the GIL, and one thread took 0.73 to 0.83 s for DiffTPT's 63
        images of 512 px (PNG read, JPEG round trip), more than a DiffTPT sample's tuning on a GPU. A file that
        cannot be read raises its SampleError as reading in order would (the first bad one in variant order)."""
        reencode = self.reencoded_as(sample) is not None

        def read(path: Path) -> Any:
            image = load_rgb(path)
            if reencode and path.suffix.lower() == IMAGE_SUFFIX:  # ours (lossless); not an imported file
                image = as_saved_beside_source(image, sample.relpath)
            return image

        paths = self.paths_for(sample)
        if self.read_threads <= 1 or len(paths) <= 1:
            return [read(path) for path in paths]
        with ThreadPoolExecutor(max_workers=min(self.read_threads, len(paths))) as pool:
            return list(pool.map(read, paths))

    def paths_for(self, sample: Any) -> list[Path]:
        if not sample.content_hash:
            raise SampleError(f"sample {sample.index} has no content hash, so no generated images")
        with session_scope(self.engine) as session:
            paths = find_generated_paths(session, self.store, config_id=self.config_id,
                                         source_hash=sample.content_hash, limit=self.count)
            failure = None if len(paths) == self.count else generation_failure(
                session, config_id=self.config_id, source_hash=sample.content_hash)
        if len(paths) == self.count:
            return paths
        if failure is not None:
            reason = failure.strip().splitlines()[-1] if failure.strip() else "no reason recorded"
            raise SampleError(f"sample {sample.index}: its generation failed ({reason})")
        raise NotReadyError(f"sample {sample.index} has {len(paths)} of its {self.count} generated images "
                            f"(generation config {self.config_id})")

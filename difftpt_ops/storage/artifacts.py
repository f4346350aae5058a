"""A content-addressed artifact store: bytes filed under a key derived from everything that made them.

Layout: `<root>/<namespace>/<first two hex digits of the key>/<key>`, e.g.
`artifacts/generated/3f/3f9c...e1.png`. The two-digit fan-out keeps directories small (63 images per
sample soon means millions of files).

Crash safety: bytes go to a temporary name in the destination directory, are flushed and fsynced,
then published under the final name in one atomic step. A worker killed mid-write leaves only a
`.tmp` file, which no reader ever takes for an artifact. Publishing never overwrites: the first
complete copy of a key wins, so the hash a database row records always matches the file on disk,
even when two workers raced on the same key.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from difftpt_ops.data.images import hash_file

# A key is a sha256 hex digest plus a file suffix; anything else (slashes, "..") could escape the root.
_KEY = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]{1,8}$")
TEMP_SUFFIX = ".tmp"

# Generated images are stored as PNG. Lossless: the stored pixels are exactly what the pipeline made,
# so "same seeds, same images" is checked on pixels, not on codec noise, and every run reads the same
# views. Deterministic: Pillow writes no timestamp or other metadata unless asked, and zlib at a fixed
# level always emits the same stream, so equal pixels give equal bytes and a stable content hash (for
# one Pillow/zlib build). Level 1 encodes about twice as fast as the default 6 for ~10% more bytes;
# encoding must keep up with a GPU making several images a second. The cost is disk: about 0.5 MB per
# 512 px image against ~0.1 MB for a quality-95 JPEG. (The reference's generator wrote JPEG at Pillow's default
# quality beside JPEG sources; DiffTPT runs reproduce that when they read, see GeneratedViews.)
IMAGE_SUFFIX = ".png"
PNG_COMPRESS_LEVEL = 1


def encode_png(image: Image.Image) -> bytes:
    """The bytes stored for a generated image (see IMAGE_SUFFIX for why PNG)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


@dataclass(frozen=True)
class Artifact:
    """A stored artifact and what the store knows about its bytes."""

    key: str
    path: Path
    sha256: str  # of the bytes on disk under `key`
    size_bytes: int
    created: bool  # False: the key was already stored and the existing bytes were kept


class ArtifactStore:
    """Bytes under content keys in one directory tree (the workspace, or a shared filesystem)."""

    def __init__(self, root: Path, *, namespace: str = "generated") -> None:
        self.root = Path(root)
        self.namespace = namespace

    def path(self, key: str) -> Path:
        """Where `key` lives (whether or not it is stored yet).

        Raises:
            ValueError: `key` is not `<64 hex digits>.<suffix>`.
        """
        if not _KEY.match(key):
            raise ValueError(f"`key` must be a sha256 hex digest with a suffix, got {key!r}")
        return self.root / self.namespace / key[:2] / key

    def exists(self, key: str) -> bool:
        """True when a complete copy of `key` is stored (temporary files never count)."""
        return self.path(key).is_file()

    def get(self, key: str) -> Artifact | None:
        """The stored artifact under `key` (its bytes hashed now), or None when it is not stored."""
        final = self.path(key)
        return self._existing(key, final) if final.is_file() else None

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes of `key`. Raises FileNotFoundError when it is not stored."""
        return self.path(key).read_bytes()

    def put(self, key: str, data: bytes) -> Artifact:
        """Store `data` under `key` atomically, unless a complete copy is already there.

        Returns:
            The stored artifact. When `key` existed, `created` is False and `sha256` is the hash of
            the bytes already on disk, which were kept.
        """
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_file():
            return self._existing(key, final)
        tmp = final.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not _publish(tmp, final):
            return self._existing(key, final)
        _fsync_directory(final.parent)
        return Artifact(key, final, hashlib.sha256(data).hexdigest(), len(data), created=True)

    def put_bytes(self, key: str, data: bytes) -> Path:
        """Store `data` under `key` (see `put`) and return its path."""
        return self.put(key, data).path

    def remove_stale_temp(self, *, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by killed writers, older than `older_than_s`. Returns the count.

        Younger ones may belong to a writer still running, so they are left alone.
        """
        base = self.root / self.namespace
        if not base.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in base.glob(f"*/.*{TEMP_SUFFIX}"):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def _existing(self, key: str, final: Path) -> Artifact:
        return Artifact(key, final, hash_file(final), final.stat().st_size, created=False)


def _publish(tmp: Path, final: Path) -> bool:
    """Give `tmp` the name `final` atomically. False when `final` already existed (it is kept)."""
    try:
        # A hard link fails when the target exists, so a finished copy is never replaced.
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links: rename is still atomic, at worst replacing an equal key.
        os.replace(tmp, final)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable too (a crash after rename must not lose the name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is already synced
    finally:
        os.close(fd)

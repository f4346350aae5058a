"""Checkpoint files of online runs: a method's state after a shard, with that shard's logits and positions.

A checkpoint is a safetensors file in the artifact store, named by the sha256 of its bytes and written
atomically (fsynced) before the `online_checkpoints` row that points at it. A file whose size or hash no
longer matches its row is moved aside, so that a replay of its shard can write it again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import OnlineCheckpoint

log = logging.getLogger(__name__)

CHECKPOINT_NAMESPACE = "online"
CHECKPOINT_SUFFIX = ".st"  # safetensors; the artifact store allows suffixes of at most 8 characters
STATE_PREFIX = "state."  # checkpoint tensors: the method's state_dict under this prefix, plus the shard's
LOGITS_KEY = "logits"  # prediction logits (n_samples, n_classes) and
POSITIONS_KEY = "positions"  # the stream positions they belong to


def encode_checkpoint(state: dict[str, Any], logits: Any, positions: Any) -> bytes:
    """The safetensors bytes of a checkpoint: the state's tensors, the shard's logits and their positions."""
    from safetensors.torch import save

    tensors = {f"{STATE_PREFIX}{name}": tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    tensors[LOGITS_KEY] = logits.detach().cpu().float().contiguous()
    tensors[POSITIONS_KEY] = positions.detach().cpu().contiguous()
    return save(tensors)


def decode_checkpoint(data: bytes) -> tuple[dict[str, Any], Any, Any]:
    """(state tensors, logits, positions) of checkpoint bytes."""
    from safetensors.torch import load

    tensors = load(data)
    state = {name.removeprefix(STATE_PREFIX): t for name, t in tensors.items() if name.startswith(STATE_PREFIX)}
    return state, tensors[LOGITS_KEY], tensors[POSITIONS_KEY]


def checkpoint_store(settings: Settings) -> Any:
    from difftpt_ops.storage.artifacts import ArtifactStore

    return ArtifactStore(settings.artifact_root, namespace=CHECKPOINT_NAMESPACE)


def put_checkpoint(store: Any, data: bytes) -> dict[str, Any]:
    """Write checkpoint bytes under their content key (fsynced, atomic); the row's file facts."""
    digest = hashlib.sha256(data).hexdigest()
    store.put(f"{digest}{CHECKPOINT_SUFFIX}", data)
    return {"artifact_key": f"{digest}{CHECKPOINT_SUFFIX}", "content_hash": digest, "size_bytes": len(data)}


def read_checkpoint(store: Any, row: Any) -> bytes | None:
    """The bytes of a checkpoint row's file when they are intact; a damaged file is moved aside (so that a
    replay can write it again) and None is returned."""
    path = store.path(row.artifact_key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.warning("checkpoint %s of run %s shard %s is missing", row.artifact_key, row.run_id, row.shard_index)
        return None
    if len(data) == row.size_bytes and hashlib.sha256(data).hexdigest() == row.content_hash:
        return data
    log.warning("checkpoint %s of run %s shard %s is damaged (%d of %d bytes); using an earlier one",
                row.artifact_key, row.run_id, row.shard_index, len(data), row.size_bytes)
    path.rename(path.with_name(f"{path.name}.damaged-{int(time.time() * 1000)}"))
    return None


def shard_checkpoints(engine: Engine, settings: Settings, run_id: int) -> list[tuple[int, bytes | None]]:
    """(shard index, intact bytes or None) of every checkpoint of a run, in chain order (tests, inspection)."""
    store = checkpoint_store(settings)
    with session_scope(engine) as session:
        rows = session.scalars(select(OnlineCheckpoint).where(OnlineCheckpoint.run_id == run_id)
                               .order_by(OnlineCheckpoint.shard_index)).all()
        session.expunge_all()
    return [(row.shard_index, read_checkpoint(store, row)) for row in rows]

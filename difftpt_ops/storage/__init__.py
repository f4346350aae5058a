"""Where artifacts (generated images) live: a content-addressed store on a local or shared filesystem."""

from __future__ import annotations

from difftpt_ops.storage.artifacts import Artifact, ArtifactStore

__all__ = ["Artifact", "ArtifactStore"]

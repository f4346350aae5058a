"""Which views the loss uses: TPT's confidence selection and DiffTPT's cosine + entropy filters.

All filters are vectorised over views and run once, at step 0; later steps reuse the indices. Counts are
int(n * ratio) as in the reference, but at least one view is kept whenever there is a candidate, so the
loss is never taken over an empty set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from difftpt_ops.tta.losses import view_entropy


@dataclass(frozen=True)
class Selection:
    """The views the loss uses, and the per-view scores behind the choice."""

    indices: Tensor  # (k,) long, into the sample's views
    entropy: Tensor  # (n,) fp32, of each view's softmax at step 0
    cosine: Tensor  # (n,) fp32, similarity to view 0; NaN where not computed


def keep_count(n: int, ratio: float) -> int:
    """int(n * ratio) as the reference counts, but at least 1 when n >= 1."""
    return max(1, int(n * ratio)) if n > 0 else 0


def lowest_entropy(entropy: Tensor, ratio: float, candidates: Tensor | None = None) -> Tensor:
    """Indices of the int(len * ratio) lowest-entropy candidates (all views when None), lowest first."""
    if candidates is None:
        candidates = torch.arange(entropy.shape[0], device=entropy.device)
    order = torch.argsort(entropy[candidates], stable=True)
    return candidates[order[:keep_count(candidates.shape[0], ratio)]]


def cosine_to_original(source: Tensor) -> Tensor:
    """Cosine similarity of every row to row 0, (n,); row 0 itself is NaN. Vectorised, fp32."""
    source = source.float()
    similarity = F.cosine_similarity(source, source[:1], dim=-1, eps=1e-8)
    similarity[0] = float("nan")
    return similarity


def most_similar(cosine: Tensor, ratio: float, candidates: Tensor) -> Tensor:
    """The int(len * ratio) candidates most similar to the original, most similar first."""
    order = torch.argsort(cosine[candidates], descending=True, stable=True)
    return candidates[order[:keep_count(candidates.shape[0], ratio)]]


def select_tpt(logits: Tensor, ratio: float) -> Selection:
    """TPT: the int(n * ratio) lowest-entropy views; view 0 competes like any other."""
    entropy = view_entropy(logits)
    nan = torch.full_like(entropy, float("nan"))
    return Selection(indices=lowest_entropy(entropy, ratio), entropy=entropy, cosine=nan)


def select_difftpt(logits: Tensor, features: Tensor, *, n_conventional: int, cosine_ratio: float,
                   entropy_ratio: float, cosine_on: str = "logits", mode: str = "chained") -> Selection:
    """DiffTPT's filters over [original, conventional..., generated...] rows.

    chained (the reference code): among views 1..n-1 (conventional and generated alike) keep the
    int((n-1) * cosine_ratio) most similar to view 0, prepend view 0, then keep the int(len * entropy_ratio)
    lowest-entropy of those.

    parallel (the paper's description): the original and conventional views go through the entropy filter
    alone (int(len * entropy_ratio) lowest-entropy of them); the generated views go through the cosine
    filter (int(n_gen * cosine_ratio) most similar to view 0) and then the entropy filter at the same
    ratio; the two kept sets are joined.

    Similarity is measured on the logit vectors (cosine_on="logits", the code) or on the normalised image
    features ("features", the paper). With no generated views, chained filters what exists and parallel
    reduces to TPT's selection at entropy_ratio.
    """
    entropy = view_entropy(logits)
    cosine = cosine_to_original(logits if cosine_on == "logits" else features)
    n = logits.shape[0]
    device = logits.device
    if mode == "chained":
        similar = most_similar(cosine, cosine_ratio, torch.arange(1, n, device=device))
        candidates = torch.cat([torch.zeros(1, dtype=torch.long, device=device), similar])
        indices = lowest_entropy(entropy, entropy_ratio, candidates)
    else:
        split = 1 + n_conventional
        kept_conventional = lowest_entropy(entropy, entropy_ratio, torch.arange(0, split, device=device))
        generated = torch.arange(split, n, device=device)
        if generated.numel():
            similar = most_similar(cosine, cosine_ratio, generated)
            kept_generated = lowest_entropy(entropy, entropy_ratio, similar)
        else:
            kept_generated = generated
        indices = torch.cat([kept_conventional, kept_generated])
        cosine = torch.where(torch.arange(n, device=device) >= split, cosine, torch.full_like(cosine, float("nan")))
    return Selection(indices=indices, entropy=entropy, cosine=cosine)

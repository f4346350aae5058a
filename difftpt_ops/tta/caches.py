"""Per-class feature caches sorted by entropy, as TDA's, DPE's and BoostAdapter's reference code keep them
(`update_cache`), their affinities, and TDA's summary of a sample's views.

A cache is three tensors of a state dict under one prefix: `<prefix>_keys` (n_classes, capacity, dim),
`<prefix>_entropy` (n_classes, capacity, inf where empty) and `<prefix>_count` (n_classes,), plus
`<prefix>_mask` (n_classes, capacity, n_classes) for a cache whose entries carry a class mask (TDA's negative
one); a class's filled slots are a prefix of its row, sorted by entropy when filed with `file_entry` (a
first-in-first-out cache, BoostAdapter's negative one, keeps them in arrival order). Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from difftpt_ops.tta.losses import at_least_fp32, marginal_entropy, view_entropy


def file_entry(state: dict[str, Tensor], prefix: str, label: int, key: Tensor, entropy: float,
               mask: Tensor | None) -> None:
    """File one entry into a class's slots: append while there is room, else replace the worst if better
    (the reference's `update_cache`, which DPE's code keeps unchanged); `mask` goes with the entry when given."""
    keys, entropies, count = state[f"{prefix}_keys"], state[f"{prefix}_entropy"], state[f"{prefix}_count"]
    capacity, used = keys.shape[1], int(count[label])
    if used == capacity:
        if not entropy < float(entropies[label, capacity - 1]):
            return
        used -= 1  # the highest-entropy entry (the last) drops out
    # Stable order by entropy: the new entry goes after the entries with an equal or lower entropy.
    position = int((entropies[label, :used] <= entropy).sum())
    tail = slice(position + 1, used + 1)
    moved = slice(position, used)
    keys[label, tail] = keys[label, moved].clone()
    entropies[label, tail] = entropies[label, moved].clone()
    keys[label, position] = key
    entropies[label, position] = entropy
    if mask is not None:
        masks = state[f"{prefix}_mask"]
        masks[label, tail] = masks[label, moved].clone()
        masks[label, position] = mask
    count[label] = used + 1


def affinity(feature: Tensor, keys: Tensor, count: Tensor, beta: float) -> Tensor:
    """exp(-(beta - beta * f.k)) per slot, (n_classes, capacity); empty slots weigh 0."""
    similarity = keys @ feature
    weights = (-(beta - beta * similarity)).exp()
    filled = torch.arange(keys.shape[1], device=count.device).unsqueeze(0) < count.unsqueeze(1)
    return weights * filled


def negative_cache_logits(state: dict[str, Tensor], feature: Tensor, alpha: float, beta: float) -> Tensor:
    """alpha * A(negative cache) @ its entries' class masks, (n_classes,); zero while the cache is empty."""
    if not bool(state["neg_count"].any()):
        return torch.zeros(state["neg_count"].shape[0])
    weights = affinity(feature, state["neg_keys"], state["neg_count"], beta)
    return alpha * (weights.flatten() @ state["neg_mask"].flatten(0, 1).float())


def summarise_views(features: Tensor, logits: Tensor,
                    selection_p: float) -> tuple[Tensor, Tensor, float, Tensor, Tensor]:
    """(feature, logits, entropy, probability map, kept view indices) of one sample from its views (fp32, or
    fp64 for fp64 inputs)."""
    logits = at_least_fp32(logits)
    if logits.shape[0] == 1:
        return (at_least_fp32(features[0]), logits[0], float(view_entropy(logits)[0]), logits[0].softmax(-1),
                torch.zeros(1, dtype=torch.long))
    keep = max(1, int(logits.shape[0] * selection_p))  # the reference's int() alone keeps none of < 10 views
    order = torch.argsort(view_entropy(logits), stable=True)[:keep]
    kept = logits[order]
    return (at_least_fp32(features[order]).mean(0), kept.mean(0), float(marginal_entropy(kept)),
            kept.softmax(-1).mean(0), order)


def two_caches(n_classes: int, dim: int, pos_capacity: int, neg_capacity: int) -> dict[str, Tensor]:
    """TDA's state: empty positive and negative caches, per class `capacity` slots of (key, entropy), plus the
    negative entries' class masks."""
    state = {}
    for prefix, capacity in (("pos", pos_capacity), ("neg", neg_capacity)):
        state[f"{prefix}_keys"] = torch.zeros(n_classes, capacity, dim)
        state[f"{prefix}_entropy"] = torch.full((n_classes, capacity), math.inf)
        state[f"{prefix}_count"] = torch.zeros(n_classes, dtype=torch.int64)
    state["neg_mask"] = torch.zeros(n_classes, neg_capacity, n_classes, dtype=torch.bool)
    return state


def _filled(state: Mapping[str, Tensor], prefix: str) -> Tensor:
    return torch.arange(state[f"{prefix}_keys"].shape[1]).unsqueeze(0) < state[f"{prefix}_count"].unsqueeze(1)


def two_caches_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A compact copy of `two_caches` state for a checkpoint: only the filled slots, each class's in order."""
    out = {"pos_count": state["pos_count"].clone(), "neg_count": state["neg_count"].clone(),
           "shape": torch.tensor([*state["pos_keys"].shape, state["neg_keys"].shape[1]], dtype=torch.int64)}
    for prefix in ("pos", "neg"):
        filled = _filled(state, prefix)
        out[f"{prefix}_keys"] = state[f"{prefix}_keys"][filled].contiguous()
        out[f"{prefix}_entropy"] = state[f"{prefix}_entropy"][filled].contiguous()
    out["neg_mask"] = state["neg_mask"][_filled(state, "neg")].contiguous()
    return out


def load_two_caches(saved: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rebuild the full state from `two_caches_state_dict` output."""
    n_classes, pos_capacity, dim, neg_capacity = (int(v) for v in saved["shape"])
    state = two_caches(n_classes, dim, pos_capacity, neg_capacity)
    for prefix in ("pos", "neg"):
        state[f"{prefix}_count"] = saved[f"{prefix}_count"].clone()
        filled = _filled(state, prefix)
        state[f"{prefix}_keys"][filled] = saved[f"{prefix}_keys"]
        state[f"{prefix}_entropy"][filled] = saved[f"{prefix}_entropy"]
    state["neg_mask"][_filled(state, "neg")] = saved["neg_mask"]
    return state

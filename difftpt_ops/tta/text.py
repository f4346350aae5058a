"""The frozen CLIP text tower, run on prompt embeddings and cut to the tokens that matter.

Two exact savings, both consequences of CLIP's causal text attention (position i only sees positions <= i):

1. Truncation. The feature is read at the end-of-text (EOT) token, so tokens after it never influence it.
   Running the transformer on the first L = EOT index + 1 positions, with the positional embedding and the
   causal mask sliced to L, gives the padded 77-token features to float rounding. Truncating through the
   tokenizer's context_length instead would force an EOT into the sequence and change the result.
2. Shared prefix. Every class prompt starts with the same [SOS][ctx_1..ctx_n] tokens, so their hidden
   states are identical for all classes. They are computed once per layer (batch 1) and only their keys and
   values are broadcast to the class tokens, which then run over ~4 instead of ~9 positions per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftpt_ops.core.errors import InvalidSpecError


class ClipLike(Protocol):
    """What the tuning code needs of a loaded CLIP (models.clip.LoadedClip satisfies it)."""

    model: nn.Module
    tokenizer: Any
    name: str
    device: torch.device


class TextTower:
    """Views the text modules of an open_clip CLIP or CustomTextCLIP, without copying weights."""

    def __init__(self, model: nn.Module, *, name: str = "model") -> None:
        tower = model.text if hasattr(model, "text") else model
        if not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None:
            raise InvalidSpecError("--model", name, "text tower is not a CLIP-style transformer; not supported")
        self.token_embedding: nn.Embedding = tower.token_embedding
        self.positional_embedding: Tensor = tower.positional_embedding
        self.transformer: nn.Module = tower.transformer
        self.ln_final: nn.Module = tower.ln_final
        self.text_projection: Tensor | nn.Module | None = tower.text_projection
        self.attn_mask: Tensor | None = tower.attn_mask
        self.pool_type: str = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        self.eos_id: int | None = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id", None)
        self.context_length = int(self.positional_embedding.shape[0])
        if self.pool_type not in {"argmax", "eos"}:
            raise InvalidSpecError("--model", name, f"text pooling {self.pool_type!r} is not supported")

    @property
    def cast_dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    def pool_index(self, tokens: Tensor) -> Tensor:
        """Position of the token the feature is read from, per row of `tokens` (as open_clip pools)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings of `tokens` (n, L) -> (n, L, width), frozen."""
        with torch.no_grad():
            return self.token_embedding(tokens)

    def encode(self, embeddings: Tensor, pool_index: Tensor) -> Tensor:
        """Text features (n, embed_dim), not normalised, of prompt embeddings (n, L, width) with L <= 77.

        L may be shorter than the context when the tower is causal and every pool index is < L; this is the
        open_clip encode_text computation with the positional embedding and the causal mask sliced to L.
        """
        length = embeddings.shape[1]
        cast = self.cast_dtype
        x = embeddings.to(cast) + self.positional_embedding[:length].to(cast)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool_index]
        return self._project(x)

    @property
    def can_share_prefix(self) -> bool:
        """True for the standard open_clip block (pre-norm, packed-QKV nn.MultiheadAttention, causal)."""
        if not self.causal or getattr(self.transformer, "grad_checkpointing", False):
            return False
        return all(_is_plain_block(block) for block in getattr(self.transformer, "resblocks", []) or [None])

    def encode_shared_prefix(self, prefix: Tensor, suffixes: Sequence[Tensor],
                             pool_indices: Sequence[Tensor]) -> list[Tensor]:
        """Text features of prompts [prefix][suffix_g] for each group g, running the prefix once per layer.

        `prefix` is (1, P, width), shared by every prompt; `suffixes[g]` is (n_g, S_g, width) and
        `pool_indices[g]` (n_g,) are absolute positions (>= P). Equal to `encode` on the concatenated
        sequences; requires `can_share_prefix`. All tokens are packed into one (tokens, width) matrix so
        the per-token layers (projections, MLP, norms) run as a few large matmuls; only the attention
        is done per group.
        """
        cast = self.cast_dtype
        length = prefix.shape[1]
        position = self.positional_embedding.to(cast)
        rows = [prefix[0].to(cast) + position[:length]]
        rows += [(s.to(cast) + position[length:length + s.shape[1]]).flatten(0, 1) for s in suffixes]
        shapes = [(int(s.shape[0]), int(s.shape[1])) for s in suffixes]
        x = torch.cat(rows)
        for block in self.transformer.resblocks:
            x = _packed_block(block, x, length, shapes, self.attn_mask)
        # Gather the pooled rows first: the final LayerNorm is per token, so this is exact and cheaper.
        offsets = torch.tensor([0] + [n * s for n, s in shapes], device=x.device).cumsum(0)[:-1] + length
        picks = [offset + torch.arange(n, device=x.device) * s + (pool.to(x.device) - length)
                 for offset, (n, s), pool in zip(offsets, shapes, pool_indices, strict=True)]
        pooled = self._project(self.ln_final(x[torch.cat(picks)]))
        return list(pooled.split([n for n, _ in shapes]))

    def _project(self, x: Tensor) -> Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Module):
            return self.text_projection(x)
        return x @ self.text_projection


def _is_plain_block(block: object) -> bool:
    attn = getattr(block, "attn", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention)
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(b, L, width) -> (b, heads, L, head_dim)."""
    b, length, width = x.shape
    return x.reshape(b, length, n_heads, width // n_heads).transpose(1, 2)


def _packed_block(block: nn.Module, x: Tensor, prefix: int, shapes: Sequence[tuple[int, int]],
                  mask: Tensor) -> Tensor:
    """One ResidualAttentionBlock over packed rows: `prefix` shared rows, then each group's n x S class rows.

    The prefix attends causally to itself; class token i of a prompt (absolute position P + i) attends to
    the prefix's keys/values (computed once, broadcast) and to its own tokens <= i: exactly rows P..P+S of
    the causal mask. Norms, projections, the MLP and the residuals are per token and run on all rows.
    """
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    width = x.shape[-1]
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    p_k, p_v = _heads(k[:prefix][None], heads), _heads(v[:prefix][None], heads)
    attended = [_merge(F.scaled_dot_product_attention(
        _heads(q[:prefix][None], heads), p_k, p_v, attn_mask=mask[:prefix, :prefix].to(x.dtype)))]
    start = prefix
    for n, s in shapes:
        rows = slice(start, start + n * s)
        start += n * s
        g_q, g_k, g_v = (_heads(t[rows].reshape(n, s, width), heads) for t in (q, k, v))
        g_k = torch.cat([p_k.expand(n, -1, -1, -1), g_k], dim=2)
        g_v = torch.cat([p_v.expand(n, -1, -1, -1), g_v], dim=2)
        attended.append(_merge(F.scaled_dot_product_attention(
            g_q, g_k, g_v, attn_mask=mask[prefix:prefix + s, :prefix + s].to(x.dtype))))
    x = x + block.ls_1(F.linear(torch.cat(attended), attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _merge(attended: Tensor) -> Tensor:
    """(b, heads, L, head_dim) -> (b * L, width)."""
    b, heads, length, dim = attended.shape
    return attended.transpose(1, 2).reshape(b * length, heads * dim)


def normalise(features: Tensor) -> Tensor:
    """L2-normalise rows in fp32 (features may come out of a half-precision tower)."""
    return F.normalize(features.float(), dim=-1)

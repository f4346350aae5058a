"""The learnable prompt: one shared context of n_ctx token vectors, the class name at the end.

Each class prompt is [SOS][ctx_1 .. ctx_n]["class name" tokens][template tail, e.g. "."][EOT]. Only the
context is a parameter; SOS and the class/tail/EOT embeddings are frozen. Prompts are cut after their EOT
token and grouped by length, and the [SOS][ctx] prefix common to all classes is run once (see text.py for
why both are exact), so the text transformer processes about 4 positions per class instead of 77.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difftpt_ops.core.errors import InputError, InvalidSpecError
from difftpt_ops.core.specs import PromptSpec
from difftpt_ops.tta.text import TextTower

PLACEHOLDER = "X"  # one BPE token per word, as the reference uses for a random or CoOp context
RANDOM_CTX_STD = 0.02


def class_prompt_texts(class_names: Sequence[str], prompt: PromptSpec) -> list[str]:
    """Prompt text per class: context words, the class name (underscores -> spaces), the template tail.

    The template's text before "{}" is where the context sits: its words are replaced by the learnable
    context (initialised from ctx_init). With the default template this gives "a photo of a {class}.".
    """
    if not class_names:
        raise InputError("class_names", "[]", "must name at least one class")
    tail = prompt.template.split("{}", 1)[1]
    words = _context_words(prompt)
    return [f"{words} {name.replace('_', ' ')}{tail}".strip() for name in class_names]


def initial_context(tower: TextTower, tokenizer: Any, prompt: PromptSpec, *,
                    coop_state: Mapping[str, Any] | Tensor | None = None, seed: int = 0) -> Tensor:
    """The context a sample starts from, (n_ctx, width) in fp32.

    A CoOp `ctx` wins over ctx_init; without either the context is N(0, 0.02^2) drawn from `seed`.

    Raises:
        InvalidSpecError: ctx_init does not tokenise to n_ctx tokens, or the CoOp ctx has the wrong size.
    """
    width = tower.token_embedding.weight.shape[1]
    if coop_state is not None:
        return coop_context(coop_state, n_ctx=prompt.n_ctx, width=width)
    if prompt.ctx_init is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(prompt.n_ctx, width, generator=generator) * RANDOM_CTX_STD
    tokens = tokenizer([_context_words(prompt)]).to(tower.token_embedding.weight.device)
    n_tokens = int(tower.pool_index(tokens)[0]) - 1
    if n_tokens != prompt.n_ctx:
        raise InvalidSpecError("ctx_init", prompt.ctx_init,
                               f"tokenises to {n_tokens} tokens but n_ctx is {prompt.n_ctx}")
    return tower.embed(tokens)[0, 1:1 + prompt.n_ctx].float().cpu()


def coop_context(source: Mapping[str, Any] | Tensor, *, n_ctx: int, width: int) -> Tensor:
    """The `ctx` tensor of a CoOp checkpoint (the loaded dict, its state_dict, or the tensor), checked.

    Raises:
        InvalidSpecError: no `ctx` in the checkpoint, or its shape is not (n_ctx, width).
    """
    ctx = source
    if isinstance(ctx, Mapping):
        ctx = ctx.get("state_dict", ctx)
        ctx = ctx.get("ctx") if isinstance(ctx, Mapping) else None
    if not isinstance(ctx, Tensor):
        raise InvalidSpecError("coop_checkpoint", type(source).__name__, "has no `ctx` tensor")
    if tuple(ctx.shape) != (n_ctx, width):
        raise InvalidSpecError("coop_checkpoint", tuple(ctx.shape),
                               f"ctx must have shape ({n_ctx}, {width}): n_ctx context tokens of the model's width")
    return ctx.detach().float().cpu().clone()


@dataclass(frozen=True)
class PromptGroup:
    """Classes whose prompts share one truncated length: their frozen class-part embeddings and pool positions."""

    classes: Tensor  # (g,) class indices
    suffix: Tensor  # (g, length - 1 - n_ctx, width): class tokens, template tail, EOT
    pool_index: Tensor  # (g,) absolute position of the token the feature is read from


class PromptLearner(nn.Module):
    """Shared context `ctx` (the only parameter) plus frozen per-class token embeddings, grouped by length.

    `truncate=False` keeps the full context length; `share_prefix=False` runs every prompt whole. Both
    exist to test that the speed-ups are exact.
    """

    def __init__(self, tower: TextTower, tokens: Tensor, init: Tensor, *, max_groups: int = 4,
                 truncate: bool = True, share_prefix: bool = True) -> None:
        super().__init__()
        n_ctx = init.shape[0]
        device = tower.token_embedding.weight.device
        tokens = tokens.to(device)
        self.tower = tower
        self.n_classes = tokens.shape[0]
        self.ctx = nn.Parameter(init.clone().float().to(device))  # fp32 even when the tower is half precision
        self.register_buffer("ctx_init", init.clone().float().to(device), persistent=False)
        pool = tower.pool_index(tokens)
        truncate = truncate and tower.causal
        lengths = pool + 1 if truncate else torch.full_like(pool, tokens.shape[1])
        embeddings = tower.embed(tokens)
        self.register_buffer("sos", embeddings[:1, :1], persistent=False)
        self.share_prefix = share_prefix and truncate and tower.can_share_prefix and bool(
            (tokens[:, 0] == tokens[0, 0]).all())
        self.groups = [
            PromptGroup(classes=idx, suffix=embeddings[idx, 1 + n_ctx:length], pool_index=pool[idx])
            for idx, length in _length_groups(lengths, max_groups if truncate else 1)
        ]
        order = torch.cat([group.classes for group in self.groups])
        self.register_buffer("inverse", torch.argsort(order), persistent=False)

    def reset(self) -> None:
        """Put the context back to its initial value (before every sample)."""
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)

    def text_features(self, ctx: Tensor | None = None) -> Tensor:
        """Normalised text features (n_classes, embed_dim) in fp32 for the current context, or for `ctx`
        (n_ctx, width), any context of the same shape (an online method's buffer of prompts: DynaPrompt);
        differentiable in it."""
        ctx = self.ctx if ctx is None else ctx
        prefix = torch.cat([self.sos, ctx.to(self.sos.dtype).unsqueeze(0)], dim=1)  # (1, 1 + n_ctx, width)
        if self.share_prefix:
            parts = self.tower.encode_shared_prefix(prefix, [g.suffix for g in self.groups],
                                                    [g.pool_index for g in self.groups])
        else:
            parts = [
                self.tower.encode(torch.cat([prefix.expand(g.suffix.shape[0], -1, -1), g.suffix], dim=1), g.pool_index)
                for g in self.groups
            ]
        features = torch.cat(parts)[self.inverse]
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @property
    def token_count(self) -> int:
        """Token positions the text transformer processes per pass (to report the saving)."""
        prefix = 1 + self.ctx.shape[0]
        per_class = 0 if self.share_prefix else prefix
        return (prefix if self.share_prefix else 0) + sum(
            int(g.suffix.shape[0]) * (per_class + int(g.suffix.shape[1])) for g in self.groups)


def _context_words(prompt: PromptSpec) -> str:
    if prompt.ctx_init is not None:
        return " ".join(prompt.ctx_init.replace("_", " ").split())
    return " ".join([PLACEHOLDER] * prompt.n_ctx)


def _length_groups(lengths: Tensor, max_groups: int) -> list[tuple[Tensor, int]]:
    """Split classes into at most `max_groups` groups, each cut to its longest prompt, minimising total tokens.

    Fewer groups mean fewer, larger transformer calls; more groups mean less padding. A small dynamic
    programme over the sorted distinct lengths finds the split with the fewest padded tokens.
    """
    values, counts = torch.unique(lengths.cpu(), return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    k = len(values)
    groups = min(max(1, max_groups), k)
    inf = float("inf")
    # best[g][j]: fewest tokens covering the first j distinct lengths with g groups; cut[g][j]: where the last starts.
    best = [[inf] * (k + 1) for _ in range(groups + 1)]
    cut = [[0] * (k + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(1, k + 1):
            for i in range(j):
                cost = best[g - 1][i] + sum(counts[i:j]) * values[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g_best = min(range(1, groups + 1), key=lambda g: best[g][k])
    bounds, j = [], k
    for g in range(g_best, 0, -1):
        bounds.append((cut[g][j], j))
        j = cut[g][j]
    result = []
    for start, end in reversed(bounds):
        members = (lengths >= values[start]) & (lengths <= values[end - 1])
        result.append((torch.nonzero(members).flatten(), int(values[end - 1])))
    return result

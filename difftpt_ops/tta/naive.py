"""The straightforward formulation of TPT / DiffTPT, as the reference code computes it.

Kept only to prove that the engine's speed-ups are exact (tests) and to measure them (bench): every step
re-runs the frozen image encoder on all views, every prompt is padded to the full 77-token context, the
cosine filter is a Python loop of per-view similarities, and the final prediction encodes view 0 again.
Views, the initial context and the loss are shared with the engine; they are not speed-ups.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difftpt_ops.core.errors import InvalidSpecError
from difftpt_ops.core.specs import DiffTPTSpec, MethodSpec, TPTSpec
from difftpt_ops.tta.losses import marginal_entropy, view_entropy
from difftpt_ops.tta.prompts import class_prompt_texts, initial_context
from difftpt_ops.tta.text import ClipLike, TextTower, normalise
from difftpt_ops.tta.views import build_views


@dataclass(frozen=True)
class NaiveResult:
    pred: int
    top5: list[int]
    zeroshot_pred: int
    selected: list[int]
    seconds: float


class NaiveTuner:
    """Reference-style TPT/DiffTPT: full-length prompts, image encoder re-run on every forward."""

    def __init__(self, clip: ClipLike, class_names: Sequence[str], spec: MethodSpec, *, init_seed: int = 0,
                 view_workers: int = 1) -> None:
        if not isinstance(spec, (TPTSpec, DiffTPTSpec)):
            raise InvalidSpecError("--method", spec.method, "the naive formulation runs tpt and difftpt only")
        if isinstance(spec, DiffTPTSpec) and spec.filter_mode != "chained":
            raise InvalidSpecError("filter_mode", spec.filter_mode, "the naive formulation runs the chained filter")
        self.model = clip.model
        self.spec = spec
        self.view_workers = view_workers
        self.device = torch.device(clip.device)
        self.tower = TextTower(clip.model, name=clip.name)
        tokens = clip.tokenizer(class_prompt_texts(class_names, spec.prompt)).to(self.device)
        init = initial_context(self.tower, clip.tokenizer, spec.prompt, seed=init_seed)
        n_ctx = init.shape[0]
        embeddings = self.tower.embed(tokens)
        self.prefix, self.suffix = embeddings[:, :1], embeddings[:, 1 + n_ctx:]
        self.eot = tokens.argmax(dim=-1)
        self.ctx = nn.Parameter(init.to(self.device))
        self.ctx_init = init.to(self.device)

    def run(self, image: object, *, generated: Sequence[object] = (), seed: int, sample_key: str | int,
            augmix: bool = False) -> NaiveResult:
        """One sample, the reference way. Same views as the engine for the same (seed, sample_key)."""
        start = time.perf_counter()
        spec = self.spec
        tpt = isinstance(spec, TPTSpec)
        n_conventional = spec.n_views - 1 if tpt else spec.n_conventional
        generated = [] if tpt else list(generated)[:spec.n_generated]
        use_augmix = spec.augmix if spec.augmix is not None else augmix
        views = build_views(image, n_conventional=n_conventional, generated=generated, seed=seed,
                            sample_key=sample_key, augmix=use_augmix, resolution=spec.resolution,
                            workers=self.view_workers).pixels
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init)
        optimizer = torch.optim.AdamW([self.ctx], lr=spec.lr, weight_decay=spec.weight_decay)
        scaler = torch.amp.GradScaler("cuda", init_scale=1000.0) if self.device.type == "cuda" else None
        selected: Tensor | None = None
        zeroshot = -1
        for _ in range(spec.steps):
            logits, image = self._forward(views)
            if selected is None:
                zeroshot = int(logits[0].argmax())
                selected = self._select(logits.detach(), image)
            loss = marginal_entropy(logits[selected])
            optimizer.zero_grad()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        with torch.no_grad():
            final = self._forward(views[:1])[0][0]
        if selected is None:
            zeroshot, selected = int(final.argmax()), torch.zeros(1, dtype=torch.long)
        return NaiveResult(pred=int(final.argmax()), top5=torch.topk(final, k=min(5, final.numel())).indices.tolist(),
                           zeroshot_pred=zeroshot, selected=selected.tolist(), seconds=time.perf_counter() - start)

    def _forward(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and image features of all views: image encoder re-run, text over n_classes x 77 tokens."""
        with self._autocast():
            with torch.no_grad():
                image = normalise(self.model.encode_image(views.to(self.device)))
            text = normalise(self._encode_text())
            return self.model.logit_scale.exp() * image @ text.t(), image

    def _encode_text(self) -> Tensor:
        tower = self.tower
        n = self.prefix.shape[0]
        x = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(n, -1, -1).to(self.prefix.dtype), self.suffix], 1)
        x = x + tower.positional_embedding
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        return tower._project(x[torch.arange(n, device=x.device), self.eot])

    def _select(self, logits: Tensor, image: Tensor) -> Tensor:
        spec = self.spec
        if isinstance(spec, TPTSpec):
            entropy = view_entropy(logits)
            return torch.argsort(entropy)[:max(1, int(logits.shape[0] * spec.selection_p))]
        return self._select_difftpt(logits, image)

    def _select_difftpt(self, logits: Tensor, image: Tensor) -> Tensor:
        spec = self.spec
        assert isinstance(spec, DiffTPTSpec)
        source = logits if spec.cosine_on == "logits" else image
        similarity = nn.CosineSimilarity(dim=0)
        scores = torch.stack([similarity(source[i].float(), source[0].float()) for i in range(1, source.shape[0])]) \
            if source.shape[0] > 1 else torch.zeros(0)
        top = torch.argsort(scores, descending=True)[:int((source.shape[0] - 1) * spec.selection_cosine)] + 1
        candidates = torch.cat([torch.zeros(1, dtype=torch.long), top.cpu()])
        entropy = view_entropy(logits[candidates.to(logits.device)])
        keep = max(1, int(candidates.shape[0] * spec.selection_entropy))
        return candidates[torch.argsort(entropy.cpu())[:keep]].to(logits.device)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

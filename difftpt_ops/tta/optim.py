"""One optimiser step of prompt tuning, as the reference codes take it. Pure torch."""

from __future__ import annotations

import torch
from torch import Tensor


def optimiser_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Zero the gradients, back-propagate `loss` and step: through `scaler` when given (CUDA with fp16 weights),
    which skips the step on an fp16 overflow, as the references' GradScaler does."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

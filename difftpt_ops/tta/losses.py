"""The TPT objective: entropy of the mean probability over the selected views."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp32, or fp64 left as it is (the equivalence tests compute in fp64)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def view_entropy(logits: Tensor) -> Tensor:
    """Entropy of each row's softmax, (n_views,), in fp32 (fp64 for fp64 logits)."""
    logits = at_least_fp32(logits)
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1)


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax over rows, a scalar.

    The log of the mean probability is computed stably as logsumexp over views of the log-probabilities
    minus log N (not the mean of log-probabilities, not the mean of logits), clamped to the dtype's
    minimum so that exp(-inf) * -inf cannot produce NaN.
    """
    logits = at_least_fp32(logits)
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    mean_log_prob = log_probs.logsumexp(dim=0) - math.log(log_probs.shape[0])
    mean_log_prob = mean_log_prob.clamp(min=torch.finfo(mean_log_prob.dtype).min)
    return -(mean_log_prob * mean_log_prob.exp()).sum(dim=-1)

"""What every client loss is: a function of (logits, targets, loss context, params)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NoParams:
    """For losses without hyper-parameters."""


@dataclass
class LossContext:
    """What a loss may know besides the batch.

    ``class_counts``: the client's own training counts per class (float, length C);
    ``progress``: how far the federation is, round / rounds, in [0, 1] (for schedules like DRW);
    ``global_counts``: the federation's counts per class, when the server sent them.
    """

    class_counts: torch.Tensor
    progress: float = 0.0
    global_counts: torch.Tensor | None = None


LossFn = Callable[[torch.Tensor, torch.Tensor, LossContext, Any], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``fn(logits, targets, ctx, params)`` and its params dataclass."""

    name: str
    fn: LossFn
    params_cls: type = NoParams

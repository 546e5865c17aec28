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
    ``progress``: how far the federation is, round / rounds, in [0, 1] (for schedules like DRW).
    """

    class_counts: torch.Tensor
    progress: float = 0.0

    @property
    def prior(self) -> torch.Tensor:
        """Class prior π_j = n_j / Σ n, with absent classes counted as one sample (never log 0)."""
        counts = self.class_counts.clamp(min=1.0)
        return counts / counts.sum()


LossFn = Callable[[torch.Tensor, torch.Tensor, LossContext, Any], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``fn(logits, targets, ctx, params)`` and its params dataclass."""

    name: str
    fn: LossFn
    params_cls: type = NoParams

"""What every client loss is: a function of (logits, targets, class counts, params)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NoParams:
    """For losses without hyper-parameters."""


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``fn(logits, targets, class_counts, params)`` and its params dataclass.

    ``class_counts`` holds the client's own training counts per class (float, length C).
    """

    name: str
    fn: LossFn
    params_cls: type = NoParams

"""Logit-adjusted loss (Menon et al., ICLR 2021): CE on z_j + τ log π_j; predict with plain z.

π is the training label distribution: in a federation the global one, summed from the clients'
counts by the server (``prior: global``, the paper's); ``prior: client`` takes the client's own
counts, and with τ = 1 is balanced softmax (``balanced_softmax``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec
from fedimb.errors import ConfigError

PRIORS = ("global", "client")


@dataclass
class LogitAdjustParams:
    """tau: strength τ of the adjustment; prior: global | client."""

    tau: float = 1.0
    prior: str = "global"

    def check(self, prefix: str) -> None:
        """Reject an unknown prior."""
        if self.prior not in PRIORS:
            raise ConfigError(f"{prefix}.prior", f"'{self.prior}' is not allowed; choose one of {', '.join(PRIORS)}")


def class_prior(counts: torch.Tensor) -> torch.Tensor:
    """π_j = n_j / Σ n, a class nobody holds counted as one sample (never log 0)."""
    counts = counts.clamp(min=1.0)
    return counts / counts.sum()


def logit_adjust(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: LogitAdjustParams) -> torch.Tensor:
    """CE on logits plus τ log prior."""
    if params.prior == "global" and ctx.global_counts is None:
        raise RuntimeError("logit_adjust prior=global: the server sent no global class counts")
    counts = ctx.global_counts if params.prior == "global" else ctx.class_counts
    return F.cross_entropy(logits + params.tau * torch.log(class_prior(counts).to(logits.device)), targets)


LOSS = LossSpec("logit_adjust", logit_adjust, LogitAdjustParams)

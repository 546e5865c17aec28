"""FedLC (Zhang et al., ICML 2022): the calibrated loss on z'_j = z_j − τ·n_{k,j}^(−1/4), with
the client's OWN counts n_{k,j} (PFLlib uses global ones). A class absent on the client counts as
one sample, so its logit is pushed down by τ rather than to −∞.

The paper prints the loss with the true class left out of the denominator,
``denominator: others``:  L = −z'_y + log Σ_{j≠y} exp(z'_j).
That loss has no lower bound (growing z_y lowers it for ever): LeNet on digits with lr 0.01 and
momentum 0.9 reaches logits of ~750 and chance accuracy within six epochs. The default,
``denominator: all``, keeps the true class in (cross-entropy on z'), the form FL-bench trains with.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec
from fedimb.errors import ConfigError


DENOMINATORS = ("all", "others")


@dataclass
class FedLCParams:
    """tau: calibration strength τ; denominator: all (cross-entropy on z') | others (the printed j ≠ y)."""

    tau: float = 0.5
    denominator: str = "all"

    def check(self, prefix: str) -> None:
        """Reject an unknown denominator."""
        if self.denominator not in DENOMINATORS:
            raise ConfigError(f"{prefix}.denominator",
                              f"'{self.denominator}' is not allowed; choose one of {', '.join(DENOMINATORS)}")


def fedlc_calibrated_logits(logits: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """z_j − τ·n_j^(−1/4)."""
    return logits - tau * counts.clamp(min=1.0).pow(-0.25).to(logits.device)


def fedlc(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: FedLCParams) -> torch.Tensor:
    """−z'_y + log Σ_j exp(z'_j) (``all``) or log Σ_{j≠y} exp(z'_j) (``others``), averaged over the batch."""
    calibrated = fedlc_calibrated_logits(logits, ctx.class_counts, params.tau)
    if params.denominator == "all":
        return F.cross_entropy(calibrated, targets)
    true = F.one_hot(targets, calibrated.shape[1]).bool()
    others = torch.logsumexp(calibrated.masked_fill(true, float("-inf")), dim=1)
    return (others - calibrated[true]).mean()


LOSS = LossSpec("fedlc", fedlc, FedLCParams)

"""FedProx client (Li et al., MLSys 2020): adds (μ/2)·||w − w_global||² to the local loss."""

from __future__ import annotations

import torch

from clients.algorithms.base import ClientAlgorithm
from fedimb import protocol


class FedProxClient(ClientAlgorithm):
    """Reads μ from the ``proximal-mu`` value that Flower's FedProx strategy sends."""

    name = "fedprox"

    def extra_loss(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The proximal term over trainable parameters."""
        mu = float(self.rnd.config_value(protocol.PROXIMAL_MU, 0.0))
        if mu == 0.0:
            return None
        total = logits.new_zeros(())
        for name, param in self.rnd.model.named_parameters():
            total = total + (param - self.rnd.global_weights[name].to(param.device)).pow(2).sum()
        return 0.5 * mu * total

"""Small classifiers built by name; each exposes its penultimate features.

Every model is ``features(x) -> (B, D)`` followed by a ``head``, linear or cosine; ``forward``
returns logits. Prototype methods (CAFedCL-style, FedProto) and active-learning samplers read
``features``; everything else only needs ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedimb.config import COSINE_HEAD_LOSSES, ExperimentConfig, registered


class CosineHead(nn.Module):
    """Logits cos(f, w_j) of the normalised features and class weights (LDAM's NormedLinear), in [−1, 1]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1.0, 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """cos(f, w_j), shape (B, out_features)."""
        return nn.functional.normalize(features, dim=1) @ nn.functional.normalize(self.weight, dim=1).T


class FeatureClassifier(nn.Module):
    """A feature extractor followed by a linear or cosine head."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head: nn.Module = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (B, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, num_classes)."""
        return self.head(self.body(x))


def _flat_dim(body: nn.Module, input_shape: tuple[int, int, int]) -> int:
    body.eval()  # BatchNorm cannot take a single sample in training mode
    with torch.no_grad():
        dim = int(body(torch.zeros(1, *input_shape)).shape[1])
    body.train()
    return dim


def lenet(input_shape: tuple[int, int, int], num_classes: int) -> FeatureClassifier:
    """NIID-Bench's CNN: conv 1→6 k5, pool, conv 6→16 k5, pool, FC 256→120→84, head 84→C."""
    channels, height, _ = input_shape
    pad = 0 if height >= 20 else 2  # 8×8 digits would vanish under two unpadded k5 convs
    conv = nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    flat = _flat_dim(conv, input_shape)
    body = nn.Sequential(conv, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    return FeatureClassifier(body, 84, num_classes)


def cnn4(input_shape: tuple[int, int, int], num_classes: int) -> FeatureClassifier:
    """FairFAL's CNN4Conv: 4 × [conv3×3 64 → BN → ReLU → maxpool2], linear head (64-d on 28×28)."""
    channels, height, _ = input_shape
    ceil = height < 16  # keep 8×8 inputs from pooling down to nothing
    layers: list[nn.Module] = []
    in_ch = channels
    for _ in range(4):
        layers += [nn.Conv2d(in_ch, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                   nn.MaxPool2d(2, ceil_mode=ceil)]
        in_ch = 64
    body = nn.Sequential(*layers, nn.Flatten())
    return FeatureClassifier(body, _flat_dim(body, input_shape), num_classes)


def mlp(input_shape: tuple[int, int, int], num_classes: int) -> FeatureClassifier:
    """Two hidden layers of 200 units (the MLP of the FedAvg paper)."""
    flat = int(np.prod(input_shape))
    body = nn.Sequential(nn.Flatten(), nn.Linear(flat, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU())
    return FeatureClassifier(body, 200, num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.skip = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet8(input_shape: tuple[int, int, int], num_classes: int) -> FeatureClassifier:
    """ResNet-8: a 3×3 stem and three basic blocks (16, 32, 64 channels), global average pool."""
    channels = input_shape[0]
    body = nn.Sequential(
        nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _BasicBlock(16, 16, 1), _BasicBlock(16, 32, 2), _BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return FeatureClassifier(body, 64, num_classes)


MODELS: dict[str, Callable[[tuple[int, int, int], int], FeatureClassifier]] = {
    "lenet": lenet,
    "cnn4": cnn4,
    "mlp": mlp,
    "resnet8": resnet8,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0,
                head: str = "linear") -> FeatureClassifier:
    """Build model ``name`` with a ``head`` (linear | cosine), initialised deterministically from ``seed``."""
    factory = registered(MODELS, name, "model.name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(input_shape, num_classes)
        if head == "cosine":
            model.head = CosineHead(model.feature_dim, num_classes)
        return model


def head_of(cfg: ExperimentConfig) -> str:
    """The head ``cfg`` asks for, ``auto`` resolved by the loss."""
    if cfg.model.head != "auto":
        return cfg.model.head
    return "cosine" if cfg.train.loss.name in COSINE_HEAD_LOSSES else "linear"


def build_configured_model(cfg: ExperimentConfig, input_shape: tuple[int, int, int], num_classes: int,
                           seed: int = 0) -> FeatureClassifier:
    """The model of ``cfg`` (``model.name`` with its head), as server and clients build it."""
    return build_model(cfg.model.name, input_shape, num_classes, seed, head_of(cfg))


def is_exchanged(key: str) -> bool:
    """Whether a state-dict entry travels between server and clients.

    BatchNorm's integer step counter is local bookkeeping; averaging it would turn it into a
    float and break adaptive server optimisers.
    """
    return not key.endswith("num_batches_tracked")


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The exchanged part of the state dict, detached on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_exchanged(k)}


def set_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load exchanged weights (a subset of the state dict) into ``model``."""
    model.load_state_dict(weights, strict=False)

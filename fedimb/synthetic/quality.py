"""How good are the synthetic samples: a grid to look at and a per-class recognisability score.

Recognisability is the FedSSG design's quality check: a classifier trained centrally on the
real, balanced training set labels the generated images; the share of generated "class c"
images it calls c is that class's score.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from fedimb.models import build_model
from fedimb.records import save_figure


def _displayable(image: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    # Normalised-space values are not pixels: one shared stretch to [0, 1] keeps brightness comparable.
    arr = np.clip((image.detach().float().cpu().numpy() - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


def sample_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    path: str | os.PathLike[str],
    per_class: int = 8,
    class_names: list[str] | None = None,
    column_names: list[str] | None = None,
) -> Path:
    """Write a PNG grid, one row per class, the first ``per_class`` images of that class.

    ``column_names``: a title over each column ("" for none), e.g. the domain of a group of columns.
    """
    labels = labels.reshape(-1).cpu()
    lo, hi = (float(images.min()), float(images.max())) if len(images) else (0.0, 1.0)
    fig = Figure(figsize=(0.9 * per_class + 1.2, 0.9 * num_classes + 0.3))
    axes = fig.subplots(num_classes, per_class, squeeze=False)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).reshape(-1)[:per_class].tolist()
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(idx):
                shown = _displayable(images[idx[j]], lo, hi)
                ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="gray", interpolation="nearest")
        axes[c][0].set_ylabel(class_names[c] if class_names else str(c), rotation=0, ha="right", va="center")
    for ax, title in zip(axes[0], column_names or []):
        ax.set_title(title, fontsize="small", loc="left")
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return save_figure(fig, path)


@torch.inference_mode()
def recognisability(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int = 512
) -> list[float]:
    """Per class, the share of generated images of that class the classifier assigns to it.

    A class with no generated images scores NaN (written as null in JSON records).
    """
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters(), torch.empty(0)).device
    preds = torch.cat(
        [classifier(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    ) if len(images) else torch.zeros(0, dtype=torch.long)
    classifier.train(was_training)
    labels = labels.reshape(-1).cpu().long()
    scores = []
    for c in range(num_classes):
        mask = labels == c
        scores.append(float((preds[mask] == c).float().mean()) if mask.any() else math.nan)
    return scores


def train_reference_classifier(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 2, seed: int = 0
) -> nn.Module:
    """LeNet trained centrally on the real (balanced) training set; the judge for recognisability.

    Plain SGD (lr 0.05, momentum 0.9, batch 128) on tensors; returned in eval mode on the CPU.
    """
    x, y = torch.as_tensor(train_x).float(), torch.as_tensor(train_y).long()
    model = build_model("lenet", tuple(x.shape[1:]), num_classes, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 128):
            idx = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()

"""Synthetic top-up, the parts server and clients share: how many samples of each class, the
sampler per class, pools, a judge's count of recognisable samples, training from the config.

A client's top-up fills its classes up to a target with generated samples, capped relative to
its real data (:func:`topup_counts`). Pools are sampled with one guidance scale and rescale per
class (:class:`ClassSampler`), so the tail classes may take a sampler of their own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedimb import protocol
from fedimb.config import SyntheticConfig

if TYPE_CHECKING:
    from fedimb.synthetic.generator import Generator


def topup_counts(counts: np.ndarray, target_per_class: int | np.ndarray, max_ratio: float, only_held: bool = False,
                 allowed: np.ndarray | None = None) -> np.ndarray:
    """Synthetic samples per class: up to the target (0 = largest local class), capped at max_ratio × real.

    When the cap binds, every class's need is scaled down by the same factor (floored) and the
    leftover units go to the largest fractional parts, lower class first on ties. ``only_held``
    tops up only the classes with a real sample (a client's own generator never saw the others).
    ``target_per_class`` may also be one target per class (the closed loop's); ``allowed`` (bool
    per class) tops up only those classes (the (class, domain) pairs the generator learned).
    ``counts`` may be per (class, domain) pair as well: every entry is treated as a class.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if np.ndim(target_per_class):
        target = np.asarray(target_per_class, dtype=np.int64)
    else:
        target = int(target_per_class) if target_per_class > 0 else int(counts.max(initial=0))
    need = np.clip(target - counts, 0, None)
    if only_held:
        need[counts == 0] = 0
    if allowed is not None:
        need[~np.asarray(allowed, dtype=bool)] = 0
    cap = int(np.floor(max_ratio * counts.sum()))
    if need.sum() <= cap:
        return need
    exact = need * (cap / need.sum())
    out = np.floor(exact).astype(np.int64)
    order = sorted(range(len(need)), key=lambda c: (-(exact[c] - out[c]), c))
    for c in order[: cap - int(out.sum())]:
        out[c] += 1
    return out


def topup_seed(seed: int, partition_id: int, loop_round: int = 0) -> int:
    """The seed of one client's pool: the static top-up's (``loop_round`` 0), or the closed loop's after
    that round (fresh noise each time, the same on server and client alike)."""
    if loop_round <= 0:
        return protocol.derive_seed(seed, "topup", client=partition_id)
    return protocol.derive_seed(seed, "topup-loop", loop_round, partition_id)


def labels_for(counts: np.ndarray) -> torch.Tensor:
    """A label vector with counts[c] copies of class c, in class order."""
    return torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).long()


@dataclass(frozen=True, eq=False)
class ClassSampler:
    """Guidance scale and guidance rescale per class, one float64 value each."""

    guidance: np.ndarray
    rescale: np.ndarray

    def __post_init__(self) -> None:
        guidance, rescale = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (self.guidance, self.rescale))
        if guidance.shape != rescale.shape:
            raise ValueError(f"{len(guidance)} guidance scales but {len(rescale)} rescales")
        object.__setattr__(self, "guidance", guidance)
        object.__setattr__(self, "rescale", rescale)

    @classmethod
    def for_classes(cls, syn: SyntheticConfig, class_counts: np.ndarray) -> ClassSampler:
        """The tail third by ``class_counts`` (training samples over all clients) takes
        ``tail_guidance_*`` where set, every other class the main knobs."""
        from fedimb.metrics import class_groups

        num_classes = len(class_counts)
        scales = np.full(num_classes, syn.guidance_scale, dtype=np.float64)
        phis = np.full(num_classes, syn.guidance_rescale, dtype=np.float64)
        tail = class_groups(num_classes, np.asarray(class_counts))["tail"]
        if syn.tail_guidance_scale is not None:
            scales[tail] = syn.tail_guidance_scale
        if syn.tail_guidance_rescale is not None:
            phis[tail] = syn.tail_guidance_rescale
        return cls(scales, phis)

    def to_config(self) -> dict[str, list[float]]:
        """ConfigRecord values: a client sees only its own counts, not which classes are the tail."""
        return {protocol.GUIDANCE_PER_CLASS: [float(v) for v in self.guidance],
                protocol.RESCALE_PER_CLASS: [float(v) for v in self.rescale]}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClassSampler | None:
        """The sampler a message's config carries, or None when it carries none."""
        keys = (protocol.GUIDANCE_PER_CLASS, protocol.RESCALE_PER_CLASS)
        return cls(*(config[key] for key in keys)) if all(key in config for key in keys) else None

    def summary(self) -> dict[str, list[float]]:
        """The two lists as the run's summary names them."""
        return {"guidance_per_class": [float(v) for v in self.guidance],
                "rescale_per_class": [float(v) for v in self.rescale]}

    def per_label(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guidance scale and rescale for each label, float32, as ``Generator.sample`` takes them."""
        return tuple(torch.as_tensor(v, dtype=torch.float32)[labels] for v in (self.guidance, self.rescale))


def pool_record(x: torch.Tensor, y: torch.Tensor) -> ArrayRecord:
    """A pool as one ArrayRecord (on the wire and in the node state alike)."""
    return ArrayRecord({protocol.POOL_IMAGES: x.detach().cpu().float(), protocol.POOL_LABELS: y.detach().cpu().long()})


def pool_tensors(record: ArrayRecord, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of a :func:`pool_record`, on ``device``."""
    x = torch.from_numpy(record[protocol.POOL_IMAGES].numpy().copy()).to(device)
    y = torch.from_numpy(record[protocol.POOL_LABELS].numpy().copy()).long().to(device)
    return x, y


def sample_pool(generator: Generator, counts: np.ndarray, syn: SyntheticConfig, seed: int,
                sampler: ClassSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``counts[i]`` images of each generator label i with ``syn.ddim_steps`` DDIM steps.

    The labels are the classes, or for a (class, domain) generator the pair ids
    ``domain · C + class`` (:meth:`~fedimb.synthetic.generator.Generator.condition_ids`); the
    returned labels are always the classes, what the classifier trains on. ``sampler`` None
    samples every class with ``syn.guidance_scale`` / ``syn.guidance_rescale``.
    """
    conditions = labels_for(counts)
    if len(conditions) == 0:
        return torch.empty(0), conditions
    classes = conditions % generator.num_classes  # the identity for a class-conditional generator
    scale, rescale = (syn.guidance_scale, syn.guidance_rescale) if sampler is None else sampler.per_label(classes)
    images = generator.sample(conditions, guidance_scale=scale, num_inference_steps=syn.ddim_steps, seed=seed,
                              guidance_rescale=rescale)
    return images, classes


def judge_hits(generator: Generator, judge: torch.nn.Module, held: np.ndarray, syn: SyntheticConfig, seed: int,
               sampler: ClassSampler | None) -> tuple[list[int], list[int], float]:
    """Quality of a generator without moving an image: per class, how many of
    ``quality_per_class`` samples the judge calls that class (0 of 0 for classes not held);
    also the sampling rate in images/s."""
    from fedimb.synthetic.quality import recognisability  # matplotlib: not in every ClientApp process

    counts = np.where(np.asarray(held) > 0, syn.quality_per_class, 0)
    started = time.time()
    images, labels = sample_pool(generator, counts, syn, seed=seed, sampler=sampler)
    per_second = len(labels) / max(time.time() - started, 1e-9)
    shares = recognisability(judge, images, labels, len(counts)) if len(labels) else [math.nan] * len(counts)
    hits = [0 if n == 0 else int(round(share * n)) for share, n in zip(shares, counts)]
    return hits, [int(n) for n in counts], per_second


def train_as_configured(generator: Generator, images: torch.Tensor, labels: torch.Tensor, syn: SyntheticConfig,
                        steps: int, seed: int, **overrides: Any) -> float:
    """``generator.train`` with the config's batch size, lr, class-balanced batches and Min-SNR gamma.

    ``overrides`` go to ``train`` as they are (``ema_decay``, ``progress``).
    """
    return generator.train(images, labels, steps=steps, batch_size=syn.batch_size, lr=syn.lr, seed=seed,
                           balanced=syn.balanced_batches, snr_gamma=syn.snr_gamma, **overrides)


def load_or_train(make: Callable[[], Generator], folder: Path | None, record: Path | None = None,
                  device: str | torch.device = "cpu", **made_of: Any) -> tuple[Generator, float, bool]:
    """The generator saved in ``folder``, else ``make()`` saved there; with its training seconds.

    ``record`` (a JSON file beside the folder) keeps the seconds, and ``made_of``, so a run that
    reuses the generator still reports what training it cost. ``folder`` None trains without
    keeping anything. Returns (generator, seconds, whether it came from ``folder``).
    """
    from fedimb.synthetic.generator import Generator  # diffusers: only where a generator is made

    if folder is not None and Generator.is_saved(folder):
        seconds = float(json.loads(record.read_text())["seconds"]) if record and record.is_file() else 0.0
        return Generator.from_pretrained(folder, device=device), seconds, True
    started = time.time()
    generator = make()
    seconds = time.time() - started
    if folder is not None:
        generator.save_pretrained(folder)
    if record is not None:
        from fedimb.records import atomic_write_text  # matplotlib: not in every ClientApp process

        atomic_write_text(record, json.dumps({"seconds": seconds, **made_of}))
    return generator, seconds, False

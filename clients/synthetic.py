"""Client side of synthetic top-up: how many samples per class, the stored pool, generator rounds.

A client's synthetic pool lives in ``context.state`` (images and labels), delivered once by the
server (``server_pool``), sampled by the client from a shipped generator (``client_sample``), or
sampled from a generator the client trained alone (``synthetic.training=local``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedimb import protocol
from fedimb.config import SyntheticConfig
from fedimb.protocol import derive_seed
from fedimb.records import atomic_write_text

POOL_KEY = "synthetic-pool"
SAMPLER_KEYS = (protocol.GUIDANCE_PER_CLASS, protocol.RESCALE_PER_CLASS)  # the class sampler on the wire


def generator_from(record: ArrayRecord, config, cfg, input_shape: tuple[int, int, int], num_classes: int):
    """Rebuild the server's generator from its weights and the data range in the message config."""
    from fedimb.generation import build_generator

    lo, hi = (float(v) for v in config[protocol.GENERATOR_RANGE])
    unet = build_generator(cfg.synthetic.generator_size, input_shape, num_classes, cfg.seed, data_range=(lo, hi),
                           prediction=cfg.synthetic.prediction)
    unet.load_state_dict(record.to_torch_state_dict())
    return unet


def topup_counts(counts: np.ndarray, target_per_class: int, max_ratio: float, only_held: bool = False) -> np.ndarray:
    """Synthetic samples per class: up to the target (0 = largest local class), capped at max_ratio × real.

    When the cap binds, every class's need is scaled down by the same factor (floored) and the
    leftover units go to the largest fractional parts, lower class first on ties. ``only_held``
    tops up only the classes with a real sample (a client's own generator never saw the others).
    """
    counts = np.asarray(counts, dtype=np.int64)
    target = int(target_per_class) if target_per_class > 0 else int(counts.max(initial=0))
    need = np.clip(target - counts, 0, None)
    if only_held:
        need[counts == 0] = 0
    cap = int(np.floor(max_ratio * counts.sum()))
    if need.sum() <= cap:
        return need
    exact = need * (cap / need.sum())
    out = np.floor(exact).astype(np.int64)
    order = sorted(range(len(need)), key=lambda c: (-(exact[c] - out[c]), c))
    for c in order[: cap - int(out.sum())]:
        out[c] += 1
    return out


def store_pool(state: RecordDict, x: torch.Tensor, y: torch.Tensor) -> None:
    """Keep the synthetic pool in the node state."""
    state[POOL_KEY] = ArrayRecord({"x": x.detach().cpu().float(), "y": y.detach().cpu().long()})


def load_pool(state: RecordDict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored synthetic pool on ``device``, or None."""
    if POOL_KEY not in state:
        return None
    record = state[POOL_KEY]
    x = torch.from_numpy(record["x"].numpy().copy()).to(device)
    y = torch.from_numpy(record["y"].numpy().copy()).to(device)
    return x, y


def labels_for(counts: np.ndarray) -> torch.Tensor:
    """A label vector with counts[c] copies of class c, in class order."""
    return torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).long()


def class_sampler(cfg: SyntheticConfig, class_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Guidance scale and rescale per class: the tail third by ``class_counts`` (training samples
    over all clients) takes ``tail_guidance_*`` where set, every other class the main knobs."""
    from fedimb.metrics import class_groups

    num_classes = len(class_counts)
    scales = np.full(num_classes, cfg.guidance_scale, dtype=np.float64)
    phis = np.full(num_classes, cfg.guidance_rescale, dtype=np.float64)
    tail = class_groups(num_classes, np.asarray(class_counts))["tail"]
    if cfg.tail_guidance_scale is not None:
        scales[tail] = cfg.tail_guidance_scale
    if cfg.tail_guidance_rescale is not None:
        phis[tail] = cfg.tail_guidance_rescale
    return scales, phis


def guidance_of(labels: torch.Tensor, cfg: SyntheticConfig, sampler: tuple[np.ndarray, np.ndarray] | None
                ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """Guidance scale and rescale for :func:`fedimb.generation.sample`: the config's scalars when
    ``sampler`` is None, else one value per label from the per-class ``sampler``."""
    if sampler is None:
        return cfg.guidance_scale, cfg.guidance_rescale
    return tuple(torch.as_tensor(np.asarray(v), dtype=torch.float32)[labels] for v in sampler)


def sample_pool(unet, counts: np.ndarray, cfg: SyntheticConfig, seed: int,
                sampler: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``counts[c]`` images of each class c from the generator.

    ``sampler`` is (guidance scale, rescale) per class, as :func:`class_sampler` makes it; None
    samples every class with ``cfg.guidance_scale`` / ``cfg.guidance_rescale``.
    """
    from fedimb.generation import sample

    labels = labels_for(counts)
    if len(labels) == 0:
        return torch.empty(0), labels
    scale, rescale = guidance_of(labels, cfg, sampler)
    images = sample(unet, labels, guidance_scale=scale, num_inference_steps=cfg.ddim_steps,
                    seed=seed, guidance_rescale=rescale)
    return images, labels


def local_generator(x: torch.Tensor, y: torch.Tensor, cfg, input_shape: tuple[int, int, int], num_classes: int,
                    partition_id: int, cache: Path | None) -> tuple[object, float, bool]:
    """This client's own generator (``synthetic.training=local``), trained on its data only.

    As many steps as the client makes in the federated schedule (rounds × local steps), with the
    same knobs. Kept in ``cache`` when given (a save_generator folder); returns (generator,
    seconds its training took, whether it came from the cache).
    """
    from fedimb.generation import build_generator, load_generator, save_generator, train_generator

    if cache is not None and (cache / "config.json").is_file():
        made = cache.parent / f"{cache.name}.json"
        seconds = float(json.loads(made.read_text())["seconds"]) if made.is_file() else 0.0
        return load_generator(cache, device=x.device), seconds, True
    syn = cfg.synthetic
    started = time.time()
    unet = build_generator(syn.generator_size, input_shape, num_classes, cfg.seed,
                           data_range=(float(x.min()), float(x.max())), prediction=syn.prediction).to(x.device)
    train_generator(unet, x, y, steps=syn.local_steps * syn.rounds, batch_size=syn.batch_size, lr=syn.lr,
                    seed=derive_seed(cfg.seed, "generator-round", 0, partition_id), ema_decay=0.0, balanced=syn.balanced_batches,
                    snr_gamma=syn.snr_gamma)
    seconds = time.time() - started
    if cache is not None:
        save_generator(unet, cache)
        atomic_write_text(cache.parent / f"{cache.name}.json", json.dumps({"seconds": seconds}))
    return unet, seconds, False


def judge_hits(unet, judge: torch.nn.Module, held: np.ndarray, cfg: SyntheticConfig, seed: int,
               sampler: tuple[np.ndarray, np.ndarray] | None) -> tuple[list[int], list[int], float]:
    """Quality of a local generator without moving an image: per class, how many of
    ``quality_per_class`` samples the judge calls that class (0 of 0 for classes not held);
    also the sampling rate in images/s."""
    from fedimb.generation import recognisability

    counts = np.where(np.asarray(held) > 0, cfg.quality_per_class, 0)
    started = time.time()
    images, labels = sample_pool(unet, counts, cfg, seed=seed, sampler=sampler)
    per_second = len(labels) / max(time.time() - started, 1e-9)
    shares = recognisability(judge, images, labels, len(counts)) if len(labels) else [math.nan] * len(counts)
    hits = [0 if n == 0 else int(round(share * n)) for share, n in zip(shares, counts)]
    return hits, [int(n) for n in counts], per_second

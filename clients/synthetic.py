"""Client side of synthetic top-up: the stored pool, the generator a message carries, a local generator.

A client's synthetic pool lives in ``context.state`` (images and labels), delivered once by the
server (``server_pool``), sampled by the client from a shipped generator (``client_sample``), or
sampled from a generator the client trained alone (``synthetic.training=local``). Both the
client and the server size and sample pools with :mod:`fedimb.synthetic.topup`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, RecordDict

from fedimb import protocol
from fedimb.config import ExperimentConfig
from fedimb.protocol import derive_seed
from fedimb.synthetic.allocation import generator_domains
from fedimb.synthetic.topup import load_or_train, pool_record, pool_tensors, train_as_configured

if TYPE_CHECKING:
    from fedimb.synthetic.generator import Generator

POOL_KEY = "synthetic-pool"  # node state, not the wire


def generator_from(record: ArrayRecord, config: Mapping[str, Any], cfg: ExperimentConfig,
                   input_shape: tuple[int, int, int], num_classes: int) -> Generator:
    """Rebuild the server's generator from its weights and the data range in the message config."""
    from fedimb.synthetic.generator import Generator  # diffusers: only for the synthetic handlers

    lo, hi = (float(v) for v in config[protocol.GENERATOR_RANGE])
    generator = Generator.build(cfg.synthetic.generator_size, input_shape, num_classes, cfg.seed,
                                data_range=(lo, hi), prediction=cfg.synthetic.prediction,
                                domains=generator_domains(cfg))
    generator.load_state_dict(record.to_torch_state_dict())
    return generator


def store_pool(state: RecordDict, x: torch.Tensor, y: torch.Tensor) -> None:
    """Keep the synthetic pool in the node state."""
    state[POOL_KEY] = pool_record(x, y)


def load_pool(state: RecordDict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored synthetic pool on ``device``, or None."""
    return pool_tensors(state[POOL_KEY], device) if POOL_KEY in state else None


def local_generator(x: torch.Tensor, y: torch.Tensor, cfg: ExperimentConfig, input_shape: tuple[int, int, int],
                    num_classes: int, partition_id: int, cache: Path | None) -> tuple[Generator, float, bool]:
    """This client's own generator (``synthetic.training=local``), trained on its data only.

    As many steps as the client makes in the federated schedule (rounds × local steps), with the
    same knobs and the seed of its federated round 0. Kept in ``cache`` when given; returns
    (generator, seconds its training took, whether it came from the cache).
    """
    from fedimb.synthetic.generator import Generator

    syn = cfg.synthetic

    def make() -> Generator:
        generator = Generator.build(syn.generator_size, input_shape, num_classes, cfg.seed,
                                    data_range=(float(x.min()), float(x.max())), prediction=syn.prediction).to(x.device)
        train_as_configured(generator, x, y, syn, steps=syn.local_steps * syn.rounds,
                            seed=derive_seed(cfg.seed, "generator-round", 0, partition_id), ema_decay=0.0)
        return generator

    record = None if cache is None else cache.parent / f"{cache.name}.json"
    return load_or_train(make, cache, record, device=x.device)

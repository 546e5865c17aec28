"""Synthetic minority samples: train the generator (federated by default), report its quality,
deliver each client its top-up, before the classifier federation starts.

Federated training is FedAvg over the generator's weights with ``train.generator`` messages:
clients train on their own images and send weights back; no image leaves a client. The
generator and the server-sampled pools are cached under ``synthetic.cache_dir`` keyed by
everything that made them, so ``--resume``, reruns and sweeps over strategies reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from rich.console import Console

from clients.synthetic import (SAMPLER_KEYS, class_sampler,
                               guidance_of, labels_for, sample_pool, topup_counts)
from fedimb import protocol
from fedimb.config import ExperimentConfig, SyntheticConfig
from fedimb.data import DatasetSplits
from fedimb.protocol import derive_seed
from fedimb.records import atomic_write_text
from fedimb.generation import (build_generator, data_range, load_generator, recognisability, sample, sample_grid,
                               save_generator, train_generator, train_reference_classifier)
from strategies.base import ReproducibleSampling, StrategyContext, error_reason

console = Console(stderr=True)


EMBEDDING_KEY = "class_embedding.weight"  # UNet2DModel's (num_classes + 1) x D label table


def class_aware_rows(merged: ArrayRecord, client_tables: list[np.ndarray], client_counts: np.ndarray) -> ArrayRecord:
    """Replace row c of the averaged label table by the mean of the clients' rows c weighted by
    their count of class c (rows of classes nobody holds, and the null row, keep ``merged``'s).

    A client without class c never moves row c, so FedAvg would scale the row's update by the
    share of the weight held by clients that have c: a class held by one client of ten learns
    about ten times slower than the rest of the network.
    """
    table = merged[EMBEDDING_KEY].numpy().copy()
    stacked = np.stack(client_tables).astype(np.float64)  # K x (C+1) x D
    counts = np.asarray(client_counts, dtype=np.float64)  # K x C
    for c in range(counts.shape[1]):
        if counts[:, c].sum() > 0:
            table[c] = (counts[:, c, None] * stacked[:, c]).sum(0) / counts[:, c].sum()
    merged[EMBEDDING_KEY] = Array(table.astype(merged[EMBEDDING_KEY].numpy().dtype))
    return merged


class GeneratorFedAvg(ReproducibleSampling, FedAvg):
    """FedAvg over the generator's weights; its messages go to the ``train.generator`` handler.

    With ``class_counts`` (partition id x class) the label table is aggregated class by class
    (:func:`class_aware_rows`).
    """

    def __init__(self, *args: Any, class_counts: np.ndarray | None = None, total_rounds: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_counts = class_counts
        self.total_rounds = total_rounds
        self.started = time.time()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, Any]:
        """FedAvg, then the class-aware label table when counts were given; one progress line per round."""
        replies = [m for m in self.sort_replies(replies) if not m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)
        losses = [float(m.content[protocol.METRICS][protocol.GENERATOR_LOSS]) for m in replies
                  if protocol.METRICS in m.content and protocol.GENERATOR_LOSS in m.content[protocol.METRICS]]
        console.print(f"generator round {server_round:3d}/{self.total_rounds}  loss "
                      f"{np.mean(losses) if losses else float('nan'):.4f}  {time.time() - self.started:7.1f}s",
                      highlight=False)
        if arrays is None or self.class_counts is None or EMBEDDING_KEY not in arrays:
            return arrays, metrics
        tables = [m.content[protocol.ARRAYS][EMBEDDING_KEY].numpy() for m in replies]
        counts = self.class_counts[[self.partition_of[m.metadata.src_node_id] for m in replies]]
        return class_aware_rows(arrays, tables, counts), metrics

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> Iterable[Message]:
        kind = protocol.GENERATOR_TRAIN if message_type == MessageType.TRAIN else message_type
        return [Message(content=record, message_type=kind, dst_node_id=n) for n in node_ids]


def value_range(splits: DatasetSplits) -> tuple[float, float]:
    """The range of the normalised training images: every generator copy maps it to [−1, 1] the same way."""
    return float(splits.train_x.min()), float(splits.train_x.max())


SAMPLING_KNOBS = ("guidance_scale", "guidance_rescale", "tail_guidance_scale", "tail_guidance_rescale", "ddim_steps")


def cache_key(cfg: ExperimentConfig) -> str:
    """Hash of what determines the generator: data, long tail, partition, clients, seed, training knobs.

    Sampling knobs are left out: one generator serves every sampler, and its pools are named by them.
    """
    syn = asdict(cfg.synthetic)
    for knob in (*SAMPLING_KNOBS, "policy", "target_per_class", "max_ratio", "loss_weight", "quality_per_class",
                 "cache_dir"):
        syn.pop(knob)
    made_of = {"seed": cfg.seed, "data": asdict(cfg.data), "imbalance": asdict(cfg.imbalance),
               "partition": asdict(cfg.partition), "num_clients": cfg.federation.num_clients, "synthetic": syn}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def _cache_dir(cfg: ExperimentConfig, run_dir: Path) -> Path:
    root = Path(cfg.synthetic.cache_dir) if cfg.synthetic.cache_dir else run_dir / "synthetic"
    return root / cache_key(cfg)


def obtain_generator(grid: Grid, cfg: ExperimentConfig, ctx: StrategyContext, partition_of: dict[int, int],
                     splits: DatasetSplits, config_text: str, cache: Path, counts: np.ndarray | None = None):
    """Load the cached or pretrained generator, or train it (federated or central) and cache it.

    ``counts`` (partition id x class) enables the class-aware label table of
    ``synthetic.aggregation=class_aware``. Returns (generator, seconds its training took,
    whether it came from the cache).
    """
    syn = cfg.synthetic
    if syn.training == "pretrained":
        return load_generator(syn.generator_path), 0.0, False
    if (cache / "generator").is_dir():
        console.print(f"generator: reusing {cache / 'generator'}", highlight=False)
        made = cache / "training.json"
        seconds = float(json.loads(made.read_text())["seconds"]) if made.is_file() else 0.0
        return load_generator(cache / "generator"), seconds, True
    started = time.time()
    unet = build_generator(syn.generator_size, splits.input_shape, splits.num_classes, cfg.seed,
                           data_range=value_range(splits), prediction=syn.prediction)
    if syn.training == "federated":
        class_counts = counts if syn.aggregation == "class_aware" else None
        strategy = GeneratorFedAvg(**{**ctx.flower_kwargs(), "fraction_evaluate": 0.0, "min_evaluate_nodes": 0,
                                      "train_metrics_aggr_fn": None, "evaluate_metrics_aggr_fn": None},
                                   class_counts=class_counts, total_rounds=syn.rounds)
        strategy.bind(ctx, partition_of)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(unet.state_dict()), num_rounds=syn.rounds,
                                train_config=ConfigRecord({protocol.EXPERIMENT_CONFIG: config_text,
                                                           protocol.GENERATOR_RANGE: list(value_range(splits))}))
        unet.load_state_dict(result.arrays.to_torch_state_dict())
    else:  # central: only a simulation's server can see every client's images
        from fedimb.data import build_federated_data

        data = build_federated_data(cfg)
        idx = np.concatenate(data.client_indices)
        steps = syn.local_steps * syn.rounds * cfg.federation.num_clients
        train_generator(unet, torch.from_numpy(splits.train_x[idx]), torch.from_numpy(splits.train_y[idx]),
                        steps=steps, batch_size=syn.batch_size, lr=syn.lr, seed=cfg.seed, progress=True,
                        balanced=syn.balanced_batches, snr_gamma=syn.snr_gamma)
    seconds = time.time() - started
    save_generator(unet, cache / "generator")
    # Kept beside the cached generator so a run that reuses it still reports what training cost.
    atomic_write_text(cache / "training.json", json.dumps({"seconds": seconds, "training": syn.training}))
    return unet, seconds, False


def quality_report(unet, cfg: ExperimentConfig, splits: DatasetSplits, run_dir: Path,
                   sampler: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-class recognisability of generated samples by a classifier trained on the real balanced train set.

    ``sampler``: guidance scale and rescale per class (:func:`clients.synthetic.class_sampler`),
    the one the pools use; None = the config's scalars for every class.
    """
    syn = cfg.synthetic
    labels = labels_for(np.full(splits.num_classes, syn.quality_per_class))
    scale, rescale = guidance_of(labels, syn, sampler)
    started = time.time()
    images = sample(unet, labels, guidance_scale=scale, num_inference_steps=syn.ddim_steps,
                    seed=cfg.seed, progress=True, guidance_rescale=rescale)
    per_second = len(labels) / max(time.time() - started, 1e-9)
    reference = train_reference_classifier(torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y),
                                           splits.num_classes, seed=cfg.seed)
    scores = recognisability(reference, images, labels, splits.num_classes)
    sample_grid(images, labels, splits.num_classes, run_dir / "synthetic_grid.png")
    return {"recognisability": scores, "mean_recognisability": float(np.mean(scores)),
            "min_recognisability": float(np.min(scores)), "sampling_images_per_s": per_second, **_sampler_fields(syn)}


def _sampler_fields(syn: SyntheticConfig) -> dict[str, Any]:
    return {"ddim_steps": syn.ddim_steps, "guidance_scale": syn.guidance_scale, "guidance_rescale": syn.guidance_rescale,
            "tail_guidance_scale": syn.tail_guidance_scale, "tail_guidance_rescale": syn.tail_guidance_rescale}


def _sampler_config(sampler: tuple[np.ndarray, np.ndarray]) -> dict[str, list[float]]:
    # a client sees only its own counts, not which classes are the tail: it gets the sampler per class
    return {key: [float(v) for v in values] for key, values in zip(SAMPLER_KEYS, sampler)}


def _send_topups(grid: Grid, messages: list[Message]) -> list[Message]:
    replies = list(grid.send_and_receive(messages))
    failed = [m for m in replies if m.has_error()]
    if failed or len(replies) != len(messages):
        raise RuntimeError(f"synthetic top-up failed: {error_reason(failed[0]) if failed else 'missing replies'}")
    return sorted(replies, key=lambda m: int(m.content[protocol.METRICS][protocol.PARTITION_ID]))


def deliver(grid: Grid, cfg: ExperimentConfig, unet, partition_of: dict[int, int], counts: np.ndarray,
            config_text: str, cache: Path, sampler: tuple[np.ndarray, np.ndarray]) -> list[int]:
    """Send every client its top-up (a pool or the generator); returns synthetic samples per client.

    ``sampler`` (guidance scale and rescale per class) samples the pools, or goes with the generator.
    """
    syn = cfg.synthetic
    messages = []
    for node_id, pid in sorted(partition_of.items(), key=lambda item: item[1]):
        config = {protocol.EXPERIMENT_CONFIG: config_text, protocol.GENERATOR_RANGE: list(data_range(unet))}
        if syn.policy == "client_sample":
            config.update(_sampler_config(sampler))
        content = RecordDict({protocol.CONFIG: ConfigRecord(config)})
        if syn.policy == "server_pool":
            content[protocol.POOL] = _server_pool(unet, counts[pid], cfg, cache, pid, sampler)
        else:
            content[protocol.GENERATOR] = ArrayRecord(unet.state_dict())
        messages.append(Message(content=content, message_type=protocol.TOPUP, dst_node_id=node_id))
    return [int(m.content[protocol.METRICS][protocol.NUM_SYNTHETIC]) for m in _send_topups(grid, messages)]


def local_generators(grid: Grid, cfg: ExperimentConfig, partition_of: dict[int, int], splits: DatasetSplits,
                     config_text: str, cache: Path, sampler: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """``synthetic.training=local``: every client trains its own generator on its own data, scores it
    with the judge the server ships, and tops up the classes it holds; returns the summary block.

    Only counts and timings come back, so recognisability is pooled over the clients holding each
    class, and there is no sample grid (the images stay on their clients).
    """
    syn = cfg.synthetic
    judge = train_reference_classifier(torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y),
                                       splits.num_classes, seed=cfg.seed)
    messages = []
    for node_id, pid in sorted(partition_of.items(), key=lambda item: item[1]):
        config = {protocol.EXPERIMENT_CONFIG: config_text, protocol.TRAIN_LOCAL: True,
                  protocol.LOCAL_GENERATOR_DIR: str(cache / f"local-c{pid}"), **_sampler_config(sampler)}
        content = RecordDict({protocol.CONFIG: ConfigRecord(config), protocol.JUDGE: ArrayRecord(judge.state_dict())})
        messages.append(Message(content=content, message_type=protocol.TOPUP, dst_node_id=node_id))
    replies = [m.content[protocol.METRICS] for m in _send_topups(grid, messages)]
    hits = np.sum([np.asarray(r[protocol.QUALITY_HITS]) for r in replies], axis=0)
    scored = np.sum([np.asarray(r[protocol.QUALITY_SCORED]) for r in replies], axis=0)
    scores = [float(h / n) if n else math.nan for h, n in zip(hits, scored)]  # NaN: a class no client holds
    seconds = [float(r[protocol.GENERATOR_TRAINING_S]) for r in replies]
    return {"recognisability": scores, "mean_recognisability": float(np.nanmean(scores)),
            "min_recognisability": float(np.nanmin(scores)), "quality_scored_per_class": scored.tolist(),
            "sampling_images_per_s": float(np.mean([float(r[protocol.SAMPLING_IMAGES_PER_S]) for r in replies])),
            **_sampler_fields(syn),
            # the longest client's own training: what a federation whose clients train in parallel waits
            # for (a simulation on fewer cores than clients takes longer)
            "generator_training_s": max(seconds),
            "generator_training_s_per_client": seconds,
            "generator_reused": all(bool(int(r[protocol.GENERATOR_REUSED])) for r in replies),
            "generator_params": int(replies[0][protocol.GENERATOR_PARAMS]),
            "generator_dir": str(cache / "local-c*"),
            "synthetic_per_client": [int(r[protocol.NUM_SYNTHETIC]) for r in replies]}


def _pool_name(syn: SyntheticConfig, pid: int) -> str:
    # Knobs added later join the name only when set, so pools made before them keep their names.
    rescale = f"-g{syn.guidance_rescale}" if syn.guidance_rescale else ""
    tail = "" if syn.tail_guidance_scale is None and syn.tail_guidance_rescale is None else \
        f"-tail{syn.tail_guidance_scale}g{syn.tail_guidance_rescale}"
    return f"pool-t{syn.target_per_class}-r{syn.max_ratio}-w{syn.guidance_scale}-s{syn.ddim_steps}{rescale}{tail}-c{pid}.pt"


def _server_pool(unet, client_counts: np.ndarray, cfg: ExperimentConfig, cache: Path, pid: int,
                 sampler: tuple[np.ndarray, np.ndarray]) -> ArrayRecord:
    syn = cfg.synthetic
    need = topup_counts(client_counts, syn.target_per_class, syn.max_ratio)
    path = cache / _pool_name(syn, pid)
    if path.is_file():
        x, y = torch.load(path)
    else:
        x, y = sample_pool(unet, need, syn, seed=derive_seed(cfg.seed, "topup", client=pid), sampler=sampler)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save((x, y), tmp)
        tmp.replace(path)
    return ArrayRecord({"x": x.float(), "y": y.long()})


def prepare_synthetic(grid: Grid, cfg: ExperimentConfig, ctx: StrategyContext, partition_of: dict[int, int],
                      counts: np.ndarray, splits: DatasetSplits, config_text: str, run_dir: Path) -> dict[str, Any]:
    """Generator, quality report and delivery; returns the ``synthetic`` block of summary.json."""
    cache = _cache_dir(cfg, run_dir)
    sampler = class_sampler(cfg.synthetic, counts.sum(axis=0))
    per_class = {"guidance_per_class": [float(v) for v in sampler[0]], "rescale_per_class": [float(v) for v in sampler[1]]}
    if cfg.synthetic.training == "local":
        report = {**local_generators(grid, cfg, partition_of, splits, config_text, cache, sampler), **per_class}
        console.print(f"synthetic: local generators, mean recognisability {report['mean_recognisability']:.3f}, "
                      f"per client {report['synthetic_per_client']}", highlight=False)
        return report
    unet, train_seconds, reused = obtain_generator(grid, cfg, ctx, partition_of, splits, config_text, cache, counts)
    report = {**quality_report(unet, cfg, splits, run_dir, sampler), **per_class}
    report["generator_training_s"] = train_seconds  # of the cached generator when it was reused
    report["generator_reused"] = reused
    report["generator_params"] = sum(p.numel() for p in unet.parameters())
    report["generator_dir"] = str(cache / "generator")
    report["synthetic_per_client"] = deliver(grid, cfg, unet, partition_of, counts, config_text, cache, sampler)
    console.print(f"synthetic: mean recognisability {report['mean_recognisability']:.3f}, "
                  f"per client {report['synthetic_per_client']}", highlight=False)
    return report

"""The synthetic phase of a run: the generator (trained through Flower, or reused), its quality
report, and every client's top-up, before the classifier federation starts.

Federated training runs :class:`strategies.generator.GeneratorFedAvg` against the clients'
``train.generator`` handlers. The generator and the server-sampled pools are cached under
``synthetic.cache_dir`` keyed by everything that made them, so ``--resume``, reruns and sweeps
over strategies reuse them; with ``synthetic.training=local`` every client trains, caches and
scores a generator of its own and only counts and timings come back.

With ``synthetic.condition=class_domain`` the generator is conditioned on (class, domain) pairs
and every client is topped up with the pairs it lacks (:mod:`fedimb.synthetic.allocation`); the
closed loop (``fedimb.app.closed_loop``) sends later top-ups through :func:`deliver` too.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fedimb import protocol
from fedimb.config import ExperimentConfig, SyntheticConfig
from fedimb.data import DatasetSplits
from fedimb.data.datasets import Normalisation
from fedimb.synthetic.allocation import client_domain_indices, condition_counts, generator_domains, plan_topups
from fedimb.synthetic.generator import Generator
from fedimb.synthetic.quality import recognisability, sample_grid, train_reference_classifier
from fedimb.synthetic.topup import (ClassSampler, labels_for, load_or_train, pool_record, sample_pool, topup_seed,
                                    train_as_configured)
from strategies.base import StrategyContext, error_reason
from strategies.generator import GeneratorFedAvg

console = Console(stderr=True)

# what chooses a generator's samples (not the generator): left out of its cache key, written into the report
SAMPLING_KNOBS = ("ddim_steps", "guidance_scale", "guidance_rescale", "tail_guidance_scale", "tail_guidance_rescale")


@dataclass(frozen=True)
class DataFacts:
    """What the server knows of the data: the image shape, the classes, the range of the normalised
    images (every generator copy maps it to [−1, 1] the same way) and the data it is given, if any,
    to train the recognisability judge on.

    A simulation's server is given the dataset; a deployed one learns the rest from the hello
    replies and has no judge, so its generator's samples are not scored.
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    value_range: tuple[float, float]
    judge_data: tuple[np.ndarray, np.ndarray] | None = None
    normalisation: Normalisation | None = None  # of judge_data: a (class, domain) judge sees it in every domain

    @classmethod
    def of_splits(cls, splits: DatasetSplits) -> DataFacts:
        """The facts of a dataset the server holds (its training split is the judge's data)."""
        return cls(splits.input_shape, splits.num_classes, (float(splits.train_x.min()), float(splits.train_x.max())),
                   (splits.train_x, splits.train_y), splits.normalisation)


def cache_key(cfg: ExperimentConfig) -> str:
    """Hash of what determines the generator: data, long tail, partition, clients, seed, training knobs.

    Sampling knobs are left out: one generator serves every sampler, and its pools are named by them.
    """
    syn = asdict(cfg.synthetic)
    for knob in (*SAMPLING_KNOBS, "policy", "target_per_class", "max_ratio", "loss_weight", "quality_per_class",
                 "cache_dir", "closed_loop_every"):
        syn.pop(knob)
    if syn["condition"] == "class":
        syn.pop("condition")  # the default joins no key: generators cached before the knob keep theirs
    if syn["domain_weighting"] == "size":
        syn.pop("domain_weighting")  # likewise
    partition = asdict(cfg.partition)
    if not partition["noise_sigma"]:
        partition.pop("noise_sigma")  # off, it joins no key either: generators cached before it keep theirs
    if partition["copies"] == 1:
        partition.pop("copies")  # likewise
    made_of = {"seed": cfg.seed, "data": asdict(cfg.data), "imbalance": asdict(cfg.imbalance),
               "partition": partition, "num_clients": cfg.federation.num_clients, "synthetic": syn}
    if cfg.domains.names:  # the clients' images pass through their devices: another generator
        made_of["domains"] = asdict(cfg.domains)
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Where this configuration's generator and pools are kept."""
    root = Path(cfg.synthetic.cache_dir) if cfg.synthetic.cache_dir else run_dir / "synthetic"
    return root / cache_key(cfg)


def _fresh_generator(cfg: ExperimentConfig, facts: DataFacts) -> Generator:
    syn = cfg.synthetic
    return Generator.build(syn.generator_size, facts.input_shape, facts.num_classes, cfg.seed,
                           data_range=facts.value_range, prediction=syn.prediction, domains=generator_domains(cfg))


def _judge(cfg: ExperimentConfig, facts: DataFacts) -> torch.nn.Module | None:
    if facts.judge_data is None:
        return None
    x, y = facts.judge_data
    if generator_domains(cfg):
        x = _in_every_domain(x, cfg, facts.normalisation)
    return train_reference_classifier(torch.from_numpy(x), torch.from_numpy(y), facts.num_classes, seed=cfg.seed)


def _in_every_domain(x: np.ndarray, cfg: ExperimentConfig, norm: Normalisation | None) -> np.ndarray:
    """The judge's images, each in one domain (a seeded 1/D share per domain): a (class, domain)
    generator's samples are judged by a classifier that knows every device, at the usual cost."""
    from fedimb.data.domains import apply_domain

    names, tag = cfg.domains.names, 24  # a seed stream of its own (fedimb.data.domains uses tags 21-23)
    parts = np.array_split(np.random.default_rng([cfg.seed, tag]).permutation(len(x)), len(names))
    out = np.empty_like(x)
    for d, (name, idx) in enumerate(zip(names, parts)):
        out[idx] = apply_domain(x[idx], name, cfg.domains, norm, np.random.default_rng([cfg.seed, tag, d]))
    return out


def generator_strategy(cfg: ExperimentConfig, partition_of: dict[int, int], counts: np.ndarray) -> GeneratorFedAvg:
    """The federated generator's strategy, bound to the clients; ``counts`` (partition id x class)
    make the label table class-aware under ``synthetic.aggregation=class_aware``."""
    syn = cfg.synthetic
    # the label table's rows are pairs for a (class, domain) generator: count each client's pairs
    domains = client_domain_indices(cfg) if generator_domains(cfg) else None
    counts = condition_counts(counts, domains, len(cfg.domains.names))
    # no client evaluation: the generator is judged once, on the server, after its last round
    ctx = StrategyContext(num_clients=cfg.federation.num_clients, fraction=cfg.federation.fraction,
                          fraction_evaluate=0.0, min_clients=cfg.federation.min_clients, seed=cfg.seed,
                          client_eval_every=0, rounds=syn.rounds)
    balanced = syn.domain_weighting == "balanced"
    strategy = GeneratorFedAvg(**ctx.flower_kwargs(), total_rounds=syn.rounds,
                               class_counts=counts if syn.aggregation == "class_aware" else None,
                               domain_of=client_domain_indices(cfg) if balanced else None)
    strategy.bind(ctx, partition_of)
    return strategy


def train_federated(grid: Grid, cfg: ExperimentConfig, partition_of: dict[int, int], counts: np.ndarray,
                    facts: DataFacts, config_text: str,
                    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Generator:
    """``synthetic.rounds`` FedAvg rounds of the generator through ``grid``; ``evaluate_fn`` sees
    the global weights after every round (Flower's ``Strategy.start``)."""
    generator = _fresh_generator(cfg, facts)
    train_config = ConfigRecord({protocol.EXPERIMENT_CONFIG: config_text,
                                 protocol.GENERATOR_RANGE: list(facts.value_range)})
    result = generator_strategy(cfg, partition_of, counts).start(
        grid=grid, initial_arrays=ArrayRecord(generator.state_dict()), num_rounds=cfg.synthetic.rounds,
        train_config=train_config, evaluate_fn=evaluate_fn)
    generator.load_state_dict(result.arrays.to_torch_state_dict())
    return generator


def _train_central(cfg: ExperimentConfig, facts: DataFacts) -> Generator:
    # only a simulation's server can see every client's images
    from fedimb.data import build_federated_data, client_train_data

    syn = cfg.synthetic
    data = build_federated_data(cfg)
    # each client's images as it holds them (its domain and noise level)
    parts = [client_train_data(data, cfg, pid) for pid in range(len(data.client_indices))]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    generator = _fresh_generator(cfg, facts)
    if generator.domains:  # each client's labels in its domain: the pair ids
        domains = np.repeat(client_domain_indices(cfg), [len(p[1]) for p in parts])
        y = generator.condition_ids(torch.from_numpy(y), torch.from_numpy(domains)).numpy()
    train_as_configured(generator, torch.from_numpy(x), torch.from_numpy(y), syn,
                        steps=syn.local_steps * syn.rounds * cfg.federation.num_clients, seed=cfg.seed, progress=True)
    return generator


def obtain_generator(grid: Grid, cfg: ExperimentConfig, partition_of: dict[int, int], counts: np.ndarray,
                     facts: DataFacts, config_text: str, cache: Path) -> tuple[Generator, float, bool]:
    """Load the cached or pretrained generator, or train it (federated or central) and cache it.

    Returns (generator, seconds its training took, whether it came from the cache).
    """
    syn = cfg.synthetic
    if syn.training == "pretrained":
        generator = Generator.from_pretrained(syn.generator_path)
        if generator.domains != generator_domains(cfg):
            raise ValueError(f"synthetic.generator_path: the generator is conditioned on domains "
                             f"{list(generator.domains)}, the config asks for {list(generator_domains(cfg))}")
        return generator, 0.0, False

    def make() -> Generator:
        if syn.training == "federated":
            return train_federated(grid, cfg, partition_of, counts, facts, config_text)
        if facts.judge_data is None:
            raise ValueError("synthetic.training=central needs the training data on the server (a simulation)")
        return _train_central(cfg, facts)

    generator, seconds, reused = load_or_train(make, cache / "generator", cache / "training.json",
                                               training=syn.training)
    if reused:
        console.print(f"generator: reusing {cache / 'generator'}", highlight=False)
    return generator, seconds, reused


def quality_report(generator: Generator, cfg: ExperimentConfig, facts: DataFacts, run_dir: Path,
                   sampler: ClassSampler) -> dict[str, Any]:
    """Per-class recognisability of generated samples by a classifier trained on the real balanced
    train set the server is given (none: not scored), sampled with the pools' ``sampler``; writes
    the sample grid into ``run_dir``. A (class, domain) generator is sampled in every pair (one grid
    row each); the judge then sees its training images in every domain, and the report adds each
    domain's per-class scores (``recognisability_per_domain``)."""
    syn = cfg.synthetic
    conditions = labels_for(np.full(generator.num_conditions, syn.quality_per_class))
    classes = conditions % facts.num_classes
    scale, rescale = sampler.per_label(classes)
    started = time.time()
    images = generator.sample(conditions, guidance_scale=scale, num_inference_steps=syn.ddim_steps, seed=cfg.seed,
                              progress=True, guidance_rescale=rescale)
    per_second = len(conditions) / max(time.time() - started, 1e-9)
    row_names = [f"{d}/{c}" for d in generator.domains for c in range(facts.num_classes)] or None
    sample_grid(images, conditions, generator.num_conditions, run_dir / "synthetic_grid.png", class_names=row_names)
    judge = _judge(cfg, facts)
    scores = [math.nan] * facts.num_classes if judge is None else recognisability(judge, images, classes,
                                                                                    facts.num_classes)
    report = {"recognisability": scores, "mean_recognisability": float(np.mean(scores)),
              "min_recognisability": float(np.min(scores)), "sampling_images_per_s": per_second,
              **_judge_field(facts), **_sampler_fields(syn)}
    if generator.domains:
        in_domain = conditions // facts.num_classes
        report["generator_domains"] = list(generator.domains)
        report["recognisability_per_domain"] = {
            name: [math.nan] * facts.num_classes if judge is None else
            recognisability(judge, images[in_domain == d], classes[in_domain == d], facts.num_classes)
            for d, name in enumerate(generator.domains)}
    return report


def _judge_field(facts: DataFacts) -> dict[str, str]:
    """Which data the recognisability judge was trained on: the results pages say so."""
    return {"judge_data": "none: the server holds no data, samples not scored" if facts.judge_data is None
            else "the server's dataset: its whole training split"}


def _sampler_fields(syn: SyntheticConfig) -> dict[str, Any]:
    return {knob: getattr(syn, knob) for knob in SAMPLING_KNOBS}


def _send_topups(grid: Grid, partition_of: dict[int, int], content_of: Callable[[int], RecordDict]) -> list[Message]:
    """One ``query.topup`` per client (``content_of(partition id)``); the replies in partition order."""
    messages = [Message(content=content_of(pid), message_type=protocol.TOPUP, dst_node_id=node_id)
                for node_id, pid in sorted(partition_of.items(), key=lambda item: item[1])]
    replies = list(grid.send_and_receive(messages))
    failed = [m for m in replies if m.has_error()]
    if failed or len(replies) != len(messages):
        raise RuntimeError(f"synthetic top-up failed: {error_reason(failed[0]) if failed else 'missing replies'}")
    return sorted(replies, key=lambda m: int(m.content[protocol.METRICS][protocol.PARTITION_ID]))


def deliver(grid: Grid, cfg: ExperimentConfig, generator: Generator, partition_of: dict[int, int], needs: np.ndarray,
            config_text: str, cache: Path, sampler: ClassSampler, loop_round: int = 0) -> list[int]:
    """Send every client its top-up (a pool or the generator); returns synthetic samples per client.

    ``needs`` (partition id x generator label, :func:`~fedimb.synthetic.allocation.plan_topups`):
    how many samples of each class, or (class, domain) pair. ``sampler`` samples the pools, or goes
    with the generator. ``loop_round`` > 0: the closed loop's top-up after that round (its own seeds
    and pool names; the clients replace their pools). A client sampling a static class-only top-up
    computes its needs itself, as it always has; any other is sent its row of ``needs``.
    """
    syn = cfg.synthetic
    send_needs = bool(generator.domains) or loop_round > 0

    def content_of(pid: int) -> RecordDict:
        config = {protocol.EXPERIMENT_CONFIG: config_text, protocol.GENERATOR_RANGE: list(generator.data_range),
                  protocol.SERVER_ROUND: loop_round}
        if syn.policy == "client_sample":
            config.update(sampler.to_config())
            if send_needs:
                config[protocol.TOPUP_COUNTS] = [int(v) for v in needs[pid]]
        content = RecordDict({protocol.CONFIG: ConfigRecord(config)})
        if syn.policy == "server_pool":
            content[protocol.POOL] = _server_pool(generator, needs[pid], cfg, cache, pid, sampler, loop_round)
        else:
            content[protocol.GENERATOR] = ArrayRecord(generator.state_dict())
        return content

    replies = _send_topups(grid, partition_of, content_of)
    return [int(m.content[protocol.METRICS][protocol.NUM_SYNTHETIC]) for m in replies]


def static_needs(cfg: ExperimentConfig, counts: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Every client's top-up per generator label (its classes, or its (class, domain) pairs), from the
    hello round's ``counts`` (partition id x class); ``weights``: the closed loop's, per label."""
    syn = cfg.synthetic
    domains = client_domain_indices(cfg) if generator_domains(cfg) else None
    return plan_topups(counts, domains, len(cfg.domains.names), syn.target_per_class, syn.max_ratio, weights)


def local_generators(grid: Grid, cfg: ExperimentConfig, partition_of: dict[int, int], facts: DataFacts,
                     config_text: str, cache: Path, sampler: ClassSampler) -> dict[str, Any]:
    """``synthetic.training=local``: every client trains its own generator on its own data, scores it
    with the judge the server ships, and tops up the classes it holds; returns the summary block.

    Only counts and timings come back, so recognisability is pooled over the clients holding each
    class, and there is no sample grid (the images stay on their clients).
    """
    judge = _judge(cfg, facts)

    def content_of(pid: int) -> RecordDict:
        config = {protocol.EXPERIMENT_CONFIG: config_text, protocol.TRAIN_LOCAL: True,
                  protocol.LOCAL_GENERATOR_DIR: str(cache / f"local-c{pid}"), **sampler.to_config()}
        content = RecordDict({protocol.CONFIG: ConfigRecord(config)})
        if judge is not None:
            content[protocol.JUDGE] = ArrayRecord(judge.state_dict())
        return content

    replies = [m.content[protocol.METRICS] for m in _send_topups(grid, partition_of, content_of)]
    unscored = [0] * facts.num_classes  # without a judge no client scores its generator
    hits = np.sum([np.asarray(r.get(protocol.QUALITY_HITS, unscored)) for r in replies], axis=0)
    scored = np.sum([np.asarray(r.get(protocol.QUALITY_SCORED, unscored)) for r in replies], axis=0)
    scores = [float(h / n) if n else math.nan for h, n in zip(hits, scored)]  # NaN: a class no client holds
    seconds = [float(r[protocol.GENERATOR_TRAINING_S]) for r in replies]
    return {"recognisability": scores, "mean_recognisability": float(np.nanmean(scores)),
            "min_recognisability": float(np.nanmin(scores)), "quality_scored_per_class": scored.tolist(),
            "sampling_images_per_s": float(np.mean([float(r.get(protocol.SAMPLING_IMAGES_PER_S, math.nan))
                                                    for r in replies])),
            **_judge_field(facts), **_sampler_fields(cfg.synthetic),
            # the longest client's own training: what a federation whose clients train in parallel waits
            # for (a simulation on fewer cores than clients takes longer)
            "generator_training_s": max(seconds),
            "generator_training_s_per_client": seconds,
            "generator_reused": all(bool(int(r[protocol.GENERATOR_REUSED])) for r in replies),
            "generator_params": int(replies[0][protocol.GENERATOR_PARAMS]),
            "generator_dir": str(cache / "local-c*"),
            "synthetic_per_client": [int(r[protocol.NUM_SYNTHETIC]) for r in replies]}


def pool_name(syn: SyntheticConfig, pid: int, need: np.ndarray | None = None, loop_round: int = 0) -> str:
    """The cached pool's file name: the top-up and sampler knobs that made it, and the client.

    A closed-loop pool (``loop_round`` > 0) is named by its round and a hash of its ``need``: the
    errors that set it depend on everything the run did.
    """
    # Knobs added later join the name only when set, so pools made before them keep their names.
    rescale = f"-g{syn.guidance_rescale}" if syn.guidance_rescale else ""
    tail = "" if syn.tail_guidance_scale is None and syn.tail_guidance_rescale is None else \
        f"-tail{syn.tail_guidance_scale}g{syn.tail_guidance_rescale}"
    sampler = f"w{syn.guidance_scale}-s{syn.ddim_steps}{rescale}{tail}"
    if loop_round > 0:
        digest = hashlib.sha256(np.asarray(need, dtype=np.int64).tobytes()).hexdigest()[:12]
        return f"pool-loop{loop_round}-{digest}-{sampler}-c{pid}.pt"
    return f"pool-t{syn.target_per_class}-r{syn.max_ratio}-{sampler}-c{pid}.pt"


def _server_pool(generator: Generator, need: np.ndarray, cfg: ExperimentConfig, cache: Path, pid: int,
                 sampler: ClassSampler, loop_round: int = 0) -> ArrayRecord:
    syn = cfg.synthetic
    path = cache / pool_name(syn, pid, need, loop_round)
    if path.is_file():
        x, y = torch.load(path)
    else:
        x, y = sample_pool(generator, need, syn, seed=topup_seed(cfg.seed, pid, loop_round), sampler=sampler)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save((x, y), tmp)
        tmp.replace(path)
    return pool_record(x, y)


@dataclass
class Topups:
    """What a later top-up needs (the closed loop's): the generator, its sampler and where pools are kept."""

    generator: Generator
    sampler: ClassSampler
    cache: Path


def prepare_synthetic(grid: Grid, cfg: ExperimentConfig, partition_of: dict[int, int], counts: np.ndarray,
                      facts: DataFacts, config_text: str, run_dir: Path) -> tuple[dict[str, Any], Topups | None]:
    """The synthetic phase: generator, quality report and delivery; returns the ``synthetic`` block of
    summary.json, and what later top-ups need (None for local generators: the server holds none).

    ``counts`` (partition id x class) come from the clients' hello replies.
    """
    cache = cache_dir(cfg, run_dir)
    sampler = ClassSampler.for_classes(cfg.synthetic, counts.sum(axis=0))
    if cfg.synthetic.training == "local":
        report = {**local_generators(grid, cfg, partition_of, facts, config_text, cache, sampler), **sampler.summary()}
        console.print(f"synthetic: local generators, mean recognisability {report['mean_recognisability']:.3f}, "
                      f"per client {report['synthetic_per_client']}", highlight=False)
        return report, None
    generator, train_seconds, reused = obtain_generator(grid, cfg, partition_of, counts, facts, config_text, cache)
    report = {**quality_report(generator, cfg, facts, run_dir, sampler), **sampler.summary()}
    report["generator_training_s"] = train_seconds  # of the cached generator when it was reused
    report["generator_reused"] = reused
    report["generator_params"] = generator.num_parameters
    report["generator_dir"] = str(cache / "generator")
    report["synthetic_per_client"] = deliver(grid, cfg, generator, partition_of, static_needs(cfg, counts),
                                             config_text, cache, sampler)
    console.print(f"synthetic: mean recognisability {report['mean_recognisability']:.3f}, "
                  f"per client {report['synthetic_per_client']}", highlight=False)
    return report, Topups(generator, sampler, cache)

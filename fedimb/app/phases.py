"""The phases a server run is composed of, and the state they share.

A run is: hello (which partition each node holds, its class counts), then the optional
generator (synthetic top-up), then the federation itself: rounds of one strategy, or
active-learning stages with query steps between them. Each phase reads and extends one
:class:`ServerRun`; :func:`phases_for` says which phases a config asks for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimb import protocol
from fedimb.app.active_learning import ActiveLearningLoop, write_fal_records
from fedimb.app.metering import PartitionAssigner
from fedimb.app.observer import RoundObserver
from fedimb.checkpoint import Checkpoint, config_digest, resume_blocker, save_checkpoint
from fedimb.config import ExperimentConfig
from fedimb.data import (DatasetSplits, FederatedData, build_federated_data, client_train_data, partition_stats,
                         plot_partition)
from fedimb.data.domains import feature_skew_report
from fedimb.failures import round_timeout
from fedimb.metrics import class_groups
from fedimb.models import build_configured_model, get_weights
from strategies import build_strategy, strategy_spec
from strategies.base import RoundOffset, StrategyContext, error_reason

if TYPE_CHECKING:
    from fedimb.app.closed_loop import ClosedLoop


class RunFailed(RuntimeError):
    """A federation could not finish; the message says which client or step failed."""


@dataclass
class Hello:
    """What the hello round learnt: node id → partition id, each partition's class counts, the image shape."""

    partition_of: dict[int, int]
    counts: np.ndarray  # (num_clients, num_classes), row = partition id; labelled samples only in active learning
    input_shape: tuple[int, int, int]
    num_examples: np.ndarray  # (num_clients,) samples each holds, labelled or not
    value_range: tuple[float, float]  # of the normalised images over all clients


def wait_for_nodes(grid: Grid, cfg: ExperimentConfig, timeout: float = 600.0) -> list[int]:
    """The node ids, sorted, once all ``federation.num_clients`` nodes are connected."""
    deadline = time.time() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < cfg.federation.num_clients:
        if time.time() > deadline:
            raise RunFailed(f"only {len(node_ids)} of {cfg.federation.num_clients} nodes connected")
        time.sleep(0.5)
    return node_ids


def assigned_hello(node_ids: list[int], data: FederatedData, cfg: ExperimentConfig) -> Hello:
    """What a hello round would learn, from the data a simulation's server split itself: the i-th
    smallest node id plays partition i; counts, sizes, image shape and value range of the partitions
    (each client's images as it sees them: through its domain and noise level)."""
    ranges = [(float(x.min()), float(x.max())) if len(x) else (0.0, 0.0)
              for x in (client_train_data(data, cfg, pid)[0] for pid in range(len(data.client_indices)))]
    counts = np.asarray(data.counts, dtype=np.int64)
    return Hello({nid: pid for pid, nid in enumerate(node_ids)}, counts, tuple(data.splits.input_shape),
                 counts.sum(1), (min(lo for lo, _ in ranges), max(hi for _, hi in ranges)))


def say_hello(grid: Grid, cfg: ExperimentConfig, config_text: str, timeout: float = 600.0) -> Hello:
    """Wait for all nodes, ask each for its partition id and class counts (query messages)."""
    node_ids = wait_for_nodes(grid, cfg, timeout)
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.EXPERIMENT_CONFIG: config_text})})
    messages = [Message(content=content, message_type=protocol.HELLO, dst_node_id=nid) for nid in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [m for m in replies if m.has_error()]
    if failed or len(replies) != len(node_ids):
        reason = error_reason(failed[0]) if failed else "no reply"
        raise RunFailed(f"hello round failed on {len(failed) or len(node_ids) - len(replies)} node(s): {reason}")
    partition_of: dict[int, int] = {}
    rows: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}
    ranges: list[tuple[float, float]] = []
    shapes: set[tuple[int, ...]] = set()
    for reply in replies:
        metrics = reply.content[protocol.METRICS]
        pid = int(metrics[protocol.PARTITION_ID])
        partition_of[reply.metadata.src_node_id] = pid
        rows[pid] = [int(c) for c in metrics[protocol.CLASS_COUNTS]]
        sizes[pid] = int(metrics[protocol.NUM_EXAMPLES])
        lo, hi = (float(v) for v in metrics[protocol.VALUE_RANGE])
        ranges.append((lo, hi))
        shapes.add(tuple(int(s) for s in metrics[protocol.INPUT_SHAPE]))
    if sorted(rows) != list(range(cfg.federation.num_clients)):
        raise RunFailed(f"partition ids {sorted(rows)} do not cover 0..{cfg.federation.num_clients - 1}")
    if len(shapes) != 1:
        raise RunFailed(f"clients hold images of different shapes: {sorted(shapes)}")
    return Hello(partition_of, np.array([rows[p] for p in sorted(rows)], dtype=np.int64), shapes.pop(),
                 np.array([sizes[p] for p in sorted(sizes)], dtype=np.int64),
                 (min(lo for lo, _ in ranges), max(hi for _, hi in ranges)))


@dataclass
class ServerRun:
    """What the phases of one run share; each phase reads it and adds what it learnt."""

    grid: Grid
    cfg: ExperimentConfig
    config_text: str
    run_dir: Path
    splits: DatasetSplits | None  # the dataset the server is given; None when it holds none
    observer: RoundObserver
    ctx: StrategyContext
    checkpoint: Checkpoint | None = None
    # simulation: the server assigns partitions to nodes instead of asking each (None: it asks)
    assigner: PartitionAssigner | None = None
    hello: Hello | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # blocks added to summary.json
    closed_loop: ClosedLoop | None = None  # synthetic.closed_loop_every: later top-ups between rounds

    def make_strategy(self) -> Strategy:
        """A fresh strategy from the registry, bound to the seed and the hello round's node map."""
        strategy, _ = build_strategy(self.cfg, self.ctx)
        strategy.bind(self.ctx, self.hello.partition_of)
        return strategy

    def initial_arrays(self) -> ArrayRecord:
        """The model every federation (and every reset active-learning stage) starts from."""
        return ArrayRecord(get_weights(build_configured_model(self.cfg, self.hello.input_shape,
                                                              self.observer.num_classes, self.cfg.seed)))

    def train_config(self) -> ConfigRecord:
        """What every train message carries: the experiment and the strategy's client algorithm."""
        return ConfigRecord({protocol.EXPERIMENT_CONFIG: self.config_text,
                             protocol.CLIENT_ALGORITHM: strategy_spec(self.cfg.strategy.name).client_algorithm,
                             protocol.GLOBAL_CLASS_COUNTS: [int(c) for c in self.hello.counts.sum(0)]})

    def evaluate_config(self) -> ConfigRecord:
        """What every evaluate message carries: the experiment and the client algorithm (FedProto's
        clients evaluate their own models by their own rule)."""
        return ConfigRecord({protocol.EXPERIMENT_CONFIG: self.config_text,
                             protocol.CLIENT_ALGORITHM: strategy_spec(self.cfg.strategy.name).client_algorithm})


Phase = Callable[[ServerRun], None]


def cannot_resume(cfg: ExperimentConfig) -> str | None:
    """Why a run of ``cfg`` cannot resume (the registry says whether its clients keep state), or None."""
    return resume_blocker(cfg, strategy_spec(cfg.strategy.name).keeps_client_state)


def hello_phase(run: ServerRun) -> None:
    """Learn each node's partition and class counts; write the partition report and heatmap.

    A simulation's server split the data itself: it assigns the partitions to the nodes and
    sends no message (:func:`assigned_hello`). Deployed, it asks every site. In active learning
    the sites report their labelled counts only; a simulation's server uses the whole
    partitions' counts for the report and the class groups (what the published runs used).
    """
    if run.assigner is not None:
        run.hello = assigned_hello(wait_for_nodes(run.grid, run.cfg), build_federated_data(run.cfg), run.cfg)
        run.assigner.partition_of = dict(run.hello.partition_of)
    else:
        run.hello = say_hello(run.grid, run.cfg, run.config_text)
        if run.cfg.active_learning.enabled and run.splits is not None:
            run.hello.counts = build_federated_data(run.cfg).counts
    run.observer.train_counts = run.hello.counts.sum(0)
    run.observer.input_shape = run.hello.input_shape
    stats = partition_stats(run.hello.counts)
    if run.splits is not None:  # as above: a simulation's clients take their domain and noise level from the config
        stats = feature_skew_report(stats, run.cfg)
    run.observer.recorder.write_partition(stats)
    plot_partition(run.hello.counts, run.run_dir / "partition.png",
                   title=f"{run.cfg.data.dataset}: {run.cfg.partition.name}")


def synthetic_phase(run: ServerRun) -> None:
    """Train (or reload) the federated generator and top every client up; summary block ``synthetic``.

    With ``synthetic.closed_loop_every`` it also sets up the later top-ups (:attr:`ServerRun.closed_loop`).
    """
    from fedimb.app.synthetic import DataFacts, prepare_synthetic  # diffusers loads only when asked for

    facts = DataFacts.of_splits(run.splits) if run.splits is not None else DataFacts(
        run.hello.input_shape, run.observer.num_classes, run.hello.value_range)
    report, topups = prepare_synthetic(run.grid, run.cfg, run.hello.partition_of, run.hello.counts,
                                       facts, run.config_text, run.run_dir)
    run.summary["synthetic"] = report
    if run.cfg.synthetic.closed_loop_every and topups is not None:
        from fedimb.app.closed_loop import ClosedLoop

        run.closed_loop = ClosedLoop(run.grid, run.cfg, run.hello.partition_of, run.hello.counts, run.config_text,
                                     topups)
        report["closed_loop"] = run.closed_loop.records  # filled as the rounds go


def _end_setup(run: ServerRun) -> None:
    """The bytes of the phases before the federation (hello, generator) go to the summary, so each
    round's row counts its own messages only (and a resumed run's rows match an uninterrupted one's)."""
    if run.observer.meter is not None:
        run.summary["setup_bytes"] = run.observer.meter.take()


def active_learning_phase(run: ServerRun) -> None:
    """FL stages on the labelled pools with query steps between them; summary block ``active_learning``."""
    _end_setup(run)
    al = run.cfg.active_learning
    counts = run.hello.counts
    loop = ActiveLearningLoop(run.cfg, run.grid, run.hello.partition_of, run.config_text, run.make_strategy,
                              run.initial_arrays, run.observer.central_evaluate, run.observer.start_stage,
                              class_groups(run.observer.num_classes, counts.sum(0))["tail"], int(run.hello.num_examples.sum()))
    run.summary["active_learning"] = loop.run(run.train_config(), run.evaluate_config())
    write_fal_records(run.run_dir, loop.steps, al.initial_fraction, al.step_fraction)


def rounds_phase(run: ServerRun) -> None:
    """``federation.rounds`` rounds of the configured strategy, after the checkpoint when resuming."""
    loop = run.closed_loop
    if loop is not None and run.checkpoint is not None:  # the pools of the closed loop's last top-up, again
        loop.resume(run.checkpoint.round, run.checkpoint.rows)
    _end_setup(run)
    run_rounds(run.grid, run.cfg, run.run_dir, run.make_strategy(), run.initial_arrays, run.checkpoint,
               run.observer, run.train_config(), run.evaluate_config(),
               after_round=None if loop is None else loop.after_round)


def phases_for(cfg: ExperimentConfig) -> list[Phase]:
    """The phases of a run of ``cfg``: hello, the generator if asked for, then the federation."""
    federation = active_learning_phase if cfg.active_learning.enabled else rounds_phase
    return [hello_phase, *([synthetic_phase] if cfg.synthetic.enabled else []), federation]


def run_rounds(grid: Grid, cfg: ExperimentConfig, run_dir: Path, strategy: Strategy,
               initial_arrays: Callable[[], ArrayRecord], checkpoint: Checkpoint | None, observer: RoundObserver,
               train_config: ConfigRecord, evaluate_config: ConfigRecord,
               after_round: Callable[[int, list[dict[str, Any]]], None] | None = None) -> None:
    """The rounds after ``checkpoint`` (all of them without one), checkpointing after each.

    Runs that cannot resume (:func:`cannot_resume`) write no checkpoint: it would never be read.
    ``after_round(round, logged rows)`` runs after each round's evaluation, before its checkpoint
    (the closed-loop top-up).
    """
    keep = cannot_resume(cfg) is None
    digest = config_digest(cfg)

    as_evaluated = getattr(strategy, "evaluation_arrays", lambda arrays: arrays)  # e.g. a prototype head

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = observer.central_evaluate(server_round, as_evaluated(arrays))
        if after_round is not None:
            after_round(server_round, observer.recorder.rounds)
        if keep:
            state = strategy.state_dict() if hasattr(strategy, "state_dict") else {}
            save_checkpoint(run_dir, Checkpoint(
                round=server_round, config_sha256=digest, arrays={k: v.numpy() for k, v in arrays.items()},
                rows=observer.recorder.rounds, pending=observer.pending, strategy_state=state,
                elapsed_s=observer.recorder.elapsed()))
        return metrics

    done = 0
    arrays = initial_arrays()
    runner: Strategy = strategy
    if checkpoint is not None:
        done = checkpoint.round
        arrays = ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})
        if hasattr(strategy, "load_state_dict"):  # every fedimb strategy has it (ReproducibleSampling)
            strategy.load_state_dict(checkpoint.strategy_state)
        runner = RoundOffset(strategy, done)
    runner.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.federation.rounds - done,
                 timeout=round_timeout(cfg.federation.round_timeout),
                 train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_and_checkpoint)

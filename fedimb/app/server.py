"""The fedimb ServerApp: hello round, strategy from the registry, centralised evaluation, records.

``fedimb run`` builds it around a resolved config (:func:`make_server_app`); ``flwr run .``
loads the module-level ``server_app``, which reads ``config`` / ``overrides`` / ``out`` from
the run config in pyproject.toml.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedimb import protocol
from fedimb.checkpoint import (Checkpoint, config_digest, load_checkpoint, resume_blocker, save_checkpoint,
                               written_for)
from fedimb.config import ExperimentConfig, from_yaml, load_config, to_yaml
from fedimb.data import DatasetSplits, build_federated_data, load_dataset, partition_stats, plot_partition
from fedimb.metrics import class_groups, classification_metrics, client_fairness
from fedimb.models import build_model, get_weights, set_weights
from fedimb.records import RunRecorder, package_versions
from strategies import build_strategy, strategy_spec
from fedimb.app.active_learning import ActiveLearningLoop, write_fal_records
from strategies.base import RoundOffset, StrategyContext, error_reason

console = Console(stderr=True)
APP_DIR = Path(__file__).resolve().parent.parent


class RunFailed(RuntimeError):
    """A federation could not finish; the message says which client or step failed."""


@dataclass
class Hello:
    """What the hello round learnt: node id → partition id, and each partition's class counts."""

    partition_of: dict[int, int]
    counts: np.ndarray  # (num_clients, num_classes), row = partition id


def say_hello(grid: Grid, cfg: ExperimentConfig, config_text: str, timeout: float = 600.0) -> Hello:
    """Wait for all nodes, ask each for its partition id and class counts (query messages)."""
    deadline = time.time() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < cfg.federation.num_clients:
        if time.time() > deadline:
            raise RunFailed(f"only {len(node_ids)} of {cfg.federation.num_clients} nodes connected")
        time.sleep(0.5)
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.EXPERIMENT_CONFIG: config_text})})
    messages = [Message(content=content, message_type=protocol.HELLO, dst_node_id=nid) for nid in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [m for m in replies if m.has_error()]
    if failed or len(replies) != len(node_ids):
        reason = error_reason(failed[0]) if failed else "no reply"
        raise RunFailed(f"hello round failed on {len(failed) or len(node_ids) - len(replies)} node(s): {reason}")
    partition_of: dict[int, int] = {}
    rows: dict[int, list[int]] = {}
    for reply in replies:
        metrics = reply.content[protocol.METRICS]
        pid = int(metrics[protocol.PARTITION_ID])
        partition_of[reply.metadata.src_node_id] = pid
        rows[pid] = [int(c) for c in metrics[protocol.CLASS_COUNTS]]
    if sorted(rows) != list(range(cfg.federation.num_clients)):
        raise RunFailed(f"partition ids {sorted(rows)} do not cover 0..{cfg.federation.num_clients - 1}")
    return Hello(partition_of, np.array([rows[p] for p in sorted(rows)], dtype=np.int64))


@dataclass
class RoundObserver:
    """Collects each round's client metrics and the centralised evaluation into the records."""

    cfg: ExperimentConfig
    recorder: RunRecorder
    train_counts: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray
    input_shape: tuple[int, int, int]
    num_classes: int
    rounds_per_stage: int = 0  # rounds of one strategy.start (all rounds unless active learning)
    round_offset: int = 0  # rounds of earlier active-learning stages
    pending: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def start_stage(self, stage: int) -> None:
        """Active learning: number this stage's rounds after the earlier stages'."""
        self.round_offset = stage * self.rounds_per_stage

    def train_metrics(self, records: list[RecordDict], weight_key: str) -> MetricRecord:
        """Sample-weighted mean of the clients' train metrics."""
        weights = np.array([float(r[protocol.METRICS][weight_key]) for r in records])
        losses = np.array([float(r[protocol.METRICS][protocol.TRAIN_LOSS]) for r in records])
        out = MetricRecord({"train_loss": float(np.dot(weights, losses) / weights.sum())})
        self.pending["train_loss"] = out["train_loss"]
        return out

    def evaluate_metrics(self, records: list[RecordDict], weight_key: str) -> MetricRecord:
        """Client-side accuracies: weighted mean and the fairness figures."""
        accs = [float(r[protocol.METRICS][protocol.ACCURACY]) for r in records]
        fairness = client_fairness(accs)
        self.pending.update(fairness)
        return MetricRecord({k: float(v) for k, v in fairness.items()})

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Global model on the balanced test set every ``eval.every`` rounds and at the end."""
        last = server_round == self.rounds_per_stage
        if (server_round % self.cfg.eval.every and not last) or (server_round == 0 and self.round_offset):
            return None
        model = build_model(self.cfg.model.name, self.input_shape, self.num_classes, self.cfg.seed)
        set_weights(model, arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            preds = torch.cat([model(self.test_x[i:i + self.cfg.eval.batch_size]).argmax(1)
                               for i in range(0, len(self.test_x), self.cfg.eval.batch_size)])
        metrics = classification_metrics(self.test_y, preds.numpy(), self.num_classes, self.train_counts)
        row = {**metrics, **self.pending}
        self.pending = {}
        self.recorder.log_round(self.round_offset + server_round, row)
        self._print(self.round_offset + server_round, row)
        return MetricRecord({k: float(v) for k, v in metrics.items() if not isinstance(v, list)})

    def _print(self, server_round: int, row: dict[str, Any]) -> None:
        parts = [f"round {server_round:>3}/{total_rounds(self.cfg)}",
                 f"acc {row['accuracy']:.4f}", f"bal {row['balanced_accuracy']:.4f}",
                 f"f1 {row['macro_f1']:.4f}", f"tail {row['tail_recall']:.4f}"]
        if "client_accuracy_std" in row:
            parts.append(f"client-std {row['client_accuracy_std']:.4f}")
        parts.append(f"{time.time() - self.started:7.1f}s")
        console.print("  ".join(parts), highlight=False, soft_wrap=True)


def evaluation_set(cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray, DatasetSplits]:
    """The balanced test set, or (``eval.split=validation``) the held-out training samples."""
    if cfg.eval.split == "validation":
        data = build_federated_data(cfg)
        idx = data.validation_indices
        return data.splits.train_x[idx], data.splits.train_y[idx], data.splits
    splits = load_dataset(cfg.data)
    return splits.test_x, splits.test_y, splits


def total_rounds(cfg: ExperimentConfig) -> int:
    """Rounds of the whole run: all active-learning stages, or ``federation.rounds``."""
    al = cfg.active_learning
    return (al.steps + 1) * al.rounds_per_step if al.enabled else cfg.federation.rounds


def _resume_point(cfg: ExperimentConfig, run_dir: Path) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (None: it starts over), checked against the config."""
    blocker = resume_blocker(cfg)
    if blocker:
        raise RunFailed(f"--resume: {blocker}")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None and not written_for(checkpoint, cfg, run_dir):
        raise RunFailed(f"--resume: config.yaml changed since the checkpoint in {run_dir} was written")
    return checkpoint


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> None:
    """The whole server side of one run: hello, rounds (or active-learning stages), records.

    ``resume``: continue from the run directory's checkpoint (``fedimb run --resume``).
    """
    config_text = to_yaml(cfg)
    recorder = RunRecorder(run_dir)
    checkpoint = _resume_point(cfg, run_dir) if resume else None
    recorder.write_config(config_text)
    hello = say_hello(grid, cfg, config_text)
    stats = partition_stats(hello.counts)
    recorder.write_partition(stats)
    plot_partition(hello.counts, run_dir / "partition.png", title=f"{cfg.data.dataset}: {cfg.partition.name}")

    eval_x, eval_y, splits = evaluation_set(cfg)
    per_stage = cfg.active_learning.rounds_per_step if cfg.active_learning.enabled else cfg.federation.rounds
    observer = RoundObserver(cfg, recorder, hello.counts.sum(0), torch.from_numpy(eval_x), eval_y,
                             splits.input_shape, splits.num_classes, rounds_per_stage=per_stage)
    if checkpoint is not None:
        recorder.restore(checkpoint.rows, checkpoint.elapsed_s)
        observer.pending = dict(checkpoint.pending)
        observer.started -= checkpoint.elapsed_s
        console.print(f"resuming after round {checkpoint.round}/{total_rounds(cfg)}", highlight=False)
    ctx = StrategyContext(
        num_clients=cfg.federation.num_clients, fraction=cfg.federation.fraction,
        fraction_evaluate=cfg.federation.fraction_evaluate if cfg.eval.client_every else 0.0,
        min_clients=cfg.federation.min_clients, seed=cfg.seed, client_eval_every=cfg.eval.client_every,
        rounds=observer.rounds_per_stage, train_metrics_aggr_fn=observer.train_metrics,
        evaluate_metrics_aggr_fn=observer.evaluate_metrics,
    )

    def make_strategy() -> Strategy:
        strategy, _ = build_strategy(cfg, ctx)
        strategy.bind(ctx, hello.partition_of)
        return strategy

    def initial_arrays() -> ArrayRecord:
        return ArrayRecord(get_weights(build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.seed)))

    train_config = ConfigRecord({protocol.EXPERIMENT_CONFIG: config_text,
                                 protocol.CLIENT_ALGORITHM: strategy_spec(cfg.strategy.name).client_algorithm})
    evaluate_config = ConfigRecord({protocol.EXPERIMENT_CONFIG: config_text})
    extra: dict[str, Any] = {}
    if cfg.synthetic.enabled:
        from strategies.synthetic import prepare_synthetic  # diffusers loads only when asked for

        extra["synthetic"] = prepare_synthetic(grid, cfg, ctx, hello.partition_of, hello.counts, splits,
                                               config_text, run_dir)
    if cfg.active_learning.enabled:
        loop = ActiveLearningLoop(cfg, grid, hello.partition_of, config_text, make_strategy, initial_arrays,
                                  observer.central_evaluate, observer.start_stage,
                                  class_groups(splits.num_classes, hello.counts.sum(0))["tail"], int(hello.counts.sum()))
        extra["active_learning"] = loop.run(train_config, evaluate_config)
        write_fal_records(run_dir, loop.steps, cfg.active_learning.initial_fraction, cfg.active_learning.step_fraction)
    else:
        run_rounds(grid, cfg, run_dir, make_strategy(), initial_arrays, checkpoint, observer, train_config,
                   evaluate_config)
    if not recorder.rounds or recorder.rounds[-1]["round"] != total_rounds(cfg):
        raise RunFailed("the federation stopped before its last round; see the errors above")
    recorder.write_summary({
        "name": cfg.name, "seed": cfg.seed, "strategy": cfg.strategy.name,
        "loss": cfg.train.loss.name, "versions": package_versions(),
        "wall_time_per_round_s": recorder.elapsed() / total_rounds(cfg), **extra,
    })
    recorder.plot_curves()


def run_rounds(grid: Grid, cfg: ExperimentConfig, run_dir: Path, strategy: Strategy,
               initial_arrays: Callable[[], ArrayRecord], checkpoint: Checkpoint | None, observer: RoundObserver,
               train_config: ConfigRecord, evaluate_config: ConfigRecord) -> None:
    """The rounds after ``checkpoint`` (all of them without one), checkpointing after each.

    Runs that cannot resume (``resume_blocker``) write no checkpoint: it would never be read.
    """
    keep = resume_blocker(cfg) is None
    digest = config_digest(cfg)

    as_evaluated = getattr(strategy, "evaluation_arrays", lambda arrays: arrays)  # e.g. a prototype head

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = observer.central_evaluate(server_round, as_evaluated(arrays))
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
                 train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_and_checkpoint)


def _config_from_run_config(context: Context) -> tuple[ExperimentConfig, Path]:
    """``flwr run``: the YAML path and overrides come from pyproject's run config.

    Under ``flwr run`` this module runs from the installed FAB (``$FLWR_HOME/apps/...``), so
    ``APP_DIR`` is that copy: a relative ``config`` names a YAML shipped in the FAB, and a
    relative ``out`` is taken from the working directory (the SuperLink's), not ``APP_DIR``.
    """
    run_config = context.run_config
    path = Path(str(run_config.get("config", "experiments/quickstart.yaml"))).expanduser()
    if not path.is_absolute():
        path = APP_DIR / path
    overrides = str(run_config.get("overrides", "")).split()
    out = Path(str(run_config.get("out", "runs/flwr"))).expanduser().absolute()
    cfg = load_config(path, overrides)
    return cfg, out / f"{cfg.name}-{int(time.time())}"


def make_server_app(config_text: str | None = None, run_dir: Path | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp for one resolved config, or (no arguments) one that reads the run config.

    ``resume``: continue ``run_dir`` from its checkpoint.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config_text is None or run_dir is None:
            cfg, out = _config_from_run_config(context)
        else:
            cfg, out = from_yaml(config_text), run_dir
        flwr_logger = logging.getLogger("flwr")
        if not cfg.simulation.verbose and flwr_logger.level < logging.ERROR:  # quieter, never louder than the caller set
            flwr_logger.setLevel(logging.ERROR)
        run_federation(grid, cfg, out, resume=resume and run_dir is not None)

    return app


server_app = make_server_app()

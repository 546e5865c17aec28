"""Federated active learning: FL stages on the labelled pools, query steps in between.

Each stage runs the configured strategy (a fresh instance, so server optimiser state does not
leak across stages) for ``rounds_per_step`` rounds on the clients' labelled pools, from a
fresh random init (``reset_model``, as in the FairFAL paper) or from the last stage's model.
Then every client gets a ``query.select`` message with the global model and a budget
b = round(N_train, −2) · step_fraction / K; it picks samples with its sampler and reveals their
labels. FairFAL's γ̄ is the mean of the clients' γ_k from the first query step, then frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimb import protocol
from fedimb.config import ExperimentConfig
from fedimb.failures import round_timeout
from fedimb.records import atomic_write_text, save_figure
from strategies.base import error_reason

def step_budget(total_train: int, step_fraction: float, num_clients: int) -> int:
    """FairFAL's per-client budget: round(N_train, −2) · step_fraction / K."""
    return int(round(round(total_train, -2) * step_fraction / num_clients))


def tail_share(histogram: np.ndarray, tail_classes: list[int]) -> float:
    """Share of queried samples whose (revealed) class is a tail class."""
    total = histogram.sum()
    return float(histogram[tail_classes].sum() / total) if total else 0.0


@dataclass
class ActiveLearningLoop:
    """Orchestrates stages and query steps; ``make_strategy`` builds a bound strategy per stage."""

    cfg: ExperimentConfig
    grid: Grid
    partition_of: dict[int, int]
    config_text: str
    make_strategy: Callable[[], Strategy]
    initial_arrays: Callable[[], ArrayRecord]
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    on_stage: Callable[[int], None]
    tail_classes: list[int]
    total_train: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    gamma_bar: float | None = None

    def run(self, train_config: ConfigRecord, evaluate_config: ConfigRecord) -> list[dict[str, Any]]:
        """All stages and steps; returns one row per stage."""
        al = self.cfg.active_learning
        arrays = self.initial_arrays()
        for step in range(al.steps + 1):
            if step and al.reset_model:
                arrays = self.initial_arrays()
            self.on_stage(step)
            train_config[protocol.FAL_STEP] = step
            result = self.make_strategy().start(
                grid=self.grid, initial_arrays=arrays, num_rounds=al.rounds_per_step,
                timeout=round_timeout(self.cfg.federation.round_timeout),
                train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=self.evaluate_fn)
            arrays = result.arrays
            final = result.evaluate_metrics_serverapp.get(al.rounds_per_step)
            row: dict[str, Any] = {"step": step, **({k: float(v) for k, v in final.items()} if final else {})}
            if step == 0 and al.steps:
                self.query(arrays, step, budget=0)  # γ_k of every client first, so γ̄ is known at step 0
            if step < al.steps:
                row.update(self.query(arrays, step))
            self.steps.append(row)
        return self.steps

    def query(self, arrays: ArrayRecord, step: int, budget: int | None = None) -> dict[str, Any]:
        """Send one query step to every node (``budget`` 0: only collect reports); return what it labelled."""
        al = self.cfg.active_learning
        if budget is None:
            budget = step_budget(self.total_train, al.step_fraction, self.cfg.federation.num_clients)
        config = ConfigRecord({protocol.EXPERIMENT_CONFIG: self.config_text, protocol.BUDGET: budget,
                               protocol.FAL_STEP: step})
        if self.gamma_bar is not None:
            config[protocol.GAMMA_BAR] = self.gamma_bar
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        node_ids = sorted(self.partition_of, key=self.partition_of.get)
        messages = [Message(content=content, message_type=protocol.SELECT, dst_node_id=n) for n in node_ids]
        replies = list(self.grid.send_and_receive(messages))
        failed = [m for m in replies if m.has_error()]
        if failed or len(replies) != len(node_ids):
            reason = error_reason(failed[0]) if failed else "missing replies"
            raise RuntimeError(f"query step {step} failed: {reason}")
        metrics = [m.content[protocol.METRICS] for m in replies]
        histogram = np.sum([np.asarray(m[protocol.LABEL_HISTOGRAM]) for m in metrics], axis=0)
        if step == 0 and self.gamma_bar is None and all(protocol.FAIRFAL_GAMMA in m for m in metrics):
            self.gamma_bar = float(np.mean([float(m[protocol.FAIRFAL_GAMMA]) for m in metrics]))  # frozen from here on
        labelled = int(sum(int(m[protocol.NUM_LABELLED]) for m in metrics))
        return {"queried": int(histogram.sum()), "labelled_after": labelled,
                "labelled_fraction_after": labelled / self.total_train,
                "queried_tail_share": tail_share(histogram, self.tail_classes),
                "gamma_bar": self.gamma_bar if self.gamma_bar is not None else float("nan"),
                "local_models_from_scratch": int(sum(int(m.get(protocol.LOCAL_MODEL_FROM_SCRATCH, 0)) for m in metrics)),
                "queried_histogram": [int(h) for h in histogram]}


def write_fal_records(run_dir, steps: list[dict[str, Any]], initial_fraction: float, step_fraction: float) -> None:
    """fal.csv (one row per stage) and fal_curve.png (accuracy and balanced accuracy vs labelled share)."""
    from matplotlib.figure import Figure

    keys = sorted({k for row in steps for k in row if k != "queried_histogram"})
    lines = [",".join(["labelled_fraction", *keys, "queried_histogram"])]
    fractions = [initial_fraction + step_fraction * row["step"] for row in steps]
    for frac, row in zip(fractions, steps):
        hist = " ".join(str(h) for h in row.get("queried_histogram", []))
        lines.append(",".join([f"{frac:.4f}", *(str(row.get(k, "")) for k in keys), hist]))
    atomic_write_text(run_dir / "fal.csv", "\n".join(lines) + "\n")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for metric in ("accuracy", "balanced_accuracy", "tail_recall"):
        if all(metric in row for row in steps):
            ax.plot([100 * f for f in fractions], [100 * row[metric] for row in steps], marker="o", label=metric)
    ax.set_xlabel("labelled share of the training set (%)")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, run_dir / "fal_curve.png")

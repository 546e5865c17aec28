"""What the server records each round: client metrics, the central evaluation, the printed line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from rich.console import Console

from fedimb import protocol
from fedimb.app.metering import MeteredGrid
from fedimb.config import ExperimentConfig
from fedimb.data import DatasetSplits, build_federated_data, load_dataset
from fedimb.data.domains import domain_test_sets
from fedimb.metrics import (WORST_DOMAIN_COLUMN, classification_metrics, client_fairness, confusion, domain_metrics,
                            metrics_from_confusion)
from fedimb.models import build_configured_model, set_weights
from fedimb.records import RunRecorder

console = Console(stderr=True)


@dataclass(frozen=True)
class HeldOutTest:
    """The balanced test set (and its view in every acquisition domain) that a run evaluated on the
    validation split scores once, after its last round: the summary's ``test`` block, read by no phase."""

    x: torch.Tensor
    y: np.ndarray
    domain_x: dict[str, torch.Tensor]

    @classmethod
    def of(cls, cfg: ExperimentConfig, splits: DatasetSplits) -> HeldOutTest:
        views = domain_test_sets(splits.test_x, cfg, splits.normalisation)
        return cls(torch.from_numpy(splits.test_x), splits.test_y, {n: torch.from_numpy(v) for n, v in views.items()})


@dataclass
class RoundObserver:
    """Collects each round's client metrics and the evaluations into the records.

    The central evaluation needs a test set on the server (``test_x`` / ``test_y``); federated
    evaluation sums the clients' confusion matrices. With both, the federated metrics are the
    ``federated_*`` columns; with federated evaluation only, they are the main columns.

    ``held_out``: under ``eval.split=validation`` the rounds score the validation split; the
    last round's global model is also scored once on the test set, into :attr:`test_metrics`.
    """

    cfg: ExperimentConfig
    recorder: RunRecorder
    test_x: torch.Tensor | None  # None: the server holds no test set
    test_y: np.ndarray | None
    # what the hello phase learns from the clients
    train_counts: np.ndarray | None = None
    input_shape: tuple[int, int, int] | None = None
    meter: MeteredGrid | None = None  # bytes on the wire: each row gets those since the previous row
    # the test set as every acquisition domain takes it (domains.names); empty: scored as it is
    domain_x: dict[str, torch.Tensor] = field(default_factory=dict)
    held_out: HeldOutTest | None = None
    test_metrics: dict[str, Any] = field(default_factory=dict)  # held_out scored after the last round
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

    @property
    def num_classes(self) -> int:
        """Classes of the experiment, as the clients' class counts have them."""
        return len(self.train_counts)

    def evaluate_metrics(self, records: list[RecordDict], weight_key: str) -> MetricRecord:
        """Client-side accuracies (fairness figures) and, with federated evaluation, the pooled metrics."""
        accs = [float(r[protocol.METRICS][protocol.ACCURACY]) for r in records]
        fairness = client_fairness(accs)
        self.pending.update(fairness)
        if self.federated and records:
            by_domain = confusions_by_domain(records, self.num_classes)
            prefix = "federated_" if self.test_x is not None else ""
            if list(by_domain) == [None]:  # no client named a domain
                metrics = metrics_from_confusion(by_domain[None], self.train_counts)
            else:
                metrics = domain_metrics({name or UNNAMED_DOMAIN: m for name, m in by_domain.items()}, self.train_counts)
            self.pending.update({prefix + k: v for k, v in metrics.items()})
        return MetricRecord({k: float(v) for k, v in fairness.items()})

    @property
    def federated(self) -> bool:
        """Whether the round's metrics come (also) from the clients' confusion matrices."""
        return self.cfg.eval.federated or self.test_x is None

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Record the round: the global model on the server's test set (if any) every ``eval.every``
        rounds and at the end, with the clients' metrics of the round."""
        last = server_round == self.rounds_per_stage
        if (server_round % self.cfg.eval.every and not last) or (server_round == 0 and self.round_offset):
            return None
        if self.test_x is None and "accuracy" not in self.pending:
            return None  # no evaluation at all this round (before the first client evaluation)
        metrics = {} if self.test_x is None else self._central_metrics(arrays, server_round)
        if self.meter is not None:
            self.pending.update(self.meter.take())
        row = {**metrics, **self.pending}
        self.pending = {}
        self.recorder.log_round(self.round_offset + server_round, row)
        self._print(self.round_offset + server_round, row)
        if self.test_metrics and self.round_offset + server_round == total_rounds(self.cfg):
            self._print_test(self.test_metrics)
        return MetricRecord({k: float(v) for k, v in metrics.items() if not isinstance(v, list)})

    def _central_metrics(self, arrays: ArrayRecord, server_round: int) -> dict[str, Any]:
        """The global model on the evaluation set; after the run's last round also on the held-out
        test set (:attr:`test_metrics`), when the rounds score the validation split."""
        model = build_configured_model(self.cfg, self.input_shape, self.num_classes, self.cfg.seed)
        set_weights(model, arrays.to_torch_state_dict())
        model.eval()
        if self.held_out is not None and self.round_offset + server_round == total_rounds(self.cfg):
            self.test_metrics = self._scores(model, self.held_out.x, self.held_out.y, self.held_out.domain_x)
        return self._scores(model, self.test_x, self.test_y, self.domain_x)

    def _scores(self, model: torch.nn.Module, x: torch.Tensor, y: np.ndarray,
                domain_x: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Metrics of ``model`` on (x, y); with domains, on (x, y) in every domain (the main metrics
        pooled over them, each domain's balanced accuracy and the worst one's)."""
        if domain_x:
            matrices = {name: confusion(y, self._predict(model, view), self.num_classes)
                        for name, view in domain_x.items()}
            return domain_metrics(matrices, self.train_counts)
        return classification_metrics(y, self._predict(model, x), self.num_classes, self.train_counts)

    def _predict(self, model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
        batch = self.cfg.eval.batch_size
        with torch.no_grad():
            return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).numpy()

    def _print(self, server_round: int, row: dict[str, Any]) -> None:
        parts = [f"round {server_round:>3}/{total_rounds(self.cfg)}",
                 f"acc {row['accuracy']:.4f}", f"bal {row['balanced_accuracy']:.4f}",
                 f"f1 {row['macro_f1']:.4f}", f"tail {row['tail_recall']:.4f}"]
        if WORST_DOMAIN_COLUMN in row:
            parts.append(f"worst-domain {row[WORST_DOMAIN_COLUMN]:.4f}")
        if "client_accuracy_std" in row:
            parts.append(f"client-std {row['client_accuracy_std']:.4f}")
        parts.append(f"{time.time() - self.started:7.1f}s")
        console.print("  ".join(parts), highlight=False, soft_wrap=True)

    def _print_test(self, metrics: dict[str, Any]) -> None:
        """The held-out test set's line, after the last round's."""
        worst = f"  worst-domain {metrics[WORST_DOMAIN_COLUMN]:.4f}" if WORST_DOMAIN_COLUMN in metrics else ""
        console.print(f"test set after the last round: bal {metrics['balanced_accuracy']:.4f}  "
                      f"tail {metrics['tail_recall']:.4f}{worst}", highlight=False)


UNNAMED_DOMAIN = "unnamed"  # the clients that named no domain, when others did


def confusions_by_domain(records: list[RecordDict], num_classes: int) -> dict[str | None, np.ndarray]:
    """The clients' summed confusion matrices per domain their evaluation replies name (None: named none),
    in name order, unnamed last: federated evaluation scores each acquisition domain, a deployed site's too."""
    sums: dict[str | None, np.ndarray] = {}
    for record in records:
        config = record.get(protocol.CONFIG)
        name = None if config is None or protocol.DOMAIN not in config else str(config[protocol.DOMAIN])
        matrix = np.asarray(record[protocol.METRICS][protocol.CONFUSION], dtype=np.int64).reshape(num_classes, num_classes)
        sums[name] = sums.get(name, 0) + matrix
    return {name: sums[name] for name in sorted(sums, key=lambda n: (n is None, n or ""))}


def evaluation_set(cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray, DatasetSplits]:
    """The balanced test set, or (``eval.split=validation``) the held-out training samples.

    Only for a server that is given the dataset (a simulation, or ``eval.server_data=dataset``).
    """
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

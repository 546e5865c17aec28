"""The Flower strategy of the federated generator: FedAvg over its weights, class-aware label rows.

Clients train on their own images in ``train.generator`` messages and send weights back; no
image leaves a client. Not a classifier strategy (not in ``STRATEGIES``): the synthetic phase
(``fedimb.app.synthetic``) runs it before the classifier federation starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from rich.console import Console

from fedimb import protocol
from fedimb.synthetic.generator import EMBEDDING_KEY
from strategies.base import ReproducibleSampling, reweight_replies

console = Console(stderr=True)


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


def domain_balanced_weights(sizes: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """Each reply's aggregation weight when every domain among them weighs alike: size over its domain's
    total size in the round, over the number of domains in the round (the weights sum to 1)."""
    sizes, domains = np.asarray(sizes, dtype=np.float64), np.asarray(domains)
    present, which, members = np.unique(domains, return_inverse=True, return_counts=True)
    totals = np.bincount(which, weights=sizes)
    # a domain whose replies report no samples splits its share evenly
    share = np.where(totals[which] > 0, sizes / np.where(totals[which] > 0, totals[which], 1.0), 1.0 / members[which])
    return share / len(present)


class GeneratorFedAvg(ReproducibleSampling, FedAvg):
    """FedAvg over the generator's weights; its messages go to the ``train.generator`` handler.

    With ``class_counts`` (partition id x class) the label table is aggregated class by class
    (:func:`class_aware_rows`); with ``domain_of`` (partition id → domain index) every domain in a
    round weighs alike in the FedAvg of the weights (:func:`domain_balanced_weights`); a (class, domain)
    label row is still averaged over the clients holding that pair, all of them of its domain.
    """

    def __init__(self, *args: Any, class_counts: np.ndarray | None = None, total_rounds: int = 0,
                 domain_of: np.ndarray | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_counts = class_counts
        self.domain_of = domain_of
        self.total_rounds = total_rounds
        self.started = time.time()

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, Any]:
        """FedAvg, then the class-aware label table when counts were given; one progress line per round."""
        if self.domain_of is not None:
            self._balance_domains(replies)
        arrays, metrics = super().aggregate_screened(server_round, replies)
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

    def _balance_domains(self, replies: list[Message]) -> None:
        """Rewrite each reply's FedAvg weight to its domain-balanced share (:func:`domain_balanced_weights`)."""
        sizes = [float(m.content[protocol.METRICS][protocol.NUM_EXAMPLES]) for m in replies]
        domains = self.domain_of[[self.partition_of[m.metadata.src_node_id] for m in replies]]
        reweight_replies(replies, list(domain_balanced_weights(np.array(sizes), domains)), protocol.NUM_EXAMPLES)

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> Iterable[Message]:
        kind = protocol.GENERATOR_TRAIN if message_type == MessageType.TRAIN else message_type
        return [Message(content=record, message_type=kind, dst_node_id=n) for n in node_ids]

"""The closed-loop top-up: every K rounds the global model's errors set every client's next synthetic pool.

The static top-up is computed once, before training, from counts. With
``synthetic.closed_loop_every: K`` the server reads, after every K-th round, the errors of that
round's global model as the run logged them (``per_class_recall`` and, with domains,
``balanced_accuracy_domain_<name>``: the server's validation split, which the config check
insists on, so the test set never steers training) and sends every client a fresh pool (``query.topup``, the same message as the static
top-up): targets proportional to the errors (:func:`~fedimb.synthetic.allocation.condition_weights`),
within the same target total and synthetic:real cap. A class-conditional generator follows the
class errors only; a (class, domain) one the class error times the domain error. The clients
replace their pools; nothing is sent after the last round.

The plan is a pure function of the logged rows, so a resumed run re-sends the last pool before
its next round and lists the earlier top-ups in the summary as an uninterrupted run does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from rich.console import Console

from fedimb.app.synthetic import Topups, deliver, static_needs
from fedimb.config import ExperimentConfig
from fedimb.synthetic.allocation import condition_weights, errors_from_row, generator_domains

console = Console(stderr=True)


@dataclass
class ClosedLoop:
    """The server's closed-loop top-up; :meth:`after_round` runs after each round's evaluation.

    ``records``: one entry per top-up sent (round, the errors read, samples per client), the
    ``closed_loop`` list of the summary's ``synthetic`` block.
    """

    grid: Grid
    cfg: ExperimentConfig
    partition_of: dict[int, int]
    counts: np.ndarray  # partition id x class, from the hello round
    config_text: str
    topups: Topups
    records: list[dict[str, Any]] = field(default_factory=list)

    def due(self, server_round: int) -> bool:
        """Whether a top-up follows ``server_round``: every K-th round, none after the last."""
        every = self.cfg.synthetic.closed_loop_every
        return every > 0 and 0 < server_round < self.cfg.federation.rounds and server_round % every == 0

    def plan(self, server_round: int, rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
        """Every client's next top-up per generator label from round ``server_round``'s logged errors;
        None when that round logged none (the pools then stay as they are)."""
        row = next((r for r in reversed(rows) if int(r.get("round", -1)) == server_round), None)
        errors = None if row is None else errors_from_row(row, generator_domains(self.cfg))
        if errors is None:
            console.print(f"closed loop: round {server_round} logged no per-class recall; the pools stay",
                          highlight=False)
            return None
        class_errors, domain_errors = errors
        needs = static_needs(self.cfg, self.counts, condition_weights(class_errors, domain_errors))
        self.records.append({"round": server_round, "class_error": class_errors.tolist(),
                             "domain_error": None if domain_errors is None else domain_errors.tolist(),
                             "synthetic_per_client": needs.sum(axis=1).tolist()})
        return needs

    def after_round(self, server_round: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """After a due round: plan from its errors and send every client its new pool."""
        if not self.due(server_round):
            return
        needs = self.plan(server_round, rows)
        if needs is None:
            return
        topups = self.topups
        sent = deliver(self.grid, self.cfg, topups.generator, self.partition_of, needs, self.config_text,
                       topups.cache, topups.sampler, loop_round=server_round)
        console.print(f"closed loop after round {server_round}: synthetic per client {sent}", highlight=False)

    def resume(self, done_round: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """A run resumed after ``done_round``: list the top-ups made before it and re-send the last one
        (the clients' pools died with their processes)."""
        due = [r for r in range(1, done_round + 1) if self.due(r)]
        for server_round in due[:-1]:
            self.plan(server_round, rows)
        if due:
            self.after_round(due[-1], rows)

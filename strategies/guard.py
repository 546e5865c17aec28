"""What stands between a round's replies and the aggregation: failures, validation, ``min_replies``.

For every round :meth:`ReplyGuard.screen` sorts out the nodes that failed (an error reply, no
reply before ``federation.round_timeout``, an update that fails validation or the norm rule),
records them (``failures.csv``, the ``failures`` column of ``rounds.csv``, one printed line each),
and lets the round go on with the valid replies when there are at least ``federation.min_replies``
of them; with fewer the run stops with :class:`RoundFailed`, naming each failed node and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from flwr.app import ArrayRecord, Message
from rich.console import Console

from fedimb.config import ExperimentConfig
from fedimb.failures import DROPPED_FILE, Failure, FailureLog, describe, pending_counter, required_replies
from fedimb.hostile import RobustConfig
from strategies.base import ClientFailed, error_reason
from strategies.robust import RobustRuleFailed, apply_rule
from strategies.validation import norm_outliers, update_norms

console = Console(stderr=True)
UNKNOWN_PARTITION = -1


class RoundFailed(ClientFailed):
    """Fewer valid replies than ``federation.min_replies``; the message names every failed node and why."""


def node_failure(server_round: int, node: int, partition_of: dict[int, int], phase: str, reason: str) -> Failure:
    """A row of ``failures.csv`` (or ``robust_dropped.csv``) for ``node``, named by its partition when known."""
    return Failure(server_round, node, partition_of.get(node, UNKNOWN_PARTITION), phase, reason)


@dataclass
class ReplyGuard:
    """The run's rules for replies; one per run, shared by every strategy instance it builds."""

    min_replies: Union[int, float] = 1.0
    norm_factor: float = 0.0
    robust: RobustConfig = field(default_factory=RobustConfig)
    log: FailureLog = field(default_factory=FailureLog)
    dropped: FailureLog = field(default_factory=lambda: FailureLog(file_name=DROPPED_FILE))
    # robust.exclude_after: per client (history_key), [rounds scored by the rule, rounds it dropped the reply]
    history: dict[str, list[int]] = field(default_factory=dict)

    def left_out(self, key: str) -> bool:
        """Whether ``robust.exclude_after`` leaves this client out: scored often enough, dropped in most rounds."""
        scored, dropped = self.history.get(key, (0, 0))
        return bool(self.robust.exclude_after) and scored >= self.robust.exclude_after and 2 * dropped > scored

    def screen(self, server_round: int, phase: str, replies: list[Message], sent: list[int],
               partition_of: dict[int, int], problem: Callable[[Message], str | None] | None = None,
               start: ArrayRecord | None = None) -> list[Message]:
        """The valid replies of one phase of a round, in the order given; failures recorded.

        ``sent``: the nodes asked (a node among them without a reply timed out); ``problem``: why
        a reply must not be used (train: :func:`strategies.validation.reply_problem`); ``start``:
        the weights the round started from, for the norm rule.
        """
        if not sent and not replies:  # a phase this round skipped (e.g. no client evaluation)
            return []
        failures: list[Failure] = []

        def fail(node: int, reason: str) -> None:
            failures.append(node_failure(server_round, node, partition_of, phase, reason))

        replied = {m.metadata.src_node_id for m in replies}
        for node in sent:
            if node not in replied:
                fail(node, "no reply before the round timeout")
        valid = []
        for message in replies:
            reason = error_reason(message) if message.has_error() else (problem(message) if problem else None)
            if reason is None:
                valid.append(message)
            else:
                fail(message.metadata.src_node_id, reason if message.has_error() else f"rejected: {reason}")
        if problem is not None and self.norm_factor > 0 and valid:
            norms = update_norms([m.content for m in valid], start)
            outliers = set(norm_outliers(norms, self.norm_factor))
            median = float(np.median(norms))
            for i in sorted(outliers):
                fail(valid[i].metadata.src_node_id,
                     f"rejected: update norm {norms[i]:.4g} > {self.norm_factor:g} x the round's median {median:.4g}")
            valid = [m for i, m in enumerate(valid) if i not in outliers]
        self.log.record(failures)
        for failure in failures:
            console.print(f"round {server_round:>3} {phase}: partition {failure.partition} (node {failure.node}) "
                          f"{failure.reason}", highlight=False, soft_wrap=True)
        asked = max(len(sent), len(replies))
        needed = required_replies(self.min_replies, asked)
        if len(valid) < needed:
            raise RoundFailed(f"round {server_round} {phase}: {len(valid)} valid replies of {asked}, "
                              f"federation.min_replies={self.min_replies} needs {needed}; {describe(failures)}")
        return valid

    def apply_robust(self, server_round: int, replies: list[Message], start: ArrayRecord | None,
                     partition_of: dict[int, int], records: tuple[str, ...] = ()) -> list[Message]:
        """``strategy.robust`` over the valid replies (:func:`strategies.robust.apply_rule`).

        The replies a selection rule leaves out are recorded in ``robust_dropped.csv`` and printed.
        With ``robust.exclude_after`` the clients :meth:`left_out` are dropped unscored first.
        """
        keys = {id(m): history_key(m.metadata.src_node_id, partition_of) for m in replies}
        out_ids = {id(m) for m in replies if self.left_out(keys[id(m)])}
        ruled_out = [m for m in replies if id(m) in out_ids]
        scored = [m for m in replies if id(m) not in out_ids]
        try:
            kept = apply_rule(self.robust, scored, start, records,
                              excluded=sum(self.left_out(key) for key in self.history))
        except RobustRuleFailed as exc:
            raise RoundFailed(f"round {server_round} train: {exc}") from None
        if replies and not kept:
            raise RoundFailed(f"round {server_round} train: strategy.robust.exclude_after={self.robust.exclude_after} "
                              f"left out every client that replied ({len(ruled_out)})")
        kept_ids = {id(m) for m in kept}
        if self.robust.exclude_after:
            for message in scored:
                counts = self.history.setdefault(keys[id(message)], [0, 0])
                counts[0] += 1
                counts[1] += id(message) not in kept_ids
        def reason(message: Message) -> str:
            if id(message) not in out_ids:
                return f"dropped by {self.robust.name}"
            scored_rounds, dropped_rounds = self.history[keys[id(message)]]
            return f"dropped by {self.robust.name} (left out: dropped in {dropped_rounds} of {scored_rounds} rounds scored)"

        left_out = [node_failure(server_round, m.metadata.src_node_id, partition_of, "train", reason(m))
                    for m in replies if id(m) not in kept_ids]
        self.dropped.record(left_out)
        if left_out:
            console.print(f"round {server_round:>3} train: {self.robust.name} dropped partitions "
                          f"{sorted(f.partition for f in left_out)}", highlight=False, soft_wrap=True)
        return kept


def history_key(node: int, partition_of: dict[int, int]) -> str:
    """The name a client's robust history is kept under: its partition when known, else its node."""
    partition = partition_of.get(node)
    return f"partition {partition}" if partition is not None else f"node {node}"


def reply_guard(cfg: ExperimentConfig, run_dir: Path, observer: object, resumed_after: int | None) -> ReplyGuard:
    """The run's guard: its failure log in ``run_dir`` (a resumed run keeps the rows up to its checkpoint)."""
    log = FailureLog(run_dir, pending_counter(observer))
    dropped = FailureLog(run_dir, file_name=DROPPED_FILE)
    if resumed_after is not None:
        log.restore(resumed_after)
        dropped.restore(resumed_after)
    fed = cfg.federation
    return ReplyGuard(fed.min_replies, fed.norm_factor, cfg.strategy.robust, log, dropped)


def refuse_faults_when_deployed(cfg: ExperimentConfig) -> None:
    """Fault injection is for simulations (``fedimb run``); a deployed federation must not sabotage itself."""
    if cfg.faults.enabled():
        raise RoundFailed("faults: fault injection runs in simulation only (fedimb run); "
                          "this ServerApp was started by flwr run, so it refuses a config with faults")

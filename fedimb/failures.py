"""Every client failure of a run: an error reply, a reply that never came, an update that was rejected.

The strategies report each round's failures here (``strategies/guard.py``); :class:`FailureLog`
rewrites ``failures.csv`` (round, node, partition, phase, reason) atomically after every round
that had one, and hands each round's count to the ``failures`` column of ``rounds.csv``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from fedimb.records import atomic_write_text

FAILURES_FILE = "failures.csv"
DROPPED_FILE = "robust_dropped.csv"  # the valid replies a selection rule (krum, multikrum, bulyan, cosine) left out
COLUMNS = ("round", "node", "partition", "phase", "reason")


class RoundFailed(RuntimeError):
    """Fewer valid replies than ``federation.min_replies``; the message names every failed node and why."""


@dataclass(frozen=True)
class Failure:
    """One client's failure in one round."""

    round: int
    node: int
    partition: int  # -1 when the node never said which partition it holds
    phase: str  # train | evaluate
    reason: str


def required_replies(min_replies: Union[int, float], sampled: int) -> int:
    """Valid replies a round needs: a count (at most the clients sampled) or a fraction of them, at least one."""
    if isinstance(min_replies, int) and not isinstance(min_replies, bool):
        return max(1, min(min_replies, sampled))
    return max(1, math.ceil(float(min_replies) * sampled - 1e-9))


def describe(failures: list[Failure]) -> str:
    """The failed clients in one line: ``partition 1 (node 123): reason; ...``."""
    return "; ".join(f"partition {f.partition} (node {f.node}): {f.reason}" for f in failures)


@dataclass
class FailureLog:
    """The run's failures, written to ``run_dir/failures.csv`` (no run directory: kept in memory only).

    With ``file_name=DROPPED_FILE`` the same log holds the replies a robust selection rule dropped.
    """

    run_dir: Path | None = None
    on_count: Callable[[int], None] | None = None  # each round's count, for the rounds.csv row
    failures: list[Failure] = field(default_factory=list)
    file_name: str = FAILURES_FILE

    def record(self, phase_failures: list[Failure], count_round: bool = True) -> None:
        """Add one phase's failures of a round (possibly none) and rewrite the file when any."""
        self.failures.extend(phase_failures)
        if self.on_count is not None and count_round:
            self.on_count(len(phase_failures))
        if phase_failures and self.run_dir is not None:
            self._write()

    def restore(self, up_to_round: int) -> None:
        """A resumed run: keep the rows of the rounds the checkpoint holds, drop the later ones."""
        path = None if self.run_dir is None else self.run_dir / self.file_name
        if path is None or not path.is_file():
            return
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        self.failures = [Failure(int(r["round"]), int(r["node"]), int(r["partition"]), r["phase"], r["reason"])
                         for r in rows if int(r["round"]) <= up_to_round]
        self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for f in self.failures:
            writer.writerow([f.round, f.node, f.partition, f.phase, f.reason])
        atomic_write_text(self.run_dir / self.file_name, buf.getvalue())


FLOWER_TIMEOUT_S = 3600.0  # Flower's Strategy.start default


def round_timeout(seconds: float) -> float:
    """The seconds a round waits for replies: ``federation.round_timeout``, or Flower's default for 0."""
    return seconds if seconds > 0 else FLOWER_TIMEOUT_S


def pending_counter(observer: object) -> Callable[[int], None]:
    """Adds each round's failure count to ``observer.pending['failures']``: the next rounds.csv row's column."""
    def count(n: int) -> None:
        pending = observer.pending  # type: ignore[attr-defined] - replaced after every logged row
        pending["failures"] = int(pending.get("failures", 0)) + n
    return count

"""Config of hostile and failing clients: injected faults (simulation only) and the robust aggregation rule.

``faults:`` makes some clients misbehave, deterministically from (seed, round, partition):
which clients are hostile is ``faults.clients`` (partition ids) or a ``faults.fraction`` of them
drawn from the seed; each of the per-round rates below is the probability that a hostile client
shows that fault in a round. ``strategy.robust`` is the server's defence, composable with any
strategy (``strategies/robust.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fedimb.errors import ConfigError

# Fault kinds drawn per round, in the order their draws are made (so adding one at the end keeps
# every earlier draw): the crash and the straggler act before training, the rest on the reply.
ROUND_FAULTS = ("crash", "straggle", "nan", "inf", "wrong_shape", "scale", "sign_flip", "label_flip")
ROBUST_RULES = ("none", "trimmed_mean", "median", "krum", "multikrum", "bulyan", "clip", "cosine")
KRUM_RULES = ("krum", "multikrum", "bulyan")  # score replies by their distances; f, directions, exclude_after
SELECTION_RULES = (*KRUM_RULES, "cosine")  # drop replies whole (robust_dropped.csv)


@dataclass
class FaultsConfig:
    """Injected client faults; every rate is a probability per round per hostile client."""

    clients: list[int] = field(default_factory=list)  # hostile partition ids
    fraction: float = 0.0  # when ``clients`` is empty: this share of the clients, drawn from the seed
    crash: float = 0.0  # the ClientApp raises: an error reply
    straggle: float = 0.0  # the reply comes ``straggle_s`` late (after federation.round_timeout: dropped)
    straggle_s: float = 30.0
    nan: float = 0.0  # every weight NaN
    inf: float = 0.0  # every weight +Inf
    wrong_shape: float = 0.0  # the first weight array loses its last row
    scale: float = 0.0  # the update (weights − global) × ``scale_factor``
    scale_factor: float = 100.0
    sign_flip: float = 0.0  # the update's sign flipped: global − update
    label_flip: float = 0.0  # trains on labels c → C−1−c
    leave_round: int = 0  # from this round on the hostile clients are gone for good (0 = never)

    def enabled(self) -> bool:
        """Whether any client can misbehave."""
        hostile = bool(self.clients) or self.fraction > 0
        return hostile and (self.leave_round > 0 or any(getattr(self, kind) > 0 for kind in ROUND_FAULTS))


@dataclass
class RobustConfig:
    """The robust aggregation rule applied to a round's valid replies before the strategy aggregates.

    byzantine: f, hostile replies assumed per round (krum, multikrum, bulyan); trim: share cut at
    each end of every coordinate (trimmed_mean); select: updates multikrum averages (0 = n − f);
    max_norm: clip's bound on an update's L2 norm (0 = the round's median update norm);
    directions: krum, multikrum and bulyan score each update scaled to unit norm, so under
    non-IID sizes a long honest update (a client with much data, many local steps) is not taken
    for the outlier while a flipped one is; the kept replies go on as sent; min_cosine: cosine drops
    a reply whose update's cosine with the median direction is at most this, in [-1, 1);
    exclude_after: krum, multikrum and bulyan remember what they dropped: a client scored in at least
    this many rounds and dropped in more than half of them is left out of every later round, and the
    rule assumes that many fewer hostile replies among the rest (f − k; with f − k = 0 it keeps them
    all). 0 = off: every round is scored on its own.
    """

    name: str = "none"
    byzantine: int = 1
    trim: float = 0.1
    select: int = 0
    max_norm: float = 0.0
    directions: bool = False
    min_cosine: float = 0.0
    exclude_after: int = 0


def _fail(field_name: str, message: str) -> None:
    raise ConfigError(field_name, message)


def check_faults(faults: FaultsConfig, num_clients: int) -> None:
    """Reject rates outside [0, 1], unknown partitions and non-positive knobs."""
    for f in fields(FaultsConfig):
        value = getattr(faults, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(f"faults.{f.name}", f"must be a finite number, got {value}")
    for kind in (*ROUND_FAULTS, "fraction"):
        if not 0.0 <= getattr(faults, kind) <= 1.0:
            _fail(f"faults.{kind}", f"a probability must be in [0, 1], got {getattr(faults, kind)}")
    bad = [c for c in faults.clients if not 0 <= c < num_clients]
    if bad:
        _fail("faults.clients", f"partition ids must be in 0..{num_clients - 1}, got {bad}")
    if faults.straggle_s < 0:
        _fail("faults.straggle_s", f"must be >= 0, got {faults.straggle_s}")
    if faults.leave_round < 0:
        _fail("faults.leave_round", f"must be >= 0 (0 = never), got {faults.leave_round}")


def check_robust(robust: RobustConfig) -> None:
    """Reject an unknown rule or a parameter outside its range."""
    if robust.name not in ROBUST_RULES:
        _fail("strategy.robust.name", f"'{robust.name}' is not allowed; choose one of {', '.join(ROBUST_RULES)}")
    if robust.byzantine < 0:
        _fail("strategy.robust.byzantine", f"must be >= 0, got {robust.byzantine}")
    if not 0.0 <= robust.trim < 0.5:
        _fail("strategy.robust.trim", f"must be in [0, 0.5), got {robust.trim}")
    if robust.select < 0:
        _fail("strategy.robust.select", f"must be >= 0 (0 = n - f), got {robust.select}")
    if not (math.isfinite(robust.max_norm) and robust.max_norm >= 0):
        _fail("strategy.robust.max_norm", f"must be >= 0 (0 = the round's median norm), got {robust.max_norm}")
    if robust.exclude_after < 0:
        _fail("strategy.robust.exclude_after", f"must be >= 0 (0 = off), got {robust.exclude_after}")
    if robust.exclude_after and robust.name not in KRUM_RULES:
        _fail("strategy.robust.exclude_after", f"applies to krum, multikrum and bulyan, not to {robust.name}")
    if not (math.isfinite(robust.min_cosine) and -1.0 <= robust.min_cosine < 1.0):
        _fail("strategy.robust.min_cosine", f"must be in [-1, 1), got {robust.min_cosine}")


def check_min_replies(value: Any, num_clients: int) -> None:
    """``federation.min_replies``: a count 1..num_clients (an int) or a fraction in (0, 1] (a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail("federation.min_replies", f"a count (int) or a fraction (float), got {value!r}")
    if isinstance(value, int) and not 1 <= value <= num_clients:
        _fail("federation.min_replies", f"a count must be in 1..{num_clients} (federation.num_clients), got {value}")
    if isinstance(value, float) and not (math.isfinite(value) and 0.0 < value <= 1.0):
        _fail("federation.min_replies", f"a fraction must be in (0, 1], got {value}")

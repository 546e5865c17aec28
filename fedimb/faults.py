"""Injected client faults (``faults:``, simulation only): what a hostile client does in a round.

Which clients are hostile, and which faults each shows in a round, follow from (seed, round,
partition) alone (:func:`fedimb.protocol.derive_seed`), so a rerun injects the same faults and a
benchmark can compare defences on identical attacks. The ClientApp asks :meth:`FaultPlan.for_round`
at the start of a train (or evaluate) message and applies what it says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from fedimb.hostile import ROUND_FAULTS, FaultsConfig
from fedimb.protocol import derive_seed


class InjectedFault(RuntimeError):
    """A fault the config asked for; its message is the reason the server records."""


def hostile_partitions(faults: FaultsConfig, num_clients: int, seed: int) -> frozenset[int]:
    """``faults.clients``, or ``faults.fraction`` of the partitions drawn from the seed (at least one)."""
    if faults.clients:
        return frozenset(int(c) for c in faults.clients)
    if faults.fraction <= 0:
        return frozenset()
    count = max(1, round(faults.fraction * num_clients))
    order = np.random.default_rng(derive_seed(seed, "fault-clients")).permutation(num_clients)
    return frozenset(int(p) for p in order[:count])


@dataclass(frozen=True)
class FaultPlan:
    """The faults one client shows in one round (empty for an honest client)."""

    kinds: frozenset[str] = frozenset()
    left: bool = False  # gone for good: every message from this round on fails
    straggle_s: float = 0.0
    scale_factor: float = 100.0
    server_round: int = 0

    @classmethod
    def for_round(cls, faults: FaultsConfig, seed: int, num_clients: int, server_round: int,
                  partition: int) -> FaultPlan:
        """One draw per fault kind from (seed, round, partition); a kind fires when its draw < its rate."""
        if not faults.enabled() or partition not in hostile_partitions(faults, num_clients, seed):
            return cls(server_round=server_round)
        draws = np.random.default_rng(derive_seed(seed, "faults", server_round, partition)).random(len(ROUND_FAULTS))
        kinds = frozenset(k for k, u in zip(ROUND_FAULTS, draws) if u < getattr(faults, k))
        left = 0 < faults.leave_round <= server_round
        return cls(kinds, left, faults.straggle_s, faults.scale_factor, server_round)

    def before_training(self) -> None:
        """Leave, crash or straggle before any work, as a failing site would."""
        self.before_evaluation()
        if "crash" in self.kinds:
            raise InjectedFault(f"injected fault: crash at round {self.server_round}")
        if "straggle" in self.kinds:
            time.sleep(self.straggle_s)

    def before_evaluation(self) -> None:
        """A client that left answers nothing any more."""
        if self.left:
            raise InjectedFault(f"injected fault: left the federation (round {self.server_round})")

    @property
    def flips_labels(self) -> bool:
        """Train on labels c → C−1−c this round."""
        return "label_flip" in self.kinds

    def corrupt(self, weights: ArrayRecord, start: ArrayRecord) -> ArrayRecord:
        """The reply's weights as this round's faults make them (``start``: the global weights sent)."""
        if not self.kinds & {"nan", "inf", "wrong_shape", "scale", "sign_flip"}:
            return weights
        arrays = {k: v.numpy().copy() for k, v in weights.items()}
        origin = {k: v.numpy() for k, v in start.items()}
        floats = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)]
        for key in floats:
            update = arrays[key] - origin[key]
            if "scale" in self.kinds:
                update = update * self.scale_factor
            if "sign_flip" in self.kinds:
                update = -update
            arrays[key] = (origin[key] + update).astype(arrays[key].dtype)
            if "nan" in self.kinds or "inf" in self.kinds:
                arrays[key].fill(np.nan if "nan" in self.kinds else np.inf)
        if "wrong_shape" in self.kinds and floats:
            arrays[floats[0]] = arrays[floats[0]][:-1]
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})

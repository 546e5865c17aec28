"""What every fedimb strategy shares: reproducible client sampling, checkpointable state, the registry entry type.

Flower's node ids are random on every run and ``sample_nodes`` draws with the global
``random`` module, so the mixin presents node ids in partition order and seeds that draw from
(seed, round). Replies are also put in partition order before aggregation, because float
sums in arrival order would differ from run to run.

A strategy that carries something from one round to the next (a momentum buffer, prototypes,
dual variables) names those attributes in ``state_attrs``; the mixin's ``state_dict()`` /
``load_state_dict()`` put them into the run's checkpoint and back (``fedimb run --resume``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimb import protocol
from strategies.validation import Signature, reply_problem, signature

ROBUST_HISTORY = "robust_history"  # the checkpointed state's entry for ReplyGuard.history


class ClientFailed(RuntimeError):
    """A ClientApp replied with an error."""


def error_reason(message: Message) -> str:
    """The client's own exception message out of the layers Ray and Flower wrap around it."""
    reason = " ".join(str(message.error.reason).split())
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    return reason.rstrip("'>\" ").strip()


MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


@dataclass
class StrategyContext:
    """What the ServerApp knows when it builds a strategy."""

    num_clients: int
    fraction: float
    fraction_evaluate: float
    min_clients: int
    seed: int
    client_eval_every: int
    rounds: int
    train_metrics_aggr_fn: MetricsAggregator | None = None
    evaluate_metrics_aggr_fn: MetricsAggregator | None = None
    guard: Any = None  # a strategies.guard.ReplyGuard; None: any failed client fails the round

    def flower_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every Flower FedAvg-family constructor takes."""
        min_train = min(self.min_clients, self.num_clients)
        return {
            "fraction_train": self.fraction,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": min_train,
            "min_evaluate_nodes": min_train if self.fraction_evaluate > 0 else 0,
            # Flower waits without limit for this many connected nodes before sampling: all of them
            # would stall a deployment for as long as one site is away (the hello round has already
            # waited for every node, so a simulation samples from all of them either way)
            "min_available_nodes": min_train,
            "train_metrics_aggr_fn": self.train_metrics_aggr_fn,
            "evaluate_metrics_aggr_fn": self.evaluate_metrics_aggr_fn,
        }


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: how to build it, its params dataclass, its client algorithm.

    ``keeps_client_state``: its clients keep something in ``context.state`` from one round to
    the next (SCAFFOLD's c_i), which a restarted run has lost, so such runs cannot resume.
    ``global_model``: the server holds a model to evaluate; without one (FedProto) the run is
    scored by the clients' evaluation of their own models.
    """

    name: str
    build: Callable[[StrategyContext, Any], Strategy]
    params_cls: type
    client_algorithm: str = protocol.DEFAULT_CLIENT_ALGORITHM
    summary: str = ""
    keeps_client_state: bool = False
    global_model: bool = True


@dataclass
class NoParams:
    """For strategies without hyper-parameters."""


def attach_record(messages: list[Message], key: str, arrays: dict[str, np.ndarray]) -> None:
    """Put the same extra ArrayRecord (control variates, prototypes) into every outgoing message."""
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    for message in messages:
        message.content[key] = record


def take_records(replies: list[Message], key: str) -> list[dict[str, np.ndarray]]:
    """Remove the extra ArrayRecord ``key`` from each reply (Flower's FedAvg accepts exactly one) and return them."""
    taken = []
    for message in replies:
        if key in message.content:
            record = message.content[key]
            taken.append({k: record[k].numpy() for k in record})
            del message.content[key]
    return taken


def attach_prototypes(messages: list[Message], prototypes: np.ndarray | None, has: np.ndarray | None) -> list[Message]:
    """Put the global prototypes (C×D) and which classes have one into every message, once they exist."""
    if prototypes is not None:
        attach_record(messages, protocol.PROTOTYPES, {protocol.PROTOTYPE_MATRIX: prototypes.astype(np.float32),
                                                      protocol.PROTOTYPE_PRESENT: has.astype(np.float32)})
    return messages


def reweight_replies(replies: list[Message], weights: list[float], key: str) -> None:
    """Replace each reply's weighting metric, so Flower's weighted mean uses our weights."""
    for message, weight in zip(replies, weights):
        message.content["metrics"][key] = float(weight)


def attribute_errors(replies: Iterable[Message], sent: list[Message]) -> list[Message]:
    """Replies with the sender they stand for.

    For a node it cannot reach, the SuperLink answers itself: the error reply carries the
    SuperLink's id as sender. It is matched to the message it answers (the message id the grid
    set on sending) and given that message's destination, so the failure names the site.
    """
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    replies = list(replies)
    for reply in replies:
        node = destination.get(reply.metadata.reply_to_message_id)
        if node is not None and reply.metadata.src_node_id != node:
            reply.metadata.__dict__["_src_node_id"] = node
    return replies


class _OrderedGrid:
    """A view of a Grid whose node ids come in partition order."""

    def __init__(self, grid: Grid, order: dict[int, int]) -> None:
        self._grid = grid
        self._order = order

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=lambda nid: (self._order.get(nid, 1 << 62), nid))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@contextlib.contextmanager
def _seeded_random(*key: int) -> Iterator[None]:
    saved = random.getstate()
    random.seed(hash(key))
    try:
        yield
    finally:
        random.setstate(saved)


class ReproducibleSampling:
    """Mixin placed before a Flower strategy: seeded sampling, ordered aggregation, eval cadence, state."""

    partition_of: dict[int, int]
    seed: int = 0
    client_eval_every: int = 1
    rounds: int = 0
    # Attributes that carry over from one round to the next (numpy arrays, lists or dicts of
    # them, numbers, None); everything else is rebuilt from the config or within a round.
    state_attrs: tuple[str, ...] = ()
    # Extra reply records a coordinate-wise robust rule rewrites too (strategies/robust.py).
    robust_records: tuple[str, ...] = ()
    guard: Any = None  # strategies.guard.ReplyGuard, from bind(); None: a failed client fails the round
    round_start: ArrayRecord | None = None  # the weights this round's train messages carried
    asked: dict[str, list[Message]] = {}  # phase → this round's messages (their ids are set once sent)

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state after a round: ``state_attrs`` by name, and the robust rule's history
        of drops when it keeps one (``strategy.robust.exclude_after``)."""
        state = {name: getattr(self, name) for name in self.state_attrs}
        if self.guard is not None and self.guard.robust.exclude_after:
            state[ROBUST_HISTORY] = {key: list(counts) for key, counts in self.guard.history.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a missing or unknown name is an error."""
        state = dict(state)
        history = state.pop(ROBUST_HISTORY, None)
        if history is not None and self.guard is not None:
            self.guard.history = {str(key): [int(v) for v in counts] for key, counts in history.items()}
        if set(state) != set(self.state_attrs):
            raise ValueError(f"{type(self).__name__} state has {sorted(state)}, expected {sorted(self.state_attrs)}")
        for name, value in state.items():
            setattr(self, name, value)

    def bind(self, ctx: StrategyContext, partition_of: dict[int, int]) -> None:
        """Give the strategy the seed and the node id → partition id map from the hello round."""
        self.partition_of = dict(partition_of)
        self.seed = ctx.seed
        self.client_eval_every = ctx.client_eval_every
        self.rounds = ctx.rounds
        self.guard = ctx.guard

    def _order(self) -> dict[int, int]:
        return getattr(self, "partition_of", {})

    def sort_replies(self, replies: Iterable[Message], fail_on_error: bool = True) -> list[Message]:
        """Replies in partition order, so aggregation sums in the same order every run.

        Without a guard a failed client fails the round: a research run that silently drops
        clients reports numbers for a federation nobody configured (``federation.min_replies``
        says how many a round may lose).
        """
        order = self._order()
        replies = sorted(replies, key=lambda m: order.get(m.metadata.src_node_id, 1 << 62))
        for message in replies if fail_on_error else ():
            if message.has_error():
                pid = order.get(message.metadata.src_node_id, "?")
                raise ClientFailed(f"client (partition {pid}) failed: {error_reason(message)}")
        return replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling, made reproducible."""
        with _seeded_random(self.seed, server_round, 1):
            messages = list(super().configure_train(  # type: ignore[misc]
                server_round, arrays, config, _OrderedGrid(grid, self._order())))
        self.round_start = arrays
        self.asked = {**self.asked, "train": messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Client-side evaluation every ``eval.client_every`` rounds and at the last round."""
        every = self.client_eval_every
        if every <= 0 or (server_round % every and server_round != self.rounds):
            self.asked = {**self.asked, "evaluate": []}  # a round that asks nobody waits for nobody
            return []
        with _seeded_random(self.seed, server_round, 2):
            messages = list(super().configure_evaluate(  # type: ignore[misc]
                server_round, arrays, config, _OrderedGrid(grid, self._order())))
        self.asked = {**self.asked, "evaluate": messages}
        return messages

    def _asked_nodes(self, phase: str) -> list[int]:
        return [m.metadata.dst_node_id for m in self.asked.get(phase, [])]

    def reply_records(self, weights: Signature | None) -> dict[str, Signature | None]:
        """The records a train reply carries besides weights and metrics, with their signatures (None: any)."""
        return {}

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that may be aggregated, in partition order: validated, counted, robust rule applied."""
        replies = self.sort_replies(attribute_errors(replies, self.asked.get("train", [])),
                                    fail_on_error=self.guard is None)
        if self.guard is None:
            return replies
        weights = None if self.round_start is None else signature(self.round_start)
        extras = self.reply_records(weights)
        key = self.weighted_by_key  # type: ignore[attr-defined]
        valid = self.guard.screen(server_round, "train", replies, self._asked_nodes("train"), self._order(),
                                  lambda m: reply_problem(m.content, weights, extras, key), self.round_start)
        return self.guard.apply_robust(server_round, valid, self.round_start, self._order(), self.robust_records)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies (:meth:`screen_train`), then aggregate what passed."""
        return self.aggregate_screened(server_round, self.screen_train(server_round, replies))

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's own aggregation of screened replies; a strategy that aggregates more overrides it."""
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate in partition order; failed evaluations are recorded like failed training."""
        replies = self.sort_replies(attribute_errors(replies, self.asked.get("evaluate", [])),
                                    fail_on_error=self.guard is None)
        if self.guard is not None:
            replies = self.guard.screen(server_round, "evaluate", replies, self._asked_nodes("evaluate"),
                                        self._order())
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


class RoundOffset(Strategy):
    """Runs a strategy's rounds ``done + 1 .. done + num_rounds`` through Flower's ``start``.

    Flower's ``Strategy.start`` always numbers rounds from 1; a resumed run must give the
    strategy, the clients (seeds, lr schedule) and ``evaluate_fn`` the run's own round
    numbers, and must not evaluate its starting model again (round ``done`` is recorded).
    """

    def __init__(self, strategy: Strategy, done: int) -> None:
        self.strategy = strategy
        self.done = done

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's, at the run's round."""
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's, at the run's round."""
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's, at the run's round."""
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's, at the run's round."""
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)

    def summary(self) -> None:
        """The wrapped strategy's."""
        self.strategy.summary()

    def start(self, *args: Any, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              **kwargs: Any) -> Any:
        """Flower's loop; ``evaluate_fn`` sees the run's round numbers and skips the starting model."""
        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return None if server_round == 0 else evaluate_fn(server_round + self.done, arrays)

        return super().start(*args, evaluate_fn=shifted if evaluate_fn else None, **kwargs)

"""Fake replies and small strategies for aggregation tests (no Flower run needed)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from clients.algorithms.base import ClientRound
from fedimb.config import load_config
from strategies import build_strategy
from strategies.base import StrategyContext


def reply(node_id: int, weights: dict[str, list[float]], n: int, **metrics) -> Message:
    """A train reply from ``node_id`` carrying ``weights`` and ``n`` examples."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}),
        "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5, **metrics}),
    })
    msg = Message(content=content, dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node_id  # a reply as if from this node
    return msg


def round_of(model, start, content, state) -> ClientRound:
    """A client round without data, for hook tests."""
    empty = torch.zeros(0)
    return ClientRound(model, start, content, state, lr=0.1, momentum=0.0, x=empty, y=empty, class_counts=empty)


def make(name: str, **params):
    """Strategy ``name`` bound to four nodes 101..104 = partitions 0..3."""
    cfg = load_config(None, ["data.dataset=digits", f"strategy.name={name}"]
                      + [f"strategy.params.{k}={v}" for k, v in params.items()])
    ctx = StrategyContext(num_clients=4, fraction=1.0, fraction_evaluate=1.0, min_clients=2, seed=0,
                          client_eval_every=1, rounds=3)
    strategy, spec = build_strategy(cfg, ctx)
    strategy.bind(ctx, {101: 0, 102: 1, 103: 2, 104: 3})
    return strategy, spec


def guard(strategy, start: dict[str, list[float]] | None = None, asked: list[int] | None = None, **rules):
    """Put a ReplyGuard (``rules``: min_replies, norm_factor, robust) on ``strategy`` as a run does;
    ``start``: the weights the round started from; ``asked``: the nodes the round's messages went to."""
    from fedimb.failures import FailureLog
    from fedimb.hostile import RobustConfig
    from strategies.guard import ReplyGuard

    robust = rules.pop("robust", {})
    strategy.guard = ReplyGuard(log=FailureLog(), robust=RobustConfig(**robust), **rules)
    if start is not None:
        strategy.round_start = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in start.items()})
    strategy.asked = {"train": [Message(RecordDict(), dst_node_id=n, message_type="train") for n in asked or []]}
    return strategy.guard.log


def error_reply(node_id: int, reason: str) -> Message:
    """An error reply from ``node_id``, as Flower makes one from a ClientApp exception."""
    from flwr.app import Error

    return Message(Error(code=1, reason=reason), reply_to=Message(RecordDict(), dst_node_id=node_id,
                                                                  message_type="train"))

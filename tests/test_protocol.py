"""The wire protocol is defined once, and the library does not import the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedimb import protocol
from fedimb.protocol import derive_seed

ROOT = Path(__file__).resolve().parent.parent


def test_derive_seed_keeps_the_published_streams():
    # the formulas every published run used: seed·a + round·b + partition
    assert derive_seed(3, "train-init", 7, 2) == 3 * 100_003 + 7 * 1_009 + 2
    assert derive_seed(3, "train-batches", 7, 2) == 3 * 1_000_003 + 7 * 10_007 + 2
    assert derive_seed(3, "generator-round", 7, 2) == 3 * 7_919 + 7 * 101 + 2
    assert derive_seed(3, "topup", client=2) == 3 * 31 + 2


def test_unknown_seed_purpose_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown seed purpose 'dropout'.*train-init"):
        derive_seed(0, "dropout")


def test_record_and_metric_keys_are_distinct():
    names = {k: v for k, v in vars(protocol).items() if k.isupper() and isinstance(v, str)}
    records = [protocol.ARRAYS, protocol.METRICS, protocol.CONFIG, protocol.PROTOTYPES, protocol.PROTOTYPE_STATS,
               protocol.CONTROL, protocol.CONTROL_DELTA, protocol.POOL, protocol.GENERATOR, protocol.JUDGE]
    assert len(set(records)) == len(records)
    wire = [v for k, v in names.items() if not k.startswith("NODE_") and v not in records
            and k not in ("HELLO", "SELECT", "GENERATOR_TRAIN", "TOPUP")]
    assert len(set(wire)) == len(wire), sorted(v for v in wire if wire.count(v) > 1)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_library_imports_neither_strategies_nor_clients():
    library = [p for p in (ROOT / "fedimb").rglob("*.py") if "app" not in p.relative_to(ROOT / "fedimb").parts]
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"strategies", "clients"}) for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_assigner_tells_each_message_its_partition_on_its_own_config():
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedimb import protocol
    from fedimb.app.metering import PartitionAssigner

    class Sent:
        def send_and_receive(self, messages, *, timeout=None):
            return list(messages)

    shared = RecordDict({"config": ConfigRecord({"k": 1})})  # Flower's strategies share one record
    messages = [Message(content=shared, dst_node_id=nid, message_type="train") for nid in (907, 12)]
    assigner = PartitionAssigner(Sent())
    assert [m.content is shared for m in assigner.send_and_receive(messages)] == [True, True]  # deployed: as is
    assigner.partition_of = {12: 0, 907: 1}
    out = assigner.send_and_receive(messages)
    assert [m.content["config"][protocol.ASSIGNED_PARTITION] for m in out] == [1, 0]
    assert [m.content["config"]["k"] for m in out] == [1, 1] and protocol.ASSIGNED_PARTITION not in shared["config"]


def test_assigned_hello_by_hand():
    import numpy as np

    from fedimb.app.phases import assigned_hello
    from fedimb.data import FederatedData
    from fedimb.data.datasets import DatasetSplits

    train_x = np.array([-1.0, 0.5, 2.0, 3.0], dtype=np.float32).reshape(4, 1, 1, 1)
    splits = DatasetSplits(train_x, np.array([0, 1, 1, 0]), train_x[:1], np.array([0]), 2, "tiny")
    data = FederatedData(splits, np.arange(4), [np.array([0, 1]), np.array([2])], np.array([[1, 1], [0, 1]]),
                         np.array([], dtype=np.int64))
    from fedimb.config import load_config

    hello = assigned_hello([55, 70], data, load_config(None, ["data.dataset=digits"]))
    assert hello.partition_of == {55: 0, 70: 1} and hello.counts.tolist() == [[1, 1], [0, 1]]
    assert hello.num_examples.tolist() == [2, 1] and hello.input_shape == (1, 1, 1)
    assert hello.value_range == (-1.0, 2.0)  # sample 3 belongs to no client

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

"""Shared fixtures: small configs on data that is on every machine (sklearn digits)."""

from __future__ import annotations

import os

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedimb.config import ExperimentConfig, load_config

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DIGITS_SMALL = [
    "name=digits-test", "data.dataset=digits", "partition.name=dirichlet", "partition.alpha=0.5",
    "partition.min_size=5", "federation.num_clients=4", "federation.rounds=3", "model.name=mlp",
    "train.local_epochs=1", "train.lr=0.05", "train.batch_size=32",
]


@pytest.fixture
def digits_cfg() -> ExperimentConfig:
    """A 4-client, 3-round federation on sklearn digits."""
    return load_config(None, DIGITS_SMALL)


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a running app need an identity."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def assert_quick_start_refused(args: list[str], field: str, out, capsys) -> None:
    """``fedimb run`` of the quick start on digits with ``args`` stops with exit 2 and one line naming
    ``field``, before writing anything to ``out``."""
    from pathlib import Path

    from fedimb.app.cli import main

    quickstart = Path(__file__).resolve().parents[1] / "experiments/quickstart.yaml"
    code = main(["run", str(quickstart), "data.dataset=digits", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"config error: {field}:") and len(err.splitlines()) == 1
    assert not out.exists()

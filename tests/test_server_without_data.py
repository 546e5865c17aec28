"""Every registered strategy and loss, and active learning, with a server that holds no data.

Deployed, the ServerApp learns what it needs from the clients' replies and evaluates through
them; here the same ServerApp runs on Flower's simulation engine with ``holds_dataset=False``
(the clients' side is the same in simulation and deployment but for where a client's data
comes from, which tests/test_deploy.py runs on real SuperNodes).
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from clients.app import app as client_app
from clients.losses import LOSSES
from fedimb.app import server
from fedimb.config import ExperimentConfig, load_config
from strategies import STRATEGIES
from tests.conftest import DIGITS_SMALL

pytestmark = pytest.mark.slow

# every strategy once, every loss at least once beside one of them
PAIRS = list(zip(STRATEGIES, itertools.cycle(LOSSES)))
TINY = ["federation.num_clients=3", "federation.rounds=2", "partition.name=iid"]
# the knobs a strategy learns with in two rounds of this tiny federation
KNOBS = {"fedprox": ["strategy.params.proximal_mu=0.01"], "fedavgm": ["strategy.params.server_momentum=0.5"],
         "fedadam": ["strategy.params.eta=0.01"]}


def run_without_data(cfgs: list[ExperimentConfig], run_dirs: list[Path]) -> dict[Path, str]:
    """Our ServerApp with ``holds_dataset=False`` on Flower's simulation engine, with our ClientApp:
    the federations one after the other on the same virtual nodes (one Ray start for all). Every
    message carries its experiment's config, so the clients follow; a failed federation does not
    stop the next. Returns the run directory → error of each federation that failed."""
    app = ServerApp()
    errors: dict[Path, str] = {}

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for cfg, run_dir in zip(cfgs, run_dirs):
            try:
                server.run_federation(grid, cfg, run_dir, holds_dataset=False)
            except Exception as exc:  # noqa: BLE001 - the test of that federation reports it
                errors[run_dir] = f"{type(exc).__name__}: {exc}"

    run_simulation(server_app=app, client_app=client_app, num_supernodes=cfgs[0].federation.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return errors


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "rounds.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _run_without_data(overrides: list[str], run_dir: Path) -> list[dict[str, str]]:
    errors = run_without_data([load_config(None, DIGITS_SMALL + TINY + overrides)], [run_dir])
    assert not errors, errors
    return _rows(run_dir)


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory) -> tuple[dict[tuple[str, str], Path], dict[Path, str]]:
    """Every (strategy, loss) pair's federation, all in one simulation."""
    root = tmp_path_factory.mktemp("pairs")
    run_dirs = {(s, loss): root / f"{s}-{loss}" for s, loss in PAIRS}
    cfgs = [load_config(None, DIGITS_SMALL + TINY + [f"strategy.name={s}", f"train.loss.name={loss}",
                                                      *KNOBS.get(s, [])]) for s, loss in PAIRS]
    return run_dirs, run_without_data(cfgs, list(run_dirs.values()))


def test_pairs_cover_every_strategy_and_loss():
    assert {s for s, _ in PAIRS} == set(STRATEGIES) and {loss for _, loss in PAIRS} == set(LOSSES)


@pytest.mark.parametrize("strategy, loss", PAIRS, ids=[f"{s}-{loss}" for s, loss in PAIRS])
def test_each_strategy_learns_with_a_server_that_holds_no_data(strategy, loss, pair_runs):
    run_dirs, errors = pair_runs
    run_dir = run_dirs[(strategy, loss)]
    assert run_dir not in errors, errors[run_dir]
    rows = _rows(run_dir)
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[-1]["balanced_accuracy"]) > 0.4  # 10 classes: chance is 0.1
    assert json.loads((run_dir / "summary.json").read_text())["evaluation"] == "federated"


def test_active_learning_with_a_server_that_holds_no_data(tmp_path):
    rows = _run_without_data(["active_learning.enabled=true", "active_learning.steps=1",
                              "active_learning.rounds_per_step=1"], tmp_path / "run")  # two stages of one round
    assert [int(r["round"]) for r in rows] == [1, 2]
    with open(tmp_path / "run" / "fal.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    assert int(steps[0]["labelled_after"]) > 0  # the sites' own labels answered the query

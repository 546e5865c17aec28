"""``fedimb sweep`` and ``fedimb report`` on a tiny real grid (digits, 2 methods; the plan with 2 seeds)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedimb.app.cli import main
from fedimb.config import ConfigError, to_yaml
from fedimb.app.sweep import is_finished, plan_sweep

SUITE = """
base: base.yaml
seeds: [0, 1]
overrides: [federation.rounds=1]
axes:
  method:
    fedavg: [strategy.name=fedavg]
    fedprox: [strategy.name=fedprox]
"""
BASE = """
name: tiny
data: {dataset: digits}
partition: {name: iid}
federation: {num_clients: 2}
model: {name: mlp}
train: {lr: 0.05}
eval: {client_every: 0}
"""


def write_suite(tmp_path: Path, suite: str = SUITE) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "suite.yaml"
    path.write_text(suite)
    return path


def test_plan_expands_axes_times_seeds(tmp_path):
    runs, out = plan_sweep(write_suite(tmp_path), out=tmp_path / "out")
    assert [r.run_dir.name for r in runs] == ["fedavg-s0", "fedavg-s1", "fedprox-s0", "fedprox-s1"]
    assert runs[2].cfg.strategy.name == "fedprox" and runs[1].cfg.seed == 1
    assert runs[0].cfg.federation.rounds == 1


def test_bad_cell_is_named(tmp_path):
    suite = SUITE.replace("[strategy.name=fedavg]", "[partition.alpha=-1]")
    with pytest.raises(ConfigError, match="in sweep cell fedavg"):
        plan_sweep(write_suite(tmp_path, suite))


@pytest.mark.slow
def test_sweep_then_report(tmp_path, capsys):
    suite = write_suite(tmp_path, SUITE.replace("seeds: [0, 1]", "seeds: [0]"))
    assert main(["sweep", str(suite), "--out", str(tmp_path / "sweep")]) == 0
    for name in ("results.md", "results.csv", "comparison.png"):
        assert (tmp_path / "sweep" / name).is_file(), name
    with open(tmp_path / "sweep" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["method"] for r in rows) == ["fedavg", "fedprox"] and all(r["n"] == "1" for r in rows)
    # a second sweep finds every run done and only rebuilds the report
    assert main(["sweep", str(suite), "--out", str(tmp_path / "sweep")]) == 0
    assert "done before, skipped" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "sweep" / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert "fedprox" in (tmp_path / "report" / "results.md").read_text()


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, monkeypatch, capsys):
    import fedimb.app.simulation as simulation

    real_run = simulation.run_experiment

    def fedprox_fails(cfg, run_dir, **kwargs):
        if cfg.strategy.name == "fedprox":  # stands in for a run that dies mid-way (an actor lost, say)
            raise simulation.RunError("run failed: injected")
        return real_run(cfg, run_dir, **kwargs)

    monkeypatch.setattr(simulation, "run_experiment", fedprox_fails)
    suite = write_suite(tmp_path, SUITE.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "    fedprox: [strategy.name=fedprox]", "    fedprox: [strategy.name=fedprox]\n    fedavg2: [strategy.name=fedavg, train.lr=0.1]"))
    assert main(["sweep", str(suite), "--out", str(tmp_path / "sweep")]) != 0
    err = capsys.readouterr().err
    assert "1 of 3 sweep runs failed (fedprox-s0)" in err
    finished = sorted(p.parent.name for p in (tmp_path / "sweep" / "runs").glob("*/summary.json"))
    assert finished == ["fedavg-s0", "fedavg2-s0"]  # the cell after the failed one still ran
    assert "fedprox" not in (tmp_path / "sweep" / "results.md").read_text()


def test_each_finished_run_is_handed_over_before_the_next_one_starts(tmp_path, monkeypatch):
    import fedimb.app.simulation as simulation
    from fedimb.app.sweep import execute

    def finish_unless_fedprox(cfg, run_dir, **kwargs):  # stands in for training: a run finishes or fails
        if cfg.strategy.name == "fedprox":
            raise simulation.RunError("run failed: injected")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text("{}")

    monkeypatch.setattr(simulation, "run_experiment", finish_unless_fedprox)
    runs, out = plan_sweep(write_suite(tmp_path), out=tmp_path / "out")  # fedavg s0, s1, fedprox s0, s1
    handed: list[tuple[str, list[str]]] = []
    finished, failed = execute(runs, out, on_finished=lambda run: handed.append(
        (run.run_dir.name, sorted(p.parent.name for p in out.glob("runs/*/summary.json")))))
    # fedavg-s0 is handed over while it is the only finished run; failed runs are not handed over
    assert handed == [("fedavg-s0", ["fedavg-s0"]), ("fedavg-s1", ["fedavg-s0", "fedavg-s1"])]
    assert failed == ["fedprox-s0", "fedprox-s1"] and [r.run_dir.name for r in finished] == ["fedavg-s0", "fedavg-s1"]


def fake_finished(run, cfg) -> None:
    """A run directory as a finished run of ``cfg`` leaves it: its config and a summary."""
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run.run_dir / "summary.json").write_text("{}")


def test_a_finished_run_of_another_config_is_refused_not_reused(tmp_path, capsys):
    runs, _ = plan_sweep(write_suite(tmp_path), out=tmp_path / "out")
    assert not is_finished(runs[0])  # nothing there yet
    old, _ = plan_sweep(write_suite(tmp_path), ["federation.rounds=3"], out=tmp_path / "out")
    fake_finished(runs[0], old[0].cfg)
    with pytest.raises(ConfigError, match="federation.rounds: .*fedavg-s0 finished with 3, this sweep asks for 1"):
        is_finished(runs[0])
    # the sweep stops with that one line before training anything
    assert main(["sweep", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "out")]) != 0
    assert "config error: federation.rounds: " in capsys.readouterr().err
    assert not (runs[1].run_dir / "summary.json").exists()


def test_keys_that_do_not_change_results_do_not_make_a_run_stale(tmp_path):
    runs, _ = plan_sweep(write_suite(tmp_path), out=tmp_path / "out")
    # a disabled synthetic block's knobs, the scheduling and where the data lives
    other, _ = plan_sweep(write_suite(tmp_path), ["synthetic.rounds=9", "simulation.num_cpus=2",
                                                  "data.root=/elsewhere"], out=tmp_path / "out")
    fake_finished(runs[0], other[0].cfg)
    assert is_finished(runs[0])
    # the same knob counts once its block is enabled
    on, _ = plan_sweep(write_suite(tmp_path), ["synthetic.enabled=true", "synthetic.rounds=9"], out=tmp_path / "o2")
    now, _ = plan_sweep(write_suite(tmp_path), ["synthetic.enabled=true"], out=tmp_path / "o2")
    fake_finished(now[0], on[0].cfg)
    with pytest.raises(ConfigError, match="synthetic.rounds"):
        is_finished(now[0])

"""Config merging and the one-line errors of bad input (exit code 2, before any work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedimb.app.cli import main
from fedimb.config import ConfigError, from_yaml, load_config, to_yaml
from fedimb.app.sweep import plan_sweep

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml")) + [ROOT / "experiments/niid_bench/base.yaml"]
SUITES = sorted((ROOT / "experiments/suites").glob("*.yaml"))


def test_yaml_and_overrides_merge():
    cfg = load_config(ROOT / "experiments/quickstart.yaml", ["partition.alpha=0.3", "federation.rounds=2",
                                                              "strategy.params.proximal_mu=0.1"])
    assert cfg.partition.alpha == 0.3 and cfg.federation.rounds == 2
    assert cfg.strategy.params == {"proximal_mu": 0.1}
    assert cfg.data.dataset == "fmnist"  # from the YAML
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_load(path):
    assert load_config(path).federation.num_clients > 0


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_shipped_suites_plan_every_cell(path, tmp_path):
    runs, _ = plan_sweep(path, [], tmp_path)
    assert runs and len({r.run_dir for r in runs}) == len(runs)


@pytest.mark.parametrize("override, field, hint", [
    ("partition.alph=1", "partition.alph", "allowed keys here: name, alpha"),
    ("nonsense=1", "nonsense", "allowed keys here"),
    ("partition.alpha=abc", "partition.alpha", "Float"),
    ("partition.alpha=0", "partition.alpha", "> 0"),
    ("partition.alpha=-1", "partition.alpha", "> 0"),
    ("imbalance.factor=0.5", "imbalance.factor", ">= 1"),
    ("partition.name=zipf", "partition.name", "dir_balance"),
    ("federation.fraction=1.5", "federation.fraction", "(0, 1]"),
    ("data.dataset=cifar", "data.dataset", "fmnist, digits"),
    ("train.lr", "train.lr", "key=value"),
    ("train.lr_decay_at=[0.5,1.5]", "train.lr_decay_at", "(0, 1)"),
])
def test_bad_values_name_the_field(override, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "experiments/quickstart.yaml", [override])
    assert err.value.field_name == field
    assert hint in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, field", [
    (["strategy.name=fedsgd"], "strategy.name"),
    (["strategy.name=fedprox", "strategy.params.mu=1"], "strategy.params.mu"),
    (["model.name=vgg"], "model.name"),
    (["train.loss.name=hinge"], "train.loss.name"),
    (["federation.num_clients=5000"], "federation.num_clients"),
    (["partition.alpha=0.001", "partition.min_size=100", "federation.num_clients=20"], "partition.alpha"),
    (["data.dataset=fmnist", "data.root=/nonexistent/fmnist"], "data.root"),
])
def test_cli_rejects_before_any_work(args, field, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "experiments/quickstart.yaml"), "data.dataset=digits", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert field in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing started


def test_cli_exit_code_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedimb.app.cli", "run", str(ROOT / "experiments/quickstart.yaml"),
                           "strategy.name=nope"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "strategy.name" in proc.stderr and "Traceback" not in proc.stderr


def test_benchmark_scripts_answer_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/synthetic.py"), "--suite", "nope.yaml",
                           "--doc", str(tmp_path / "page.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "suite" in proc.stderr and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "page.md").exists()


def test_partition_command_prints_table_and_writes_heatmap(tmp_path, capsys):
    png = tmp_path / "p.png"
    code = main(["partition", str(ROOT / "experiments/quickstart.yaml"), "data.dataset=digits",
                 "federation.num_clients=5", "partition.min_size=5", "--out", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and png.stat().st_size > 1000
    assert "IR" in out and "TV" in out


def test_round_lr_steps_down_after_each_milestone():
    from clients.trainer import round_lr

    train = load_config(ROOT / "experiments/fal_fmnist.yaml").train  # lr 0.01, decay ×0.1 after 75%
    assert [round_lr(train, r, 100) for r in (1, 75)] == [0.01, 0.01]
    assert round_lr(train, 76, 100) == pytest.approx(0.001)
    two = load_config(ROOT / "experiments/quickstart.yaml", ["train.lr=1", "train.lr_decay_at=[0.5,0.8]",
                                                             "train.lr_decay_factor=0.5"]).train
    assert [round_lr(two, r, 10) for r in (5, 6, 8, 9)] == [1.0, 0.5, 0.5, 0.25]


def test_the_closing_table_says_what_the_final_metrics_were_scored_on(capsys):
    from fedimb.app.cli import print_summary, summary_title

    base = {"final": {"balanced_accuracy": 0.5}, "best": {"balanced_accuracy": 0.6}, "wall_time_s": 1.0}
    assert summary_title({**base, "evaluation": "central"}) == "final metrics (balanced test set)"
    assert "local test splits" in summary_title({**base, "evaluation": "federated"})
    held_out = {**base, "evaluation": "central", "test": {"balanced_accuracy": 0.4321}}
    assert summary_title(held_out).startswith("final metrics (validation split")
    print_summary(held_out)
    assert "test_balanced_accuracy" in capsys.readouterr().out.replace("\n", "")

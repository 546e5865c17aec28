"""GPUs through Ray: each client on the GPU Ray assigned it, the CPU fallback, the check before a run.

There is no GPU on the machine the suite was written on, so the federation test declares two to
Ray (``simulation.ray_num_gpus``): Ray places the clients' actors on GPU ids 0 and 1 exactly as on
real cards, CUDA cannot use them, and ``device=auto`` trains on the CPU. On a GPU machine the same
tests pass: ids beyond the machine's cards are as unusable to CUDA as any id here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from clients.device import _warn_cpu_fallback, cuda_index, pick_device, ray_gpu_ids
from fedimb import protocol
from fedimb.app.gpus import GPU_COLUMN, check_ray_gpus, clients_per_gpu, local_gpus
from fedimb.app.simulation import backend_config, run_experiment
from fedimb.config import load_config
from fedimb.errors import ConfigError
from tests.conftest import DIGITS_SMALL

ROOT = Path(__file__).resolve().parent.parent
NO_SUCH_GPU = 4096  # an id no machine's CUDA can use, with or without cards


def test_cuda_index_follows_what_ray_left_visible():
    assert cuda_index([1], "1") == 0  # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned id
    assert cuda_index([3, 5], "3,5") == 0
    assert cuda_index([5], "3,5") == 1
    assert cuda_index([2], None) == 2  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the id is torch's index
    assert cuda_index([], None) == 0


def test_cpu_is_the_cpu_and_outside_ray_no_gpu_is_assigned():
    assert pick_device("cpu", [0]) == torch.device("cpu")
    assert ray_gpu_ids() == []  # the test process is no Ray actor
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_auto_falls_back_to_the_cpu_with_one_warning(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _warn_cpu_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match=f"Ray assigned GPU {NO_SUCH_GPU} .* training on the CPU"):
        assert pick_device("auto", [NO_SUCH_GPU]) == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick_device("auto", [NO_SUCH_GPU]) == torch.device("cpu")  # once per process


def test_cuda_without_a_usable_gpu_fails_in_one_line(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError, match=f"simulation.device=cuda but no GPU is usable .*Ray assigned GPU "
                                           f"{NO_SUCH_GPU}") as err:
        pick_device("cuda", [NO_SUCH_GPU])
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_machine_the_assigned_card_is_used(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    last = torch.cuda.device_count() - 1
    assert pick_device("cuda", [last]) == torch.device("cuda", last)
    assert pick_device("auto", [last]) == torch.device("cuda", last)


def _sim(*overrides: str):
    return load_config(None, DIGITS_SMALL + list(overrides)).simulation


def test_num_gpus_without_a_gpu_known_to_ray_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # Ray, like CUDA, then sees no GPU on any machine
    assert local_gpus() == 0
    with pytest.raises(ConfigError, match=r"simulation.num_gpus: 0.25 per client but Ray knows no GPU on this "
                                          r"machine; .*simulation.ray_num_gpus=N"):
        check_ray_gpus(_sim("simulation.num_gpus=0.25"))
    check_ray_gpus(_sim("simulation.num_gpus=0.25", "simulation.ray_num_gpus=1"))  # declared: fine
    with pytest.raises(ConfigError, match=r"simulation.num_gpus: 3 per client but no Ray node has more than 2"):
        check_ray_gpus(_sim("simulation.num_gpus=3", "simulation.ray_num_gpus=2"))
    with pytest.raises(ConfigError, match="simulation.num_gpus: > 0 but simulation.device=cpu"):
        check_ray_gpus(_sim("simulation.num_gpus=1", "simulation.ray_num_gpus=1", "simulation.device=cpu"))


def test_declared_gpus_go_to_the_ray_this_run_starts_only():
    cfg = load_config(None, DIGITS_SMALL + ["simulation.num_gpus=0.5", "simulation.ray_num_gpus=2"])
    assert backend_config(cfg)["init_args"]["num_gpus"] == 2
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.5
    assert "num_gpus" not in backend_config(load_config(None, DIGITS_SMALL))["init_args"]  # detect
    with pytest.raises(ConfigError, match="simulation.ray_num_gpus: must be 0 with simulation.ray_address"):
        load_config(None, DIGITS_SMALL + ["simulation.ray_address=127.0.0.1:6379", "simulation.ray_num_gpus=1"])
    with pytest.raises(ConfigError, match="simulation.ray_num_gpus: must be >= 0"):
        load_config(None, DIGITS_SMALL + ["simulation.ray_num_gpus=-1"])


def test_clients_are_counted_per_gpu_id():
    def reply(ids: list[int]) -> RecordDict:
        return RecordDict({protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 1, protocol.GPU_IDS: ids})})

    assert clients_per_gpu([reply([1]), reply([0]), reply([1]), reply([0, 1])]) == [2, 3]
    assert clients_per_gpu([reply([]), reply([])]) == []  # a CPU run adds no column


def test_cli_refuses_num_gpus_without_a_gpu_with_exit_code_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "fedimb.app.cli", "run", str(ROOT / "experiments/quickstart.yaml"),
               *DIGITS_SMALL, "simulation.num_gpus=0.5", "--out", str(tmp_path / "r")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "simulation.num_gpus" in lines[0] and "Ray knows no GPU" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_clients_spread_over_the_gpus_ray_assigned(tmp_path, monkeypatch):
    # two declared GPUs, half a GPU and half a CPU per client: four actors, two on each GPU id
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # Ray would cap the declared GPUs to it
    cfg = load_config(None, DIGITS_SMALL + ["federation.rounds=1", "simulation.num_gpus=0.5",
                                            "simulation.num_cpus=0.5", "simulation.ray_num_gpus=2"])
    run_experiment(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "rounds.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["round"] != "0"]
    per_round = [[int(r[f"{GPU_COLUMN}_{i}"] or 0) for i in (0, 1)] for r in rows]
    assert len(per_round) == 1
    assert all(sum(counts) == 4 for counts in per_round), per_round  # every client reported one GPU id
    assert all(total > 0 for total in map(sum, zip(*per_round))), per_round  # both GPU ids trained

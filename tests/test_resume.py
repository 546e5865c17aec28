"""Resumable runs: per-round checkpoints, strategy state, ``fedimb run --resume``."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

import fedimb.app.phases
from fedimb.checkpoint import (CHECKPOINT_FILE, Checkpoint, config_digest, load_checkpoint, resume_blocker,
                               save_checkpoint, written_for)
from fedimb.app.cli import main
from fedimb.app.phases import cannot_resume
from fedimb.config import load_config, to_yaml
from fedimb.records import RunRecorder, read_rounds_csv
from fedimb.app.simulation import run_experiment
from strategies import STRATEGIES
from strategies.base import RoundOffset
from tests.conftest import DIGITS_SMALL
from tests.fakes import make, reply

NODES = {101: 0, 102: 1, 103: 2, 104: 3}


class FakeGrid:
    """Enough of a Grid for configure_train."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _replies(name: str, server_round: int, arrays: ArrayRecord) -> list:
    """Train replies with everything any strategy reads; values depend on (round, partition)."""
    out = []
    for nid, pid in NODES.items():
        rng = np.random.default_rng([server_round, pid])
        weights = {k: (v.numpy() + rng.normal(0, 0.1, v.numpy().shape)).astype(np.float32).tolist()
                   for k, v in arrays.items()}
        msg = reply(nid, weights, 10 + 5 * pid, **{"climb-loss": float(rng.uniform(0.5, 2.0)),
                                                     "confidence": float(rng.uniform(0.3, 0.9)),
                                                     "fednova-a": float(rng.uniform(2.0, 6.0))})
        algorithm = STRATEGIES[name].client_algorithm
        if algorithm == "prototypes":
            msg.content["proto-stats"] = ArrayRecord({
                "protos": torch.from_numpy(rng.normal(size=(3, 2)).astype(np.float32)),
                "counts": torch.tensor([5.0, float(pid), 0.0 if pid % 2 else 2.0]),
                "uncertainty": torch.from_numpy(rng.uniform(0, 1, 3).astype(np.float32)),
                "dispersion": torch.from_numpy(rng.uniform(0, 1, 3).astype(np.float32)),
                "synthetic": torch.tensor([0.0, 1.0, 3.0]),
                "quality": torch.from_numpy(rng.uniform(0.5, 1, 3).astype(np.float32))})
        if algorithm == "fedproto":  # prototypes and counts only, no weights
            msg.content["arrays"] = ArrayRecord()
            msg.content["proto-stats"] = ArrayRecord({
                "protos": torch.from_numpy(rng.normal(size=(3, 2)).astype(np.float32)),
                "counts": torch.tensor([5.0, float(pid), 0.0 if pid % 2 else 2.0])})
        if algorithm == "scaffold":
            msg.content["control-delta"] = ArrayRecord(
                {k: torch.from_numpy(rng.normal(size=v.numpy().shape).astype(np.float32)) for k, v in arrays.items()})
        out.append(msg)
    return out


def _round(strategy, name: str, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid()))
    new, _ = strategy.aggregate_train(server_round, _replies(name, server_round, arrays))
    return new


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_state_survives_a_checkpoint_exactly(name, tmp_path):
    # Round 3 of a restored strategy (fresh object + checkpoint) equals round 3 of the original.
    strategy, _ = make(name)
    arrays = ArrayRecord({"w": Array(np.array([0.5, -1.0, 2.0], dtype=np.float32))})
    for server_round in (1, 2):
        arrays = _round(strategy, name, server_round, arrays)
    save_checkpoint(tmp_path, Checkpoint(round=2, config_sha256="x", arrays={k: v.numpy() for k, v in arrays.items()},
                                         rows=[], strategy_state=strategy.state_dict()))
    loaded = load_checkpoint(tmp_path)
    restored, _ = make(name)
    restored.load_state_dict(loaded.strategy_state)
    resumed_arrays = ArrayRecord({k: Array(v) for k, v in loaded.arrays.items()})

    expected = _round(strategy, name, 3, arrays)
    offset = RoundOffset(restored, 2)  # the resumed run's loop says round 1; the strategy must see round 3
    list(offset.configure_train(1, resumed_arrays, ConfigRecord(), FakeGrid()))
    got, _ = offset.aggregate_train(1, _replies(name, 3, resumed_arrays))
    assert set(got) == set(expected) and all(np.array_equal(got[k].numpy(), expected[k].numpy()) for k in got)
    assert _same(vars(restored), vars(strategy))  # every attribute, so a state left out of state_attrs shows


def _same(a, b) -> bool:
    """Exact equality of nested state (dicts, lists, arrays, ArrayRecords, None, plain values)."""
    if isinstance(a, ArrayRecord):
        return isinstance(b, ArrayRecord) and _same({k: v.numpy() for k, v in a.items()},
                                                    {k: v.numpy() for k, v in b.items()})
    if isinstance(a, Message):  # the round's outgoing messages: the same when sent to the same node alike
        return isinstance(b, Message) and (a.metadata.dst_node_id, a.metadata.message_type) == (
            b.metadata.dst_node_id, b.metadata.message_type) and _same(dict(a.content), dict(b.content))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_stateful_strategies_name_their_state():
    assert make("fedavgm")[0].state_attrs == ("momentum_vector",)
    assert set(make("fedadam")[0].state_attrs) == {"m_t", "v_t"}
    assert set(make("cafedcl")[0].state_attrs) == {"prototypes", "has"}
    assert make("climb")[0].state_attrs == ("lambdas",)
    with pytest.raises(ValueError, match="expected"):
        make("fedavgm")[0].load_state_dict({})


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    rows = [{"round": 0, "wall_time_s": 0.1, "accuracy": 0.5, "per_class_recall": [0.1, float("nan")]}]
    state = {"m": [np.arange(3, dtype=np.float32), None], "d": {"a": np.array([True, False])}, "x": np.float64(2.5)}
    save_checkpoint(tmp_path, Checkpoint(round=1, config_sha256="abc", arrays={"w": np.ones((2, 2), np.float32)},
                                         rows=rows, pending={"train_loss": 0.25}, strategy_state=state, elapsed_s=3.0))
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 1 and loaded.elapsed_s == 3.0 and loaded.pending == {"train_loss": 0.25}
    assert loaded.arrays["w"].dtype == np.float32 and np.array_equal(loaded.arrays["w"], np.ones((2, 2)))
    assert np.array_equal(loaded.strategy_state["m"][0], np.arange(3)) and loaded.strategy_state["m"][1] is None
    assert loaded.strategy_state["d"]["a"].dtype == bool and loaded.strategy_state["x"] == 2.5
    assert loaded.rows[0]["accuracy"] == 0.5 and math.isnan(loaded.rows[0]["per_class_recall"][1])
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_recorder_restore_drops_rows_after_the_checkpoint(tmp_path):
    recorder = RunRecorder(tmp_path)
    for r in range(3):
        recorder.log_round(r, {"accuracy": 0.1 * r, "per_class_recall": [0.5, 0.6]})
    kept = recorder.rounds[:2]
    again = RunRecorder(tmp_path)
    again.restore(kept, elapsed_s=100.0)
    assert [row["round"] for row in read_rounds_csv(tmp_path / "rounds.csv")] == [0.0, 1.0]
    assert again.elapsed() >= 100.0
    again.log_round(2, {"accuracy": 0.2, "per_class_recall": [0.5, 0.6]})
    assert list(read_rounds_csv(tmp_path / "rounds.csv")[-1]) == ["round", "wall_time_s", "accuracy",
                                                                  "per_class_recall_0", "per_class_recall_1"]


def test_only_client_state_blocks_resume():
    blocked = {name for name in STRATEGIES
               if cannot_resume(load_config(None, DIGITS_SMALL + [f"strategy.name={name}"]))}
    assert blocked == {"scaffold", "fedproto"}
    assert "active_learning" in cannot_resume(load_config(None, DIGITS_SMALL + ["active_learning.enabled=true"]))
    assert resume_blocker(load_config(None, DIGITS_SMALL), keeps_client_state=True) is not None


def _run_dir(tmp_path: Path, overrides: list[str] = ()) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config(None, DIGITS_SMALL + list(overrides))))
    return run_dir


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_resume_of_a_finished_run_does_no_work(tmp_path, capsys, monkeypatch):
    run_dir = _run_dir(tmp_path)
    (run_dir / "summary.json").write_text(json.dumps({"final": {"accuracy": 0.9123}}))
    monkeypatch.setattr("fedimb.app.simulation.run_experiment", lambda *a, **k: pytest.fail("must not run"))
    assert main(["run", "--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "run finished" in err and "final accuracy 0.9123" in err


def test_resume_without_config_yaml_is_one_line_exit_2(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert _one_line_error(capsys).startswith("--resume: no config.yaml in")


@pytest.mark.parametrize("overrides, line", [
    (["strategy.name=scaffold"], "--resume: strategy 'scaffold' keeps client state and cannot resume; rerun it"),
    (["active_learning.enabled=true"], "--resume: active_learning runs keep client state"),
])
def test_resume_refuses_client_state(overrides, line, tmp_path, capsys):
    assert main(["run", "--resume", str(_run_dir(tmp_path, overrides))]) == 2
    assert _one_line_error(capsys).startswith(line)


def test_resume_refuses_overrides_and_a_changed_config(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    assert main(["run", "--resume", str(run_dir), "seed=1"]) == 2
    assert "takes only the run directory" in _one_line_error(capsys)
    other = load_config(None, DIGITS_SMALL + ["seed=1"])
    save_checkpoint(run_dir, Checkpoint(round=1, config_sha256=config_digest(other), arrays={}, rows=[]))
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "changed since" in _one_line_error(capsys)


def test_run_without_config_or_resume_is_exit_2(capsys):
    assert main(["run"]) == 2
    assert "--resume RUN_DIR" in _one_line_error(capsys)


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "rounds.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(fh)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy.name=cafedcl"]], ids=["cafedcl"])
def test_interrupted_then_resumed_equals_uninterrupted(strategy, tmp_path, monkeypatch, capsys):
    # cafedcl only: it runs fedavg's pipeline plus server state (prototypes); the fast tests
    # already check every strategy's state round trip, so a fedavg case would only add a minute.
    # One uninterrupted run; a copy of its directory taken right after round 2's checkpoint is
    # what a run killed at that moment leaves behind. Resuming the copy must give the same rows.
    cfg = load_config(None, DIGITS_SMALL + ["federation.rounds=4"] + strategy)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    save = fedimb.app.phases.save_checkpoint

    def save_and_copy(run_dir: Path, checkpoint: Checkpoint) -> Path:
        path = save(run_dir, checkpoint)
        if checkpoint.round == 2:
            shutil.copytree(run_dir, cut)
        return path

    monkeypatch.setattr(fedimb.app.phases, "save_checkpoint", save_and_copy)
    run_experiment(cfg, whole)
    monkeypatch.undo()
    assert not (cut / "summary.json").exists() and load_checkpoint(cut).round == 2
    assert [r["round"] for r in metric_rows(cut)] == ["0", "1", "2"]

    assert main(["run", "--resume", str(cut)]) == 0
    assert "after round 2 of 4" in capsys.readouterr().err
    assert metric_rows(cut) == metric_rows(whole)
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (cut, whole))
    assert summary["final"] == reference["final"] and summary["best"] == reference["best"]
    assert (cut / "curves.png").is_file() and not list(cut.glob("*.tmp*"))
    assert main(["run", "--resume", str(cut)]) == 0  # finished now: nothing to do
    assert "run finished" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_new_config_key_still_resumes(tmp_path, capsys):
    """Keys added to the schema since (at their defaults) do not make an old run unresumable."""
    run_dir = _run_dir(tmp_path)
    cfg = load_config(run_dir / "config.yaml")
    # The run as an older fedimb wrote it: its config.yaml lacks a key today's schema has.
    old_text = "\n".join(line for line in (run_dir / "config.yaml").read_text().splitlines()
                         if not line.strip().startswith("prediction:")) + "\n"
    assert old_text != (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(old_text)
    checkpoint = Checkpoint(round=1, config_sha256=hashlib.sha256(old_text.encode()).hexdigest(), arrays={}, rows=[])
    assert written_for(checkpoint, cfg, run_dir)
    # A real change to the run is still refused.
    assert not written_for(checkpoint, load_config(None, DIGITS_SMALL + ["seed=1"]), run_dir)
    (run_dir / "config.yaml").write_text(old_text.replace("seed: 0", "seed: 1"))
    assert not written_for(checkpoint, cfg, run_dir)  # the file is no longer the one the checkpoint hashed

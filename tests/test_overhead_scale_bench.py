"""The overhead, scale and GPU benchmarks: their pages from records, and (slow) one tiny real run."""

from __future__ import annotations

import gzip
import json

import pytest

from fedimb.app.bench import load_benchmark

TIMED = ("process_s", "fixed_s", "rounds_s", "end_s", "round_ends_s", "peak_rss_bytes", "peak_pss_bytes",
         "peak_processes", "load_before", "exit_code", "command", "accuracy")
HEADER = {"command": "fedimb bench overhead", "args": [], "written": "2026-01-01 00:00", "machine": "test, 2 cores",
          "cores": 2, "memory_bytes": 24 * 1024**3, "config": "experiments/quickstart.yaml", "overrides": [],
          "per_round": 100}


def _measured(side: str, fixed: float, seconds: float, rss: float = 1e9, **fields) -> dict:
    return {"side": side, "exit_code": 0, "process_s": fixed + seconds + 1, "fixed_s": fixed, "rounds_s": seconds,
            "end_s": 1.0, "round_ends_s": [fixed, fixed + seconds / 2, fixed + seconds], "peak_rss_bytes": rss,
            "peak_pss_bytes": rss / 2, "peak_processes": 3, "load_before": 0.5, "accuracy": 0.5, **fields}


def _overhead_records(fedimb_fixed: float) -> list[dict]:
    out = []
    for w, epochs in (("3x1", 1), ("1x10", 10)):
        rounds = {"bare": 10.0 * epochs, "plain": 12.0 * epochs, "fedimb": 5.0 * epochs}
        fixed = {"bare": 2.0, "plain": 10.0, "fedimb": fedimb_fixed}
        out += [_measured(s, fixed[s], rounds[s], workload=w, local_epochs=epochs, rounds=int(w[0]), num_clients=10)
                for s in ("bare", "plain", "fedimb")]
    return out


def test_overhead_floors_follow_the_records():
    bench = load_benchmark("overhead")
    text, floor_text = bench.build_page(HEADER, _overhead_records(fedimb_fixed=12.0), "overhead", "")
    assert "All floors hold: yes." in text
    assert "| 1x10 | rounds' throughput, fedimb ÷ bare PyTorch loop | 2.00 | >= 1.9 | yes |" in floor_text
    assert "| 3x1 | rounds' throughput, fedimb ÷ plain Flower app | 2.40 | >= 2 | yes |" in floor_text
    text, floor_text = bench.build_page(HEADER, _overhead_records(fedimb_fixed=14.0), "overhead", "")
    assert "| 3x1 | fixed cost, fedimb ÷ plain Flower app | 1.40 | <= 1.3 | no |" in floor_text
    assert "All floors hold: no." in text


def test_overhead_page_says_what_it_cannot_check():
    bench = load_benchmark("overhead")
    records = [r for r in _overhead_records(12.0) if r["workload"] == "3x1"]
    records[1].update(exit_code=1, fixed_s=None, rounds_s=None, end_s=None, round_ends_s=None, accuracy=None)
    text, _ = bench.build_page(HEADER, records, "overhead", "")
    assert "| plain Flower app | 23.0 | – | – |" in text and "failed (exit 1)" in text
    assert ("Not measured in these records: fixed cost, throughput with 10 local epochs, throughput with 1 local "
            "epoch") in text
    assert "All floors hold: not all measured." in text


def test_scale_samples_per_round_and_checks_its_floors():
    bench = load_benchmark("scale")
    overrides = bench.size_overrides(10_000, 100, 3, [])
    assert "federation.fraction=0.01" in overrides and "federation.fraction_evaluate=0.01" in overrides
    assert "federation.fraction=1.0" in bench.size_overrides(100, 100, 3, [])
    records = [_measured("plain", 5.0, 10.0, rss=2e9, clients=10_000, per_round=100, rounds=2),
               _measured("fedimb", 6.0, 11.0, rss=2.5e9, clients=10_000, per_round=100, rounds=2),
               {**_measured("fedimb", 0, 0), "clients": 100_000, "per_round": 100, "rounds": 2, "exit_code": 2,
                "fixed_s": None, "round_ends_s": None, "log_tail": ["config error: more clients than samples"]}]
    text, floor_text = bench.build_page(HEADER, records, "scale", "")
    assert "| 10,000 | whole process, fedimb ÷ plain Flower app | 1.12 | <= 1.5 | yes |" in floor_text
    assert "| 10,000 | peak RSS, fedimb ÷ plain Flower app | 1.25 | <= 1.5 | yes |" in floor_text
    assert "| 100,000 | finished, peak RSS (GiB) within this machine's 24.0 | inf | <= 24 | no |" in floor_text
    assert "failed (exit 2): config error: more clients than samples" in text
    assert "All floors hold: no." in text


def _records(path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line]
    return lines[0]["page"], lines[1:]


def _rebuilds_the_same(bench, doc) -> None:
    before = doc.read_bytes()
    assert bench.main(["--from-records", "--doc", str(doc)]) == 0
    assert doc.read_bytes() == before


def test_gpu_page_reads_speed_utilisation_and_placement_from_records():
    bench = load_benchmark("gpu")
    header = {**HEADER, "command": "fedimb bench gpu", "clients": 100, "card": "Test GPU"}
    started = 1000.0
    gpu = _measured("fedimb", 10.0, 8.0, fraction=0.0625, clients=100, rounds=3, local_epochs=1, started=started,
                    round_ends_s=[10.0, 14.0, 16.0, 18.0], clients_per_gpu={"0": 300},
                    # idle while the actors start (before round 1 ends), busy after it
                    gpu_samples=[[started + 12.0, 5.0, 900.0], [started + 15.0, 60.0, 2000.0],
                                 [started + 17.0, 80.0, 2100.0]])
    cpu = _measured("fedimb", 10.0, 16.0, fraction=0.0, clients=100, rounds=3, local_epochs=1, started=started,
                    round_ends_s=[10.0, 16.0, 20.0, 24.0])
    assert bench.utilisation(gpu) == (70.0, 2100.0)
    text, comparison = bench.build_page(header, [gpu, cpu], "gpu", "")
    # 1 round in 2 s after round 1 on the card, 1 in 4 s on the CPU
    assert "| GPU, 0.0625 of the card per client | 10.0 | 4.0 | 0.500 | 2.00 | 70.0 | 2100 | 0: 300 | 50.00 | ok |" \
        in comparison
    assert "| CPU | 10.0 | 6.0 | 0.250 | – | – | – | – | 50.00 | ok |" in comparison
    assert "card: Test GPU" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the GPU sides run on a CUDA machine")
def test_gpu_benchmark_without_cuda_stops_with_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fedimb.app.cli", "bench", "gpu", "--out", str(tmp_path),
                           "--doc", str(tmp_path / "gpu.md")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "gpu.md").exists()
    assert done.stderr.strip().splitlines() == [
        "config error: --fractions: the GPU sides need a CUDA GPU that PyTorch can use, and this machine has none: "
        "run on a GPU machine, or measure the CPU side alone with --fractions"]


@pytest.mark.slow
def test_overhead_runs_each_side_in_its_own_process(tmp_path):
    bench = load_benchmark("overhead")
    doc = tmp_path / "docs" / "overhead.md"
    assert bench.main(["--workloads", "1x1", "--out", str(tmp_path / "out"), "--doc", str(doc),
                       "data.dataset=digits"]) == 0
    header, records = _records(doc.with_suffix("") / "records.jsonl.gz")
    assert header["cores"] and header["memory_bytes"] and header["args"][:2] == ["--workloads", "1x1"]
    assert [(r["workload"], r["side"]) for r in records] == [("1x1", "bare"), ("1x1", "plain"), ("1x1", "fedimb")]
    for r in records:
        assert r["exit_code"] == 0 and all(k in r for k in TIMED), r
        assert len(r["round_ends_s"]) == 2 and r["fixed_s"] > 0 and r["rounds_s"] > 0 and r["peak_rss_bytes"] > 0
    assert {r["side"]: r["peak_processes"] > 1 for r in records} == {"bare": False, "plain": True, "fedimb": True}
    assert "## 1 round x 1 local epoch" in doc.read_text()
    _rebuilds_the_same(bench, doc)

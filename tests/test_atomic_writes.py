"""A writer killed (SIGKILL) at random moments never leaves a half-written record: old or new, whole."""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE = 8 << 20  # large enough that a kill often lands inside a write

WRITER = """
import sys
from pathlib import Path
from fedimb.records import RunRecorder, atomic_write_bytes, atomic_write_json

run_dir, size = Path(sys.argv[1]), int(sys.argv[2])
contents = [bytes([65]) * size, bytes([66]) * size]
recorder = RunRecorder(run_dir)
print("ready", flush=True)
i = 0
while True:
    atomic_write_bytes(run_dir / "big.bin", contents[i % 2])
    recorder.log_round(i, {"accuracy": i / 1000, "per_class_recall": [i % 7] * (1 + i % 5)})
    atomic_write_json(run_dir / "summary.json", {"i": i, "pad": "x" * (size // 64)})
    i += 1
"""


def check_whole(run_dir: Path) -> None:
    big = (run_dir / "big.bin").read_bytes()
    assert big in (b"A" * SIZE, b"B" * SIZE, b"old")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == {"i", "pad"} or summary == {"old": True}
    with open(run_dir / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(None not in row and len(row) == len(rows[0]) for row in rows)


def test_sigkill_mid_write_leaves_old_or_new_content(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"old")
    (tmp_path / "summary.json").write_text(json.dumps({"old": True}))
    (tmp_path / "rounds.csv").write_text("round,accuracy\n0,0.1\n")
    rng = random.Random(0)
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(SIZE)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        check_whole(tmp_path)
    assert (tmp_path / "big.bin").read_bytes() != b"old"  # the writer did get through some writes

"""`flwr run .` on Flower 1.42's managed local SuperLink: the same ServerApp/ClientApp as `fedimb run`.

The run uses a throw-away ``FLWR_HOME`` and its own SuperLink ports, so ``~/.flwr`` and any
other SuperLink are left alone; every process that carries that ``FLWR_HOME`` (SuperLink,
SuperExec, flwr-simulation, Ray) is stopped afterwards, pass or fail.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

from fedimb.app.loopback import pids_with_env, stop_processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NUM_CLIENTS = 2
TINY_YAML = f"""\
name: flwr-run-digits
seed: 0
data:
  dataset: digits
partition:
  name: iid
federation:
  num_clients: {NUM_CLIENTS}
  rounds: 2
model:
  name: mlp
train:
  lr: 0.05
simulation:
  num_cpus: 1
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def flwr_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for the flwr CLI; afterwards, stops every process started under it."""
    home = tmp_path / "flwr-home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FLWR_HOME")}
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` of the FAB's deps
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr spawns `flower-superlink`
    })
    try:
        yield env
    finally:
        stop_processes(pids_with_env(f"FLWR_HOME={home}"))


def _flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the flwr CLI in its own session; on timeout kill it and its children."""
    proc = subprocess.Popen([str(BIN / "flwr"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"flwr {' '.join(args)} timed out after {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_fab_ships_every_module_and_no_federations_table():
    """Flower 1.42 drops ``*_test.py`` / ``test_*.py`` from a FAB and migrates (rewrites) a
    pyproject that still has ``[tool.flwr.federations]``; guard against both."""
    from flwr.cli.build import build_fab_from_disk

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "federations" not in config["tool"]["flwr"]
    names = set(zipfile.ZipFile(BytesIO(build_fab_from_disk(ROOT))).namelist())
    modules = {p.relative_to(ROOT).as_posix() for pkg in ("fedimb", "clients", "strategies")
               for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set(), "modules missing from the FAB (Flower excludes *_test.py, test_*.py)"
    assert "experiments/quickstart.yaml" in names
    # a SuperNode unpacks and hash-checks the FAB per message: no pages, tests or benchmarks in it
    assert not [n for n in names if n.split("/")[0] in ("docs", "tests", "benchmarks")]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(sys.platform != "linux", reason="process clean-up reads /proc")
def test_flwr_run_local_simulation(tmp_path: Path, flwr_env: dict[str, str]):
    config, out = tmp_path / "tiny.yaml", tmp_path / "runs"
    config.write_text(TINY_YAML)
    run_config = tmp_path / "run-config.toml"  # a .toml file: no shell quoting of the paths
    run_config.write_text(f"config = {json.dumps(str(config))}\nout = {json.dumps(str(out))}\n")

    started = time.time()
    result = _flwr(["run", ".", "local", "--run-config", str(run_config),
                    "--federation-config", f"num-supernodes={NUM_CLIENTS} client-resources-num-cpus=1",
                    "--stream"], flwr_env, ROOT, timeout=150)
    log = result.stdout
    print(f"flwr run took {time.time() - started:.1f}s")
    assert result.returncode == 0, log[-4000:]
    run_id = next((line.split()[-1] for line in log.splitlines() if "Successfully started run" in line), None)
    assert run_id, log[-4000:]

    # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink for its status.
    # (cwd=tmp_path: `flwr ls` would migrate a pyproject found in its working directory.)
    status = ""
    for _ in range(30):
        listed = _flwr(["ls", "local", "--format", "json"], flwr_env, tmp_path, timeout=60)
        runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        status = next((r["status"] + " " + r["status-details"] for r in runs if r["run-id"] == run_id), "")
        if status.startswith("finished"):
            break
        time.sleep(1)
    assert status.startswith("finished:completed"), f"{status}\n{log[-4000:]}"

    run_dirs = [p.parent for p in out.glob("*/summary.json")]
    assert len(run_dirs) == 1, (sorted(out.rglob("*")), log[-4000:])
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    with open(run_dirs[0] / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # under `flwr run` the server holds no data unless eval.server_data says so: the rows come
    # from federated evaluation, which starts with the first round
    assert [int(r["round"]) for r in rows] == [1, 2] and summary["evaluation"] == "federated"
    assert summary["final"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert (run_dirs[0] / "partition.json").is_file() and (run_dirs[0] / "config.yaml").is_file()

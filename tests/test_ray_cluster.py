"""``simulation.ray_address``: a federation on a Ray cluster that was running before it, and still is after.

The test starts its own head node (``ray start --head``) on loopback, with its own port and temp
dir, and stops exactly the processes of that cluster: other Rays on the machine (a benchmark's,
another test's) are left alone, so ``ray stop`` (which stops every Ray on the machine) is not used.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedimb.app.gpus import check_ray_gpus
from fedimb.app.simulation import run_experiment
from fedimb.config import load_config
from fedimb.errors import ConfigError
from tests.conftest import DIGITS_SMALL

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's: the cluster's workers import fedimb with it


@dataclass(frozen=True)
class Cluster:
    """A Ray cluster this test started: its GCS port on loopback and its own temp dir."""

    port: int
    temp_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def cluster_processes(cluster: Cluster) -> list[int]:
    """The processes of ``cluster``: those naming its temp dir or its GCS address, and their descendants
    (workers rename themselves ``ray::...``, so only their parent, the raylet, names the cluster)."""
    table = _processes()
    gcs = re.compile(rf"--(gcs-)?address=\S+:{cluster.port}(\s|$)")
    owned = {pid for pid, (_, cmd) in table.items() if str(cluster.temp_dir) in cmd or gcs.search(cmd)}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in owned} - owned
        owned |= children
        grew = bool(children)
    return sorted(owned)


def stop_cluster(cluster: Cluster, grace_s: float = 5.0) -> None:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace_s`` (Ray's GCS may ignore SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_processes(cluster):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while cluster_processes(cluster) and time.monotonic() < deadline:
            time.sleep(0.2)


def ray_cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # nothing points the CLI elsewhere
    return {**env, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    """A one-node Ray cluster on 127.0.0.1 with its own ports and temp dir, stopped afterwards."""
    # Ray's socket paths (temp dir + session name + sockets/...) must stay under 107 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    port = free_port()
    # every port that has a fixed default gets a free one, so another Ray here is not disturbed
    command = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp_dir}",
               "--include-dashboard=false", f"--dashboard-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--num-gpus=0", "--disable-usage-stats"]  # no GPU, even on a machine with one
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=180, env=ray_cli_env())
        yield Cluster(port, temp_dir)
    finally:
        stop_cluster(Cluster(port, temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_status(address: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=120,
                          env=ray_cli_env())


def test_a_federation_joins_a_running_cluster_and_leaves_it_running(ray_cluster, tmp_path):
    cfg = load_config(None, DIGITS_SMALL + ["federation.num_clients=3", "federation.rounds=1",
                                            f"simulation.ray_address={ray_cluster.address}"])
    summary = run_experiment(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "rounds.csv", newline="") as fh:
        assert [row["round"] for row in csv.DictReader(fh)] == ["0", "1"]
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    gpu_cfg = load_config(None, DIGITS_SMALL + ["simulation.num_gpus=0.5",
                                                f"simulation.ray_address={ray_cluster.address}"])
    with pytest.raises(ConfigError, match=f"simulation.num_gpus: 0.5 per client but Ray knows no GPU on the Ray "
                                          f"cluster at {ray_cluster.address}"):
        check_ray_gpus(gpu_cfg.simulation)  # asks the cluster itself, before any work
    status = cluster_status(ray_cluster.address)
    assert status.returncode == 0 and "Active:" in status.stdout, status.stdout + status.stderr
    stop_cluster(ray_cluster)  # what the fixture does anyway: check it leaves nothing behind
    assert cluster_processes(ray_cluster) == []

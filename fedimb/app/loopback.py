"""Rehearse a deployment on one machine: a ``fedimb deploy init`` folder run on loopback.

:class:`LoopbackDeployment` starts the SuperLink as COMMANDS.md does (TLS,
``--enable-supernode-auth``, ``--database``) in a work folder with a private ``FLWR_HOME``,
waits for ``/health``, registers site keys, starts SuperNodes (each in its own process group,
with its own ``--port`` and ``--node-config``, and its warm ``fedimb deploy superexec`` in that
group unless the plan says ``--clientapp flower``), submits an app with ``flwr run APP CONN --format
json`` and polls ``flwr ls`` until the run is ``finished:*``. :meth:`LoopbackDeployment.stop`
stops exactly the process groups it started (and any child that left its group), first
SIGTERM, then SIGKILL. The loopback tests and ``benchmarks/deploy.py`` drive deployments
through it.

The SuperLink listens on the port the deploy folder names (pick a free one for ``deploy init
--port``); a SuperNode gets the port given to :meth:`LoopbackDeployment.start_supernode`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedimb.app.deploy import (FLWR_ENV, DeployPlan, register_command, superexec_command, superlink_command,
                               supernode_command)
from fedimb.app.deploy_run import FlwrCli

BIN = Path(sys.executable).parent
# On one machine the SuperLink and the ServerApp are served before the sites' ClientApp
# processes (ten at once on two cores here); sites on machines of their own never compete
# with them. It does not save the SuperLink's SQLite state (--database) from giving up on a
# lock under that load and losing a site's reply: start_superlink(database=False) does.
SITE_NICENESS = 10


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_env(home: Path) -> dict[str, str]:
    """The environment of every flwr process: a private FLWR_HOME, offline, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FLWR_HOME")}
    env.update(FLWR_ENV)
    env.update({"FLWR_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    return env


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][0] != "Z"
    except OSError:
        return False


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(") ", 1)[-1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds ``entry`` exactly (``KEY=value``)."""
    wanted, pids = entry.encode(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if wanted in (proc / "environ").read_bytes().split(b"\0") and _alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


def stop_processes(pids: Iterable[int], groups: Iterable[int] = (), grace: float = 10.0,
                   reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM the process groups and processes, then SIGKILL whatever is left after ``grace`` seconds."""
    pids, groups = set(pids), list(groups)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        for pgid in groups:
            _signal(pgid, sig, group=True)
        for pid in pids:
            _signal(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and any(_alive(p) for p in pids):
            reap()
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


@dataclass
class Started:
    """One process this harness started, in a process group of its own (or its SuperNode's), logging to ``log``."""

    name: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        """What it has written so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class LoopbackDeployment:
    """Runs a ``deploy init`` folder's commands on this machine; use as a context manager."""

    deploy_dir: Path
    work: Path
    plan: DeployPlan = field(init=False)
    env: dict[str, str] = field(init=False)
    started: list[Started] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deploy_dir = Path(self.deploy_dir).resolve()
        self.work = Path(self.work).resolve()
        self.plan = DeployPlan.read(self.deploy_dir)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        home = self.work / "flwr-home"
        home.mkdir(exist_ok=True)
        # the generated connection entry is the only one: flwr must work from it alone
        (home / "config.toml").write_text((self.deploy_dir / self.plan.flwr_config).read_text())
        self.env = flwr_env(home)

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- processes

    def spawn(self, name: str, cmd: list[str], niceness: int = 0, group: int | None = None) -> Started:
        """Start ``cmd`` in a process group of its own, or in process group ``group`` (``niceness`` added),
        output to ``logs/<name>.log``. Groups stay in this session: a process may join only a group of its own
        session."""
        log = self.work / "logs" / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, cwd=self.work, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=0 if group is None else group,
                                    preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
        started = Started(name, proc, log)
        self.started.append(started)
        return started

    def start_superlink(self, timeout: float = 60.0, database: bool = True) -> Started:
        """The SuperLink as COMMANDS.md starts it (its database in the work folder); waits for /health.

        ``database=False`` keeps its state in memory instead.
        """
        cmd = superlink_command(self.plan, self.deploy_dir)
        at = cmd.index("--database")
        if database:
            cmd[at + 1] = str(self.work / "superlink.db")  # the deploy folder stays as written
        else:
            del cmd[at: at + 2]
        link = self.spawn("superlink", cmd)
        self.wait_health(link, timeout)
        return link

    def health_url(self) -> str:
        """The SuperLink's /health endpoint, dialled at 127.0.0.1 (checks the certificate's IP SAN)."""
        return f"{'http' if self.plan.insecure else 'https'}://127.0.0.1:{self.plan.port}/health"

    def wait_health(self, link: Started, timeout: float) -> None:
        """Until /health answers 200 over TLS with the deployment's CA; raises with the log if not."""
        context = None if self.plan.insecure else ssl.create_default_context(
            cafile=str(self.deploy_dir / str(self.plan.ca)))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if link.proc.poll() is not None:
                raise RuntimeError(f"SuperLink exited with {link.proc.returncode}:\n{link.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.health_url(), context=context, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"SuperLink /health did not answer in {timeout}s:\n{link.output()[-3000:]}")

    def start_supernode(self, site: str, port: int, node_config: str | None = None, root_certificates: bool = True,
                        extra: tuple[str, ...] = ()) -> Started:
        """Site ``site``'s SuperNode as COMMANDS.md starts it, on ``port``; ``node_config`` replaces its own.

        ``root_certificates=False`` leaves out ``--root-certificates`` (the node then trusts only
        the system's CAs, not the deployment's). With the plan's warm ClientApps, its ``fedimb deploy
        superexec`` starts in the SuperNode's process group, so that killing the group ends the site.
        """
        plan = next(s for s in self.plan.sites if s.name == site)
        cmd = supernode_command(self.plan, plan, self.deploy_dir)
        cmd[cmd.index("--port") + 1] = str(port)
        if node_config is not None:
            cmd[cmd.index("--node-config") + 1] = node_config
        if not root_certificates:
            at = cmd.index("--root-certificates")
            del cmd[at: at + 2]
        node = self.spawn(f"supernode-{site}", [*cmd, *extra], niceness=SITE_NICENESS)
        if self.plan.clientapp == "warm":
            self.spawn(f"superexec-{site}", superexec_command(port, node.proc.pid), niceness=SITE_NICENESS,
                       group=node.proc.pid)
        return node

    def start_sites(self, timeout: float = 300.0) -> list[Started]:
        """Register every site of the plan, start its SuperNode on a free port, wait until all are online."""
        nodes = []
        for site in self.plan.sites:
            if not self.plan.insecure:
                done = self.register(site.name)
                if done.returncode != 0:
                    raise RuntimeError(f"flwr supernode register {site.name} failed ({done.returncode}):\n"
                                       f"{done.stdout}\n{done.stderr}")
            nodes.append(self.start_supernode(site.name, free_port()))
        self.wait_online(len(nodes), timeout)
        return nodes

    def leftovers(self) -> list[int]:
        """Live processes carrying this deployment's private FLWR_HOME: only ones started here do."""
        return pids_with_env(f"FLWR_HOME={self.env['FLWR_HOME']}")

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process group started here, and every child that left it; SIGKILL after ``grace``.

        A child started while the others shut down (a SuperExec restarting an app) is found by
        the FLWR_HOME it inherited.
        """
        self._stop_once(grace)
        if self.leftovers():
            self._stop_once(grace)

    def _stop_once(self, grace: float) -> None:
        pids: set[int] = set(self.leftovers())
        groups = [s.proc.pid for s in self.started if s.proc.poll() is None]
        for s in self.started:
            pids.update(descendants(s.proc.pid))
            if s.proc.poll() is None:
                pids.add(s.proc.pid)
        # reaping our own children while waiting, so they do not linger as zombies
        stop_processes(pids, groups, grace, reap=lambda: [s.proc.poll() for s in self.started])
        for s in self.started:
            try:
                s.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    # ---------------------------------------------------------------- the flwr CLI

    @property
    def cli(self) -> FlwrCli:
        """The ``flwr`` command with this deployment's FLWR_HOME and connection."""
        return FlwrCli(self.plan.connection, Path(self.env["FLWR_HOME"]))

    def flwr(self, args: list[str], timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` with this deployment's FLWR_HOME (in the work folder unless ``cwd``)."""
        return self.cli.call(args, timeout=timeout, cwd=cwd or self.work)

    def register(self, site: str) -> subprocess.CompletedProcess:
        """``flwr supernode register`` of one site's public key, as COMMANDS.md does it."""
        plan = next(s for s in self.plan.sites if s.name == site)
        return self.flwr(register_command(self.plan, plan, self.deploy_dir)[1:])

    def supernodes(self) -> list[dict]:
        """``flwr supernode list --format json``: the registered nodes and their status."""
        done = self.flwr(["supernode", "list", self.plan.connection, "--format", "json"])
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode list failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return list(json.loads(done.stdout).get("nodes", []))

    def wait_online(self, count: int, timeout: float = 120.0) -> list[dict]:
        """Until ``count`` registered nodes are online; returns the list."""
        deadline = time.time() + timeout
        while True:
            nodes = self.supernodes()
            online = [n for n in nodes if str(n.get("status", "")).lower() == "online"]
            if len(online) >= count:
                return nodes
            if time.time() > deadline:
                raise RuntimeError(f"{len(online)} of {count} SuperNodes online after {timeout}s: {nodes}")
            time.sleep(2)

    def submit(self, app_dir: Path, run_config: str | None = None) -> int:
        """``flwr run APP_DIR CONN --format json [--run-config ...]``; returns the run id."""
        return self.cli.submit(Path(app_dir), run_config)

    def run_status(self, run_id: int) -> dict:
        """The run's entry of ``flwr ls CONN --run-id ID --format json``."""
        return self.cli.run_status(run_id)

    def wait_finished(self, run_id: int, timeout: float = 600.0) -> dict:
        """Poll until the run's status starts with ``finished:``; returns its entry."""
        return self.cli.wait_finished(run_id, timeout=timeout)

    def logs(self, run_id: int) -> str:
        """``flwr log ID CONN --show``: the run's logs (the ServerApp's output)."""
        return self.cli.logs(run_id)

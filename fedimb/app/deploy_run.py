"""``fedimb deploy run``: submit an experiment to a SuperLink, follow it, and say how it ended.

``flwr run --stream`` exits 0 even when the run failed, so this submits with ``flwr run APP
CONNECTION --format json``, polls ``flwr ls CONNECTION --run-id ID --format json`` until the
status starts with ``finished:``, and exits 0 only on ``finished:completed`` (1 otherwise, with
the SuperLink's reason in one line). The ServerApp writes the run directory on the SuperLink's
machine, under ``--out``: the same records as a simulated run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedimb.app.deploy import FLWR_ENV
from fedimb.config import ConfigError, load_config

console = Console(stderr=True)
APP_ROOT = Path(__file__).resolve().parents[2]  # where pyproject.toml's [tool.flwr.app] lives
FINISHED = "finished:"
COMPLETED = "finished:completed"


class FlwrFailed(RuntimeError):
    """A ``flwr`` command failed; the message holds its output's tail."""


@dataclass
class FlwrCli:
    """The ``flwr`` command of this environment, with a given ``FLWR_HOME`` (None: the user's)."""

    connection: str
    flwr_home: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """The process environment of every ``flwr`` call: offline, and this ``FLWR_HOME``."""
        env = {**os.environ, **FLWR_ENV}
        if self.flwr_home is not None:
            env["FLWR_HOME"] = str(self.flwr_home)
        return env

    def call(self, args: list[str], timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """``flwr ARGS`` in a session of its own, its whole group killed on timeout."""
        flwr = Path(sys.executable).with_name("flwr")
        proc = subprocess.Popen([str(flwr), *args], cwd=cwd, env=self.env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise FlwrFailed(f"flwr {' '.join(args)} timed out after {timeout}s: {(out + err)[-500:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def submit(self, app_dir: Path, run_config: str | None = None) -> int:
        """``flwr run APP_DIR CONNECTION --format json [--run-config ...]``; returns the run id."""
        args = ["run", str(app_dir), self.connection, "--format", "json"]
        if run_config is not None:
            args += ["--run-config", run_config]
        done = self.call(args, timeout=300, cwd=app_dir)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            raise FlwrFailed(f"flwr run failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> dict:
        """The run's entry of ``flwr ls CONNECTION --run-id ID --format json``."""
        done = self.call(["ls", self.connection, "--run-id", str(run_id), "--format", "json"])
        if done.returncode != 0:
            raise FlwrFailed(f"flwr ls failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
        runs = json.loads(done.stdout).get("runs", [])
        return next((r for r in runs if int(r.get("run-id", -1)) == run_id), {})

    def wait_finished(self, run_id: int, timeout: float = 3600.0, poll_s: float = 2.0,
                      max_poll_s: float = 30.0, ended: Callable[[], bool] = lambda: False) -> dict:
        """Poll until the run's status starts with ``finished:``; returns its entry.

        The wait between polls doubles from ``poll_s`` up to ``max_poll_s``: each poll starts a
        ``flwr`` process (about a CPU second) and a TLS session with the SuperLink, which every
        3 s took a third of a core from a machine that also ran the sites. ``ended`` is a cheap
        local sign that the run is over (its summary.json appeared), looked at every second while
        waiting: when it shows, the next poll comes at once and the waits start again from 1 s.
        """
        deadline = time.time() + timeout
        wait_s, sign_seen = poll_s, False
        while True:
            entry = self.run_status(run_id)
            if str(entry.get("status", "")).startswith(FINISHED):
                return entry
            if time.time() > deadline:
                raise FlwrFailed(f"run {run_id} not finished after {timeout:.0f}s: {entry.get('status', '?')}")
            until = min(time.time() + wait_s, deadline + 0.1)
            if not sign_seen and _sleep_until_sign(until, ended):
                sign_seen, wait_s = True, 1.0  # the status follows the summary within seconds
                continue
            time.sleep(max(until - time.time(), 0.0))
            wait_s = min(2 * wait_s, max_poll_s)

    def logs(self, run_id: int) -> str:
        """``flwr log ID CONNECTION --show``: the run's logs (the ServerApp's output)."""
        done = self.call(["log", str(run_id), self.connection, "--show"], timeout=60)
        return done.stdout + done.stderr


def run_config_toml(config: Path, overrides: list[str], out: Path) -> str:
    """The run config the ServerApp reads (``config``, ``overrides``, ``out``), as TOML text."""
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in
                     (("config", str(config.resolve())), ("overrides", " ".join(overrides)),
                      ("out", str(out.absolute())))) + "\n"


def _sleep_until_sign(until: float, sign: Callable[[], bool]) -> bool:
    """Sleep until ``until``, looking at ``sign`` every second; True as soon as it shows."""
    while time.time() < until:
        if sign():
            return True
        time.sleep(min(1.0, max(until - time.time(), 0.0)))
    return False


def summary_written(out: Path, name: str, since: float) -> Callable[[], bool]:
    """Whether a run ``name`` under ``out`` wrote its summary.json after ``since``: the ServerApp's
    last record, seen only where the ServerApp writes on this machine (elsewhere never, and polling decides)."""
    root = out.absolute()

    def written() -> bool:
        return any(p.stat().st_mtime >= since for p in root.glob(f"{name}-*/summary.json"))

    return written


def deploy_run(args: argparse.Namespace) -> int:
    """``fedimb deploy run``: check the config here, submit it, follow it; 0 only when it completed."""
    config = Path(args.config)
    cfg = load_config(config, args.overrides)  # bad input stops here, before anything is submitted
    if args.timeout <= 0:
        raise ConfigError("--timeout", f"must be > 0 seconds, got {args.timeout}")
    cli = FlwrCli(args.connection, Path(args.flwr_home) if args.flwr_home else None)
    submitted = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run_toml = Path(tmp) / "run.toml"
        run_toml.write_text(run_config_toml(config, args.overrides, Path(args.out)))
        run_id = cli.submit(APP_ROOT, str(run_toml))
    console.print(f"[bold]fedimb deploy run[/]: {cfg.name} ({cfg.strategy.name}) is run {run_id} on "
                  f"'{args.connection}'; records under {Path(args.out).absolute()} on the SuperLink's machine",
                  highlight=False, soft_wrap=True)
    entry = cli.wait_finished(run_id, timeout=args.timeout, ended=summary_written(Path(args.out), cfg.name, submitted))
    status = str(entry.get("status", ""))
    if status == COMPLETED:
        console.print(f"run {run_id}: {status}", highlight=False)
        return 0
    details = " ".join(str(entry.get("status-details", "")).split())
    console.print(f"run {run_id}: {status} {details}".rstrip(), highlight=False, soft_wrap=True)
    return 1


def add_run_parser(actions: argparse._SubParsersAction) -> None:
    """Register ``deploy run`` under ``fedimb deploy``."""
    run = actions.add_parser("run", help="submit an experiment to a SuperLink, follow it; exit 0 only when it "
                                         "finished:completed")
    run.add_argument("config", help="experiment YAML")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    run.add_argument("--connection", required=True, help="the flwr connection name ($FLWR_HOME/config.toml)")
    run.add_argument("--flwr-home", default="", help="FLWR_HOME holding that connection (default: flwr's own)")
    run.add_argument("--out", default="runs/deploy",
                     help="run directory root on the SuperLink's machine (default runs/deploy, made absolute here)")
    run.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to follow the run (default a day)")
    run.set_defaults(func=deploy_run)

"""``fedimb deploy superexec``: a site's SuperExec whose ClientApp processes start warm.

Flower 1.42's SuperExec serves every message a SuperNode receives with a new ``flwr-clientapp``
process, which imports Flower's runtime, numpy and torch before any work: most of the 4.7 CPU
seconds per message that docs/results/deploy.md measured. This command is Flower's
``flower-superexec`` (the same arguments, loop, task protocol and Runtime API) with its local
executor swapped for :class:`WarmClientAppExecutor`: a ClientApp task is forked from a fork server
(:mod:`fedimb.app.clientapp_forkserver`) that imported those libraries once, and runs Flower's own
``run_clientapp`` with the task's token. The app's modules are never preloaded, so each task loads
the ClientApp from its run's FAB as a fresh process would. Other task types, and any task while the
fork server is down, start as Flower starts them.

Beside a SuperNode started with ``--isolation process`` (which then starts no SuperExec itself)::

    flower-supernode ... --isolation process --port 9094
    fedimb deploy superexec --runtime-api-address 127.0.0.1:9094 --insecure

Flower 1.42 has no hook for a local executor of one's own (its warm pools are Kubernetes-only), so
the swap replaces the executor factory that ``flwr.supercore.superexec.run_superexec`` looks up.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import IO

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from fedimb.app.clientapp_forkserver import READY, TASK_FIELDS

FORK_SERVER = Path(__file__).resolve().with_name("clientapp_forkserver.py")  # started by path, not as a module


def task_line(spec: ExecutionSpec) -> str:
    """One task for the fork server: what ``flwr-clientapp`` would get on its command line."""
    return json.dumps({field: getattr(spec, field) for field in TASK_FIELDS}) + "\n"


class WarmClientAppExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApp tasks fork from a preloaded fork server."""

    def __init__(self) -> None:
        self._server = subprocess.Popen([sys.executable, str(FORK_SERVER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        # the preload is paid here, when the site starts, not at its first message; READY says it is done
        ready = self._server.stdout.readline().strip() if self._server.stdout else ""
        if ready != READY:
            self._server.kill()
            raise RuntimeError(f"the ClientApp fork server did not start (exit code {self._server.wait()})")

    @property
    def tasks(self) -> IO[str]:
        """The fork server's task pipe."""
        assert self._server.stdin is not None
        return self._server.stdin

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """A ClientApp task forked warm; anything else (or with the server gone) as Flower launches it."""
        if spec.task_type != TaskType.CLIENT_APP or spec.suppress_output or self._server.poll() is not None:
            return super().launch(spec)
        try:
            self.tasks.write(task_line(spec))
            self.tasks.flush()
        except (BrokenPipeError, ValueError):  # the server died between poll() and write()
            return super().launch(spec)
        return LaunchResult.accepted()

    def close(self) -> None:
        """Close the task pipe: the fork server exits; tasks already forked finish."""
        try:
            self.tasks.close()
        except BrokenPipeError:
            pass
        try:
            self._server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._server.kill()


def main(argv: list[str]) -> None:
    """``flower-superexec ARGV`` with the warm executor in place of the subprocess one."""
    # the modules, not the functions their packages re-export under the same names
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
    module = importlib.import_module("flwr.supercore.superexec.run_superexec")

    flower_factory = module.get_executor

    def get_executor(executor_type: ExecutorType, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if executor_type == ExecutorType.SUBPROCESS:
            return WarmClientAppExecutor()
        return flower_factory(executor_type, *args, **kwargs)

    module.get_executor = get_executor
    sys.argv = ["flower-superexec", *argv]
    cli.flower_superexec()

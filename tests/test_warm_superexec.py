"""The warm ClientApp launcher of ``fedimb deploy superexec`` (fedimb/app/warm_superexec.py) and its fork server.

A real deployment runs through it in tests/test_deploy.py (deploy init's default); here what that
run cannot show: what the fork server preloads, and how tasks are handed to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec

from fedimb.app.warm_superexec import FORK_SERVER, READY, WarmClientAppExecutor, task_line

ROOT = Path(__file__).resolve().parent.parent


# the fork server's own code, printing the modules it holds as it exits once stdin closes (no task: it says
# ready and exits)
PROBE = ("import os, runpy, sys; exit_now = os._exit; "
         "os._exit = lambda code: (print(' '.join(sorted(sys.modules)), flush=True), exit_now(code)); "
         "runpy.run_path(sys.argv[1], run_name='__main__')")


def test_the_fork_server_preloads_flower_and_torch_but_never_the_app() -> None:
    # run from the repository root, where `fedimb` and `clients` would be importable from the cwd
    done = subprocess.run([sys.executable, "-c", PROBE, str(FORK_SERVER)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ready, modules = done.stdout.splitlines()
    assert ready == READY
    assert {"torch", "torch._dynamo", "numpy", "flwr.supernode.runtime.run_clientapp"} <= set(modules.split())
    assert not [m for m in modules.split() if m.split(".")[0] in ("fedimb", "clients", "strategies")]


def _spec(task_type: TaskType, suppress: bool = False) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="t0ken", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=42,
                         suppress_output=suppress, task_id=7)


def test_a_task_reaches_the_fork_server_as_flwr_clientapp_would_get_it() -> None:
    assert json.loads(task_line(_spec(TaskType.CLIENT_APP))) == {
        "runtime_api_address": "127.0.0.1:1", "token": "t0ken", "insecure": True, "root_certificates_path": None,
        "parent_pid": 42, "runtime_dependency_install": False}


def test_only_clientapp_tasks_fork_warm_and_the_executor_falls_back_when_the_server_is_gone(monkeypatch) -> None:
    launched: list[TaskType] = []
    monkeypatch.setattr("flwr.supercore.superexec.executor.subprocess_executor.SubprocessExecutor.launch",
                        lambda self, spec: launched.append(spec.task_type))
    executor = WarmClientAppExecutor()  # a real fork server: blocks until it has preloaded
    server, sent = executor._server, []
    try:
        executor._server = _Recording(server, sent)
        executor.launch(_spec(TaskType.CLIENT_APP))
        executor.launch(_spec(TaskType.SERVER_APP))
        executor.launch(_spec(TaskType.CLIENT_APP, suppress=True))
        assert [json.loads(line)["token"] for line in sent] == ["t0ken"]
        assert launched == [TaskType.SERVER_APP, TaskType.CLIENT_APP]  # as Flower launches them
    finally:
        executor._server = server
        executor.close()
    assert server.poll() == 0  # closing the task pipe ends the fork server
    executor.launch(_spec(TaskType.CLIENT_APP))  # the server is gone: Flower's own launch, no error
    assert launched == [TaskType.SERVER_APP, TaskType.CLIENT_APP, TaskType.CLIENT_APP]


class _Recording:
    """The fork server's process with its task pipe recorded instead of written (no task runs)."""

    def __init__(self, server: subprocess.Popen, sent: list[str]) -> None:
        self.server, self.stdin = server, _Pipe(sent)

    def poll(self) -> int | None:
        return self.server.poll()


class _Pipe:
    def __init__(self, sent: list[str]) -> None:
        self.sent = sent

    def write(self, text: str) -> None:
        self.sent.append(text)

    def flush(self) -> None:
        pass


def test_only_the_subprocess_executor_is_replaced(monkeypatch) -> None:
    import importlib

    from fedimb.app import warm_superexec

    module = importlib.import_module("flwr.supercore.superexec.run_superexec")
    cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
    made: list[object] = []
    monkeypatch.setattr(module, "get_executor", lambda executor_type, *a, **k: f"flower {executor_type}")
    monkeypatch.setattr(cli, "flower_superexec", lambda: made.append(
        (module.get_executor(ExecutorType.KUBERNETES), sys.argv[1:])))
    monkeypatch.setattr(warm_superexec, "WarmClientAppExecutor", lambda: "warm")
    monkeypatch.setattr(sys, "argv", ["fedimb"])
    warm_superexec.main(["--runtime-api-address", "127.0.0.1:9094", "--insecure"])
    assert made == [(f"flower {ExecutorType.KUBERNETES}", ["--runtime-api-address", "127.0.0.1:9094", "--insecure"])]
    assert module.get_executor(ExecutorType.SUBPROCESS) == "warm"

"""A fork server for a site's ClientApp tasks, run as a script by :mod:`fedimb.app.warm_superexec`.

It imports the third-party libraries a ClientApp process spends its start on (Flower's ClientApp
runtime, numpy, torch and the ``torch._dynamo`` that its first optimiser pulls in) once, prints
``ready``, then reads one JSON task per line from stdin and forks a child per task that runs
Flower's own ``run_clientapp`` with the task's token: what ``flwr-clientapp --token ...`` does,
without paying those imports again. It exits when stdin closes (its SuperExec is gone); running
children finish their task.

It never imports ``fedimb`` or the app's own modules, and is started by path, not as a module,
so that each child still loads the ClientApp from the FAB its run was submitted with (Flower puts
the FAB's folder first on ``sys.path``), exactly as a fresh ``flwr-clientapp`` process does.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys

# started by path: sys.path[0] is this file's folder, which must not shadow anything the app imports
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

# what a ClientApp process imports before any work (Flower's runtime, torch, numpy) and the module
# torch imports for the first optimiser of a process; third-party only, never the app's code
PRELOAD = ("numpy", "torch", "torch.optim", "torch._dynamo", "omegaconf", "flwr.app", "flwr.clientapp",
           "flwr.supernode.runtime.run_clientapp", "flwr.supercore.tls")
READY = "ready"
# a task line's fields: what ``flwr-clientapp`` gets on its command line, named as Flower's ExecutionSpec names them
TASK_FIELDS = ("runtime_api_address", "token", "insecure", "root_certificates_path", "parent_pid",
               "runtime_dependency_install")
TASK_NAME = "flwr-clientapp"


def run_task(task: dict) -> None:
    """In the forked child: Flower's ClientApp runtime for one task; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it to reap; the app may wait on children
        try:
            with open("/proc/self/comm", "w") as comm:  # named as the process it stands in for, in ps, top and /proc
                comm.write(TASK_NAME)
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the task list is the server's, not the child's
        os.close(devnull)
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(runtime_api_address=task["runtime_api_address"], token=task["token"],
                      insecure=task["insecure"],
                      certificates=validate_and_resolve_root_certificates(task["root_certificates_path"],
                                                                          task["insecure"]),
                      parent_pid=task["parent_pid"], runtime_dependency_install=task["runtime_dependency_install"])
        code = 0
    except SystemExit as ended:  # Flower's runtime ends every task with sys.exit(code)
        code = ended.code if isinstance(ended.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Preload, say ``ready``, then fork one child per task line until stdin closes."""
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(READY, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        if os.fork() == 0:
            run_task(task)
    # nothing to clean up, and tearing torch and Flower down takes seconds
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    serve()

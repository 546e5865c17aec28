"""Which device a client trains on: the GPU Ray assigned to its actor, or the CPU.

In a Flower simulation each ClientApp runs in a Ray actor that asked for
``simulation.num_gpus``; Ray gives the actor GPU ids and narrows ``CUDA_VISIBLE_DEVICES`` to
them, so several actors at a fraction share one card and the others go to the next card. A
deployed ClientApp (no Ray) has no assigned ids and takes the first visible GPU.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Sequence

import torch

CPU = torch.device("cpu")


def ray_gpu_ids() -> list[int]:
    """The GPU ids Ray assigned to this process's actor; [] outside Ray or without a GPU."""
    ray = sys.modules.get("ray")  # a Ray actor has imported it; a deployed ClientApp never pays for the import
    if ray is None or not ray.is_initialized():
        return []
    try:
        ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - not in a worker: nothing was assigned
        return []
    return [int(i) for i in ids if str(i).isdigit()]  # ids named by UUID have no number to report


def cuda_index(gpu_ids: Sequence[int], visible: str | None) -> int:
    """torch's index of the first assigned GPU.

    Ray narrows ``CUDA_VISIBLE_DEVICES`` to the assigned ids, so torch numbers them from 0 in
    that order; where Ray leaves it alone (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``)
    the id is torch's index itself.
    """
    if not gpu_ids:
        return 0
    listed = [s.strip() for s in (visible or "").split(",") if s.strip()]
    if not listed:
        return int(gpu_ids[0])
    return listed.index(str(gpu_ids[0])) if str(gpu_ids[0]) in listed else 0


@functools.lru_cache(maxsize=1)
def _warn_cpu_fallback(gpu_ids: tuple[int, ...]) -> None:
    # once per client process: every message of a virtual client would repeat it otherwise
    warnings.warn(f"Ray assigned GPU {', '.join(map(str, gpu_ids))} to this client but CUDA is not usable "
                  "in its process; training on the CPU (simulation.device=auto)", RuntimeWarning, stacklevel=3)


def pick_device(name: str, gpu_ids: Sequence[int] = ()) -> torch.device:
    """The device for ``simulation.device`` = ``name`` and the GPU ids Ray assigned.

    ``cpu``: the CPU. ``cuda``: the assigned GPU (the first visible one without ids), or a
    one-line error when CUDA cannot use it. ``auto``: that GPU when CUDA can use it, else the
    CPU, with a warning (once per process) when Ray had assigned a GPU.
    """
    if name == "cpu":
        return CPU
    index = cuda_index(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return torch.device("cuda", index)
    if name == "cuda":
        assigned = f"; Ray assigned GPU {', '.join(map(str, gpu_ids))}" if gpu_ids else ""
        raise RuntimeError(f"simulation.device=cuda but no GPU is usable in this client process (CUDA unavailable"
                           f"{assigned}); simulation.device=auto falls back to the CPU")
    if gpu_ids:
        _warn_cpu_fallback(tuple(gpu_ids))
    return CPU


def client_device(name: str) -> tuple[torch.device, list[int]]:
    """The device this client trains on, and the GPU ids Ray assigned it (reported in its train reply)."""
    gpu_ids = ray_gpu_ids()
    return pick_device(name, gpu_ids), gpu_ids

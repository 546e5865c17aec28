"""GPUs through Ray, on the driver's side: the check before a run, and which GPUs each round trained on.

A client asks Ray for ``simulation.num_gpus`` (fractions allowed); Flower builds its actor pool
from each node's GPUs, so a request that no node can meet ends, after Ray's start, in Flower's
"ActorPool is empty". :func:`check_ray_gpus` says so before any work, in one line. The clients
report the GPU ids Ray assigned them (``protocol.GPU_IDS``); :func:`recording_gpus` counts them
per id into the round's ``clients_on_gpu_<id>`` columns of ``rounds.csv``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict

from fedimb import protocol
from fedimb.config import SimulationConfig
from fedimb.errors import ConfigError

GPU_COLUMN = "clients_on_gpu"  # rounds.csv: clients_on_gpu_<id>, the round's train replies from GPU <id>
MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


def local_gpus() -> int:
    """The GPUs a Ray started on this machine would detect (``CUDA_VISIBLE_DEVICES`` respected)."""
    try:  # Ray's own detection, so the check agrees with what ray.init will declare
        from ray._private import accelerators

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        count = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return int(count if visible is None else min(count, len(visible)))
    except Exception:  # noqa: BLE001 - a private API: fall back to what torch sees
        import torch

        return torch.cuda.device_count()


def cluster_gpus(address: str) -> list[float]:
    """The GPUs of each alive node of the Ray cluster at ``address`` (connects, reads, disconnects)."""
    import ray

    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - Ray's connection errors vary; one line names the address
        raise ConfigError("simulation.ray_address", f"no Ray cluster answers at {address}: "
                                                    + " ".join(str(exc).split())) from exc
    try:
        return [float(node["Resources"].get("GPU", 0.0)) for node in ray.nodes() if node.get("Alive")]
    finally:
        ray.shutdown()


def check_ray_gpus(sim: SimulationConfig) -> None:
    """Raise :class:`ConfigError` when no Ray node can give one client ``simulation.num_gpus``.

    The GPUs counted: ``simulation.ray_num_gpus`` when declared, those of the joined cluster
    (``simulation.ray_address``), else those Ray detects on this machine.
    """
    if sim.num_gpus <= 0:
        return
    if sim.device == "cpu":
        raise ConfigError("simulation.num_gpus", "> 0 but simulation.device=cpu; set device to auto or cuda")
    if sim.ray_address:
        per_node, where = cluster_gpus(sim.ray_address), f"the Ray cluster at {sim.ray_address}"
    elif sim.ray_num_gpus:
        per_node, where = [float(sim.ray_num_gpus)], "simulation.ray_num_gpus"
    else:
        per_node, where = [float(local_gpus())], "this machine"
    most = max(per_node, default=0.0)
    if most == 0:
        raise ConfigError("simulation.num_gpus", f"{sim.num_gpus:g} per client but Ray knows no GPU on {where}; "
                                                 "set simulation.num_gpus=0, or declare GPUs to the Ray this run "
                                                 "starts with simulation.ray_num_gpus=N")
    if sim.num_gpus > most:
        raise ConfigError("simulation.num_gpus", f"{sim.num_gpus:g} per client but no Ray node has more than "
                                                 f"{most:g} GPU(s) ({where}); ask for at most {most:g}")


def clients_per_gpu(records: list[RecordDict]) -> list[int]:
    """How many of the replies came from each GPU id (index = Ray's id); [] when none reported a GPU."""
    ids = [int(i) for r in records for i in r[protocol.METRICS].get(protocol.GPU_IDS, [])]
    counts = [0] * (max(ids) + 1 if ids else 0)
    for i in ids:
        counts[i] += 1
    return counts


def recording_gpus(aggregate: MetricsAggregator, observer: object) -> MetricsAggregator:
    """``aggregate`` (the train metrics' aggregation) that also puts the round's clients per GPU id
    into ``observer.pending``: the next rounds.csv row's ``clients_on_gpu_<id>`` columns.

    A CPU-only run adds no column.
    """
    def aggregate_and_count(records: list[RecordDict], weight_key: str) -> MetricRecord:
        counts = clients_per_gpu(records)
        if counts:
            observer.pending[GPU_COLUMN] = counts  # type: ignore[attr-defined] - replaced after every logged row
        return aggregate(records, weight_key)

    return aggregate_and_count

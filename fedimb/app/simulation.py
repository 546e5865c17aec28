"""Run one experiment on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedimb.app.gpus import check_ray_gpus
from fedimb.app.process import offline_environment, quiet_run
from fedimb.config import ExperimentConfig, to_yaml

class RunError(RuntimeError):
    """The federation failed; the message is the cause, one line."""


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Ray resources per virtual client and ``ray.init`` arguments (Flower passes these to Ray)."""
    sim = cfg.simulation
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": sim.verbose}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    elif sim.ray_num_gpus:
        init_args["num_gpus"] = sim.ray_num_gpus  # declared, not detected (see SimulationConfig)
    return {"client_resources": {"num_cpus": sim.num_cpus, "num_gpus": sim.num_gpus},
            "init_args": init_args}


def default_run_dir(cfg: ExperimentConfig, root: Path = Path("runs")) -> Path:
    """runs/<name>/<strategy>-<partition>-s<seed>-<timestamp>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / cfg.name / f"{cfg.strategy.name}-{cfg.partition.name}-s{cfg.seed}-{stamp}"


def check_before_run(cfg: ExperimentConfig) -> None:
    """Everything that can be checked before the federation: names, params, data, partition
    feasibility, and GPUs for ``simulation.num_gpus`` (the only check that may ask Ray: a joined cluster's)."""
    from clients.losses import build_loss
    from fedimb.data import build_federated_data
    from fedimb.models import build_configured_model
    from strategies import check_strategy_config

    check_strategy_config(cfg)
    build_loss(cfg.train.loss.name, cfg.train.loss.params)
    data = build_federated_data(cfg)
    build_configured_model(cfg, data.splits.input_shape, data.splits.num_classes)
    check_ray_gpus(cfg.simulation)


def run_experiment(cfg: ExperimentConfig, run_dir: Path, checked: bool = False, resume: bool = False) -> dict[str, Any]:
    """Check (unless the caller did: ``checked``), run the federation on Ray, return the summary.

    ``resume``: continue ``run_dir`` from its last checkpoint (see :mod:`fedimb.checkpoint`).
    Raises :class:`RunError` on failure.
    """
    if not checked:
        check_before_run(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with offline_environment(), quiet_run(cfg.simulation.verbose):
        _simulate(cfg, run_dir, resume)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RunError(f"run failed: no summary.json in {run_dir}; see the log above")
    return json.loads(summary_path.read_text())


def _simulate(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """Flower's simulation engine on Ray with our ServerApp and ClientApp; any failure as one RunError."""
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedimb.app.server import make_server_app

    try:
        run_simulation(
            server_app=make_server_app(to_yaml(cfg), run_dir, resume=resume),
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),  # type: ignore[arg-type]
            verbose_logging=cfg.simulation.verbose,
        )
    except Exception as exc:  # noqa: BLE001 - Flower wraps the cause; show it in one line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        hint = "" if cfg.simulation.verbose else " (simulation.verbose=true shows the traceback)"
        raise RunError("run failed: " + " ".join(str(cause).split()) + hint) from exc  # one line, whatever Flower wrapped
    finally:
        _shutdown_ray()


def _shutdown_ray() -> None:
    """Leave no Ray processes behind, whatever happened."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass

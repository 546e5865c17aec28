"""The fedimb ServerApp: a run composed of phases (hello, optional generator, federation), then records.

``fedimb run`` builds it around a resolved config (:func:`make_server_app`); ``flwr run .``
loads the module-level ``server_app``, which reads ``config`` / ``overrides`` / ``out`` from
the run config in pyproject.toml.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedimb.app.gpus import recording_gpus
from fedimb.app.metering import MeteredGrid, PartitionAssigner
from fedimb.app.observer import HeldOutTest, RoundObserver, evaluation_set, total_rounds
from fedimb.app.phases import RunFailed, ServerRun, cannot_resume, phases_for
from fedimb.app.process import flwr_log_level
from fedimb.checkpoint import Checkpoint, load_checkpoint, written_for
from fedimb.config import ExperimentConfig, from_yaml, load_config, to_yaml
from fedimb.data.domains import domain_test_sets
from fedimb.records import RunRecorder, package_versions
from strategies import strategy_spec
from strategies.base import StrategyContext
from strategies.guard import refuse_faults_when_deployed, reply_guard

console = Console(stderr=True)
APP_DIR = Path(__file__).resolve().parents[2]  # the app's root: fedimb/app/server.py → the repository (or FAB)


def _resume_point(cfg: ExperimentConfig, run_dir: Path) -> Checkpoint | None:
    """The checkpoint a resumed run continues from (None: it starts over), checked against the config."""
    blocker = cannot_resume(cfg)
    if blocker:
        raise RunFailed(f"--resume: {blocker}")
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None and not written_for(checkpoint, cfg, run_dir):
        raise RunFailed(f"--resume: config.yaml changed since the checkpoint in {run_dir} was written")
    return checkpoint


def central_evaluation(cfg: ExperimentConfig, holds_dataset: bool) -> bool:
    """Whether the server scores a global model on its own test set: it needs both."""
    return holds_dataset and strategy_spec(cfg.strategy.name).global_model


def open_run(grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool, holds_dataset: bool,
             assign_partitions: bool = False) -> ServerRun:
    """The run directory's config and recorder, the evaluation set, the observer and the strategy context.

    ``holds_dataset``: the server has the config's dataset (a simulation, or
    ``eval.server_data=dataset``); otherwise it evaluates federatedly and loads no data at all.
    ``assign_partitions``: the nodes are Flower's virtual ones (fedimb's simulation runner): the
    server assigns them their partitions instead of asking each (needs ``holds_dataset``).
    """
    if not holds_dataset and cfg.eval.client_every == 0:
        raise RunFailed("the server holds no test set, so the clients evaluate: set eval.client_every >= 1 "
                        "(or give it one with eval.server_data=dataset)")
    if not strategy_spec(cfg.strategy.name).global_model and cfg.eval.client_every == 0:
        raise RunFailed(f"strategy {cfg.strategy.name} has no global model, so the clients evaluate their own: "
                        "set eval.client_every >= 1")
    config_text = to_yaml(cfg)
    assigner = PartitionAssigner(grid)
    grid = MeteredGrid(assigner)
    recorder = RunRecorder(run_dir)
    checkpoint = _resume_point(cfg, run_dir) if resume else None
    recorder.write_config(config_text)
    splits, eval_x, eval_y = None, None, None
    if holds_dataset:
        eval_np_x, eval_y, splits = evaluation_set(cfg)
        if central_evaluation(cfg, holds_dataset):
            eval_x = torch.from_numpy(eval_np_x)
        else:
            eval_y = None
    per_stage = cfg.active_learning.rounds_per_step if cfg.active_learning.enabled else cfg.federation.rounds
    domain_x = {}  # the test set in every acquisition domain: transformed once, scored every round
    if eval_x is not None and cfg.domains.names:
        views = domain_test_sets(eval_np_x, cfg, splits.normalisation)
        domain_x = {name: torch.from_numpy(x) for name, x in views.items()}
    # rounds scored on the validation split: the test set once more after the last round, for the summary only
    held_out = HeldOutTest.of(cfg, splits) if eval_x is not None and cfg.eval.split == "validation" else None
    observer = RoundObserver(cfg, recorder, eval_x, eval_y, meter=grid, rounds_per_stage=per_stage, domain_x=domain_x,
                             held_out=held_out)
    if checkpoint is not None:
        recorder.restore(checkpoint.rows, checkpoint.elapsed_s)
        observer.pending = dict(checkpoint.pending)
        observer.started -= checkpoint.elapsed_s
        console.print(f"resuming after round {checkpoint.round}/{total_rounds(cfg)}", highlight=False)
    ctx = StrategyContext(
        num_clients=cfg.federation.num_clients, fraction=cfg.federation.fraction,
        fraction_evaluate=cfg.federation.fraction_evaluate if cfg.eval.client_every else 0.0,
        min_clients=cfg.federation.min_clients, seed=cfg.seed, client_eval_every=cfg.eval.client_every,
        rounds=per_stage, train_metrics_aggr_fn=recording_gpus(observer.train_metrics, observer),
        evaluate_metrics_aggr_fn=observer.evaluate_metrics,
        guard=reply_guard(cfg, run_dir, observer, None if checkpoint is None else checkpoint.round),
    )
    return ServerRun(grid, cfg, config_text, run_dir, splits, observer, ctx, checkpoint,
                     assigner=assigner if assign_partitions and holds_dataset else None)


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool = False,
                   holds_dataset: bool = True, assign_partitions: bool = False) -> None:
    """The whole server side of one run: its phases in order, then the summary and the curves.

    ``resume``: continue from the run directory's checkpoint (``fedimb run --resume``);
    ``holds_dataset``, ``assign_partitions``: see :func:`open_run`.
    """
    run = open_run(grid, cfg, run_dir, resume, holds_dataset, assign_partitions)
    for phase in phases_for(cfg):
        phase(run)
    recorder = run.observer.recorder
    if not recorder.rounds or recorder.rounds[-1]["round"] != total_rounds(cfg):
        raise RunFailed("the federation stopped before its last round; see the errors above")
    recorder.write_summary({
        "name": cfg.name, "seed": cfg.seed, "strategy": cfg.strategy.name,
        "loss": cfg.train.loss.name, "versions": package_versions(),
        "wall_time_per_round_s": recorder.elapsed() / total_rounds(cfg),
        "evaluation": ("central and federated" if cfg.eval.federated else "central")
                      if central_evaluation(cfg, holds_dataset) else "federated",
        **run.summary,
        **({"test": run.observer.test_metrics} if run.observer.test_metrics else {}),
    })
    recorder.plot_curves()


def _config_from_run_config(context: Context) -> tuple[ExperimentConfig, Path]:
    """``flwr run``: the YAML path and overrides come from pyproject's run config.

    Under ``flwr run`` this module runs from the installed FAB (``$FLWR_HOME/apps/...``), so
    ``APP_DIR`` is that copy: a relative ``config`` names a YAML shipped in the FAB, and a
    relative ``out`` is taken from the working directory (the SuperLink's), not ``APP_DIR``.
    """
    run_config = context.run_config
    path = Path(str(run_config.get("config", "experiments/quickstart.yaml"))).expanduser()
    if not path.is_absolute():
        path = APP_DIR / path
    overrides = str(run_config.get("overrides", "")).split()
    out = Path(str(run_config.get("out", "runs/flwr"))).expanduser().absolute()
    cfg = load_config(path, overrides)
    return cfg, out / f"{cfg.name}-{int(time.time())}"


def make_server_app(config_text: str | None = None, run_dir: Path | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp for one resolved config (the simulation runner's: the server holds the dataset),
    or (no arguments) one that reads the run config (``flwr run``: the server holds only what
    ``eval.server_data`` gives it).

    ``resume``: continue ``run_dir`` from its checkpoint.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config_text is None or run_dir is None:
            cfg, out = _config_from_run_config(context)
            refuse_faults_when_deployed(cfg)  # fedimb's simulation runner passes its config directly
            holds_dataset = cfg.eval.server_data == "dataset"
        else:
            cfg, out, holds_dataset = from_yaml(config_text), run_dir, True
        level = logging.NOTSET if cfg.simulation.verbose else logging.ERROR
        with flwr_log_level(level):
            run_federation(grid, cfg, out, resume=resume and run_dir is not None, holds_dataset=holds_dataset,
                           assign_partitions=config_text is not None)

    return app


server_app = make_server_app()

"""Per-round checkpoints of a run and what ``fedimb run --resume`` needs to continue one.

After every completed round the server overwrites ``checkpoint.pt`` in the run directory
(atomically): the global model, the round, the recorder's rows, the metrics waiting for the
next evaluation, the strategy's own state (``state_dict()``) and the run's elapsed time.
Clients derive their training seeds from (seed, round, partition), so a run whose clients
keep nothing between rounds continues exactly as if it had never stopped. Runs whose clients
keep state in ``context.state`` (SCAFFOLD's control variates, active-learning pools) cannot
rebuild it, so they write no checkpoint and ``--resume`` refuses them. Synthetic top-ups are
client state too, but every session delivers them again before its first round, from the
cached generator and pools, so those runs resume.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.config import ConfigError, ExperimentConfig, load_config, to_yaml

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


class ResumeError(ValueError):
    """``--resume`` cannot go on; ``str()`` is the one line shown to the user (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"--resume: {message}")


@dataclass
class Checkpoint:
    """Everything the server needs to continue a run after round ``round``."""

    round: int
    config_sha256: str
    arrays: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    pending: dict[str, Any] = field(default_factory=dict)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def config_digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config: a checkpoint only continues the run that wrote it."""
    return hashlib.sha256(to_yaml(cfg).encode("utf-8")).hexdigest()


def written_for(checkpoint: Checkpoint, cfg: ExperimentConfig, run_dir: str | Path) -> bool:
    """Whether ``checkpoint`` belongs to a run of ``cfg``.

    Also true for a checkpoint written before the schema gained a key: when the run's own
    ``config.yaml`` is the text the checkpoint hashed, and reading it through today's schema
    (new keys at their defaults) gives ``cfg``, the run is the same and may continue.
    """
    if checkpoint.config_sha256 == config_digest(cfg):
        return True
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return False
    if hashlib.sha256(path.read_bytes()).hexdigest() != checkpoint.config_sha256:
        return False
    try:
        then = load_config(path)
    except ConfigError:  # a key the schema has since dropped or retyped: not provably the same run
        return False
    return config_digest(then) == config_digest(cfg)


def _to_saveable(obj: Any) -> Any:
    import torch  # deferred, like every heavy import here: the CLI imports this module for ResumeError

    # numpy arrays become tensors so torch.load can stay weights_only (no pickled code)
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _to_saveable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_saveable(v) for v in obj]
    return obj


def _from_saved(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _from_saved(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_saved(v) for v in obj]
    return obj


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Overwrite ``run_dir/checkpoint.pt`` atomically (a kill mid-write leaves the previous one)."""
    import torch

    from fedimb.records import atomic_write_bytes

    payload = {"format": FORMAT, **{name: _to_saveable(getattr(checkpoint, name))
                                    for name in Checkpoint.__dataclass_fields__}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, buf.getvalue())


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint, or None when it has none."""
    import torch

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ResumeError(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a fedimb checkpoint of format {FORMAT}")
    return Checkpoint(**{name: _from_saved(payload[name]) for name in Checkpoint.__dataclass_fields__})


def resume_blocker(cfg: ExperimentConfig, keeps_client_state: bool) -> str | None:
    """Why a run of ``cfg`` cannot resume exactly (client state that a restart loses), or None.

    ``keeps_client_state``: what the strategy's registry entry declares.
    """
    if cfg.active_learning.enabled:
        return "active_learning runs keep client state (labelled pools) and cannot resume; rerun it"
    if keeps_client_state:
        return f"strategy '{cfg.strategy.name}' keeps client state and cannot resume; rerun it"
    return None


@dataclass
class ResumePlan:
    """What ``--resume RUN_DIR`` will do: nothing (``finished``), or continue after ``done_round``."""

    cfg: ExperimentConfig
    finished: dict[str, Any] | None = None
    done_round: int | None = None  # None: no checkpoint yet, the run starts over


def plan_resume(run_dir: Path, keeps_client_state: Callable[[ExperimentConfig], bool]) -> ResumePlan:
    """Read ``run_dir``: its config, whether it finished, its checkpoint; refuse what cannot resume.

    ``keeps_client_state``: whether a config's strategy keeps client state (the app's registry).
    """
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise ResumeError(f"no config.yaml in {run_dir}; not a fedimb run directory")
    cfg = load_config(config_path)
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():
        return ResumePlan(cfg, finished=json.loads(summary_path.read_text(encoding="utf-8")))
    blocker = resume_blocker(cfg, keeps_client_state(cfg))
    if blocker:
        raise ResumeError(blocker)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        return ResumePlan(cfg)
    if not written_for(checkpoint, cfg, run_dir):
        raise ResumeError(f"{config_path} changed since {CHECKPOINT_FILE} was written; rerun it")
    return ResumePlan(cfg, done_round=checkpoint.round)

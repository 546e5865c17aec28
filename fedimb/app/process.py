"""Process-wide settings a run changes for its duration, and gives back when it ends."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Telemetry, update checks and uv runtime envs would reach for the network; Ray's log dedup
# hides which client said what.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextlib.contextmanager
def offline_environment() -> Iterator[None]:
    """``OFFLINE_ENV`` for variables the caller left unset (Ray workers inherit them); unset again after."""
    added = {key: value for key, value in OFFLINE_ENV.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def flwr_log_level(level: int) -> Iterator[None]:
    """The ``flwr`` logger at ``level`` or quieter (never louder than the caller set), restored after."""
    logger = logging.getLogger("flwr")
    saved = logger.level
    if saved < level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def quiet_run(verbose: bool) -> Iterator[None]:
    """Without ``verbose``: Flower's logs at CRITICAL only and warnings ignored, for the run's duration.

    Flower logs a failing client's traceback from deep inside Ray; the runner reports the cause
    in one line instead.
    """
    if verbose:
        yield
        return
    with flwr_log_level(logging.CRITICAL), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

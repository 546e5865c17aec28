"""Process-wide settings a run changes are given back when it ends."""

from __future__ import annotations

import logging
import os
import warnings

from fedimb.app.process import OFFLINE_ENV, flwr_log_level, offline_environment, quiet_run


def test_offline_environment_sets_only_unset_variables_and_removes_them_after(monkeypatch):
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    with offline_environment():
        assert os.environ["RAY_DEDUP_LOGS"] == OFFLINE_ENV["RAY_DEDUP_LOGS"]
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"  # the caller's value wins
    assert "RAY_DEDUP_LOGS" not in os.environ and os.environ["RAY_USAGE_STATS_ENABLED"] == "1"


def test_quiet_run_restores_logger_and_warning_filters():
    logger = logging.getLogger("flwr")
    saved_level, saved_filters = logger.level, list(warnings.filters)
    try:
        logger.setLevel(logging.INFO)
        with quiet_run(verbose=False):
            assert logger.level == logging.CRITICAL
            assert warnings.filters[0][0] == "ignore"
        assert logger.level == logging.INFO and warnings.filters == saved_filters
        logger.setLevel(logging.CRITICAL)
        with flwr_log_level(logging.ERROR):
            assert logger.level == logging.CRITICAL  # never louder than the caller set
    finally:
        logger.setLevel(saved_level)

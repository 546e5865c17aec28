"""Server strategies by name: one file each, one line in STRATEGIES."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedimb.config import ConfigError, ExperimentConfig, build_params, registered
from strategies import cafedcl, climb, fedadam, fedavg, fedavgm, fednova, fedprox, fedproto, scaffold
from strategies.base import StrategyContext, StrategySpec

STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in (
    fedavg.SPEC,
    fedprox.SPEC,
    fedavgm.SPEC,
    fedadam.SPEC,
    scaffold.SPEC,
    fednova.SPEC,
    climb.SPEC,
    fedproto.SPEC,
    cafedcl.FEDAVG_PROTO,
    cafedcl.CAFEDCL,
)}


def strategy_spec(name: str) -> StrategySpec:
    """The registry entry for ``name``, or a ConfigError listing the names."""
    return registered(STRATEGIES, name, "strategy.name")


def check_strategy_config(cfg: ExperimentConfig) -> None:
    """Fail early on an unknown strategy name or parameter, or a run the strategy cannot do."""
    spec = strategy_spec(cfg.strategy.name)
    build_params(spec.params_cls, cfg.strategy.params, "strategy.params")
    if not spec.global_model and cfg.active_learning.enabled:
        raise ConfigError("strategy.name", f"'{spec.name}' trains no global model, and active learning queries "
                          "with one; choose another strategy or active_learning.enabled=false")


def build_strategy(cfg: ExperimentConfig, ctx: StrategyContext) -> tuple[Strategy, StrategySpec]:
    """Build the configured strategy."""
    spec = strategy_spec(cfg.strategy.name)
    params = build_params(spec.params_cls, cfg.strategy.params, "strategy.params")
    return spec.build(ctx, params), spec

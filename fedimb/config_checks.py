"""The checks a config's values must pass beyond their types: one line naming the field on the first failure."""

from __future__ import annotations

from pathlib import Path

from fedimb.config import (DEVICES, DOMAIN_TRANSFORM_NAMES, EVAL_SPLITS, GENERATOR_AGGREGATIONS,
                           GENERATOR_DOMAIN_WEIGHTINGS,
                           GENERATOR_CONDITIONS, GENERATOR_PREDICTIONS, HEADS, LOCAL_DATASETS,
                           LONG_TAIL_PROFILES, PARTITIONS, SERVER_DATA, CLIENT_TESTS, SYNTHETIC_POLICIES,
                           SYNTHETIC_TRAINING, DomainsConfig, ExperimentConfig)
from fedimb.config_input import check_finite
from fedimb.errors import ConfigError
from fedimb.hostile import check_faults, check_min_replies, check_robust


def _check_choice(field_name: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(field_name, f"'{value}' is not allowed; choose one of {', '.join(allowed)}")


def _check_positive(field_name: str, value: float, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(field_name, f"must be {bound}, got {value}")


def validate(cfg: ExperimentConfig) -> None:
    """Check values that the schema's types cannot; raise :class:`ConfigError` on the first.

    Nothing here reads the dataset's files: a deployed server or a site validates the same
    config without them (a run that loads them checks them, before any work).
    """
    check_finite(cfg)
    if cfg.imbalance.factor < 1:
        raise ConfigError("imbalance.factor", f"must be >= 1 (1 = no long tail), got {cfg.imbalance.factor}")
    _check_choice("imbalance.profile", cfg.imbalance.profile, LONG_TAIL_PROFILES)
    if not 0 < cfg.imbalance.step_minor_fraction < 1:
        raise ConfigError("imbalance.step_minor_fraction", "must be in (0, 1)")
    _check_choice("partition.name", cfg.partition.name, PARTITIONS)
    _check_positive("partition.alpha", cfg.partition.alpha)
    _check_positive("partition.min_size", cfg.partition.min_size, strict=False)
    _check_positive("partition.classes_per_client", cfg.partition.classes_per_client)
    _check_positive("partition.noise_sigma", cfg.partition.noise_sigma, strict=False)
    _check_positive("partition.copies", cfg.partition.copies)
    check_domains(cfg.domains)
    _check_positive("federation.num_clients", cfg.federation.num_clients)
    _check_positive("federation.rounds", cfg.federation.rounds)
    if not 0 < cfg.federation.fraction <= 1:
        raise ConfigError("federation.fraction", f"must be in (0, 1], got {cfg.federation.fraction}")
    if not 0 <= cfg.federation.fraction_evaluate <= 1:
        raise ConfigError("federation.fraction_evaluate", "must be in [0, 1]")
    _check_positive("federation.min_clients", cfg.federation.min_clients)
    if cfg.federation.min_clients > cfg.federation.num_clients:
        cfg.federation.min_clients = cfg.federation.num_clients
    check_min_replies(cfg.federation.min_replies, cfg.federation.num_clients)
    _check_positive("federation.round_timeout", cfg.federation.round_timeout, strict=False)
    _check_positive("federation.norm_factor", cfg.federation.norm_factor, strict=False)
    check_robust(cfg.strategy.robust)
    check_faults(cfg.faults, cfg.federation.num_clients)
    if cfg.faults.enabled() and cfg.active_learning.enabled:
        raise ConfigError("faults", "fault injection needs every client at active learning's query steps; "
                                    "switch active_learning off or leave faults empty")
    _check_positive("train.local_epochs", cfg.train.local_epochs)
    _check_positive("train.lr", cfg.train.lr)
    _check_positive("train.batch_size", cfg.train.batch_size)
    _check_positive("train.momentum", cfg.train.momentum, strict=False)
    _check_positive("train.weight_decay", cfg.train.weight_decay, strict=False)
    _check_positive("train.lr_decay_factor", cfg.train.lr_decay_factor)
    if any(not 0 < at < 1 for at in cfg.train.lr_decay_at):
        raise ConfigError("train.lr_decay_at", f"fractions of the rounds must lie in (0, 1), got {list(cfg.train.lr_decay_at)}")
    _check_choice("data.scaling", cfg.data.scaling, ("standard", "unit"))
    _check_choice("model.head", cfg.model.head, HEADS)
    if not 0 <= cfg.data.validation_fraction < 1:
        raise ConfigError("data.validation_fraction", f"must be in [0, 1), got {cfg.data.validation_fraction}")
    _check_choice("eval.split", cfg.eval.split, EVAL_SPLITS)
    if cfg.eval.split == "validation" and cfg.data.validation_fraction == 0:
        raise ConfigError("eval.split", "validation needs data.validation_fraction > 0 (e.g. 0.1)")
    _check_positive("eval.every", cfg.eval.every)
    _check_positive("eval.client_every", cfg.eval.client_every, strict=False)
    _check_choice("eval.server_data", cfg.eval.server_data, SERVER_DATA)
    _check_choice("eval.client_test", cfg.eval.client_test, CLIENT_TESTS)
    if cfg.eval.federated and cfg.eval.client_every == 0:
        raise ConfigError("eval.federated", "needs client-side evaluation; set eval.client_every >= 1")
    _check_positive("eval.batch_size", cfg.eval.batch_size)
    _check_positive("simulation.num_cpus", cfg.simulation.num_cpus)
    _check_positive("simulation.num_gpus", cfg.simulation.num_gpus, strict=False)
    _check_positive("simulation.ray_num_gpus", cfg.simulation.ray_num_gpus, strict=False)
    if cfg.simulation.ray_num_gpus and cfg.simulation.ray_address:
        raise ConfigError("simulation.ray_num_gpus", "must be 0 with simulation.ray_address: a joined cluster "
                                                      "declares its own GPUs (ray start --num-gpus N)")
    _check_positive("simulation.threads_per_client", cfg.simulation.threads_per_client)
    _check_choice("simulation.device", cfg.simulation.device, DEVICES)
    al = cfg.active_learning
    for name in ("initial_fraction", "step_fraction", "local_stop_accuracy"):
        if not 0 < getattr(al, name) <= 1:
            raise ConfigError(f"active_learning.{name}", f"must be in (0, 1], got {getattr(al, name)}")
    _check_positive("active_learning.steps", al.steps, strict=False)
    _check_positive("active_learning.rounds_per_step", al.rounds_per_step)
    _check_positive("active_learning.local_epochs", al.local_epochs)
    syn = cfg.synthetic
    _check_choice("synthetic.training", syn.training, SYNTHETIC_TRAINING)
    _check_choice("synthetic.policy", syn.policy, SYNTHETIC_POLICIES)
    _check_choice("synthetic.aggregation", syn.aggregation, GENERATOR_AGGREGATIONS)
    _check_choice("synthetic.prediction", syn.prediction, GENERATOR_PREDICTIONS)
    _check_choice("synthetic.domain_weighting", syn.domain_weighting, GENERATOR_DOMAIN_WEIGHTINGS)
    if syn.domain_weighting == "balanced" and not cfg.domains.names:
        raise ConfigError("synthetic.domain_weighting", "balanced needs acquisition domains (domains.names); "
                                                        "without them use size")
    if syn.training == "local" and syn.policy != "client_sample":
        raise ConfigError("synthetic.policy", f"training=local needs policy=client_sample (the server holds no "
                                              f"generator to sample), got {syn.policy}")
    if syn.enabled and syn.training == "pretrained" and not Path(syn.generator_path).is_dir():
        raise ConfigError("synthetic.generator_path", f"directory not found: '{syn.generator_path}' (needed by training=pretrained)")
    for name in ("rounds", "local_steps", "batch_size", "ddim_steps", "quality_per_class"):
        _check_positive(f"synthetic.{name}", getattr(syn, name))
    for name in ("lr", "max_ratio", "loss_weight"):
        _check_positive(f"synthetic.{name}", getattr(syn, name))
    _check_positive("synthetic.target_per_class", syn.target_per_class, strict=False)
    _check_positive("synthetic.guidance_scale", syn.guidance_scale, strict=False)
    if syn.tail_guidance_scale is not None:
        _check_positive("synthetic.tail_guidance_scale", syn.tail_guidance_scale, strict=False)
    for name in ("guidance_rescale", "tail_guidance_rescale"):
        value = getattr(syn, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"synthetic.{name}", f"must be in [0, 1], got {value}")
    _check_positive("synthetic.snr_gamma", syn.snr_gamma, strict=False)
    check_synthetic_loop(cfg)
    if cfg.data.dataset in LOCAL_DATASETS or "/" not in cfg.data.dataset:
        _check_choice("data.dataset", cfg.data.dataset, list(LOCAL_DATASETS) + ["<hf-owner>/<name>"])


def check_domains(domains: DomainsConfig) -> None:
    """The ``domains`` block: known, distinct transforms; one share each (>= 0, summing to 1); positive strengths."""
    for name in domains.names:
        _check_choice("domains.names", name, DOMAIN_TRANSFORM_NAMES)
    if len(set(domains.names)) != len(domains.names):
        raise ConfigError("domains.names", f"each domain must appear once, got {list(domains.names)}")
    shares = list(domains.shares)
    if shares and not domains.names:
        raise ConfigError("domains.shares", "needs domains.names (the domains the shares are of)")
    if shares and len(shares) != len(domains.names):
        raise ConfigError("domains.shares", f"needs one share per domain ({len(domains.names)}), got {len(shares)}")
    if any(share < 0 for share in shares) or (shares and abs(sum(shares) - 1.0) > 1e-6):
        raise ConfigError("domains.shares", f"must be >= 0 and sum to 1, got {shares}")
    for name in ("gamma", "contrast", "blur_sigma", "noise_std"):
        _check_positive(f"domains.{name}", getattr(domains, name))


def check_synthetic_loop(cfg: ExperimentConfig) -> None:
    """``synthetic.condition`` and ``synthetic.closed_loop_every``: what each needs of the rest of the config."""
    syn = cfg.synthetic
    _check_choice("synthetic.condition", syn.condition, GENERATOR_CONDITIONS)
    if syn.condition == "class_domain" and not cfg.domains.names:
        raise ConfigError("synthetic.condition", "class_domain needs domains.names (the domains to condition on)")
    if syn.condition == "class_domain" and syn.training == "local":
        raise ConfigError("synthetic.condition", "class_domain needs a shared generator (training federated, "
                                                 "central or pretrained): a client's own sees one domain only")
    _check_positive("synthetic.closed_loop_every", syn.closed_loop_every, strict=False)
    if not syn.closed_loop_every:
        return
    if syn.training == "local":
        raise ConfigError("synthetic.closed_loop_every", "needs a generator on the server (training federated, "
                                                         "central or pretrained), got training=local")
    if cfg.active_learning.enabled:
        raise ConfigError("synthetic.closed_loop_every", "is for the rounds of one federation; "
                                                         "switch active_learning off or set it to 0")
    if cfg.eval.split != "validation":  # the errors steer training: the test set must not
        raise ConfigError("synthetic.closed_loop_every", "reads the global model's errors to steer training, so "
                                                         "it needs eval.split=validation (never the test set)")
    if syn.closed_loop_every % cfg.eval.every:
        raise ConfigError("synthetic.closed_loop_every",
                          f"must be a multiple of eval.every ({cfg.eval.every}): the top-up reads that round's "
                          f"errors, got {syn.closed_loop_every}")

"""Typed experiment schema and its OmegaConf loading, merging and validation.

Every run is described by one :class:`ExperimentConfig`. YAML files under
``experiments/`` and dotted ``key=value`` overrides are merged onto the schema once; a wrong
key, type or value raises :class:`ConfigError` naming the field and what is allowed, before
any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedimb.config_input import read_config_file
from fedimb.errors import ConfigError
from fedimb.hostile import FaultsConfig, RobustConfig

LONG_TAIL_PROFILES = ("exp", "step")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "inner_dirichlet", "dir_balance")
LOCAL_DATASETS = ("fmnist", "digits")
DEVICES = ("auto", "cpu", "cuda")
SERVER_DATA = ("none", "dataset")
CLIENT_TESTS = ("local", "balanced")
EVAL_SPLITS = ("test", "validation")
HEADS = ("auto", "linear", "cosine")
# the losses that score s·cos(feature, class weight) (LDAM, Cao et al. 2019): model.head=auto takes the cosine head
COSINE_HEAD_LOSSES = ("ldam_drw",)
SYNTHETIC_TRAINING = ("federated", "local", "central", "pretrained")
SYNTHETIC_POLICIES = ("server_pool", "client_sample")
GENERATOR_AGGREGATIONS = ("class_aware", "fedavg")
GENERATOR_PREDICTIONS = ("epsilon", "v_prediction")
# what the generator is conditioned on: the class, or the (class, domain) pair (domains.names)
GENERATOR_CONDITIONS = ("class", "class_domain")
# how the generator's FedAvg weighs the clients: by their size, or each acquisition domain alike
GENERATOR_DOMAIN_WEIGHTINGS = ("size", "balanced")
# the acquisition "devices" of fedimb/data/domains.py (its DOMAIN_TRANSFORMS has one entry each)
DOMAIN_TRANSFORM_NAMES = ("clean", "gamma", "contrast", "blur", "noise", "invert", "rotate")


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how images are normalised."""

    dataset: str = "fmnist"  # fmnist | digits | any Hugging Face dataset id
    root: str = "/usr/share/datasets/fashion-mnist"
    hf_image_key: str = "auto"
    hf_label_key: str = "auto"
    hf_test_split: str = "test"
    validation_fraction: float = 0.0  # share of each training class held out for tuning
    scaling: str = "standard"  # standard: per-channel mean 0 / std 1; unit: pixels in [0, 1] (ToTensor)


@dataclass
class ImbalanceConfig:
    """Global long tail applied to the training set before partitioning."""

    factor: float = 1.0  # rho = n_max / n_min; 1 keeps the dataset as it is
    profile: str = "exp"  # exp | step
    step_minor_fraction: float = 0.5  # step: share of classes that are minority


@dataclass
class PartitionConfig:
    """How the (long-tailed) training set is split over clients."""

    name: str = "iid"
    alpha: float = 0.5  # dirichlet, quantity, inner_dirichlet, dir_balance
    min_size: int = 10  # dirichlet: smallest partition accepted
    classes_per_client: int = 2  # shards: #C = k
    normalise_rounds: int = 5  # dir_balance: row/column normalisation passes
    # NIID-Bench's noise-based feature imbalance, on top of any scheme: client i of K adds Gaussian
    # noise of std noise_sigma * i / (K - 1) to its images (client 0 none, the last noise_sigma), in
    # pixel units of [0, 1] (NIID-Bench adds it after ToTensor); 0 = off
    noise_sigma: float = 0.0
    # every kept training sample enters the split this many times, so a federation may have more
    # clients than samples (the scale benchmark's 100,000 clients on Fashion-MNIST's 60,000)
    copies: int = 1


@dataclass
class DomainsConfig:
    """Acquisition domains: every client's images pass through the transform of one "device".

    ``names``: the domains, each a transform of ``DOMAIN_TRANSFORM_NAMES`` (empty: no domains);
    ``shares``: the share of the clients in each domain (exact counts by largest remainder;
    empty: equal shares). The server's test set is scored in every domain. The other fields
    are the transforms' strengths.
    """

    names: list[str] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    gamma: float = 2.0  # gamma: pixel ** gamma (> 1 darkens the mid-tones)
    contrast: float = 0.5  # contrast: each image pulled towards its own mean by this factor
    blur_sigma: float = 1.0  # blur: Gaussian blur, std in pixels
    noise_std: float = 0.2  # noise: sensor noise, std in pixel units of [0, 1], clipped to [0, 1]
    rotation: float = 90.0  # rotate: degrees counter-clockwise, black corners


@dataclass
class FederationConfig:
    """Size of the federation and its schedule."""

    num_clients: int = 10
    rounds: int = 10
    fraction: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    # A round finishes with the valid replies it got when there are at least this many: a count
    # (int) or a fraction (float) of the clients sampled; fewer fail the run naming who and why.
    min_replies: Union[int, float] = 1.0
    # seconds a round waits for replies (0 = Flower's default, 3600); in simulation round 1 also
    # pays each client process's start (imports, data), since no hello round warms them up
    round_timeout: float = 0.0
    norm_factor: float = 0.0  # reject an update whose norm > k × the round's median update norm (0 = off)


@dataclass
class StrategyConfig:
    """Server strategy by registry name; ``params`` are checked by that strategy."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    robust: RobustConfig = field(default_factory=RobustConfig)


@dataclass
class ModelConfig:
    """Model by registry name; ``head``: linear | cosine | auto (cosine for the losses that
    score cosines, LDAM's; linear otherwise)."""

    name: str = "lenet"
    head: str = "auto"


@dataclass
class LossConfig:
    """Client loss by registry name; ``params`` are checked by that loss."""

    name: str = "ce"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Local SGD on each client."""

    local_epochs: int = 1
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-5
    # Step decay: lr × lr_decay_factor after each listed fraction of the rounds (of the active-learning
    # stage when active learning runs); FairFAL's protocol is [0.75] (×0.1 after round 75 of 100).
    lr_decay_at: list[float] = field(default_factory=list)
    lr_decay_factor: float = 0.1
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class EvalConfig:
    """Centralised (balanced test set) and client-side evaluation."""

    split: str = "test"  # test (balanced test set) | validation (held-out training samples)
    every: int = 1  # centralised evaluation every N rounds (the last round always)
    client_every: int = 1  # client-side evaluation every N rounds; 0 switches it off
    batch_size: int = 1024
    # Federated evaluation: the metrics of the summed confusion matrices of the clients' local
    # test splits (columns federated_*; the main columns when the server holds no test set).
    federated: bool = False
    # The test set a deployed server is given (under ``flwr run``): "none", so evaluation is
    # federated; "dataset" the config's own test split. A simulation's server always has it.
    server_data: str = "none"
    # A simulated client's evaluation set: "local", test samples in its own label mix; "balanced",
    # the whole balanced test set (so a method without a global model, FedProto, is scored like
    # the others' global model). A deployed site always uses its own.
    client_test: str = "local"


@dataclass
class SimulationConfig:
    """Flower simulation engine on Ray."""

    num_cpus: float = 1.0  # per client
    # GPUs per client, may be fractional: Ray places each client's actor on a GPU id (0.25: four
    # clients share one card; 8 clients at 0.5 spread over 2 cards) and the client trains there
    num_gpus: float = 0.0
    # auto: the GPU Ray assigned when CUDA can use it, else the CPU (with a warning when Ray
    # assigned one); cuda: that GPU or the client fails; cpu: never a GPU
    device: str = "auto"
    ray_address: str = ""  # join an existing Ray cluster ("auto" or host:port) instead of starting one
    # GPUs the Ray this run starts declares, instead of the ones Ray detects (0 = detect). Declared
    # GPUs need not exist: on a CPU machine they exercise GPU placement, each client falling back
    # to the CPU under device=auto. A joined cluster (ray_address) declares its own (ray start --num-gpus).
    ray_num_gpus: int = 0
    threads_per_client: int = 1
    verbose: bool = False


@dataclass
class ActiveLearningConfig:
    """Federated active learning: labelled pools grow by queries between FL stages."""

    enabled: bool = False
    initial_fraction: float = 0.05  # of each client's pool, labelled at random before step 0
    step_fraction: float = 0.05  # budget per step: round(N_train, -2) * step_fraction / K per client
    steps: int = 8  # query steps (5% -> 45% with the defaults)
    rounds_per_step: int = 10  # FedAvg rounds of each stage
    reset_model: bool = True  # fresh random init every stage (the FairFAL paper) or continue
    sampler: str = "random"
    sampler_params: dict[str, Any] = field(default_factory=dict)
    local_epochs: int = 50  # local-only model (samplers that need one): at most this many epochs
    local_stop_accuracy: float = 0.99  # ... stopping once its train accuracy reaches this


@dataclass
class SyntheticConfig:
    """Synthetic minority samples from a class-conditional diffusion generator."""

    enabled: bool = False
    generator_size: str = "cpu"  # fedimb.synthetic.generator.GENERATOR_SIZES
    # federated: FedAvg over the generator's weights; local: every client trains its own on its own
    # data (nothing leaves it; it can top up only the classes it holds); central: the server on
    # every client's images (simulation only); pretrained: load generator_path
    training: str = "federated"
    generator_path: str = ""  # pretrained: a Generator.save_pretrained folder
    rounds: int = 5  # federated generator rounds
    # class_aware: row c of the class embedding is averaged over the clients holding class c,
    # weighted by their count of it (FedAvg would shrink its update by the share of clients that
    # lack c); the null row and all other weights are FedAvg. fedavg: plain FedAvg everywhere.
    aggregation: str = "class_aware"
    balanced_batches: bool = True  # each class a client holds is drawn equally often in its batches
    local_steps: int = 200  # generator steps per client per round (central: steps × clients × rounds)
    batch_size: int = 64
    lr: float = 2e-3
    # Min-SNR loss weighting min(SNR, gamma)/SNR (Hang et al. 2023); 0 = plain epsilon MSE.
    # 5 lifted mean recognisability 0.547 -> 0.653 at equal steps (docs/results/synthetic_generator_probe.md)
    snr_gamma: float = 5.0
    # What the UNet predicts: epsilon (the noise) or v_prediction (Salimans & Ho 2022).
    prediction: str = "epsilon"
    guidance_scale: float = 2.0
    # phi of guidance rescale (Lin et al. 2023): 0 = plain guidance. Lets guidance go above 1.5
    # without saturated, collapsed classes: more recognisable samples, but on FMNIST-LT less useful
    # pools (docs/results/synthetic_generator_probe.md and synthetic_tuning.md)
    guidance_rescale: float = 0.0
    # A sampler of their own for the tail third of the classes (fewest training samples over all
    # clients, the classes of tail recall); None = guidance_scale / guidance_rescale. Strong
    # guidance narrows a class towards its mode: the head classes gain recognisability, while the
    # tail classes, learned from a few dozen images, may be better off keeping their variety.
    tail_guidance_scale: float | None = None
    tail_guidance_rescale: float | None = None
    ddim_steps: int = 20
    policy: str = "server_pool"  # server_pool: server samples and ships; client_sample: clients sample
    target_per_class: int = 0  # top up every class to this count (0 = the client's largest class)
    max_ratio: float = 1.0  # cap on synthetic:real samples per client
    loss_weight: float = 1.0  # weight of a synthetic sample in the loss, relative to a real one
    quality_per_class: int = 100  # generated samples per class for the recognisability report
    cache_dir: str = "runs/cache/synthetic"  # generators and pools keyed by what made them; "" = off
    # class: the generator is conditioned on the class and the top-up fills each client's classes;
    # class_domain: conditioned on the (class, acquisition domain) pair (needs domains.names), and
    # the top-up fills each client's missing pairs, the other domains' included, so a client that
    # never saw a device gets samples of it (pairs no client holds were never learned: skipped)
    condition: str = "class"
    # size: the generator's FedAvg weighs each client by its samples, so a device held by one client of
    # ten moves the shared UNet by that client's share; balanced (needs domains.names): every domain
    # in the round gets the same share of the weight, split among its clients by size
    domain_weighting: str = "size"
    # Closed-loop top-up: every K rounds the global model's per-class error (and per-domain error
    # with domains) on the server's evaluation set (federated evaluation's without one) sets each
    # client's next pool: targets proportional to the error, same total, same caps. 0 = off (the
    # static top-up, computed once from counts). eval.split=validation keeps the test set unseen.
    closed_loop_every: int = 0


@dataclass
class ExperimentConfig:
    """One federated experiment."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    active_learning: ActiveLearningConfig = field(default_factory=ActiveLearningConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


def _allowed_keys(node: DictConfig) -> str:
    return ", ".join(str(k) for k in node.keys())


def _unknown_key(key: str) -> ConfigError:
    parent = ".".join(key.split(".")[:-1])
    schema = OmegaConf.structured(ExperimentConfig)
    node = OmegaConf.select(schema, parent) if parent else schema
    allowed = _allowed_keys(node) if isinstance(node, DictConfig) else "(none: not a section)"
    return ConfigError(key, f"unknown key; allowed keys here: {allowed}")


def _merge_error(exc: OmegaConfBaseException) -> ConfigError:
    """Turn an OmegaConf error into one line naming the field."""
    key = str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?")
    msg = str(exc).splitlines()[0]
    if "not in" in msg and msg.startswith("Key"):
        return _unknown_key(key)
    return ConfigError(key, msg)


def _parse_override(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        dotted = text.strip()  # a bare key is named as the field; anything else as the override
        named = dotted if all(part.isidentifier() for part in dotted.split(".")) else "override"
        raise ConfigError(named, f"{text!r} must look like key=value")
    return key.strip(), value


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load YAML ``path`` (optional), apply dotted ``overrides``, validate, return a typed config."""
    merged = OmegaConf.structured(ExperimentConfig)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, read_config_file(Path(path)))
        for text in overrides:
            key, value = _parse_override(text)
            if OmegaConf.select(merged, key, default="__missing__") == "__missing__" and not (
                key.startswith(("strategy.params.", "train.loss.params.", "active_learning.sampler_params."))
            ):
                raise _unknown_key(key)
            OmegaConf.update(merged, key, _yaml_value(value), merge=True)
    except OmegaConfBaseException as exc:
        raise _merge_error(exc) from None
    cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    from fedimb.config_checks import validate  # it reads this module's schema and choices

    validate(cfg)
    return cfg


def _yaml_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null)."""
    try:
        return OmegaConf.create({"v": text} if text == "" else f"v: {text}")["v"]
    except yaml.YAMLError as exc:
        raise ConfigError("override", f"value {text!r} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> ExperimentConfig:
    """Rebuild a typed config from :func:`to_yaml` text (used to ship it to ClientApps)."""
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def registered(registry: dict[str, Any], name: str, field_name: str) -> Any:
    """The registry entry ``name``, or a ConfigError naming the field and the registered names."""
    if name not in registry:
        raise ConfigError(field_name, f"'{name}' is not allowed; choose one of {', '.join(registry)}")
    return registry[name]


def build_params(params_cls: type, values: dict[str, Any], field_prefix: str) -> Any:
    """Build the params dataclass of a registered algorithm from a YAML dict, checking keys and types."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(params_cls), values)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", None) or getattr(exc, "key", "?"))
        msg = str(exc).splitlines()[0]
        if msg.startswith("Key") and "not in" in msg:
            allowed = ", ".join(str(k) for k in OmegaConf.structured(params_cls).keys()) or "(none)"
            return_msg = f"unknown parameter; allowed: {allowed}"
        else:
            return_msg = msg
        raise ConfigError(f"{field_prefix}.{key}", return_msg) from None
    params = OmegaConf.to_object(merged)
    check = getattr(params, "check", None)
    if callable(check):
        check(field_prefix)
    return params

"""The fedimb ClientApp: ``query`` (hello), ``train`` and ``evaluate`` handlers.

The experiment config travels in every message (``fedimb-config``), so the same ClientApp
serves ``fedimb run`` (simulation on Ray) and ``flwr run`` on SuperLink/SuperNodes. In
simulation a node rebuilds its partition from (dataset, partition spec, seed, ``partition-id``);
a deployed site names its own data with ``data-path`` in its node config (see
:mod:`fedimb.data.sites`) and trains and evaluates on it as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.active import (keeps_last_local_model, labelled_positions, last_local_model, query_step,
                            store_last_local_model, store_positions)
from clients.algorithms import CLIENT_ALGORITHMS
from clients.algorithms.base import ClientAlgorithm, ClientRound
from clients.losses import LossContext, build_loss
from clients.synthetic import generator_from, load_pool, local_generator, pool_tensors, store_pool
from clients.device import client_device
from clients.trainer import round_lr, to_tensors, train_local
from fedimb import protocol
from fedimb.config import ExperimentConfig, from_yaml
from fedimb.protocol import derive_seed
from fedimb.data import build_federated_data, client_test_images, client_train_data
from fedimb.data.datasets import DatasetSplits
from fedimb.data.local_testset import local_test_indices
from fedimb.data.domains import client_domains
from fedimb.data.sites import SiteSpec, node_site, site_domain, site_spec
from fedimb.faults import FaultPlan
from fedimb.metrics import confusion
from fedimb.models import FeatureClassifier, build_configured_model, build_model, get_weights, set_weights
from fedimb.synthetic.allocation import client_generator_domain
from fedimb.synthetic.topup import ClassSampler, judge_hits, sample_pool, topup_counts, topup_seed, train_as_configured

app = ClientApp()
SPEC_KEY = "site-spec"  # node state, not the wire: the spec a site's data must fit


@functools.lru_cache(maxsize=4)
def _parse_config(text: str) -> ExperimentConfig:
    return from_yaml(text)


@dataclass
class ClientSession:
    """What one handler needs: the config, this node's data on its device, and ids."""

    cfg: ExperimentConfig
    partition_id: int
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    class_counts: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    site: DatasetSplits | None = None  # a deployed site's own data (``data-path``); None in simulation
    gpu_ids: list[int] = dataclasses.field(default_factory=list)  # assigned by Ray ([]: none)
    domain: str | None = None  # the acquisition domain of its images (None: not named)


def _config_of(message: Message, context: Context) -> ExperimentConfig:
    config = message.content.get(protocol.CONFIG)
    if config is None or protocol.EXPERIMENT_CONFIG not in config:
        raise ValueError(f"message lacks the '{protocol.EXPERIMENT_CONFIG}' config value; is this a fedimb ServerApp?")
    cfg = _parse_config(str(config[protocol.EXPERIMENT_CONFIG]))
    root = context.node_config.get(protocol.NODE_DATA_ROOT)
    if root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)))
    return cfg


def _session(message: Message, context: Context) -> ClientSession:
    cfg = _config_of(message, context)
    torch.set_num_threads(cfg.simulation.threads_per_client)
    partition_id = int(context.node_config[protocol.NODE_PARTITION_ID])
    if context.node_config.get(protocol.NODE_DATA_PATH):
        return _site_session(cfg, context, partition_id)  # a site is who its own node config says
    config = message.content.get(protocol.CONFIG)
    if config is not None and protocol.ASSIGNED_PARTITION in config:  # simulation: the server's choice
        partition_id = int(config[protocol.ASSIGNED_PARTITION])
    data = build_federated_data(cfg)
    if not 0 <= partition_id < len(data.client_indices):
        raise ValueError(f"partition-id {partition_id} outside 0..{len(data.client_indices) - 1}")
    device, gpu_ids = client_device(cfg.simulation.device)
    x, y = to_tensors(*client_train_data(data, cfg, partition_id), device)  # through its domain and noise level
    counts = torch.tensor(data.counts[partition_id], dtype=torch.float32, device=device)
    domains = client_domains(cfg)
    return ClientSession(cfg, partition_id, device, x, y, counts, data.splits.num_classes,
                         data.splits.input_shape, gpu_ids=gpu_ids, domain=None if domains is None else domains[partition_id])


def _site_spec(cfg: ExperimentConfig, state: RecordDict) -> SiteSpec:
    """The experiment dataset's classes, shape and normalisation, kept in the node state.

    A SuperNode starts a ClientApp process for every message, and computing the spec reads
    the whole dataset: the site's first message of a run does it, the others read it back.
    """
    if SPEC_KEY in state:
        return SiteSpec.from_json(str(state[SPEC_KEY]["json"]))
    spec = site_spec(cfg.data)
    state[SPEC_KEY] = ConfigRecord({"json": spec.to_json()})
    return spec


def _site_session(cfg: ExperimentConfig, context: Context, partition_id: int) -> ClientSession:
    """A deployed site trains on its own data as it is: no global long tail, no partition."""
    site = node_site(context.node_config, _site_spec(cfg, context.state))
    device, gpu_ids = client_device(cfg.simulation.device)
    x, y = to_tensors(site.train_x, site.train_y, device)
    counts = torch.bincount(y, minlength=site.num_classes).float()
    return ClientSession(cfg, partition_id, device, x, y, counts, site.num_classes, site.input_shape, site, gpu_ids,
                         site_domain(context.node_config))


def _local_test(session: ClientSession) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's test split: a site's own; in simulation test samples in its label mix, or
    (``eval.client_test=balanced``) the whole balanced test set."""
    if session.site is not None:
        return to_tensors(session.site.test_x, session.site.test_y, session.device)
    cfg = session.cfg
    data = build_federated_data(cfg)
    if cfg.eval.client_test == "balanced":
        idx = np.arange(len(data.splits.test_y))
    else:
        idx = local_test_indices(data.splits.test_y, data.counts[session.partition_id],
                                 cfg.federation.num_clients, cfg.seed, session.partition_id)
    return to_tensors(client_test_images(data, cfg, session.partition_id, idx), data.splits.test_y[idx], session.device)


def _labelled_view(session: ClientSession, context: Context) -> ClientSession:
    """In active learning, a client trains on its labelled pool only."""
    if not session.cfg.active_learning.enabled:
        return session
    positions = labelled_positions(context.state, len(session.y), session.cfg, session.partition_id)
    idx = torch.from_numpy(positions).to(session.device)
    y = session.y[idx]
    counts = torch.bincount(y, minlength=session.num_classes).float()
    return dataclasses.replace(session, x=session.x[idx], y=y, class_counts=counts)


def _model(session: ClientSession, arrays: ArrayRecord) -> tuple[FeatureClassifier, dict[str, torch.Tensor]]:
    model = build_configured_model(session.cfg, session.input_shape, session.num_classes, session.cfg.seed)
    global_weights = arrays.to_torch_state_dict()
    set_weights(model, global_weights)
    return model.to(session.device), global_weights


def _algorithm(content: RecordDict) -> type[ClientAlgorithm]:
    """The client algorithm the server's message names."""
    config = content[protocol.CONFIG]
    return CLIENT_ALGORITHMS[str(config.get(protocol.CLIENT_ALGORITHM, protocol.DEFAULT_CLIENT_ALGORITHM))]


def _round_model(session: ClientSession, content: RecordDict, context: Context,
                 algorithm_cls: type[ClientAlgorithm]) -> tuple[FeatureClassifier, dict[str, torch.Tensor]]:
    """The model this round starts from and its weights: the server's global model, or the client's
    own where the algorithm keeps one (FedProto)."""
    if not algorithm_cls.owns_model:
        return _model(session, content[protocol.ARRAYS])
    model = algorithm_cls.own_model(session.cfg, content, context.state, session.input_shape, session.num_classes,
                                    session.partition_id).to(session.device)
    return model, {k: v.clone() for k, v in get_weights(model).items()}


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds, how many samples, their class counts and shape.

    In active learning only the labelled pool's labels are known, so only its counts are sent.
    """
    session = _session(message, context)
    known = _labelled_view(session, context)
    metrics = MetricRecord({
        protocol.PARTITION_ID: session.partition_id,
        protocol.NUM_EXAMPLES: int(session.y.shape[0]),
        protocol.CLASS_COUNTS: [int(c) for c in known.class_counts.tolist()],
        protocol.INPUT_SHAPE: [int(s) for s in session.input_shape],
        protocol.VALUE_RANGE: [float(session.x.min()), float(session.x.max())] if len(session.x) else [0.0, 0.0],
    })
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)


def _with_synthetic(session: ClientSession, context: Context) -> tuple[ClientSession, int | None]:
    """Append the stored synthetic pool to the real data; returns the number of real samples."""
    pool = load_pool(context.state, session.device)
    if pool is None or len(pool[1]) == 0:
        return session, None
    x, y = torch.cat([session.x, pool[0]]), torch.cat([session.y, pool[1]])
    counts = session.class_counts + torch.bincount(pool[1], minlength=session.num_classes).float()
    return dataclasses.replace(session, x=x, y=y, class_counts=counts), int(len(session.y))


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training from the global weights; replies weights, counts and train loss."""
    session, real_count = _with_synthetic(_labelled_view(_session(message, context), context), context)
    cfg = session.cfg
    config = message.content[protocol.CONFIG]
    algorithm_cls = _algorithm(message.content)
    model, global_weights = _round_model(session, message.content, context, algorithm_cls)
    server_round = int(config.get(protocol.SERVER_ROUND, 0))
    faults = FaultPlan.for_round(cfg.faults, cfg.seed, cfg.federation.num_clients, server_round, session.partition_id)
    faults.before_training()  # an injected crash, departure or delay (faults:, simulation only)
    if faults.flips_labels:
        session = dataclasses.replace(session, y=session.num_classes - 1 - session.y,
                                      class_counts=session.class_counts.flip(0))
    stage_rounds = cfg.active_learning.rounds_per_step if cfg.active_learning.enabled else cfg.federation.rounds
    train_cfg = dataclasses.replace(cfg.train, lr=round_lr(cfg.train, server_round, stage_rounds))
    algorithm = algorithm_cls(ClientRound(model, global_weights, message.content, context.state,
                                          train_cfg.lr, cfg.train.momentum, session.x, session.y,
                                          session.class_counts, cfg.eval.batch_size, real_count))
    loss_fn, loss_params = build_loss(cfg.train.loss.name, cfg.train.loss.params)
    torch.manual_seed(derive_seed(cfg.seed, "train-init", server_round, session.partition_id))
    global_counts = config.get(protocol.GLOBAL_CLASS_COUNTS)
    loss_ctx = LossContext(session.class_counts, progress=server_round / stage_rounds,
                           global_counts=None if global_counts is None else torch.tensor(global_counts, dtype=torch.float32))
    result = train_local(model, session.x, session.y, train_cfg, loss_fn, loss_params, loss_ctx, algorithm,
                         seed=derive_seed(cfg.seed, "train-batches", server_round, session.partition_id),
                         real_count=real_count, synthetic_weight=cfg.synthetic.loss_weight)
    if keeps_last_local_model(cfg):
        store_last_local_model(context.state, model)
    reply = RecordDict({protocol.ARRAYS: faults.corrupt(algorithm.reply_arrays(), message.content[protocol.ARRAYS])})
    metrics: dict = {
        protocol.NUM_EXAMPLES: int(len(session.y) if real_count is None else real_count),
        protocol.TRAIN_LOSS: result.mean_loss,
        protocol.LOCAL_STEPS: result.steps,
        protocol.GPU_IDS: list(session.gpu_ids),  # the run records per round which GPUs trained
    }
    algorithm.finish(result.steps, reply, metrics)
    reply[protocol.METRICS] = MetricRecord(metrics)
    return Message(reply, reply_to=message)


@app.train(protocol.GENERATOR_ACTION)
def train_generator_round(message: Message, context: Context) -> Message:
    """One federated round of the diffusion generator on this client's real data (no image leaves)."""
    session = _session(message, context)
    generator = generator_from(message.content[protocol.ARRAYS], message.content[protocol.CONFIG], session.cfg,
                               session.input_shape, session.num_classes).to(session.device)
    server_round = int(message.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0))
    # a (class, domain) generator learns this client's classes as pairs with its own domain
    labels = generator.condition_ids(session.y, client_generator_domain(session.cfg, session.partition_id))
    # EMA restarts on every call: over a few hundred local steps it would lag the weights being averaged
    loss = train_as_configured(generator, session.x, labels, session.cfg.synthetic,
                               steps=session.cfg.synthetic.local_steps, ema_decay=0.0,
                               seed=derive_seed(session.cfg.seed, "generator-round", server_round, session.partition_id))
    metrics = MetricRecord({protocol.NUM_EXAMPLES: int(len(session.y)), protocol.GENERATOR_LOSS: float(loss)})
    reply = RecordDict({protocol.ARRAYS: ArrayRecord(generator.to("cpu").state_dict()), protocol.METRICS: metrics})
    return Message(reply, reply_to=message)


@app.query(protocol.TOPUP_ACTION)
def topup(message: Message, context: Context) -> Message:
    """Store the synthetic pool: shipped by the server, sampled here from a shipped generator, or
    sampled from this client's own generator (``synthetic.training=local``)."""
    session = _session(message, context)
    syn = session.cfg.synthetic
    config = message.content[protocol.CONFIG]
    sampler = ClassSampler.from_config(config)
    # 0: the static top-up; r: the closed loop's after round r (its own seed; the pool is replaced)
    seed = topup_seed(session.cfg.seed, session.partition_id, int(config.get(protocol.SERVER_ROUND, 0)))
    report: dict[str, Any] = {}  # what a local generator's client tells the server: counts and timings
    if protocol.POOL in message.content:
        x, y = pool_tensors(message.content[protocol.POOL])
    elif bool(config.get(protocol.TRAIN_LOCAL, False)):
        x, y, report = _local_topup(session, message, sampler, seed)
    else:
        generator = generator_from(message.content[protocol.GENERATOR], config, session.cfg, session.input_shape,
                                   session.num_classes)
        # the server's plan (pairs, or the closed loop's), else this client's own class counts decide
        counts = (np.asarray(config[protocol.TOPUP_COUNTS], dtype=np.int64) if protocol.TOPUP_COUNTS in config else
                  topup_counts(session.class_counts.cpu().numpy().astype(int), syn.target_per_class, syn.max_ratio))
        x, y = sample_pool(generator.to(session.device), counts, syn, seed=seed, sampler=sampler)
    store_pool(context.state, x, y)
    metrics = MetricRecord({protocol.PARTITION_ID: session.partition_id, protocol.NUM_SYNTHETIC: int(len(y)), **report})
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)


def _local_topup(session: ClientSession, message: Message, sampler: ClassSampler | None,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train (or reload) this client's own generator, score it with the shipped judge, sample its pool.

    Returns the pool and its report: counts and timings only, no image and no generator weight.
    """
    syn = session.cfg.synthetic
    config = message.content[protocol.CONFIG]
    cache = Path(str(config[protocol.LOCAL_GENERATOR_DIR])) if protocol.LOCAL_GENERATOR_DIR in config else None
    generator, seconds, reused = local_generator(session.x, session.y, session.cfg, session.input_shape,
                                                 session.num_classes, session.partition_id, cache)
    held = session.class_counts.cpu().numpy().astype(int)
    report: dict[str, Any] = {protocol.GENERATOR_TRAINING_S: seconds, protocol.GENERATOR_REUSED: int(reused),
                              protocol.GENERATOR_PARAMS: generator.num_parameters}
    if protocol.JUDGE in message.content:
        judge = build_model("lenet", session.input_shape, session.num_classes)
        judge.load_state_dict(message.content[protocol.JUDGE].to_torch_state_dict())
        hits, scored, per_second = judge_hits(generator, judge.to(session.device), held, syn, seed, sampler)
        report.update({protocol.QUALITY_HITS: hits, protocol.QUALITY_SCORED: scored,
                       protocol.SAMPLING_IMAGES_PER_S: per_second})
    counts = topup_counts(held, syn.target_per_class, syn.max_ratio, only_held=True)
    return (*sample_pool(generator, counts, syn, seed=seed, sampler=sampler), report)


@app.query(protocol.SELECT_ACTION)
def select(message: Message, context: Context) -> Message:
    """Active-learning query: pick samples with the configured sampler, reveal their labels."""
    session = _session(message, context)
    cfg = session.cfg
    model, _ = _model(session, message.content[protocol.ARRAYS])
    config = message.content[protocol.CONFIG]
    labelled = labelled_positions(context.state, len(session.y), cfg, session.partition_id)
    gamma_bar = float(config[protocol.GAMMA_BAR]) if protocol.GAMMA_BAR in config else None
    step = int(config.get(protocol.FAL_STEP, 0))
    grown, report = query_step(cfg, model, session.x, session.y, labelled, int(config[protocol.BUDGET]), gamma_bar,
                               derive_seed(cfg.seed, "fal-query", step, session.partition_id),
                               session.input_shape, session.num_classes,
                               last_local_model(context.state, cfg, session.input_shape, session.num_classes,
                                                session.device))
    store_positions(context.state, grown)
    metrics = {protocol.PARTITION_ID: session.partition_id, protocol.NUM_LABELLED: int(len(grown)), **report}
    return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy of the global model on this client's local test set (its own label mix)."""
    session = _session(message, context)
    cfg = session.cfg
    FaultPlan.for_round(cfg.faults, cfg.seed, cfg.federation.num_clients,  # a client that left answers nothing
                        int(message.content[protocol.CONFIG].get(protocol.SERVER_ROUND, 0)),
                        session.partition_id).before_evaluation()
    algorithm_cls = _algorithm(message.content)
    model, _ = _round_model(session, message.content, context, algorithm_cls)
    x, y = _local_test(session)
    logits = algorithm_cls.evaluation_logits(model, x, message.content, cfg.eval.batch_size)
    predicted = logits.argmax(1)
    correct = int((predicted == y).sum()) if len(y) else 0
    loss = float(torch.nn.functional.cross_entropy(logits, y)) if len(y) else 0.0
    matrix = confusion(y.cpu().numpy(), predicted.cpu().numpy(), session.num_classes)
    metrics = MetricRecord({
        protocol.NUM_EXAMPLES: int(len(y)),
        protocol.ACCURACY: correct / max(len(y), 1),
        protocol.LOSS: loss,
        protocol.PARTITION_ID: session.partition_id,
        protocol.CONFUSION: [int(v) for v in matrix.ravel()],
    })
    reply = RecordDict({protocol.METRICS: metrics})
    if session.domain is not None:
        reply[protocol.CONFIG] = ConfigRecord({protocol.DOMAIN: session.domain})
    return Message(reply, reply_to=message)

"""The wire between fedimb's ServerApp and ClientApp, defined once for both sides.

Message types, the names of records and of config / metric values that cross the wire, the
node-config keys a SuperNode is started with, the defaults both sides read, and
:func:`derive_seed`, the one place a per-purpose seed is made from the run's seed.

Flower's own conventions (the ``arrays`` / ``metrics`` / ``config`` records of a message,
``server-round``, ``proximal-mu``, the weighting metric ``num-examples``) are Flower's and are
named here so that fedimb code reads them from one place too.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import MessageType

# ---- message types: Flower's type, an action after the dot ----------------------------------
# (the ClientApp registers its handlers by action: ``@app.query(SELECT_ACTION)``)
SELECT_ACTION, GENERATOR_ACTION, TOPUP_ACTION = "select", "generator", "topup"
HELLO = MessageType.QUERY  # the server's first question: partition id and class counts
SELECT = f"{MessageType.QUERY}.{SELECT_ACTION}"  # active learning: query labels with a budget
GENERATOR_TRAIN = f"{MessageType.TRAIN}.{GENERATOR_ACTION}"  # one federated round of the diffusion generator
TOPUP = f"{MessageType.QUERY}.{TOPUP_ACTION}"  # store (or sample) the synthetic pool

# ---- records of a message (RecordDict keys) --------------------------------------------------
ARRAYS = "arrays"  # Flower's: model weights
METRICS = "metrics"  # Flower's: a reply's numbers
CONFIG = "config"  # Flower's: the server's knobs for this message
PROTOTYPES = "prototypes"  # server → client: global prototypes P (C×D) and has (C)
PROTOTYPE_STATS = "proto-stats"  # client → server: per-class prototype, count, dispersion, uncertainty
CONTROL = "control"  # SCAFFOLD, server → client: the server control variate c
CONTROL_DELTA = "control-delta"  # SCAFFOLD, client → server: c_i(new) − c_i
POOL = "pool"  # server → client: a synthetic pool sampled on the server (x, y)
GENERATOR = "generator"  # server → client: the generator's weights, for the client to sample
JUDGE = "judge"  # server → client: the reference classifier that scores a local generator

# ---- arrays inside the prototype records ----------------------------------------------------
PROTOTYPE_MATRIX, PROTOTYPE_PRESENT = "P", "has"  # in PROTOTYPES: C×D prototypes, which classes have one
# in PROTOTYPE_STATS, per class: prototype, real count, dispersion σ², mean normalised entropy u, synthetic
# count, quality q = (n_real + r·n_syn) / (n_real + n_syn) with r the global model's recognition of the synthetic
STAT_PROTOTYPES, STAT_COUNTS, STAT_DISPERSION, STAT_UNCERTAINTY = "protos", "counts", "dispersion", "uncertainty"
STAT_SYNTHETIC, STAT_QUALITY = "synthetic", "quality"

# ---- arrays inside a synthetic pool record (POOL) --------------------------------------------
POOL_IMAGES = "x"
POOL_LABELS = "y"

# ---- config values (ConfigRecord keys), server → client --------------------------------------
EXPERIMENT_CONFIG = "fedimb-config"  # the resolved experiment YAML, in every message
CLIENT_ALGORITHM = "client-algorithm"  # which clients/algorithms entry trains this round
DEFAULT_CLIENT_ALGORITHM = "fedavg"  # plain local SGD, when a strategy names none
SERVER_ROUND = "server-round"  # Flower's
# Simulation: the partition the addressed virtual node plays (the server assigns them, so it never
# has to ask every node which one it holds); a deployed site keeps its own node config's
ASSIGNED_PARTITION = "assigned-partition"
CLIENT_MODELS = "client-models"  # FedProto: model names, client i trains models[i mod len] of its own
# The federation's class counts summed over the clients' hello replies: the global prior of
# logit adjustment (Menon et al.), which no single client can know
GLOBAL_CLASS_COUNTS = "global-class-counts"
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx
PROTO_LAMBDA = "proto-lambda"
GEO_LAMBDA = "geo-lambda"
PROTO_TAU = "proto-tau"
FAL_STEP = "fal-step"  # active learning: which query step (also sent with its training rounds)
BUDGET = "budget"  # active learning: labels this client may query
GAMMA_BAR = "gamma-bar"  # FairFAL: the server's mean imbalance γ̄
GENERATOR_RANGE = "generator-range"  # [lo, hi] of the training images, sent with every generator
GUIDANCE_PER_CLASS = "guidance-per-class"  # the per-class sampler, sent with a shipped generator
RESCALE_PER_CLASS = "rescale-per-class"
TRAIN_LOCAL = "train-local"  # synthetic.training=local: the client trains its own generator
LOCAL_GENERATOR_DIR = "local-generator-dir"  # where that generator is cached between runs
# synthetic top-up, server → client: samples per generator label (class, or (class, domain) pair id
# domain·C + class) that a client sampling a shipped generator draws; without it the client sizes its
# top-up from its own class counts. SERVER_ROUND goes with it: 0 the static top-up, r the closed loop's
TOPUP_COUNTS = "topup-counts"

# ---- metric values (MetricRecord keys), client → server --------------------------------------
NUM_EXAMPLES = "num-examples"  # Flower's weighting key: the client's real training samples
PARTITION_ID = "partition-id"
CLASS_COUNTS = "class-counts"
INPUT_SHAPE = "input-shape"  # [C, H, W] of the client's images: the server builds the model from it
VALUE_RANGE = "value-range"  # [lo, hi] of the client's normalised images: the generator's range
TRAIN_LOSS = "train_loss"
LOCAL_STEPS = "local-steps"
GPU_IDS = "gpu-ids"  # train: the GPU ids Ray assigned the client's actor ([]: none, or not under Ray)
ACCURACY = "accuracy"
LOSS = "loss"
CONFUSION = "confusion"  # evaluation: the C×C confusion matrix on the local test split, row-major
CONFIDENCE = "confidence"  # prototype clients: mean 1 − normalised entropy on their data

# ---- config values (ConfigRecord keys of a reply's CONFIG record), client → server ------------
# evaluation: the acquisition domain of the client's images (a simulated client's device, a
# site's own name), so federated evaluation can score every domain
DOMAIN = "domain"
CLIMB_LOSS = "climb-loss"
FEDNOVA_FACTOR = "fednova-a"  # FedNova's normalising factor a_i
GENERATOR_LOSS = "generator_loss"
NUM_SYNTHETIC = "num-synthetic"
NUM_LABELLED = "num-labelled"
LABEL_HISTOGRAM = "histogram"  # labels revealed by this query step
LOCAL_MODEL_FROM_SCRATCH = "local-model-from-scratch"  # 1: a last-round sampler's client had not trained yet
FAIRFAL_GAMMA = "gamma"  # FairFAL: this client's imbalance γ_k, reported at the first query step
QUALITY_HITS = "quality-hits"  # local generator: judge hits per class
QUALITY_SCORED = "quality-scored"  # local generator: images scored per class
GENERATOR_TRAINING_S = "generator-training-s"
GENERATOR_REUSED = "generator-reused"
GENERATOR_PARAMS = "generator-params"
SAMPLING_IMAGES_PER_S = "sampling-images-per-s"

# ---- node config (SuperNode / simulation) ----------------------------------------------------
NODE_PARTITION_ID = "partition-id"  # Flower's simulation sets it; a deployed node names it
NODE_DATA_ROOT = "data-root"
NODE_DATA_PATH = "data-path"  # a deployed site's own data (fedimb/data/sites.py): used as it is, no partition
NODE_DOMAIN = "domain"  # a deployed site's acquisition domain (its scanner, its device): its own name


@dataclass(frozen=True)
class PrototypeLossDefaults:
    """The prototype client's loss knobs when a server does not send them (the params' defaults)."""

    lambda_proto: float = 1.0
    lambda_geo: float = 0.1
    tau: float = 0.2


PROTOTYPE_LOSS = PrototypeLossDefaults()

# ---- seeds -----------------------------------------------------------------------------------
# purpose → (multiplier of the run's seed, multiplier of the round / step). The values are the
# ones every published run used, so old runs reproduce; each stream is named for what it draws.
SEED_STREAMS: dict[str, tuple[int, int]] = {
    "train-init": (100_003, 1_009),  # torch's global RNG before local training
    "train-batches": (1_000_003, 10_007),  # batch order of local training
    "fal-query": (1_000_003, 10_007),  # an active-learning sampler's draws at a query step
    "generator-round": (7_919, 101),  # a federated generator round; a local generator is round 0
    "topup": (31, 0),  # the synthetic pool of one client (server- or client-sampled alike)
    "topup-loop": (31, 1_013),  # a closed-loop pool of one client, after round `step`
    "faults": (104_729, 1_303),  # which injected faults a hostile client shows in a round
    "fault-clients": (15_485_863, 0),  # which clients are hostile (faults.fraction)
}


def derive_seed(seed: int, purpose: str, step: int = 0, client: int = 0) -> int:
    """The seed of ``purpose`` for one client at one round (or step): seed·a + step·b + client."""
    try:
        per_seed, per_step = SEED_STREAMS[purpose]
    except KeyError:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {', '.join(SEED_STREAMS)}") from None
    return seed * per_seed + step * per_step + client

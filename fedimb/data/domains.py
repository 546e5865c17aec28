"""Feature skew: acquisition "devices" as transforms of the images, and NIID-Bench's per-client noise.

Label skew (``fedimb.data.partitions``) decides which samples a client holds; this module decides
how its images look. Two knobs, each composable with any partition and the global long tail:

- ``domains``: every client is assigned one device (``domains.names``, in the shares
  ``domains.shares``, exact counts, which client from the seed) and sees its images through that
  device's transform; the server scores its test set in every domain.
- ``partition.noise_sigma``: NIID-Bench's noise-based feature imbalance; client i of K adds
  Gaussian noise of std ``noise_sigma * i / (K - 1)``.

Every function takes and returns float arrays ``(N, C, H, W)``. The device transforms are written
on pixels in [0, 1] (``gamma_curve`` ... ``rotate``); :func:`apply_domain` wraps them for model
inputs, in whatever scale ``data.scaling`` gave them, through the dataset's
:class:`~fedimb.data.datasets.Normalisation`. Random draws (sensor noise, feature noise) come from
``np.random.default_rng([seed, tag, split, id])``: same config and seed, same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedimb.config import DOMAIN_TRANSFORM_NAMES, DomainsConfig, ExperimentConfig
from fedimb.data.datasets import Normalisation

# Tags of this module's seed streams (the data layer's convention: default_rng([seed, tag, ...])).
_ASSIGN_TAG = 21
_DEVICE_NOISE_TAG = 22
_FEATURE_NOISE_TAG = 23

# Which images a draw is for, so a client's train and local test images get independent noise.
TRAIN, LOCAL_TEST, SERVER_TEST = 0, 1, 2


# ---------------------------------------------------------------- device transforms (pixels in [0, 1])


def gamma_curve(pixels: np.ndarray, gamma: float) -> np.ndarray:
    """``pixels ** gamma`` (a sensor's response curve); > 1 darkens the mid-tones, 0 and 1 stay."""
    return np.clip(pixels, 0.0, 1.0) ** gamma


def lower_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Each image's pixels pulled towards (``factor`` < 1) or pushed from its own per-channel mean."""
    mean = pixels.mean(axis=(2, 3), keepdims=True)
    return np.clip(mean + factor * (pixels - mean), 0.0, 1.0)


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of std ``sigma`` pixels over height and width (edges repeat the border pixel)."""
    from scipy import ndimage  # 0.2 s to import: only the runs that blur pay it, not every ClientApp process

    return ndimage.gaussian_filter(pixels, sigma=(0.0, 0.0, sigma, sigma), mode="nearest")


def sensor_noise(pixels: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``std`` on every pixel, clipped to [0, 1] (a sensor saturates)."""
    return np.clip(pixels + rng.normal(0.0, std, size=pixels.shape), 0.0, 1.0)


def invert(pixels: np.ndarray) -> np.ndarray:
    """``1 - pixels`` (a negative: dark objects on a light ground)."""
    return 1.0 - pixels


def rotate(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """Each image rotated ``degrees`` counter-clockwise about its centre, same shape, black corners."""
    quarters, rest = divmod(float(degrees), 90.0)
    height, width = pixels.shape[2:]
    if rest == 0 and (height == width or quarters % 2 == 0):
        # exact multiples of 90 degrees move whole pixels: no interpolation to blur them
        return np.ascontiguousarray(np.rot90(pixels, k=int(quarters) % 4, axes=(2, 3)))
    from scipy import ndimage  # see gaussian_blur

    return ndimage.rotate(pixels, degrees, axes=(3, 2), reshape=False, order=1, mode="constant", cval=0.0)


DeviceTransform = Callable[[np.ndarray, DomainsConfig, np.random.Generator], np.ndarray]

DOMAIN_TRANSFORMS: dict[str, DeviceTransform] = {
    "clean": lambda p, cfg, rng: p,
    "gamma": lambda p, cfg, rng: gamma_curve(p, cfg.gamma),
    "contrast": lambda p, cfg, rng: lower_contrast(p, cfg.contrast),
    "blur": lambda p, cfg, rng: gaussian_blur(p, cfg.blur_sigma),
    "noise": lambda p, cfg, rng: sensor_noise(p, cfg.noise_std, rng),
    "invert": lambda p, cfg, rng: invert(p),
    "rotate": lambda p, cfg, rng: rotate(p, cfg.rotation),
}
assert tuple(DOMAIN_TRANSFORMS) == DOMAIN_TRANSFORM_NAMES, "config.DOMAIN_TRANSFORM_NAMES names these transforms"


# ---------------------------------------------------------------- model inputs <-> pixels


def to_pixels(x: np.ndarray, norm: Normalisation | None) -> np.ndarray:
    """Model inputs as pixels in [0, 1] (float64); without a normalisation ``x`` already is."""
    if norm is None:
        return x.astype(np.float64)
    return norm.invert(x) / norm.top


def from_pixels(pixels: np.ndarray, norm: Normalisation | None) -> np.ndarray:
    """Pixels in [0, 1] back to model inputs (float32), the inverse of :func:`to_pixels`."""
    if norm is None:
        return pixels.astype(np.float32)
    return norm.apply(pixels * norm.top)


def pixel_scale(norm: Normalisation | None, channels: int) -> np.ndarray:
    """Model-input units per pixel unit of [0, 1], per channel, shaped ``(1, C, 1, 1)``."""
    if norm is None or norm.scaling == "unit":
        return np.ones((1, channels, 1, 1), dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float64)
    return (norm.top / std).astype(np.float32).reshape(1, channels, 1, 1)


def apply_domain(x: np.ndarray, name: str, cfg: DomainsConfig, norm: Normalisation | None,
                 rng: np.random.Generator) -> np.ndarray:
    """Model inputs ``x`` as device ``name`` would have taken the same images (float32)."""
    if name == "clean":
        return x  # bit for bit: no round trip through pixels
    return from_pixels(DOMAIN_TRANSFORMS[name](to_pixels(x, norm), cfg, rng), norm)


# ---------------------------------------------------------------- who is in which domain


def domain_sizes(num_clients: int, shares: Sequence[float]) -> np.ndarray:
    """Clients per domain: ``num_clients * shares`` rounded by largest remainder (ties: earlier domain).

    10 clients at (0.7, 0.2, 0.1) give (7, 2, 1); the sizes always add up to ``num_clients``.
    """
    weights = np.asarray(shares, dtype=np.float64)
    # rounded first so that 0.7 * 10 = 7.000000000000001 or 6.9999... both count as 7
    real = np.round(weights / weights.sum() * num_clients, 9)
    sizes = np.floor(real).astype(np.int64)
    order = np.argsort(-(real - sizes), kind="stable")
    sizes[order[: num_clients - int(sizes.sum())]] += 1
    return sizes


def domain_shares(cfg: DomainsConfig) -> list[float]:
    """``domains.shares``, or equal shares when it is empty."""
    return list(cfg.shares) if cfg.shares else [1.0 / len(cfg.names)] * len(cfg.names)


def assign_domains(num_clients: int, shares: Sequence[float], seed: int) -> np.ndarray:
    """Domain index of every client: the sizes of :func:`domain_sizes`, which clients drawn from ``seed``."""
    labels = np.repeat(np.arange(len(shares)), domain_sizes(num_clients, shares))
    return labels[np.random.default_rng([seed, _ASSIGN_TAG]).permutation(num_clients)]


def client_domains(cfg: ExperimentConfig) -> list[str] | None:
    """Each client's domain name, by partition id; ``None`` without domains."""
    if not cfg.domains.names:
        return None
    index = assign_domains(cfg.federation.num_clients, domain_shares(cfg.domains), cfg.seed)
    return [cfg.domains.names[int(i)] for i in index]


# ---------------------------------------------------------------- NIID-Bench's noise-based feature imbalance


def noise_level(partition_id: int, num_clients: int, sigma: float) -> float:
    """Std (pixel units) of client ``partition_id``'s noise: ``sigma * i / (K - 1)``.

    NIID-Bench's code (``experiments.py``: ``args.noise / (args.n_parties - 1) * net_id``, ids from
    0): the first client is clean, the last gets ``sigma``. The paper writes ``sigma * i / N``.
    """
    return sigma * partition_id / (num_clients - 1) if num_clients > 1 else 0.0


def add_feature_noise(x: np.ndarray, std: float, norm: Normalisation | None,
                      rng: np.random.Generator) -> np.ndarray:
    """``x`` plus Gaussian noise of std ``std`` pixel units, in ``x``'s scale; unclipped, as NIID-Bench.

    NIID-Bench draws new noise each time a sample is loaded; here a client's noise is drawn once
    from the seed, so its data are the same in every round and every run.
    """
    noise = rng.standard_normal(x.shape, dtype=np.float32) * (np.float32(std) * pixel_scale(norm, x.shape[1]))
    return (x + noise).astype(np.float32)


# ---------------------------------------------------------------- what clients and the server see


def client_images(x: np.ndarray, cfg: ExperimentConfig, norm: Normalisation | None, partition_id: int,
                  split: int = TRAIN) -> np.ndarray:
    """Client ``partition_id``'s images ``x`` through its device, then with its noise level; ``x`` itself
    when neither ``domains`` nor ``partition.noise_sigma`` is on. ``split``: TRAIN or LOCAL_TEST."""
    names = client_domains(cfg)
    if names is not None:
        rng = np.random.default_rng([cfg.seed, _DEVICE_NOISE_TAG, split, partition_id])
        x = apply_domain(x, names[partition_id], cfg.domains, norm, rng)
    level = noise_level(partition_id, cfg.federation.num_clients, cfg.partition.noise_sigma)
    if level > 0:
        rng = np.random.default_rng([cfg.seed, _FEATURE_NOISE_TAG, split, partition_id])
        x = add_feature_noise(x, level, norm, rng)
    return x


def domain_test_sets(x: np.ndarray, cfg: ExperimentConfig, norm: Normalisation | None) -> dict[str, np.ndarray]:
    """The server's evaluation images in every domain, by name (empty without domains).

    NIID-Bench scores the global model on the clean test set, so ``partition.noise_sigma`` adds
    nothing here; a ``noise`` domain draws its own sensor noise from the seed.
    """
    return {name: apply_domain(x, name, cfg.domains, norm,
                               np.random.default_rng([cfg.seed, _DEVICE_NOISE_TAG, SERVER_TEST, d]))
            for d, name in enumerate(cfg.domains.names)}


def feature_skew_report(stats: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    """Partition statistics with each client's ``domain`` and ``noise_std`` where those knobs are on.

    Adds ``domains`` (clients per domain, in ``domains.names`` order) at the top; returns ``stats``.
    """
    names = client_domains(cfg)
    sigma = cfg.partition.noise_sigma
    for client in stats["clients"]:
        if names is not None:
            client["domain"] = names[client["id"]]
        if sigma > 0:
            client["noise_std"] = noise_level(client["id"], cfg.federation.num_clients, sigma)
    if names is not None:
        stats["domains"] = {name: names.count(name) for name in cfg.domains.names}
    return stats

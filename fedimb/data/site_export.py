"""Write a simulated split out as one data folder per site, to rehearse a deployment on it.

Site ``i`` gets ``<out>/site-<i>/site.npz`` in the npz format of :mod:`fedimb.data.sites`:
simulation partition ``i``'s training samples (``x``, ``y``, in the partition's order) and its
local test split as the simulation's client-side evaluation draws it (``x_test``, ``y_test``,
see :mod:`fedimb.data.local_testset`). Pixels are stored on the dataset's raw scale with
``pixel_max`` set to the dataset's own full scale, so :func:`fedimb.data.sites.load_site`
gives back exactly the arrays the simulated client trains on. A ``site.json`` beside it says
where the data came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedimb.config import ConfigError, ExperimentConfig
from fedimb.data import FederatedData, build_federated_data, client_test_images, client_train_data
from fedimb.data.datasets import Normalisation
from fedimb.data.domains import client_domains, noise_level
from fedimb.data.local_testset import local_test_indices
from fedimb.data.sites import SITE_META_FILE

SITE_FILE = "site.npz"


@dataclass(frozen=True)
class ExportedSite:
    """One written site folder and what it holds."""

    partition_id: int
    path: Path
    train_samples: int
    test_samples: int


def site_folder_name(partition_id: int) -> str:
    """The folder (and site) name of simulation partition ``partition_id``."""
    return f"site-{partition_id}"


def check_export_dir(out: Path, num_clients: int) -> None:
    """Refuse an ``out`` that is a file or already holds a site folder, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--export", f"{out} is a file; give a folder")
    taken = [site_folder_name(i) for i in range(num_clients) if (out / site_folder_name(i)).exists()]
    if taken:
        raise ConfigError("--export", f"{out / taken[0]} already exists; remove it or choose another folder")


def raw_pixels(x: np.ndarray, norm: Normalisation) -> np.ndarray:
    """Model inputs back on the dataset's raw scale: uint8 when the pixels are whole numbers up to 255."""
    raw = norm.invert(x)
    whole = np.rint(raw)
    # float32 rounding moves a pixel by far less than 1e-3; anything else was never an integer image
    if raw.size and np.abs(raw - whole).max() < 1e-3 and whole.min() >= 0 and whole.max() <= 255:
        return whole.astype(np.uint8)
    return raw.astype(np.float32)


def export_sites(cfg: ExperimentConfig, out: Path, data: FederatedData | None = None) -> list[ExportedSite]:
    """Write every simulated client's data as a site folder under ``out``; returns what was written."""
    out = Path(out)
    check_export_dir(out, cfg.federation.num_clients)
    data = data or build_federated_data(cfg)
    splits = data.splits
    if splits.normalisation is None:
        raise ConfigError("data.dataset", f"'{cfg.data.dataset}' was loaded without its normalisation")
    written = []
    domains = client_domains(cfg)
    for pid, idx in enumerate(data.client_indices):
        test_idx = local_test_indices(splits.test_y, data.counts[pid], cfg.federation.num_clients, cfg.seed, pid)
        folder = out / site_folder_name(pid)
        folder.mkdir(parents=True)
        tmp = folder / (SITE_FILE + ".tmp.npz")
        # the images as the simulated client sees them (its domain, its noise level): a site is its own domain
        train_x, train_y = client_train_data(data, cfg, pid)
        np.savez_compressed(tmp, x=raw_pixels(train_x, splits.normalisation), y=train_y,
                            x_test=raw_pixels(client_test_images(data, cfg, pid, test_idx), splits.normalisation),
                            y_test=splits.test_y[test_idx], pixel_max=np.float64(splits.normalisation.top))
        tmp.replace(folder / SITE_FILE)  # a half-written file never carries the final name
        meta = {"experiment": cfg.name, "dataset": cfg.data.dataset, "seed": cfg.seed,
                "partition": cfg.partition.name, "partition_id": pid, "num_clients": cfg.federation.num_clients,
                "train_class_counts": [int(c) for c in data.counts[pid]],
                "test_class_counts": np.bincount(splits.test_y[test_idx], minlength=splits.num_classes).tolist()}
        if domains is not None:
            meta["domain"] = domains[pid]
        if cfg.partition.noise_sigma > 0:
            meta["noise_std"] = noise_level(pid, cfg.federation.num_clients, cfg.partition.noise_sigma)
        (folder / SITE_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        written.append(ExportedSite(pid, folder, int(len(idx)), int(len(test_idx))))
    return written

"""Dataset loading: Fashion-MNIST (IDX files), scikit-learn digits, Hugging Face datasets.

Every loader returns a :class:`DatasetSplits` of channels-first float32 images standardised
with the training-set statistics, so the rest of the package never deals with file formats.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.config import ConfigError, DataConfig, registered

FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
HF_IMAGE_FALLBACKS = ("img", "image")
HF_LABEL_FALLBACKS = ("label", "labels", "fine_label")
GREY_PIL_MODES = ("L", "1", "I", "I;16", "F", "LA")


@dataclass
class DatasetSplits:
    """Train and test arrays of one dataset.

    Images are float32 ``(N, C_in, H, W)`` standardised per channel with the train statistics,
    labels int64 in ``[0, num_classes)``. The arrays are cached and shared per process: do not
    modify them in place.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    name: str
    # how raw pixels became these arrays, so other images (a site's own) can be scaled alike
    normalisation: Normalisation | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class Normalisation:
    """The map from a dataset's raw pixels to model inputs, fitted on its training set.

    ``standard``: per channel ``(raw - mean) / std``; ``unit``: ``raw / top``. ``top`` is the
    train set's largest raw value (255 for 8-bit images, 16 for sklearn digits).
    """

    scaling: str
    top: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, train_x: np.ndarray, scaling: str = "standard") -> Normalisation:
        """The normalisation ``scaling`` fitted on ``train_x`` (N, C, H, W)."""
        registered(SCALINGS, scaling, "data.scaling")
        axes = (0, 2, 3)
        mean = train_x.mean(axis=axes, dtype=np.float64)
        std = np.maximum(train_x.std(axis=axes, dtype=np.float64), 1e-8)  # a constant channel must not divide by zero
        top = max(float(train_x.max()), 1e-8)
        return cls(scaling, top, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw pixels (N, C, H, W) as float32 model inputs."""
        if self.scaling == "unit":
            return raw.astype(np.float32) / np.float32(self.top)
        shape = (1, len(self.mean), 1, 1)
        mean32 = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std32 = np.asarray(self.std, dtype=np.float32).reshape(shape)
        return (raw.astype(np.float32) - mean32) / std32

    def invert(self, x: np.ndarray) -> np.ndarray:
        """Model inputs back to raw pixels (float64; exact up to float32 rounding)."""
        if self.scaling == "unit":
            return x.astype(np.float64) * np.float32(self.top)
        shape = (1, len(self.mean), 1, 1)
        mean32 = np.asarray(self.mean, dtype=np.float32).reshape(shape).astype(np.float64)
        std32 = np.asarray(self.std, dtype=np.float32).reshape(shape).astype(np.float64)
        return x.astype(np.float64) * std32 + mean32


def standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both sets per channel to the train set's mean 0 / std 1; return float32 copies."""
    norm = Normalisation.fit(train_x, "standard")
    return norm.apply(train_x), norm.apply(test_x)


def unit_scale(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide both sets by the train set's largest value: pixels in [0, 1], like torchvision's ToTensor."""
    norm = Normalisation.fit(train_x, "unit")
    return norm.apply(train_x), norm.apply(test_x)


SCALINGS = {"standard": standardise, "unit": unit_scale}


def _make_splits(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    num_classes: int, name: str, scaling: str = "standard",
) -> DatasetSplits:
    norm = Normalisation.fit(train_x, scaling)
    return DatasetSplits(norm.apply(train_x), train_y.astype(np.int64), norm.apply(test_x), test_y.astype(np.int64),
                         num_classes, name, norm)


# ---------------------------------------------------------------- Fashion-MNIST (IDX)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, OSError, zlib.error) as exc:  # a cut-off download, a corrupt or unreadable file
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError("data.root", f"{path} cannot be read: truncated or corrupt ({why})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError("data.root", f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError("data.root", f"{path} is truncated: expected shape {tuple(dims)}")
    return data.reshape(tuple(int(d) for d in dims))


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise ConfigError("data.root", f"{stem}(.gz) not found in {root}")


def load_fmnist(cfg: DataConfig) -> DatasetSplits:
    """Fashion-MNIST from the four IDX files in ``cfg.root`` (numpy only, no torchvision)."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(
            "data.root",
            f"directory not found: {root} (install Debian's dataset-fashion-mnist or point "
            "data.root at the Fashion-MNIST IDX files)",
        )
    arrays = {key: read_idx(_find_idx(root, stem)) for key, stem in FMNIST_FILES.items()}
    return _make_splits(
        arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None], arrays["test_y"],
        10, "fmnist", cfg.scaling,
    )


# ---------------------------------------------------------------- scikit-learn digits


def load_digits_splits(cfg: DataConfig) -> DatasetSplits:
    """scikit-learn's 8x8 digits, split 75/25 stratified with the fixed seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images[:, None].astype(np.float32)
    y = bunch.target.astype(np.int64)
    # a fixed seed: the test set must be the same whatever the experiment seed is
    tr_x, te_x, tr_y, te_y = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return _make_splits(tr_x, tr_y, te_x, te_y, 10, "digits", cfg.scaling)


# ---------------------------------------------------------------- Hugging Face


def guess_column(ds: Any, feature_type: type, fallbacks: Sequence[str]) -> str | None:
    """A Hugging Face dataset's first column of ``feature_type`` (Image, ClassLabel), else the first
    of ``fallbacks`` it has, else None."""
    for name, feature in ds.features.items():
        if isinstance(feature, feature_type):
            return str(name)
    return next((name for name in fallbacks if name in ds.column_names), None)


def _pick_column(ds: Any, key: str, feature_type: type, fallbacks: Sequence[str], field: str) -> str:
    if key != "auto":
        if key not in ds.column_names:
            raise ConfigError(field, f"column '{key}' not in dataset; columns: {ds.column_names}")
        return key
    column = guess_column(ds, feature_type, fallbacks)
    if column is None:
        raise ConfigError(field, f"cannot guess the column; set it to one of {ds.column_names}")
    return column


def _orient(arr: np.ndarray) -> np.ndarray:
    """HW / HWC / CHW array -> CHW; a small last axis not larger than the first is channels."""
    if arr.ndim == 2:
        return arr[None]
    if arr.shape[-1] <= 4 and (arr.shape[0] > 4 or arr.shape[-1] <= arr.shape[0]):
        return np.moveaxis(arr, -1, 0)  # HWC, the PIL / Hugging Face convention
    return arr


def _channels_of(sample: Any) -> int:
    from PIL import Image

    if isinstance(sample, Image.Image):
        return 1 if sample.mode in GREY_PIL_MODES else 3
    return 1 if _orient(np.asarray(sample)).shape[0] == 1 else 3


def _to_chw(sample: Any, channels: int) -> np.ndarray:
    """One image (PIL or array, HW / HWC / CHW) as a ``(channels, H, W)`` array."""
    from PIL import Image

    if isinstance(sample, Image.Image):
        sample = sample.convert("L" if channels == 1 else "RGB")
    arr = _orient(np.asarray(sample))[:3]  # [:3] drops an alpha channel
    if arr.shape[0] != channels:
        # grey images inside an RGB dataset (or the reverse) must still stack
        arr = np.repeat(arr[:1], channels, axis=0) if channels == 3 else arr.mean(0, keepdims=True)
    return arr


def _images(ds: Any, key: str, channels: int) -> np.ndarray:
    try:
        return np.stack([_to_chw(s, channels) for s in ds[key]]).astype(np.float32)
    except ValueError as exc:
        raise ConfigError("data.dataset", f"images of column '{key}' differ in size: {exc}") from None


def splits_from_hf(
    train_ds: Any, test_ds: Any, image_key: str = "auto", label_key: str = "auto", name: str = "hf",
    scaling: str = "standard",
) -> DatasetSplits:
    """Convert two ``datasets.Dataset`` objects (images + integer labels) into :class:`DatasetSplits`.

    ``"auto"`` keys pick the first ``Image`` / ``ClassLabel`` column, then the usual names.
    """
    import datasets

    img = _pick_column(train_ds, image_key, datasets.Image, HF_IMAGE_FALLBACKS, "data.hf_image_key")
    lab = _pick_column(train_ds, label_key, datasets.ClassLabel, HF_LABEL_FALLBACKS, "data.hf_label_key")
    for col in (img, lab):
        if col not in test_ds.column_names:
            raise ConfigError("data.hf_test_split", f"the test split has no column '{col}'")
    channels = _channels_of(train_ds[0][img])
    try:
        train_y = np.asarray(train_ds[lab], dtype=np.int64)
        test_y = np.asarray(test_ds[lab], dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfigError("data.hf_label_key", f"column '{lab}' does not hold integer labels") from None
    feature = train_ds.features[lab]
    if isinstance(feature, datasets.ClassLabel):
        num_classes = int(feature.num_classes)
    else:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    return _make_splits(
        _images(train_ds, img, channels), train_y, _images(test_ds, img, channels), test_y,
        num_classes, name, scaling,
    )


def load_hf_dataset(cfg: DataConfig) -> DatasetSplits:
    """Download (or read from the HF cache) ``cfg.dataset`` and convert its train/test splits."""
    import datasets

    try:
        dd = datasets.load_dataset(cfg.dataset)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one config line
        msg = f"cannot load Hugging Face dataset '{cfg.dataset}': {exc}"
        raise ConfigError("data.dataset", msg) from None
    if "train" not in dd or cfg.hf_test_split not in dd:
        raise ConfigError("data.hf_test_split", f"need 'train' and '{cfg.hf_test_split}'; splits: {list(dd)}")
    return splits_from_hf(dd["train"], dd[cfg.hf_test_split], cfg.hf_image_key, cfg.hf_label_key, cfg.dataset,
                          cfg.scaling)


# ---------------------------------------------------------------- registry and cache

DATASET_LOADERS: dict[str, Callable[[DataConfig], DatasetSplits]] = {
    "fmnist": load_fmnist,
    "digits": load_digits_splits,
}


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: str, root: str, image_key: str, label_key: str, test_split: str,
                 scaling: str) -> DatasetSplits:
    # every Ray client process calls load_dataset: decode the files once per process
    cfg = DataConfig(dataset, root, image_key, label_key, test_split, scaling=scaling)
    if cfg.dataset in DATASET_LOADERS:
        return DATASET_LOADERS[cfg.dataset](cfg)
    if "/" in cfg.dataset:
        return load_hf_dataset(cfg)
    allowed = ", ".join(list(DATASET_LOADERS) + ["<hf-owner>/<name>"])
    raise ConfigError("data.dataset", f"'{cfg.dataset}' is not allowed; choose one of {allowed}")


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Load the dataset that ``cfg`` names (cached per process on the config's fields)."""
    return _load_cached(cfg.dataset, cfg.root, cfg.hf_image_key, cfg.hf_label_key, cfg.hf_test_split, cfg.scaling)

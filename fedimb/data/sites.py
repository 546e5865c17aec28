"""A deployed site's own data: what a SuperNode's ``data-path`` node config names.

A site trains and evaluates on its data as it is (no global long tail, no partition). What
the path holds picks the format:

- **npz**: a ``.npz`` file, or a folder holding exactly one. Arrays ``x`` (N images:
  ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)``) and ``y`` (N integer labels); a local
  test split in ``x_test`` / ``y_test``; ``pixel_max`` (a scalar, default 255) says what value
  is full white.
- **Hugging Face**: a folder written by ``datasets``' ``save_to_disk``: a ``Dataset`` (training
  data only) or a ``DatasetDict`` with a ``train`` split and optionally a ``test`` split. The
  image column is the first ``Image`` feature (else ``image`` / ``img``), the label column the
  first ``ClassLabel`` (else ``label`` / ``labels``).
- **image folder**: ``<class>/<image>`` with PNG or JPEG images, or ``train/<class>/...`` and
  optionally ``test/<class>/...``. A class folder is named by the class index (``0`` ..
  ``C-1``) or by the class name when the dataset has names.

Classes, image size and channels are the experiment's (:class:`SiteSpec`, from the dataset the
config names). Pixels are read on a 0..``pixel_max`` scale (255 for 8-bit images), mapped onto
that dataset's raw range and normalised exactly as the dataset was, so a model trained in
simulation sees the same input scale. Anything that does not fit raises :class:`SiteDataError`,
one line naming the site and the file.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.config import ConfigError, DataConfig
from fedimb.protocol import NODE_DATA_PATH, NODE_DOMAIN
from fedimb.data.datasets import DatasetSplits, Normalisation, guess_column, load_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_PIXEL_MAX = 255.0
GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("RGB", "RGBA", "P")
HF_MARKERS = ("dataset_dict.json", "state.json")


class SiteDataError(ConfigError):
    """A site's data that does not fit the experiment; ``str()`` names the site and the file."""

    def __init__(self, site: str, file: Path | str, message: str) -> None:
        super().__init__(NODE_DATA_PATH, f"site '{site}': {file}: {message}")


@dataclass(frozen=True)
class SiteSpec:
    """What a site's data must look like: the experiment dataset's classes, shape and scaling."""

    num_classes: int
    input_shape: tuple[int, int, int]
    normalisation: Normalisation
    class_names: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain values (ints, floats, strings, lists), to ship in a message or a JSON file."""
        norm = asdict(self.normalisation)
        return {"num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "class_names": list(self.class_names), "scaling": norm["scaling"], "top": norm["top"],
                "mean": list(norm["mean"]), "std": list(norm["std"])}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SiteSpec:
        """The inverse of :meth:`as_dict`."""
        norm = Normalisation(str(values["scaling"]), float(values["top"]),
                             tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]))
        shape = tuple(int(v) for v in values["input_shape"])
        return cls(int(values["num_classes"]), (shape[0], shape[1], shape[2]), norm,
                   tuple(str(v) for v in values.get("class_names", ())))


    def to_json(self) -> str:
        """:meth:`as_dict` as one JSON string (a single config value on the wire)."""
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> SiteSpec:
        """The inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def site_spec(cfg: DataConfig) -> SiteSpec:
    """The spec of the dataset ``cfg`` names (loads it once per process)."""
    splits = load_dataset(cfg)
    if splits.normalisation is None:
        raise ConfigError("data.dataset", f"'{cfg.dataset}' was loaded without its normalisation")
    return SiteSpec(splits.num_classes, splits.input_shape, splits.normalisation)


def site_name(path: Path) -> str:
    """A site's name: its folder's name, or the npz file's stem."""
    path = Path(path)
    return path.stem if path.suffix == ".npz" else path.resolve().name


def load_site(path: str | Path, spec: SiteSpec, name: str | None = None) -> DatasetSplits:
    """Read a site's data (train part and optional local test part) as normalised arrays.

    Returns a :class:`DatasetSplits` named after the site; a site without a test split has
    empty ``test_x`` / ``test_y``.
    """
    path = Path(path).expanduser()
    site = name or site_name(path)
    if not path.exists():
        raise SiteDataError(site, path, "no such file or folder")
    npz = _npz_file(path, site)
    if npz is not None:
        train, test = _read_npz(npz, spec, site)
    elif any((path / marker).is_file() for marker in HF_MARKERS):
        train, test = _read_hf(path, spec, site)
    else:
        train, test = _read_image_folder(path, spec, site)
    if len(train[1]) == 0:
        raise SiteDataError(site, path, "holds no training samples")
    norm = spec.normalisation
    return DatasetSplits(norm.apply(train[0]), train[1], norm.apply(test[0]), test[1], spec.num_classes, site, norm)


@functools.lru_cache(maxsize=2)
def _load_site_cached(path: str, spec: SiteSpec) -> DatasetSplits:
    return load_site(path, spec)


def node_site(node_config: Mapping[str, Any], spec: SiteSpec) -> DatasetSplits | None:
    """The data a SuperNode's ``data-path`` names (read once per process), or None when it names none.

    The arrays are shared between calls: do not modify them in place.
    """
    path = node_config.get(NODE_DATA_PATH)
    if path is None or str(path) == "":
        return None
    return _load_site_cached(str(path), spec)


DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")  # it becomes part of column names
SITE_META_FILE = "site.json"  # what ``fedimb partition --export`` writes beside a site's data


def site_domain(node_config: Mapping[str, Any]) -> str | None:
    """The acquisition domain a site names: its node config's ``domain``, else the ``domain`` of the
    ``site.json`` beside its data (an exported site's); None when neither names one.

    A real site is its own domain (its scanner, its device); the name must be 1-40 letters,
    digits, ``_``, ``.`` or ``-``, since it becomes part of the per-domain column names.
    """
    name = node_config.get(NODE_DOMAIN)
    where = f"node config '{NODE_DOMAIN}'"
    if name is None or str(name) == "":
        path = node_config.get(NODE_DATA_PATH)
        folder = Path(str(path)) if path else None
        meta = None if folder is None else (folder if folder.is_dir() else folder.parent) / SITE_META_FILE
        if meta is None or not meta.is_file():
            return None
        try:
            name = json.loads(meta.read_text(encoding="utf-8")).get("domain")
        except (OSError, ValueError, AttributeError):
            raise SiteDataError(str(path), meta, "is not a JSON object") from None
        if name is None:
            return None
        where = str(meta)
    if not DOMAIN_NAME.fullmatch(str(name)):
        raise ConfigError(NODE_DOMAIN, f"{where}: '{name}' is not a domain name; use 1-40 letters, digits, "
                                       "'_', '.' or '-'")
    return str(name)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Samples per class, ``(num_classes,)`` int64."""
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


# ---------------------------------------------------------------- checks shared by the formats

Part = tuple[np.ndarray, np.ndarray]  # raw images (N, C, H, W) float64 on the dataset's scale, labels int64


def _empty(spec: SiteSpec) -> Part:
    return np.zeros((0, *spec.input_shape)), np.zeros(0, dtype=np.int64)


def _checked_labels(labels: Any, spec: SiteSpec, site: str, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise SiteDataError(site, where, f"labels must be one integer per sample, got dtype {arr.dtype} "
                                         f"and shape {arr.shape}")
    bad = np.flatnonzero((arr < 0) | (arr >= spec.num_classes))
    if bad.size:
        raise SiteDataError(site, where, f"label {int(arr[bad[0]])} (sample {int(bad[0])}) is outside the "
                                         f"experiment's classes 0..{spec.num_classes - 1}")
    return arr.astype(np.int64)


def _to_raw(x: np.ndarray, pixel_max: float, spec: SiteSpec, site: str, where: str) -> np.ndarray:
    """Images on a 0..pixel_max scale → the dataset's raw scale (0..top)."""
    if x.size and not np.isfinite(x).all():
        raise SiteDataError(site, where, "images hold NaN or infinite values")
    if x.size and float(x.max()) > pixel_max:
        raise SiteDataError(site, where, f"pixel value {float(x.max()):g} is above pixel_max {pixel_max:g}")
    top = spec.normalisation.top
    # the same factor as the dataset when the site says its own full scale: no rounding at all
    return x if pixel_max == top else x * (top / pixel_max)


def _orient(x: np.ndarray, spec: SiteSpec, site: str, where: str) -> np.ndarray:
    """A stack of images as ``(N, C, H, W)``, or an error when it does not fit the model's input."""
    c, h, w = spec.input_shape
    if x.ndim == 4 and x.shape[1:] == (c, h, w):
        return x
    if x.ndim == 4 and x.shape[1:] == (h, w, c):
        return np.moveaxis(x, -1, 1)
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        return x[:, None]
    raise SiteDataError(site, where, f"images of shape {tuple(x.shape[1:])} do not fit the model's input "
                                     f"(channels, height, width) = {spec.input_shape}")


# ---------------------------------------------------------------- npz


def _npz_file(path: Path, site: str) -> Path | None:
    if path.is_file():
        if path.suffix != ".npz":
            raise SiteDataError(site, path, "a data file must be .npz; or give a folder (images or save_to_disk)")
        return path
    found = sorted(path.glob("*.npz"))
    if len(found) > 1:
        raise SiteDataError(site, path, f"holds {len(found)} .npz files; point data-path at one of them")
    return found[0] if found else None


def _read_npz(path: Path, spec: SiteSpec, site: str) -> tuple[Part, Part]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise SiteDataError(site, path, f"not a readable npz file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise SiteDataError(site, path, f"lacks the array '{key}'; it holds {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise SiteDataError(site, path, "a local test split needs both x_test and y_test")
    pixel_max = float(arrays.get("pixel_max", DEFAULT_PIXEL_MAX))
    parts = []
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk not in arrays:
            parts.append(_empty(spec))
            continue
        x = _orient(np.asarray(arrays[xk], dtype=np.float64), spec, site, f"{path} [{xk}]")
        y = _checked_labels(arrays[yk], spec, site, f"{path} [{yk}]")
        if len(x) != len(y):
            raise SiteDataError(site, path, f"{xk} holds {len(x)} images but {yk} {len(y)} labels")
        parts.append((_to_raw(x, pixel_max, spec, site, f"{path} [{xk}]"), y))
    return parts[0], parts[1]


# ---------------------------------------------------------------- images (Pillow)


def _pil_to_chw(img: Any, spec: SiteSpec, site: str, where: str) -> np.ndarray:
    """One Pillow image as ``(C, H, W)`` 0..255 values, checked against the model's input."""
    channels, height, width = spec.input_shape
    mode = img.mode
    if mode not in GREY_MODES + COLOUR_MODES:
        raise SiteDataError(site, where, f"image mode {mode} is not 8-bit grey or colour "
                                         f"({', '.join(GREY_MODES + COLOUR_MODES)})")
    has = 1 if mode in GREY_MODES else 3
    if has != channels:
        raise SiteDataError(site, where, f"image has {has} channel{'s' if has > 1 else ''} ({mode}); "
                                         f"the model takes {channels}")
    if img.size != (width, height):
        raise SiteDataError(site, where, f"image is {img.size[0]}x{img.size[1]} (width x height); "
                                         f"the model takes {width}x{height}")
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float64)
    return arr[None] if channels == 1 else np.moveaxis(arr, -1, 0)


def _class_index(folder: Path, spec: SiteSpec, site: str) -> int:
    name = folder.name
    if name in spec.class_names:
        return spec.class_names.index(name)
    if name.isdigit() and int(name) < spec.num_classes:
        return int(name)
    names = f" or a class name ({', '.join(spec.class_names)})" if spec.class_names else ""
    raise SiteDataError(site, folder, f"class folder '{name}' is not one of the experiment's classes: "
                                      f"name it by index 0..{spec.num_classes - 1}{names}")


def _read_class_folders(root: Path, spec: SiteSpec, site: str) -> Part:
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not folder.is_dir():
            raise SiteDataError(site, folder, "expected class folders (<class>/<image>) here, found a file")
        label = _class_index(folder, spec, site)
        for file in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise SiteDataError(site, file, f"not an image file; allowed: {', '.join(IMAGE_SUFFIXES)}")
            try:
                with Image.open(file) as img:
                    images.append(_pil_to_chw(img, spec, site, str(file)))
            except (UnidentifiedImageError, OSError) as exc:
                raise SiteDataError(site, file, f"cannot read the image ({exc})") from None
            labels.append(label)
    if not images:
        return _empty(spec)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _read_image_folder(path: Path, spec: SiteSpec, site: str) -> tuple[Part, Part]:
    def scaled(part: Part, where: Path) -> Part:
        return _to_raw(part[0], DEFAULT_PIXEL_MAX, spec, site, str(where)), part[1]

    if (path / "train").is_dir():
        train = scaled(_read_class_folders(path / "train", spec, site), path / "train")
        has_test = (path / "test").is_dir()
        test = scaled(_read_class_folders(path / "test", spec, site), path / "test") if has_test else _empty(spec)
        return train, test
    return scaled(_read_class_folders(path, spec, site), path), _empty(spec)


# ---------------------------------------------------------------- Hugging Face save_to_disk


def _hf_column(ds: Any, feature_type: type, fallbacks: tuple[str, ...], what: str, site: str, where: str) -> str:
    column = guess_column(ds, feature_type, fallbacks)
    if column is not None:
        return column
    raise SiteDataError(site, where, f"no {what} column (a {feature_type.__name__} feature or one of "
                                     f"{', '.join(fallbacks)}); columns: {ds.column_names}")


def _hf_part(ds: Any, spec: SiteSpec, site: str, where: str) -> Part:
    import datasets
    from PIL import Image

    img_col = _hf_column(ds, datasets.Image, ("image", "img"), "image", site, where)
    lab_col = _hf_column(ds, datasets.ClassLabel, ("label", "labels"), "label", site, where)
    labels = _checked_labels(ds[lab_col], spec, site, f"{where} [{lab_col}]")
    images = []
    for row, sample in enumerate(ds[img_col]):
        at = f"{where} row {row}"
        if isinstance(sample, Image.Image):
            images.append(_pil_to_chw(sample, spec, site, at))
        else:
            images.append(_orient(np.asarray(sample, dtype=np.float64)[None], spec, site, at)[0])
    x = np.stack(images) if images else _empty(spec)[0]
    return _to_raw(x, DEFAULT_PIXEL_MAX, spec, site, where), labels


def _read_hf(path: Path, spec: SiteSpec, site: str) -> tuple[Part, Part]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is one line naming the folder
        raise SiteDataError(site, path, f"not a readable save_to_disk dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SiteDataError(site, path, f"a DatasetDict needs a 'train' split; splits: {list(loaded)}")
        train = _hf_part(loaded["train"], spec, site, f"{path} (train)")
        test = _hf_part(loaded["test"], spec, site, f"{path} (test)") if "test" in loaded else _empty(spec)
        return train, test
    return _hf_part(loaded, spec, site, str(path)), _empty(spec)

"""A disk cache of the split (long tail, hold-out, partition) that every process of a run shares.

In a simulation the server and each Ray client process build the same split from the config;
the Dirichlet schemes go through flwr-datasets (Hugging Face ``datasets`` and all), about two
seconds per process on 2 cores. The first process to build a split writes it here; the others,
and later runs of the same config, read it back in milliseconds.

The key is everything the split is a function of: the seed, the data, long-tail and partition
configs, the number of clients, the training labels themselves (so a changed dataset file is a
new key) and the source of the modules that compute it (so a changed scheme is a new key too).
A file that cannot be read is rebuilt; writes are atomic, so concurrent processes at worst build
the same split twice. ``FEDIMB_SPLIT_CACHE`` sets the folder ("" or "off": no cache).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV = "FEDIMB_SPLIT_CACHE"
DEFAULT_DIR = Path.home() / ".cache" / "fedimb" / "splits"
# the modules whose code decides the split: their source joins the key
_SOURCES = ("__init__.py", "longtail.py", "partitions.py")

Split = tuple[np.ndarray, list[np.ndarray], np.ndarray]  # kept, each client's indices, held out


def cache_folder() -> Path | None:
    """Where splits are kept (None: caching is off)."""
    value = os.environ.get(ENV)
    if value is None:
        return DEFAULT_DIR
    return None if value.strip().lower() in ("", "off") else Path(value).expanduser()


def _code_digest() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def split_key(made_of: dict, train_labels: np.ndarray) -> str:
    """Hash of what the split is a function of: ``made_of`` (JSON-able config values), the labels, the code."""
    digest = hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(train_labels).tobytes())
    digest.update(_code_digest().encode())
    return digest.hexdigest()[:24]


def _encode(split: Split) -> bytes:
    kept, clients, held_out = split
    sizes = np.array([len(c) for c in clients], dtype=np.int64)
    buf = io.BytesIO()
    # one flat array and the sizes: 100,000 clients as 100,000 npz members would read slowly
    np.savez(buf, kept=kept, held_out=held_out, sizes=sizes,
             indices=np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64))
    return buf.getvalue()


def _decode(path: Path) -> Split:
    with np.load(path) as stored:
        kept, held_out, sizes, flat = (stored[k] for k in ("kept", "held_out", "sizes", "indices"))
    return kept, np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else [], held_out


def cached_split(made_of: dict, train_labels: np.ndarray, build: Callable[[], Split]) -> Split:
    """The split ``build`` makes, read from the cache when an earlier process wrote it."""
    folder = cache_folder()
    if folder is None:
        return build()
    path = folder / f"{split_key(made_of, train_labels)}.npz"
    try:
        return _decode(path)
    except (OSError, ValueError, KeyError, EOFError):  # absent, or unreadable: build it again
        pass
    split = build()
    from fedimb.records import atomic_write_bytes  # it imports matplotlib: a ClientApp process only pays on a write

    try:
        atomic_write_bytes(path, _encode(split))
    except OSError:  # a read-only home: the run goes on without the cache
        pass
    return split

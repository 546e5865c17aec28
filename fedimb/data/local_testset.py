"""Each client's local test set: test samples drawn with the client's own label distribution."""

from __future__ import annotations

import numpy as np


def local_test_indices(test_labels: np.ndarray, client_counts: np.ndarray, num_clients: int,
                       seed: int, client_id: int) -> np.ndarray:
    """Indices into the (balanced) test set for client ``client_id``.

    The client gets about ``len(test) / num_clients`` samples, split over classes in
    proportion to its training counts, so its accuracy measures how well the global model
    serves that client's own distribution (the basis of client-fairness figures). A client
    whose shares all round to nothing (more clients than test samples) gets one sample of its
    most frequent class, so it always has something to score.
    """
    total = max(1, len(test_labels) // max(num_clients, 1))
    share = client_counts / max(client_counts.sum(), 1)
    rng = np.random.default_rng([seed, client_id, 7])
    picked: list[np.ndarray] = []
    for cls, fraction in enumerate(share):
        pool = np.flatnonzero(test_labels == cls)
        take = min(len(pool), int(round(fraction * total)))
        if take:
            picked.append(rng.choice(pool, size=take, replace=False))
    if not picked and client_counts.sum() > 0:
        pool = np.flatnonzero(test_labels == int(np.argmax(client_counts)))
        picked = [rng.choice(pool, size=min(1, len(pool)), replace=False)]
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)

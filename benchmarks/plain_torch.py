"""The overhead benchmark's task without any framework; as a script, its *bare* side.

    python -m benchmarks.plain_torch --data-config experiments/quickstart.yaml --rounds 3 --local-epochs 1 \\
        --timings OUT.json [--data-override KEY=VALUE ...]

What a user writes with PyTorch alone: LeNet, a local training loop (``torch.optim.SGD``, the
samples in memory, shuffled mini-batches) and a test loop. Run as a script it is the bare
sequential loop: every round trains each client in turn from the global weights, averages the
weights by sample count (FedAvg), has every client score the average on its local test split,
then scores it on the test set, in one process. ``benchmarks/plain_flower_app.py`` runs the
same functions as a Flower app.

fedimb is used for one thing only, the data (:func:`partition`, :func:`test_set`): its own
load, long tail and partition of ``--data-config`` with ``--data-override``, so that the bare
loop, the plain Flower app and ``fedimb run`` train on the same arrays. ``--timings`` gets the
wall-clock time (``time.time()``) at which round 0's evaluation and each round ended.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn


class Net(nn.Module):
    """LeNet as NIID-Bench has it: conv 1→6 k5, pool, conv 6→16 k5, pool, FC →120→84→classes.

    Images under 20 pixels (sklearn digits) pad their convolutions by 2, as fedimb's LeNet does.
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = shape
        pad = 0 if height >= 20 else 2
        side = lambda n: ((n + 2 * pad - 4) // 2 + 2 * pad - 4) // 2  # noqa: E731 - two k5 convs, two 2x2 pools
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * side(height) * side(width), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        )
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, momentum: float,
          weight_decay: float, batch_size: int) -> float:
    """``epochs`` epochs of mini-batch SGD on (x, y), in place; the mean batch loss."""
    if len(y) == 0:
        return 0.0
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
            total, steps = total + float(loss.detach()), steps + 1
    return total / steps


@torch.no_grad()
def test(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y)."""
    if len(y) == 0:
        return 0.0, 0.0
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        loss += float(nn.functional.cross_entropy(logits, y[start:start + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return loss / len(y), correct / len(y)


# --- the data: fedimb's own split, as arrays ---------------------------------------------------


class Part(NamedTuple):
    """One client's training samples and local test split."""

    x: torch.Tensor
    y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@functools.lru_cache(maxsize=2)
def _federated(config: str, overrides: tuple[str, ...]) -> tuple[Any, Any]:
    from fedimb.config import load_config
    from fedimb.data import build_federated_data

    cfg = load_config(config, list(overrides))
    return cfg, build_federated_data(cfg)


def partition(config: str, overrides: tuple[str, ...], partition_id: int) -> Part:
    """Client ``partition_id``'s arrays as ``fedimb run`` gives them to it (cached per process)."""
    from fedimb.data import client_test_images, client_train_data
    from fedimb.data.local_testset import local_test_indices

    cfg, data = _federated(config, overrides)
    x, y = client_train_data(data, cfg, partition_id)
    idx = local_test_indices(data.splits.test_y, data.counts[partition_id], cfg.federation.num_clients, cfg.seed,
                             partition_id)
    test_x = client_test_images(data, cfg, partition_id, idx)
    return Part(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(test_x),
                torch.from_numpy(data.splits.test_y[idx]))


def test_set(config: str, overrides: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], int]:
    """The (balanced) test set, the image shape and the number of classes."""
    _, data = _federated(config, overrides)
    splits = data.splits
    return torch.from_numpy(splits.test_x), torch.from_numpy(splits.test_y), splits.input_shape, splits.num_classes


# --- what both plain sides take and record -----------------------------------------------------


def task_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The options the bare loop and the plain Flower app share."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-config", required=True, help="a fedimb YAML: the data, long tail and partition")
    parser.add_argument("--data-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a fedimb override for the data (repeatable)")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--local-epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timings", required=True, help="JSON file: when each round's evaluation ended")
    return parser


class Timings:
    """When round 0's evaluation and each round ended (``time.time()``), and the test accuracy then."""

    def __init__(self) -> None:
        self.rounds: list[list[float]] = []

    def mark(self, server_round: int, accuracy: float) -> None:
        self.rounds.append([server_round, time.time(), accuracy])

    def write(self, path: str | Path, **fields: Any) -> None:
        Path(path).write_text(json.dumps({"rounds": self.rounds, "torch_threads": torch.get_num_threads(), **fields}))


def fedavg(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the clients' weights."""
    total = sum(sizes)
    return {key: sum(state[key] * (n / total) for state, n in zip(states, sizes)) for key in states[0]}


def run_bare(args: argparse.Namespace) -> Timings:
    """The federation's work in one sequential loop."""
    overrides = tuple(args.data_override)
    x_test, y_test, shape, num_classes = test_set(args.data_config, overrides)
    cfg, _ = _federated(args.data_config, overrides)
    parts = [partition(args.data_config, overrides, k) for k in range(cfg.federation.num_clients)]
    torch.manual_seed(args.seed)
    model = Net(shape, num_classes)
    timings = Timings()
    timings.mark(0, test(model, x_test, y_test, args.eval_batch_size)[1])
    for server_round in range(1, args.rounds + 1):
        states, sizes = [], []
        for part in parts:
            local = copy.deepcopy(model)
            train(local, part.x, part.y, args.local_epochs, args.lr, args.momentum, args.weight_decay, args.batch_size)
            states.append(local.state_dict())
            sizes.append(len(part.y))
        model.load_state_dict(fedavg(states, sizes))
        for part in parts:
            test(model, part.test_x, part.test_y, args.eval_batch_size)
        timings.mark(server_round, test(model, x_test, y_test, args.eval_batch_size)[1])
    return timings


def main(argv: list[str] | None = None) -> int:
    args = task_parser("python -m benchmarks.plain_torch", __doc__).parse_args(argv)
    run_bare(args).write(args.timings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

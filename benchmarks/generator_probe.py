"""Probe the federated generator's knobs fast: its FedAvg rounds in one process, without Ray.

    python -m benchmarks.generator_probe --rounds 20 --local-steps 50             # the suite's generator
    python -m benchmarks.generator_probe --rounds 20 --local-steps 50 --snr-gamma 5 --server-ema 0.5
    python -m benchmarks.generator_probe --seed 1 --load runs/cache/synthetic/<key>/generator \
        --guidance 1 1.5 --ddim-steps 20 40                                        # a trained one's sampler
    python -m benchmarks.generator_probe --seed 4 --judge-recall                   # the judge on real test images

The rounds are the federation's own: ``fedimb.app.synthetic.train_federated`` runs the
generator's strategy (``strategies/generator.py``: sample-count weights, class-aware label
table) against the ClientApp's ``train.generator`` handler, which :class:`LocalGrid` calls in
this process, one client after another, instead of Flower's simulation on Ray. The knobs are
``synthetic.*`` overrides of ``experiments/fmnist_lt.yaml``. A knob that wins here is then
measured for real by ``benchmarks/synthetic.py``. Prints one line per variant (recognisability
per class of 100 guided samples per class, judged by the LeNet trained on the real balanced
training set) and appends it to ``--log``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from fedimb import protocol
from fedimb.app.cli import guarded
from fedimb.app.synthetic import DataFacts, train_federated
from fedimb.config import GENERATOR_PREDICTIONS, ExperimentConfig, load_config, to_yaml
from fedimb.data import FederatedData, build_federated_data
from fedimb.synthetic.generator import Generator
from fedimb.synthetic.quality import recognisability, sample_grid, train_reference_classifier

ROOT = Path(__file__).resolve().parent.parent
SETTING = ["imbalance.factor=100", "partition.name=dir_balance", "partition.alpha=0.1"]


class LocalGrid:
    """The part of Flower's Grid a strategy uses, handing each message to a ClientApp in this process.

    Node ``pid + 1`` holds partition ``pid`` and keeps its own context (node state) across rounds.
    """

    def __init__(self, app: ClientApp, num_partitions: int) -> None:
        self.app = app
        self.contexts = {pid + 1: Context(run_id=0, node_id=pid + 1, node_config={protocol.NODE_PARTITION_ID: pid},
                                          state=RecordDict(), run_config={}) for pid in range(num_partitions)}
        # Messages carry their sender's identity: outside a running ServerApp this process gives one.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 0, 0

    @property
    def partition_of(self) -> dict[int, int]:
        """Node id -> partition id, as the hello round would report it."""
        return {node_id: int(ctx.node_config[protocol.NODE_PARTITION_ID]) for node_id, ctx in self.contexts.items()}

    def get_node_ids(self) -> list[int]:
        """Every node, always connected."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Each message's reply from its node's ClientApp, in the order sent."""
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


class ServerEma:
    """Exponential moving averages of the global weights over rounds, one per decay (an ``evaluate_fn``)."""

    def __init__(self, decays: list[float]) -> None:
        self.decays = decays
        self.averages: dict[float, dict[str, torch.Tensor]] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        """Fold in the global weights after a round (round 0, the initial weights, is not one)."""
        if server_round == 0:
            return
        merged = arrays.to_torch_state_dict()
        for decay in self.decays:
            previous = self.averages.get(decay)
            self.averages[decay] = ({k: v.clone() for k, v in merged.items()} if previous is None else
                                    {k: decay * previous[k] + (1 - decay) * merged[k] for k in merged})


def probe_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment the probe's generator trains in: the benchmark's setting and the knobs given."""
    knobs = {"seed": args.seed, "synthetic.enabled": "true", "synthetic.generator_size": args.size,
             "synthetic.rounds": args.rounds, "synthetic.local_steps": args.local_steps,
             "synthetic.batch_size": args.batch_size, "synthetic.lr": args.lr, "synthetic.snr_gamma": args.snr_gamma,
             "synthetic.prediction": args.prediction, "synthetic.aggregation": args.aggregation,
             "synthetic.balanced_batches": "true", "simulation.threads_per_client": args.threads,
             "simulation.device": args.device}
    return load_config(ROOT / "experiments/fmnist_lt.yaml", [*SETTING, *(f"{k}={v}" for k, v in knobs.items())])


def federated_generator(args: argparse.Namespace, cfg: ExperimentConfig,
                        data: FederatedData) -> tuple[dict[str, Generator], float]:
    """The federation's generator rounds through a :class:`LocalGrid`.

    Returns ({variant: generator}, seconds): "raw" is the last global model, "ema<d>" the
    exponential moving average of the global models over rounds with decay d (one per --server-ema).
    """
    grid = LocalGrid(client_app, cfg.federation.num_clients)
    ema = ServerEma(args.server_ema)
    started = time.time()
    generator = train_federated(grid, cfg, grid.partition_of, data.counts, DataFacts.of_splits(data.splits), to_yaml(cfg),
                                evaluate_fn=ema)
    seconds = time.time() - started
    variants = {"raw": generator.to("cpu")}
    for decay, state in ema.averages.items():
        variants[f"ema{decay:g}"] = copy.deepcopy(generator)
        variants[f"ema{decay:g}"].load_state_dict(state)
    return variants, seconds


def cached_judge(out: Path, splits, seed: int) -> torch.nn.Module:
    """The seed's reference LeNet (the benchmark's judge), trained once and kept under ``out``."""
    judge_path = out / f"reference_lenet_s{seed}.pt"
    if judge_path.is_file():
        return torch.load(judge_path, weights_only=False)
    judge = train_reference_classifier(torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y),
                                       splits.num_classes, seed=seed)
    torch.save(judge, judge_path)
    return judge


def probe_table(log: Path) -> str:
    """Markdown table of every logged probe: knobs that differ from the defaults, then the scores."""
    defaults = {"rounds": 20, "local_steps": 50, "lr": 2e-3, "cosine": False, "snr_gamma": 0.0,
                "aggregation": "class_aware", "size": "cpu", "batch_size": 64,
                "prediction": "epsilon", "seed": 0, "ddim_steps": 20, "load": "", "interval": "0-1",
                "rescale": 0.0}
    lines = ["| probe | knobs (besides 20 rounds × 50 steps, lr 2e-3, class-aware, balanced) | guidance "
             "| training (s) | mean recog. | min recog. | per class 0–9 |", "|---|---|---|---|---|---|---|"]
    for text in log.read_text().splitlines():
        row = json.loads(text)
        # a loaded generator's training knobs are not this row's: show only what chose its samples
        shown = ("seed", "load", "ddim_steps", "interval", "rescale") if row["args"].get("load") else defaults
        knobs = ", ".join(f"{k}={v}" for k, v in row["args"].items() if k in shown and v != defaults[k])
        lines.append(f"| {row['name']} | {knobs or '(defaults)'} | {row['guidance']:g} | {row['training_s']:.0f} "
                     f"| {row['mean']:.3f} | {row['min']:.2f} | {' '.join(f'{v:.2f}' for v in row['per_class'])} |")
    return "\n".join(lines)


def main() -> int:
    """Train one generator variant, score it, print and log one line (``--table``: print the log)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--snr-gamma", type=float, default=0.0)
    parser.add_argument("--prediction", default="epsilon", choices=GENERATOR_PREDICTIONS)
    parser.add_argument("--aggregation", default="class_aware", choices=["class_aware", "fedavg"])
    parser.add_argument("--server-ema", type=float, nargs="*", default=[],
                        help="also score the EMA of the global weights over rounds, one per decay")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[20])
    parser.add_argument("--interval", nargs="+", default=["0-1"],
                        help="guidance intervals lo-hi, fractions of T (guidance only where lo·T <= t <= hi·T)")
    parser.add_argument("--rescale", type=float, nargs="+", default=[0.0], help="guidance rescale φ values")
    parser.add_argument("--load", default="",
                        help="score this saved generator (its seed's judge) instead of training one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where the clients train")
    parser.add_argument("--out", default="runs/probe/generator")
    parser.add_argument("--log", default="docs/results/synthetic/generator_probe.jsonl")
    parser.add_argument("--save", action="store_true", help="also save each variant's generator under --out")
    parser.add_argument("--table", action="store_true", help="only print the logged probes as a markdown table")
    parser.add_argument("--judge-recall", action="store_true",
                        help="only print the judge's recall per class on the real test set (a real image's score)")
    args = parser.parse_args()
    if args.table:
        print(probe_table(Path(args.log)))
        return 0
    torch.set_num_threads(args.threads)
    cfg = probe_config(args)
    data = build_federated_data(cfg)
    splits = data.splits
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.judge_recall:
        judge = cached_judge(out, splits, args.seed)
        real = recognisability(judge, torch.from_numpy(splits.test_x), torch.from_numpy(splits.test_y),
                               splits.num_classes)
        print(json.dumps({"seed": args.seed, "judge_real_recall": [round(v, 3) for v in real],
                          "mean": round(float(np.mean(real)), 3)}), flush=True)
        return 0
    if args.load:
        variants, seconds = {"loaded": Generator.from_pretrained(args.load)}, 0.0
    else:
        variants, seconds = federated_generator(args, cfg, data)
    judge = cached_judge(out, splits, args.seed)
    labels = torch.arange(splits.num_classes).repeat_interleave(100)
    if args.save:
        for variant, generator in variants.items():
            generator.save_pretrained(out / f"{args.name or 'probe'}_{variant}")
    grid_of = itertools.product(variants.items(), args.ddim_steps, args.guidance, args.interval, args.rescale)
    for (variant, generator), steps, guidance, interval, rescale in grid_of:
        lo, hi = (float(v) for v in interval.split("-"))
        started = time.time()
        images = generator.sample(labels, guidance_scale=guidance, num_inference_steps=steps, seed=args.seed,
                                  guidance_interval=(lo, hi), guidance_rescale=rescale)
        per_second = len(labels) / (time.time() - started)
        scores = recognisability(judge, images, labels, splits.num_classes)
        name = f"{args.name or 'probe'}_{variant}"
        grid_name = f"grid_{name}_w{guidance:g}_s{steps}_i{interval}_r{rescale:g}.png"
        sample_grid(images, labels, splits.num_classes, out / grid_name)
        knobs = {k: v for k, v in vars(args).items() if k not in ("log", "out", "name", "interval", "rescale")}
        row = {"name": name, "args": {**knobs, "ddim_steps": steps, "interval": interval, "rescale": rescale},
               "guidance": guidance, "training_s": round(seconds, 1), "images_per_s": round(per_second, 1),
               "mean": round(float(np.mean(scores)), 3), "min": round(float(np.min(scores)), 3),
               "per_class": [round(s, 2) for s in scores], "written": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps(row), flush=True)
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))

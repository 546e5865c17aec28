"""Probe the federated generator's knobs fast: FedAvg rounds simulated in one process.

    python benchmarks/generator_probe.py --rounds 20 --local-steps 50             # the suite's generator
    python benchmarks/generator_probe.py --rounds 20 --local-steps 50 --snr-gamma 5 --server-ema 0.5
    python benchmarks/generator_probe.py --seed 1 --load runs/cache/synthetic/<key>/generator \
        --guidance 1 1.5 --ddim-steps 20 40                                        # a trained one's sampler
    python benchmarks/generator_probe.py --seed 4 --judge-recall                   # the judge on real test images

The same local training (``train_generator``, one fresh AdamW per round, class-balanced
batches), the same weighting (client sample counts) and the same class-aware label table as
``strategies/synthetic.py``, without Flower and Ray: clients train one after another on
all threads. A knob that wins here is then measured for real by ``benchmarks/synthetic.py``.
Prints one line per variant (recognisability per class of 100 guided samples per class, judged
by the LeNet trained on the real balanced training set) and appends it to ``--log``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedimb.app.cli import guarded  # noqa: E402
from fedimb.config import GENERATOR_PREDICTIONS, load_config  # noqa: E402
from fedimb.data import build_federated_data  # noqa: E402
from fedimb.generation import (build_generator, load_generator, recognisability, sample,  # noqa: E402
                               sample_grid, save_generator, train_generator, train_reference_classifier)
from strategies.synthetic import EMBEDDING_KEY, class_aware_rows  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402

SETTING = ["imbalance.factor=100", "partition.name=dir_balance", "partition.alpha=0.1"]


def federated_generator(args: argparse.Namespace, data) -> tuple[dict[str, torch.nn.Module], float]:
    """FedAvg over the clients' generator weights, class-aware label rows.

    Returns ({variant: generator}, seconds): "raw" is the last global model, "ema<d>" the
    exponential moving average of the global models over rounds with decay d (one per --server-ema).
    """
    splits = data.splits
    value_range = (float(splits.train_x.min()), float(splits.train_x.max()))
    unet = build_generator(args.size, splits.input_shape, splits.num_classes, args.seed, data_range=value_range,
                           prediction=args.prediction)
    clients = [(torch.from_numpy(splits.train_x[idx]), torch.from_numpy(splits.train_y[idx])) for idx in data.client_indices]
    sizes = np.array([len(y) for _, y in clients], dtype=np.float64)
    averages: dict[float, dict[str, torch.Tensor]] = {}
    started = time.time()
    for server_round in range(1, args.rounds + 1):
        lr = args.lr * (0.5 * (1 + np.cos(np.pi * (server_round - 1) / args.rounds)) if args.cosine else 1.0)
        states, tables = [], []
        for pid, (x, y) in enumerate(clients):
            local = copy.deepcopy(unet)
            train_generator(local, x, y, steps=args.local_steps, batch_size=args.batch_size, lr=lr,
                            seed=args.seed * 7_919 + server_round * 101 + pid, ema_decay=0.0,
                            balanced=True, snr_gamma=args.snr_gamma)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            tables.append(states[-1][EMBEDDING_KEY].numpy())
        old = unet.state_dict()
        merged = {k: sum(w * s[k].double() for w, s in zip(sizes / sizes.sum(), states)).to(old[k].dtype) for k in old}
        if args.aggregation == "class_aware":
            record = class_aware_rows(ArrayRecord({EMBEDDING_KEY: merged[EMBEDDING_KEY]}), tables, data.counts)
            merged[EMBEDDING_KEY] = torch.from_numpy(record[EMBEDDING_KEY].numpy().copy())
        unet.load_state_dict(merged)
        for decay in args.server_ema:
            previous = averages.get(decay)
            averages[decay] = ({k: v.clone() for k, v in merged.items()} if previous is None else
                               {k: decay * previous[k] + (1 - decay) * merged[k] for k in merged})
        print(f"round {server_round:3d}/{args.rounds} {time.time() - started:7.1f}s", flush=True)
    seconds = time.time() - started
    variants = {"raw": unet.eval()}
    for decay, state in averages.items():
        variants[f"ema{decay:g}"] = copy.deepcopy(unet)
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
    parser.add_argument("--cosine", action="store_true", help="cosine decay of the local lr over rounds")
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
    parser.add_argument("--load", default="", help="score this saved generator (its seed's judge) instead of training one")
    parser.add_argument("--threads", type=int, default=2)
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
    cfg = load_config(ROOT / "experiments/fmnist_lt.yaml", [*SETTING, f"seed={args.seed}"])
    data = build_federated_data(cfg)
    splits = data.splits
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.judge_recall:
        judge = cached_judge(out, splits, args.seed)
        real = recognisability(judge, torch.from_numpy(splits.test_x), torch.from_numpy(splits.test_y), splits.num_classes)
        print(json.dumps({"seed": args.seed, "judge_real_recall": [round(v, 3) for v in real],
                          "mean": round(float(np.mean(real)), 3)}), flush=True)
        return 0
    if args.load:
        variants, seconds = {"loaded": load_generator(args.load)}, 0.0
    else:
        variants, seconds = federated_generator(args, data)
    judge = cached_judge(out, splits, args.seed)
    labels = torch.arange(splits.num_classes).repeat_interleave(100)
    if args.save:
        for variant, unet in variants.items():
            save_generator(unet, out / f"{args.name or 'probe'}_{variant}")
    grid_of = itertools.product(variants.items(), args.ddim_steps, args.guidance, args.interval, args.rescale)
    for (variant, unet), steps, guidance, interval, rescale in grid_of:
        lo, hi = (float(v) for v in interval.split("-"))
        started = time.time()
        images = sample(unet, labels, guidance_scale=guidance, num_inference_steps=steps, seed=args.seed,
                        guidance_interval=(lo, hi), guidance_rescale=rescale)
        per_second = len(labels) / (time.time() - started)
        scores = recognisability(judge, images, labels, splits.num_classes)
        name = f"{args.name or 'probe'}_{variant}"
        sample_grid(images, labels, splits.num_classes, out / f"grid_{name}_w{guidance:g}_s{steps}_i{interval}_r{rescale:g}.png")
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

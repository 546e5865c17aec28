"""Federated active learning on FMNIST-LT: learning curves of the samplers (FairFAL's table).

    python benchmarks/fal.py --samplers random entropy fairfal --seeds 0 1 2   # reduced CPU protocol
    python benchmarks/fal.py --full                                           # the paper's protocol (GPU)
    python benchmarks/fal.py --samplers fairfal random entropy margin --seeds 0 1 2 --table-only
                                                  # table of the finished runs, nothing trained
    python benchmarks/fal.py ... --from-records   # the same from the committed docs/results/fal/records

The reduced protocol (default) is stated in the output: LeNet, ``--rounds`` rounds per stage,
5 local epochs, 5% → 45% labelled. Finished runs are reused. Prints accuracy per labelled
share (mean ± std over seeds), the tail share of queries, and writes docs/results/fal.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedimb.app.cli import guarded  # noqa: E402
from fedimb.records import copy_run_records, save_figure  # noqa: E402
from fedimb.app.sweep import is_finished, plan_sweep  # noqa: E402

PAPER = {"random": 85.60, "entropy": 86.28, "badge": 86.65, "coreset": 86.15, "kafal": 87.05,
         "logo": 86.98, "fairfal": 87.37}


def pooled_tail_share(steps: list[dict]) -> float:
    """Share of all the run's queries that went to tail classes (steps weighted by their query count)."""
    queried = np.array([s.get("queried", 0) for s in steps], dtype=np.float64)
    shares = np.array([s.get("queried_tail_share", 0.0) for s in steps], dtype=np.float64)
    return float((queried * shares).sum() / queried.sum()) if queried.sum() > 0 else float("nan")


def floors(curves: dict[str, list[list[float]]], tails: dict[str, list[float]]) -> tuple[str, bool]:
    """The issue's floors on the reduced protocol: FairFAL beats Random and Entropy at the last
    labelled share (means over seeds) and queries a larger tail share than Entropy."""
    if not {"fairfal", "random", "entropy"} <= set(curves):
        return "(floors not checked: need fairfal, random and entropy)", False
    final = {k: float(np.mean([c[-1] for c in v])) for k, v in curves.items()}
    tail = {k: 100 * float(np.mean(v)) for k, v in tails.items()}
    checks = [("accuracy at the last share over random", final["fairfal"] - final["random"]),
              ("accuracy at the last share over entropy", final["fairfal"] - final["entropy"]),
              ("tail share of queries over entropy", tail["fairfal"] - tail["entropy"])]
    lines = ["| floor (fairfal) | measured (points) | needed | holds |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:+.2f} | > 0 | {'yes' if value > 0 else 'no'} |" for name, value in checks]
    return "\n".join(lines), all(value > 0 for _, value in checks)


def plot_curves(curves: dict[str, list[list[float]]], fractions: list[float], path: Path) -> Path:
    """Mean learning curve (test accuracy per labelled share) of every sampler, std as a band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    x = 100 * np.asarray(fractions)
    for label, runs in curves.items():
        acc = np.asarray(runs)
        mean = acc.mean(0)
        ax.plot(x, mean, marker="o", markersize=3, label=f"{label} (n={len(acc)})",
                linewidth=2.5 if label == "fairfal" else 1.2)
        if len(acc) > 1:
            ax.fill_between(x, mean - acc.std(0), mean + acc.std(0), alpha=0.15)
    ax.set(xlabel="labelled share (%)", ylabel="test accuracy (%)", title="FMNIST-LT, federated active learning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> int:
    """Run the chosen samplers and seeds, print and write the learning-curve table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=["random", "entropy", "fairfal"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per stage (reduced protocol)")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--full", action="store_true", help="the paper's protocol: cnn4, 100 rounds per stage")
    parser.add_argument("--out", default="runs/bench/fal")
    parser.add_argument("--doc", default="docs/results/fal.md")
    parser.add_argument("--notes", default="docs/results/fal_notes.md",
                        help="hand-written analysis inserted after the floors (kept across regenerations)")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: tabulate the finished runs among the chosen samplers and seeds")
    parser.add_argument("--from-records", action="store_true",
                        help="with --table-only: read the committed run records next to --doc instead of --out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from fedimb.app.simulation import run_experiment

    protocol = [] if args.full else [f"model.name={args.model}", f"active_learning.rounds_per_step={args.rounds}"]
    protocol_name = "full" if args.full else f"{args.model}_r{args.rounds}"
    # One folder per protocol: runs of another protocol keep their own names and are never reused here.
    runs, _ = plan_sweep(ROOT / "experiments/suites/fal_fmnist.yaml", protocol + args.overrides,
                         Path(args.out) / protocol_name, seeds=args.seeds)
    chosen = [r for r in runs if r.label in args.samplers]
    doc = Path(args.doc)
    assets = doc.with_suffix("")
    # Named records/, not runs/: run outputs are git-ignored, these copies are committed.
    records = assets / "records" / protocol_name
    if args.from_records:
        args.table_only = True
        chosen = [dataclasses.replace(r, run_dir=records / r.run_dir.name) for r in chosen]
    finished = []
    curves: dict[str, list[list[float]]] = {}
    tails: dict[str, list[float]] = {}
    fractions: list[float] = []
    for run in chosen:
        if not is_finished(run):
            if args.table_only:
                continue
            print(f"running {run.run_dir.name}", flush=True)
            run_experiment(run.cfg, run.run_dir)
        finished.append(run.run_dir)
        steps = json.loads((run.run_dir / "summary.json").read_text())["active_learning"]
        al = run.cfg.active_learning
        fractions = [al.initial_fraction + al.step_fraction * s["step"] for s in steps]
        curves.setdefault(run.label, []).append([100 * s["accuracy"] for s in steps])
        tails.setdefault(run.label, []).append(pooled_tail_share(steps))
    header = "| sampler | seeds | " + " | ".join(f"{100 * f:.0f}%" for f in fractions) + " | tail share of queries | paper @45% |"
    lines = [header, "|" + "---|" * (len(fractions) + 4)]
    for label in args.samplers:
        if label not in curves:
            continue
        acc = np.array(curves[label])
        cells = [f"{m:.2f} ± {s:.2f}" if len(acc) > 1 else f"{m:.2f}" for m, s in zip(acc.mean(0), acc.std(0))]
        lines.append(f"| {label} | {len(acc)} | " + " | ".join(cells)
                     + f" | {100 * np.mean(tails[label]):.1f}% | {f'{PAPER[label]:.2f}' if label in PAPER else '–'} |")
    table = "\n".join(lines)
    setting = ("paper's protocol (cnn4, 100 rounds/stage)" if args.full else
               f"reduced protocol: {args.model}, {args.rounds} rounds per stage, 5 local epochs, "
               "reset to random init each stage, lr 0.01 × 0.1 after 75% of each stage")
    print(f"FMNIST-LT rho=20, dir_balance alpha=0.1, 10 clients, 5% -> 45% labelled; {setting}")
    print(table)
    floor_text, ok = floors(curves, tails)
    print(floor_text)
    if curves:
        plot_curves({k: curves[k] for k in args.samplers if k in curves}, fractions, assets / "curves.png")
    if not args.from_records:
        copy_run_records(finished, records)
    notes = Path(args.notes).read_text() + "\n" if Path(args.notes).is_file() else ""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"# Federated active learning on FMNIST-LT\n\nCommand: `python benchmarks/fal.py {' '.join(sys.argv[1:])}`"
                   f"  \nWritten {time.strftime('%Y-%m-%d %H:%M')}. Setting: {setting}. Test accuracy (%) "
                   "per labelled share, mean ± std over seeds; tail share = share of all queried samples "
                   "(true labels) that belong to the rarest third of classes, pooled over steps, mean over seeds. The runs' text records are in "
                   f"`{records}/` (`--from-records` rebuilds this page from them).\n\n{table}\n\n"
                   f"## Floors\n\n{floor_text}\n\nAll floors hold: {'yes' if ok else 'no'}.\n\n{notes}"
                   f"![learning curves]({assets.name}/curves.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))

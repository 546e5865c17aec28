"""Federated active learning on FMNIST-LT: learning curves of the samplers (FairFAL's table).

    fedimb bench fal --samplers random entropy fairfal --seeds 0 1 2   # reduced CPU protocol
    fedimb bench fal --full                                           # the paper's protocol (GPU)
    fedimb bench fal --samplers fairfal random entropy margin --seeds 0 1 2 --table-only
                                                  # the page from the finished runs, nothing trained
    fedimb bench fal --from-records               # the page again from its records (docs/results/fal/)
    fedimb bench fal --add --samplers fairfal entropy --seeds 3 4   # more seeds beside the page's records

The reduced protocol (default) is stated in the output: LeNet, ``--rounds`` rounds per stage,
5 local epochs, 5% → 45% labelled. The cells of experiments/suites/fal_fmnist.yaml run through
the sweep runner (finished runs are reused). Prints accuracy per labelled share (mean ± std
over seeds), the tail share of queries and the floors, and writes docs/results/fal.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fedimb.app.cli import guarded
from fedimb.app.pages import (CallRecords, PageRun, add_option, bench_parser, command_line, floors_section,
                              floors_table, mean_std, noise_note, paired_by_seed, paired_text, parse, store_runs,
                              table)
from fedimb.app.sweep import choose, execute, failure, is_finished, plan_sweep
from fedimb.records import save_figure

DOC = "docs/results/fal.md"
SUITE = Path(__file__).resolve().parent.parent / "experiments/suites/fal_fmnist.yaml"
PAPER = {"random": 85.60, "entropy": 86.28, "badge": 86.65, "coreset": 86.15, "kafal": 87.05,
         "logo": 86.98, "fairfal": 87.37}


def pooled_tail_share(steps: list[dict]) -> float:
    """Share of all the run's queries that went to tail classes (steps weighted by their query count)."""
    queried = np.array([s.get("queried", 0) for s in steps], dtype=np.float64)
    shares = np.array([s.get("queried_tail_share", 0.0) for s in steps], dtype=np.float64)
    return float((queried * shares).sum() / queried.sum()) if queried.sum() > 0 else float("nan")


def floors(curves: dict[str, list[list[float]]], tails: dict[str, list[float]],
           seeds: dict[str, list[int]]) -> tuple[str, bool]:
    """The floors on the reduced protocol: FairFAL beats Random and Entropy at the last labelled
    share and queries a larger tail share than Entropy, each measured by the mean of its per-seed
    paired differences (the seeds both ran), with a note where they are within noise."""
    if not {"fairfal", "random", "entropy"} <= set(curves):
        return "(floors not checked: need fairfal, random and entropy)", False
    final = {k: dict(zip(seeds[k], (c[-1] for c in v))) for k, v in curves.items()}
    tail = {k: dict(zip(seeds[k], (100 * t for t in v))) for k, v in tails.items()}
    # measured on the seeds both samplers ran: the mean of the paired differences
    checks = [("accuracy at the last share over random", paired_by_seed(final["fairfal"], final["random"])),
              ("accuracy at the last share over entropy", paired_by_seed(final["fairfal"], final["entropy"])),
              ("tail share of queries over entropy", paired_by_seed(tail["fairfal"], tail["entropy"]))]
    text, ok = floors_table(["floor (fairfal)", "paired per seed (mean ± std)", "measured (points)", "needed", "holds"],
                            [([name, paired_text(diffs)], float(np.mean(diffs)), ">", 0) for name, diffs in checks])
    within = [name for name, diffs in checks if "within noise" in paired_text(diffs)]
    text += noise_note(within)
    return text, ok


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


def learning_curves(runs: list[PageRun]) -> tuple[dict[str, list[list[float]]], dict[str, list[float]], list[float],
                                                  dict[str, list[int]]]:
    """Accuracy per labelled share and pooled tail share of queries of every run, by sampler; the
    shares; each sampler's seeds in the order of its runs."""
    curves: dict[str, list[list[float]]] = {}
    tails: dict[str, list[float]] = {}
    seeds: dict[str, list[int]] = {}
    fractions: list[float] = []
    for run in runs:
        seeds.setdefault(run.label, []).append(run.cfg.seed)
        steps = run.summary["active_learning"]
        al = run.cfg.active_learning
        fractions = [al.initial_fraction + al.step_fraction * s["step"] for s in steps]
        curves.setdefault(run.label, []).append([100 * s["accuracy"] for s in steps])
        tails.setdefault(run.label, []).append(pooled_tail_share(steps))
    return curves, tails, fractions, seeds


def sampler_order(samplers: Iterable[str]) -> list[str]:
    """FairFAL first, then the suite's order; a sampler the suite does not name last."""
    import yaml

    suite = ["fairfal", *yaml.safe_load(SUITE.read_text())["axes"]["sampler"]]
    return sorted(samplers, key=lambda s: suite.index(s) if s in suite else len(suite))


def main(argv: list[str] | None = None) -> int:
    """Run the chosen samplers and seeds, print and write the learning-curve table."""
    parser = bench_parser("fal", __doc__, DOC)
    parser.add_argument("--samplers", nargs="+", default=["random", "entropy", "fairfal"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per stage (reduced protocol)")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--full", action="store_true", help="the paper's protocol: cnn4, 100 rounds per stage")
    parser.add_argument("--out", default="runs/bench/fal")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: tabulate the finished runs among the chosen samplers and seeds")
    add_option(parser)
    parser.add_argument("overrides", nargs="*")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)

    failed: list[str] = []
    if not args.from_records:
        records = CallRecords(page, header, args.add)
        protocol = [] if args.full else [f"model.name={args.model}", f"active_learning.rounds_per_step={args.rounds}"]
        protocol_name = "full" if args.full else f"{args.model}_r{args.rounds}"
        # One folder per protocol: runs of another protocol keep their own names and are never reused here.
        planned, sweep_dir = plan_sweep(SUITE, protocol + args.overrides, Path(args.out) / protocol_name,
                                        seeds=args.seeds)
        chosen = choose(planned, args.samplers, field="samplers")
        if args.table_only:
            finished = [r for r in chosen if is_finished(r)]
        else:
            finished, failed = execute(chosen, sweep_dir, on_finished=lambda run: records.keep([run.run_dir]))
        store_runs(records, [r.run_dir for r in finished], failed, len(chosen))
    header = page.header()
    curves, tails, fractions, seeds = learning_curves(page.runs())
    # added runs sit beside earlier calls' samplers, so the page shows every sampler it holds
    shown = sampler_order(curves) if args.add else [s for s in args.samplers if s in curves]
    rows = []
    for label in shown:
        acc = np.array(curves[label])
        rows.append([label, f"{len(acc)}", *(mean_std(acc[:, i]) for i in range(acc.shape[1])),
                     f"{100 * np.mean(tails[label]):.1f}%", f"{PAPER[label]:.2f}" if label in PAPER else "–"])
    text = table(["sampler", "seeds", *(f"{100 * f:.0f}%" for f in fractions), "tail share of queries", "paper @45%"],
                 rows)
    setting = ("paper's protocol (cnn4, 100 rounds/stage)" if args.full else
               f"reduced protocol: {args.model}, {args.rounds} rounds per stage, 5 local epochs, "
               "reset to random init each stage, lr 0.01 × 0.1 after 75% of each stage")
    print(f"FMNIST-LT rho=20, dir_balance alpha=0.1, 10 clients, 5% -> 45% labelled; {setting}")
    print(text)
    floor_text, ok = floors(curves, tails, seeds)
    print(floor_text)
    if curves:
        plot_curves({k: curves[k] for k in shown}, fractions, page.folder / "curves.png")
    notes, rel = page.notes(), page.records.relative_to(page.doc.parent)
    page.write(f"# Federated active learning on FMNIST-LT\n\n{command_line(header)}"
               f"  \nWritten {header['written']}. Setting: {setting}. Test accuracy (%) "
               "per labelled share, mean ± std over seeds; tail share = share of all queried samples "
               "(true labels) that belong to the rarest third of classes, pooled over steps, mean over seeds. "
               f"The runs' records are in [{rel}]({rel}) (`--from-records` rebuilds this page from them).\n\n"
               f"{text}\n\n{floors_section(floor_text, ok)}{notes + chr(10) if notes else ''}"
               f"![learning curves]({page.folder.name}/curves.png)\n")
    if failed:
        raise failure(failed, len(chosen), page.doc, "the page")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))

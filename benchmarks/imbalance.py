"""Imbalance-aware methods on FMNIST-LT: tables, plots and the CAFedCL-style floors.

    fedimb sweep experiments/suites/cafedcl_tuning.yaml                                         # validation split
    fedimb sweep experiments/suites/imbalance_fmnist.yaml --seeds 0 1 2 --only 'lt100_dirbal0.1_*'  # 3 seeds, key cell
    fedimb sweep experiments/suites/imbalance_fmnist.yaml                                       # 1 seed, 4 settings
    python benchmarks/imbalance.py                                                              # this report

Reads the finished runs of both sweeps (nothing is trained here) and writes
docs/results/imbalance.md plus docs/results/imbalance/ (results.md, results.csv,
comparison.png, curves_compare.png) and copies the runs' text records to docs/results/imbalance/records/
(committed: ``--sweep docs/results/imbalance/records/imbalance_fmnist --tuning
docs/results/imbalance/records/cafedcl_tuning`` rebuilds the report without training). The floors, on rho = 100 with dir_balance alpha = 0.1:
cafedcl beats fedavg by >= 3 points of balanced accuracy and >= 5 of tail recall, beats
fedproto, and has a lower client accuracy std than fedavg. ``--cafedcl`` / ``--fedproto``
pick the method labels compared (default: the variants chosen on the validation split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedimb.app.cli import guarded  # noqa: E402
from fedimb.records import copy_run_records, load_run  # noqa: E402
from fedimb.report import aggregate, collect_runs, find_run_dirs, results_markdown, write_report  # noqa: E402

KEY_SETTING = "dir_balance(0.1), LT rho=100"
TABLE_METRICS = ("balanced_accuracy", "tail_recall", "macro_f1", "client_accuracy_std", "accuracy")


def floors(groups: list[dict], cafedcl: str, fedprotos: list[str]) -> tuple[str, bool]:
    """Markdown lines checking the issue's floors on the key setting (against every ablation
    label given), and whether all hold."""
    by_method = {g["method"]: g for g in groups if g["setting"] == KEY_SETTING}
    missing = [m for m in ["fedavg", cafedcl, *fedprotos] if m not in by_method]
    if missing:
        return f"(floors not checked: {', '.join(missing)} missing on {KEY_SETTING})", False
    ours, base = by_method[cafedcl], by_method["fedavg"]

    def pts(group: dict, metric: str) -> float:
        return 100 * group[f"{metric}_mean"]

    checks = [
        ("balanced accuracy over fedavg", pts(ours, "balanced_accuracy") - pts(base, "balanced_accuracy"), 3.0),
        ("tail recall over fedavg", pts(ours, "tail_recall") - pts(base, "tail_recall"), 5.0),
        *[(f"balanced accuracy over {label} (n = {by_method[label]['n']})",
           pts(ours, "balanced_accuracy") - pts(by_method[label], "balanced_accuracy"), 0.0) for label in fedprotos],
        ("client accuracy std below fedavg's", pts(base, "client_accuracy_std") - pts(ours, "client_accuracy_std"), 0.0),
    ]
    lines = [f"Floors on {KEY_SETTING}, `{cafedcl}` (n = {ours['n']}) against `fedavg` (n = {base['n']}) "
             "and the FedProto ablations, means over seeds:", "",
             "| floor | measured (points) | needed | holds |", "|---|---|---|---|"]
    ok = True
    for name, value, need in checks:
        holds = value > need if need == 0 else value >= need
        ok &= holds
        lines.append(f"| {name} | {value:+.2f} | {'> 0' if need == 0 else f'>= {need:g}'} | {'yes' if holds else 'no'} |")
    return "\n".join(lines), ok


def plateau(groups: list[dict], window: int) -> str:
    """Markdown table: how flat each key-setting method's balanced accuracy is at the end of its runs."""
    lines = [f"| method | runs | last {window} rounds: max − min | last {window} rounds: change per round |",
             "|---|---|---|---|"]
    for group in (g for g in groups if g["setting"] == KEY_SETTING):
        spreads, climbs = [], []
        for run_dir in group["run_dirs"]:
            curve = [100 * r["balanced_accuracy"] for r in load_run(run_dir)["rounds"] if "balanced_accuracy" in r]
            if len(curve) > window:
                spreads.append(max(curve[-window:]) - min(curve[-window:]))
                climbs.append((curve[-1] - curve[-window]) / (window - 1))
        if spreads:
            lines.append(f"| {group['method']} | {len(spreads)} | {sum(spreads) / len(spreads):.2f} "
                         f"| {sum(climbs) / len(climbs):+.2f} |")
    return "\n".join(lines)


def protocol(run_dir: Path) -> str:
    """The training schedule of a run, read from its config (rounds, epochs, lr and its decay)."""
    cfg = load_run(run_dir)["config"]
    train, rounds = cfg.get("train") or {}, (cfg.get("federation") or {}).get("rounds")
    text = (f"{rounds} rounds × {train.get('local_epochs')} local epochs (SGD lr {train.get('lr')}, "
            f"momentum {train.get('momentum')}, batch {train.get('batch_size')}")
    for at in train.get("lr_decay_at") or []:
        text += f"; lr × {train.get('lr_decay_factor')} after round {int(at * rounds)}"
    return text + ")"


def keep_records(runs: list[Path], source: Path, dest: Path) -> None:
    """Copy the runs' text records to ``dest`` unless they are being read from there already."""
    if runs and dest.resolve() != source.resolve():
        copy_run_records(runs, dest)


def main() -> int:
    """Write the report from the finished sweep runs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="runs/sweeps/imbalance_fmnist")
    parser.add_argument("--tuning", default="runs/sweeps/cafedcl_tuning")
    parser.add_argument("--cafedcl", default="cafedcl(inference=prototype,lambda_proto=2,tau=0.1)", help="method label of the CAFedCL-style row to check")
    parser.add_argument("--fedproto", nargs="+",
                        default=["fedproto(inference=prototype)", "fedproto(inference=prototype,lambda_proto=2,tau=0.1)"],
                        help="method labels of the ablations (FedProto at its own and at cafedcl's loss knobs)")
    parser.add_argument("--last-rounds", type=int, default=5, metavar="K",
                        help="average each run's last K rounds (0: final round only)")
    parser.add_argument("--doc", default="docs/results/imbalance.md")
    parser.add_argument("--records", default="docs/results/imbalance/records",
                        help="where the runs' text records are copied (committed; --sweep/--tuning can read them)")
    parser.add_argument("--notes", default="docs/results/imbalance_notes.md",
                        help="hand-written analysis inserted after the floors (kept across regenerations)")
    args = parser.parse_args()
    doc = Path(args.doc)
    assets = doc.with_suffix("")
    runs = find_run_dirs(args.sweep)
    if not runs:
        print(f"no finished runs under {args.sweep}", file=sys.stderr)
        return 1
    write_report(runs, assets, last_rounds=args.last_rounds)
    keep_records(runs, Path(args.sweep), Path(args.records) / "imbalance_fmnist")
    groups = aggregate(collect_runs(runs, last_rounds=args.last_rounds))
    floor_text, ok = floors(groups, args.cafedcl, args.fedproto)
    notes = Path(args.notes).read_text() + "\n" if Path(args.notes).is_file() else ""
    tuning_runs = find_run_dirs(args.tuning) if Path(args.tuning).is_dir() else []
    keep_records(tuning_runs, Path(args.tuning), Path(args.records) / "cafedcl_tuning")
    tuning = (results_markdown(aggregate(collect_runs(tuning_runs, last_rounds=args.last_rounds)),
                               ("balanced_accuracy", "tail_recall", "client_accuracy_std"))
              if tuning_runs else "(no tuning runs)\n")
    window = (f"Metrics averaged over each run's last {args.last_rounds} rounds" if args.last_rounds > 0
              else "Final-round metrics")
    text = (
        "# Imbalance-aware methods on FMNIST-LT\n\n"
        f"Written {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/imbalance.py {' '.join(sys.argv[1:])}` "
        "from the finished runs of these sweeps (the (n) in each cell counts the seeds that exist)\n\n"
        "```\nfedimb sweep experiments/suites/cafedcl_tuning.yaml                      # validation split, seed 0\n"
        "fedimb sweep experiments/suites/imbalance_fmnist.yaml --seeds 0 1 2 --only "
        "'lt100_dirbal0.1_*'  # key setting\n"
        "fedimb sweep experiments/suites/imbalance_fmnist.yaml --seeds 0           # the other settings\n```\n\n"
        "Setting: FMNIST with a global exp long tail (rho = 20 or 100; balanced test set), 10 clients, all "
        f"participating, LeNet, {protocol(runs[0])}. "
        f"{window}, mean ± std over seeds (n), percent. Tail recall = mean recall of the rarest "
        "third of classes by training count (here sneaker, bag, ankle boot: easy classes on FMNIST, so "
        "balanced accuracy is the more telling figure).\n\n"
        f"## Floors\n\n{floor_text}\n\nAll floors hold: {'yes' if ok else 'no'}.\n\n"
        f"## Convergence on {KEY_SETTING} (balanced accuracy, points, mean over runs)\n\n"
        f"{plateau(groups, max(args.last_rounds, 5))}\n\n{notes}"
        "## Tuning on a validation split (never the test set)\n\n"
        "20% of every training class held out and used as the evaluation set; rho = 100, dir_balance 0.1, seed 0.\n\n"
        f"{tuning}\n"
        f"## Results\n\n{results_markdown(groups, TABLE_METRICS)}\n"
        f"![final metrics](imbalance/comparison.png)\n\n![accuracy over rounds](imbalance/curves_compare.png)\n"
    )
    doc.write_text(text)
    print(floor_text)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))

"""Imbalance-aware methods on FMNIST-LT: tables, plots and the CAFedCL-style floors.

    fedimb sweep experiments/suites/cafedcl_tuning.yaml                                         # validation split
    fedimb sweep experiments/suites/imbalance_fmnist.yaml --seeds 0 1 2 --only 'lt100_dirbal0.1_*'  # 3 seeds, key cell
    fedimb sweep experiments/suites/imbalance_fmnist.yaml                                       # 1 seed, 4 settings
    fedimb bench imbalance                                                                      # this report
    fedimb bench imbalance --from-records                       # the same from its records, nothing else read
    fedimb bench imbalance --add                                # add newly finished runs to the records

Reads the finished runs of both sweeps (nothing is trained here), keeps their records in
docs/results/imbalance/records.jsonl.gz and writes docs/results/imbalance.md plus
docs/results/imbalance/ (results.md, results.csv, comparison.png, curves_compare.png). The floors,
on rho = 100 with dir_balance alpha = 0.1: cafedcl beats fedavg by >= 3 points of balanced
accuracy and >= 5 of tail recall, beats FedProto and the FedAvg-with-prototypes ablation, and has a
lower client accuracy std than fedavg; each with its per-seed paired differences.
``--cafedcl`` / ``--fedproto`` pick the method labels compared (default: the variants chosen on
the validation split).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.app.cli import guarded
from fedimb.app.pages import (add_option, bench_parser, commands_text, floors_section, floors_table, margin_note,
                              margin_within_noise, noise_note, paired_text, parse, records_of, save_records, table)
from fedimb.report import (aggregate, collect_runs, find_run_dirs, read_records, results_markdown, run_of_record,
                           write_report)

DOC = "docs/results/imbalance.md"
KEY_SETTING = "dir_balance(0.1), LT rho=100"
TABLE_METRICS = ("balanced_accuracy", "tail_recall", "macro_f1", "client_accuracy_std", "accuracy")


def paired(rows: list[dict], ours: str, other: str, metric: str) -> np.ndarray:
    """Per-seed differences ours − other of ``metric`` on the key setting, in points, over the seeds both ran."""
    by = {(r["strategy"], r["seed"]): 100 * float(r[metric]) for r in rows if r["partition"] == KEY_SETTING}
    seeds = sorted(seed for (method, seed) in by if method == ours and (other, seed) in by)
    return np.array([by[(ours, s)] - by[(other, s)] for s in seeds])


def floors(groups: list[dict], rows: list[dict], cafedcl: str, fedprotos: list[str],
           personalised: set[str]) -> tuple[str, bool]:
    """Markdown lines checking the floors on the key setting (against every prototype baseline given)
    with the per-seed paired differences, and whether all hold."""
    by_method = {g["method"]: g for g in groups if g["setting"] == KEY_SETTING}
    missing = [m for m in ["fedavg", cafedcl] if m not in by_method]
    if missing:
        return f"(floors not checked: {', '.join(missing)} missing on {KEY_SETTING})", False
    not_run = [label for label in fedprotos if label not in by_method]
    apart = [label for label in fedprotos if label in by_method and label in personalised]
    fedprotos = [label for label in fedprotos if label in by_method and label not in personalised]
    ours, base = by_method[cafedcl], by_method["fedavg"]

    def pts(group: dict, metric: str) -> float:
        return 100 * group[f"{metric}_mean"]

    checks = [
        ("balanced accuracy over fedavg", pts(ours, "balanced_accuracy") - pts(base, "balanced_accuracy"), 3.0,
         paired(rows, cafedcl, "fedavg", "balanced_accuracy")),
        ("tail recall over fedavg", pts(ours, "tail_recall") - pts(base, "tail_recall"), 5.0,
         paired(rows, cafedcl, "fedavg", "tail_recall")),
        *[(f"balanced accuracy over {label} (n = {by_method[label]['n']})",
           pts(ours, "balanced_accuracy") - pts(by_method[label], "balanced_accuracy"), 0.0,
           paired(rows, cafedcl, label, "balanced_accuracy")) for label in fedprotos],
        ("client accuracy std below fedavg's", pts(base, "client_accuracy_std") - pts(ours, "client_accuracy_std"), 0.0,
         -paired(rows, cafedcl, "fedavg", "client_accuracy_std")),
    ]
    text, ok = floors_table(["floor", "paired per seed (mean ± std)", "measured (points)", "needed", "holds"],
                            [([name, paired_text(diffs)], value, ">" if need == 0 else ">=", need)
                             for name, value, need, diffs in checks])
    within = [name for name, _, _, diffs in checks if "within noise" in paired_text(diffs)]
    thin = [name for name, _, need, diffs in checks if name not in within and margin_within_noise(diffs, need)]
    text += noise_note(within) + margin_note(thin)
    if not_run:
        text += f"\n\nNot run on this setting, so not checked: {', '.join(f'`{label}`' for label in not_run)}."
    for label in apart:
        g = by_method[label]
        text += (f"\n\nNot compared: `{label}` has no global model; its {g['n']} runs score each client's own "
                 f"model on that client's local test split (the client's label mix), pooled: "
                 f"{pts(g, 'balanced_accuracy'):.2f} ± {100 * g['balanced_accuracy_std']:.2f} balanced accuracy. "
                 "The other rows score one global model on the balanced test set: not the same quantity.")
    return (f"Floors on {KEY_SETTING}, `{cafedcl}` (n = {ours['n']}) against `fedavg` (n = {base['n']}) "
            f"and the prototype baselines, means over seeds:\n\n{text}"), ok and not not_run


def plateau(groups: list[dict], window: int, rounds: dict[str, list[dict]]) -> str:
    """Markdown table: how flat each key-setting method's balanced accuracy is at the end of its runs."""
    rows = []
    for group in (g for g in groups if g["setting"] == KEY_SETTING):
        spreads, climbs = [], []
        for run_dir in group["run_dirs"]:
            curve = [100 * r["balanced_accuracy"] for r in rounds[run_dir] if "balanced_accuracy" in r]
            if len(curve) > window:
                spreads.append(max(curve[-window:]) - min(curve[-window:]))
                climbs.append((curve[-1] - curve[-window]) / (window - 1))
        if spreads:
            rows.append([group["method"], f"{len(spreads)}", f"{sum(spreads) / len(spreads):.2f}",
                         f"{sum(climbs) / len(climbs):+.2f}"])
    return table(["method", "runs", f"last {window} rounds: max − min", f"last {window} rounds: change per round"], rows)


def protocol(cfg: dict[str, Any]) -> str:
    """The training schedule of a run, read from its config (rounds, epochs, lr and its decay)."""
    train, rounds = cfg.get("train") or {}, (cfg.get("federation") or {}).get("rounds")
    text = (f"{rounds} rounds × {train.get('local_epochs')} local epochs (SGD lr {train.get('lr')}, "
            f"momentum {train.get('momentum')}, batch {train.get('batch_size')}")
    for at in train.get("lr_decay_at") or []:
        text += f"; lr × {train.get('lr_decay_factor')} after round {int(at * rounds)}"
    return text + ")"


def main(argv: list[str] | None = None) -> int:
    """Write the report from the finished sweep runs."""
    parser = bench_parser("imbalance", __doc__, DOC)
    parser.add_argument("--sweep", default="runs/sweeps/imbalance_fmnist")
    parser.add_argument("--tuning", default="runs/sweeps/cafedcl_tuning")
    parser.add_argument("--cafedcl", default="cafedcl(inference=prototype,lambda_proto=2,tau=0.1)", help="method label of the CAFedCL-style row to check")
    parser.add_argument("--fedproto", nargs="+",
                        default=["fedproto@balanced-test", "fedproto", "fedavg_proto(inference=prototype)",
                                 "fedavg_proto(inference=prototype,lambda_proto=2,tau=0.1)"],
                        help="method labels of the prototype baselines: FedProto, and the ablation (FedAvg with "
                             "count-weighted prototypes) at its own and at cafedcl's loss knobs")
    add_option(parser, "the finished runs under --sweep")
    parser.add_argument("--last-rounds", type=int, default=5, metavar="K",
                        help="average each run's last K rounds (0: final round only)")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)
    if not args.from_records:
        sweep_runs = find_run_dirs(args.sweep)
        if not sweep_runs:
            print(f"no finished runs under {args.sweep}", file=sys.stderr)
            return 1
        tuning_runs = find_run_dirs(args.tuning) if Path(args.tuning).is_dir() else []
        fresh = records_of(sweep_runs, group="sweep") + records_of(tuning_runs, group="tuning")
        save_records(page, header, fresh, add=args.add)
    header, records = read_records(page.records)
    runs = [run_of_record(r, page.records) for r in records if r["group"] == "sweep"]
    tuning_runs = [run_of_record(r, page.records) for r in records if r["group"] == "tuning"]
    write_report(runs, page.folder, last_rounds=args.last_rounds)
    rows = collect_runs(runs, last_rounds=args.last_rounds)
    groups = aggregate(rows)
    federated = {run["run_dir"] for run in runs if run["summary"].get("evaluation") == "federated"}
    personalised = {r["strategy"] for r in rows if r["partition"] == KEY_SETTING  # own models on their own test splits
                    and not r["strategy"].endswith("@balanced-test") and r["run_dir"] in federated}
    floor_text, ok = floors(groups, rows, args.cafedcl, args.fedproto, personalised)
    notes = page.notes()
    tuning = (results_markdown(aggregate(collect_runs(tuning_runs, last_rounds=args.last_rounds)),
                               ("balanced_accuracy", "tail_recall", "client_accuracy_std"))
              if tuning_runs else "(no tuning runs)\n")
    window = (f"Metrics averaged over each run's last {args.last_rounds} rounds" if args.last_rounds > 0
              else "Final-round metrics")
    text = (
        "# Imbalance-aware methods on FMNIST-LT\n\n"
        f"Written {header['written']} by {commands_text(header)} "
        "from the finished runs of these sweeps (the (n) in each cell counts the seeds that exist)\n\n"
        "```\nfedimb sweep experiments/suites/cafedcl_tuning.yaml                      # validation split, seed 0\n"
        "fedimb sweep experiments/suites/imbalance_fmnist.yaml --seeds 0 1 2 --only "
        "'lt100_dirbal0.1_*'  # key setting\n"
        "fedimb sweep experiments/suites/imbalance_fmnist.yaml --seeds 0           # the other settings\n```\n\n"
        "Setting: FMNIST with a global exp long tail (rho = 20 or 100; balanced test set), 10 clients, all "
        f"participating, LeNet, {protocol(runs[0]['config'])}. "
        f"{window}, mean ± std over seeds (n), percent. Tail recall = mean recall of the rarest "
        "third of classes by training count (here sneaker, bag, ankle boot: easy classes on FMNIST, so "
        "balanced accuracy is the more telling figure).\n\n"
        f"{floors_section(floor_text, ok)}"
        f"## Convergence on {KEY_SETTING} (balanced accuracy, points, mean over runs)\n\n"
        f"{plateau(groups, max(args.last_rounds, 5), {r['run_dir']: r['rounds'] for r in runs})}\n\n"
        f"{notes + chr(10) if notes else ''}"
        "## Tuning on a validation split (never the test set)\n\n"
        "20% of every training class held out and used as the evaluation set; rho = 100, dir_balance 0.1, seed 0.\n\n"
        f"{tuning}\n"
        f"## Results\n\n{results_markdown(groups, TABLE_METRICS)}\n"
        f"![final metrics]({page.folder.name}/comparison.png)\n\n"
        f"![accuracy over rounds]({page.folder.name}/curves_compare.png)\n"
    )
    page.write(text)
    print(floor_text)
    print(f"wrote {page.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))

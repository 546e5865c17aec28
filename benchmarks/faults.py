"""Failing and hostile clients on FMNIST-LT: what each fault costs fedavg and cafedcl, and what a robust rule buys back.

    fedimb bench faults                        # every cell of the suite, seeds 0 1 2, seed by seed
    fedimb bench faults --table-only           # the page from the runs finished so far, nothing trained
    fedimb bench faults --from-records         # the page again from its records (docs/results/faults/)

Runs the cells of experiments/suites/faults_fmnist.yaml (the quick-start federation for 20
rounds: clean; 10% and 30% of the clients crashing in every round; one client sending NaN
weights; one sending its update × 100 (with and without a trimmed mean); two sending it
sign-flipped (without a rule, with a trimmed mean, with Multi-Krum on the raw updates and on their
directions, with that and a memory of its drops, with the cosine rule)) through the sweep runner, all cells of a seed before the next seed, so
an interrupted call leaves whole seeds and a later call reuses every finished run (an
interrupted one resumes from its checkpoint). A run the federation stops because a round got
too few valid replies (a diverged model: every reply non-finite) is kept as such and not retried.

The page gives, per cell, balanced accuracy and tail recall (mean of each run's last 5 rounds)
and the failures recorded; the per-seed differences to the clean run of the same method and
seed (mean ± std); the floors: 30% crashing costs at most 2 points of balanced accuracy, no NaN
reply is ever averaged and the NaN run equals the run where that client crashes, and with its
rule (a trimmed mean for x100, Multi-Krum on directions with a memory of its drops for the sign flips) each attack stays within 2 points of
clean; a selection rule's drops are split into hostile and honest replies. It builds from any
subset of the runs and says how many seeds each row has.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.app.cli import guarded
from fedimb.app.pages import (PageRun, add_option, bench_parser, command_line, floors_section, floors_table, page_runs,
                              paired_text, parse, save_records, table)
from fedimb.app.sweep import PlannedRun, choose, execute, failure, is_finished, plan_sweep, result_knobs
from fedimb.config import ConfigError, ExperimentConfig, load_config
from fedimb.failures import DROPPED_FILE, FAILURES_FILE, required_replies
from fedimb.faults import FaultPlan, hostile_partitions
from fedimb.hostile import KRUM_RULES, SELECTION_RULES
from fedimb.records import save_figure
from fedimb.report import REPORT_METRICS, last_rounds_mean, read_records, record_of_run

DOC = "docs/results/faults.md"
ROOT = Path(__file__).resolve().parent.parent
MAX_COST = 2.0  # points of balanced accuracy a floor cell may lose against clean
EQUAL = 0.01  # points: the NaN run and its crash run agree to the digits the page shows
# the rule each floor checks; the sign flips' was Multi-Krum on the raw updates (signflip_multikrum) until
# its seed-2 run, Multi-Krum on directions until its fresh seeds 3 and 4, then the cosine rule until its
# seeds 0-6, see the page's Reading (every rule keeps its row)
ROBUST_CASES = {"x100_trimmed": "trimmed mean", "signflip_multikrum_history": "Multi-Krum on directions, with history"}
DATASETS = {"fmnist": "Fashion-MNIST"}
FAULT_WORDS = {"crash": "crash", "straggle": "straggle", "nan": "send NaN weights", "inf": "send Inf weights",
               "wrong_shape": "send a wrongly shaped array", "sign_flip": "send their update sign-flipped",
               "label_flip": "train on flipped labels"}
WHY_RULE = (
    "Validation rejects a non-finite reply before any rule sees it, so the NaN cell needs no rule. For the x100 "
    "client: the coordinate-wise trimmed mean cutting one value at each end of every coordinate (trim 0.1): the "
    "x100 value is an extreme of every coordinate its update moves, so it is cut, and the mean of the 8 values "
    "left stays close to FedAvg's. For the two sign flippers the floor's rule is Multi-Krum on directions with "
    "a memory (`strategy.robust.exclude_after=3`): a client scored in at least 3 rounds and dropped in more than "
    "half of them is left out of every later round, and f shrinks by one for each client left out, so once both "
    "flippers are out the other replies are all averaged, none traded for a hostile one. The rules tried before "
    "it keep their rows. The cosine rule (`cosine`): every update scaled to unit norm, the coordinate-wise median "
    "of those as the reference direction, and a reply whose cosine with it is at most 0 dropped whole (FLTrust's "
    "ReLU-cosine trust score, Cao et al. 2021, with that median in place of an update trained on the server's "
    "own root data, which a server without data cannot compute); it keeps no fixed count, but a flipped reply "
    "passes whenever its sender's honest update points away from the median. Multi-Krum with f = 2 (it needs n ≥ 2f + 3 = 7 "
    "replies) keeps the n − f = 8 replies closest to their n − f − 2 nearest neighbours and lets the strategy "
    "average them as it does (by size; cafedcl's prototypes go with their reply): a flipped update points "
    "against the honest ones, so it is farther from them than they are from each other, while many of its "
    "coordinates lie inside the honest range, where a trimmed mean keeps them (the trimmed mean with trim 0.2, "
    "as many values cut per end as there are flippers, is the row beside it). Krum alone keeps one reply, one "
    "client's non-IID update per round; Bulyan needs n ≥ 4f + 3 = 11 replies for f = 2, more than these 10 "
    "clients; the median keeps one or two values per coordinate. A coordinate-wise rule weighs every kept reply "
    "alike (each one's weights become the same point), not by its size, and Multi-Krum can drop an honest "
    "client with unusual data in place of a hostile one: the robust cells' Δ to clean counts those costs as "
    "well as whatever the attack still does. Under this long-tailed Dirichlet split the clients hold from under "
    "a thousand to almost six thousand samples, so after one local epoch the largest clients send the longest "
    "updates: on the raw updates their distances to the others are the largest, and Multi-Krum takes them for "
    "the outliers. Scored on directions (`strategy.robust.directions`: each update scaled to unit norm before "
    "the distances; the kept replies are averaged as sent) a long honest update lies with the others and a "
    "flipped one, pointing the other way, stays far from all of them. The last column counts, per seed, the "
    "flipped replies a selection rule dropped of those sent and the honest replies it dropped "
    "(`robust_dropped.csv`).")


# --- runs and their records ----------------------------------------------------------------------


def stopped_round(run_dir: Path, cfg: ExperimentConfig) -> int | None:
    """The round a run without a summary stopped in for too few valid replies (None: not stopped so)."""
    path = run_dir / FAILURES_FILE
    if (run_dir / "summary.json").is_file() or not path.is_file():
        return None
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    last = max(int(r["round"]) for r in rows)
    sampled = max(1, round(cfg.federation.fraction * cfg.federation.num_clients))
    allowed = sampled - required_replies(cfg.federation.min_replies, sampled)
    per_phase = [sum(1 for r in rows if int(r["round"]) == last and r["phase"] == p) for p in ("train", "evaluate")]
    return last if max(per_phase) > allowed else None


def stopped_here(run: PlannedRun) -> bool:
    """Whether ``run.run_dir`` holds a run of this very config that a too-short round stopped."""
    saved = run.run_dir / "config.yaml"
    return (stopped_round(run.run_dir, run.cfg) is not None and saved.is_file()
            and result_knobs(load_config(saved)) == result_knobs(run.cfg))


def record_of(run_dir: Path) -> dict[str, Any]:
    """A run's record with its failures.csv and robust_dropped.csv (None: the run wrote no such file though
    its rule selects, made before runs kept one); a stopped run's summary is empty and its rounds are those it
    logged."""
    def text_of(name: str) -> str | None:
        path = run_dir / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    config = (run_dir / "config.yaml").read_text(encoding="utf-8")
    selects = load_config(run_dir / "config.yaml").strategy.robust.name in SELECTION_RULES
    extra = {"failures": text_of(FAILURES_FILE) or "", "dropped": text_of(DROPPED_FILE) or ("" if not selects else None)}
    if (run_dir / "summary.json").is_file():
        return record_of_run(run_dir, **extra)
    return {"name": run_dir.name, **extra, "config": config, "summary": {}, "rounds": text_of("rounds.csv") or ""}


def run_cells(args: Any) -> tuple[list[Path], list[str], int]:
    """Run (or with --table-only only find) the chosen cells seed by seed; the run dirs to record, failed names, total."""
    planned, sweep_dir = plan_sweep(ROOT / args.suite, args.overrides, Path(args.out), seeds=args.seeds)
    chosen = choose(planned, args.cells or list(dict.fromkeys(r.label for r in planned)), seeds_outermost=True)
    stopped = [r for r in chosen if stopped_here(r)]
    failed: list[str] = []
    if args.table_only:
        finished = [r for r in chosen if is_finished(r)]
    else:
        finished, failed = execute([r for r in chosen if r not in stopped], sweep_dir, resume=True)
        stopped += [r for r in chosen if r.run_dir.name in failed and stopped_here(r)]
        failed = [name for name in failed if name not in {r.run_dir.name for r in stopped}]
    kept = {r.run_dir for r in finished + stopped}
    return [r.run_dir for r in chosen if r.run_dir in kept], failed, len(chosen)


# --- what the page shows of a run -----------------------------------------------------------------


def short_reason(reason: str) -> str:
    """A failure's reason without round numbers and array names, so equal reasons count together."""
    if reason.startswith("injected fault: "):
        return reason.removeprefix("injected fault: ").split(" ")[0]
    if reason.startswith("rejected: ") and reason.endswith("is not finite"):
        return "rejected: not finite"
    return re.sub(r"\d+", "N", reason)


def dropped_counts(run: PageRun, dropped_text: str | None) -> tuple[int, int, int] | None:
    """A selection rule's drops: (hostile replies dropped, hostile replies sent, honest replies dropped);
    None when the run's rule selects nothing or its drops were not recorded."""
    if run.cfg.strategy.robust.name not in SELECTION_RULES or dropped_text is None:
        return None
    hostile = set(hostile_partitions(run.cfg.faults, run.cfg.federation.num_clients, run.seed))
    rows = list(csv.DictReader(io.StringIO(dropped_text)))
    rounds = max((int(r["round"]) for r in run.run["rounds"]), default=0)
    bad = sum(int(r["partition"]) in hostile for r in rows)
    return bad, rounds * len(hostile), len(rows) - bad


def figures(run: PageRun, failures_text: str, last_rounds: int, dropped_text: str | None = "") -> dict[str, Any]:
    """Metrics (points), failures by reason, the selection rule's drops and the round a run stopped in
    (None: it finished)."""
    rows = list(csv.DictReader(io.StringIO(failures_text)))
    reasons: dict[str, int] = {}
    for row in rows:
        reasons[short_reason(row["reason"])] = reasons.get(short_reason(row["reason"]), 0) + 1
    stopped = None if run.summary else max(int(r["round"]) for r in rows)
    metrics = {m: 100 * last_rounds_mean(run.run["rounds"], m, max(last_rounds, 1)) for m in REPORT_METRICS}
    return {**metrics, "failures": rows, "reasons": reasons, "stopped": stopped, "rounds": run.run["rounds"],
            "dropped": dropped_counts(run, dropped_text)}


def nan_checks(nan: dict[int, dict], crash: dict[int, dict], cfg: ExperimentConfig) -> tuple[int, float]:
    """NaN replies that entered an aggregate (sent − rejected), and the largest |Δ| of any metric in any
    round between the NaN run and the run where that client crashes (points), over the seeds both have."""
    entered, gap = 0, 0.0
    for seed, run in nan.items():
        hostile = hostile_partitions(cfg.faults, cfg.federation.num_clients, seed)
        last = max(int(r["round"]) for r in run["rounds"])
        sent = sum("nan" in FaultPlan.for_round(cfg.faults, seed, cfg.federation.num_clients, rnd, p).kinds
                   for rnd in range(1, last + 1) for p in hostile)  # every client is sampled each round
        rejected = sum(1 for f in run["failures"] if f["phase"] == "train" and int(f["partition"]) in hostile
                       and short_reason(f["reason"]) == "rejected: not finite")
        entered += sent - rejected
        if seed in crash:
            for a, b in zip(run["rounds"], crash[seed]["rounds"], strict=False):
                gap = max(gap, *(100 * abs(a[m] - b[m]) for m in REPORT_METRICS if m in a and m in b))
    return entered, gap


# --- the page -------------------------------------------------------------------------------------


def delta(values: dict[int, dict], base: dict[int, dict], metric: str) -> tuple[list[int], np.ndarray]:
    """Seeds both cells finished, and the per-seed differences of ``metric`` (cell − base)."""
    seeds = sorted(s for s in values if s in base and values[s]["stopped"] is None and base[s]["stopped"] is None)
    return seeds, np.array([values[s][metric] - base[s][metric] for s in seeds])


def describe(cfg: ExperimentConfig, seeds: list[int]) -> list[str]:
    """A cell's hostile clients, what they do per round, its robust rule and min_replies."""
    faults, n = cfg.faults, cfg.federation.num_clients
    if not faults.enabled():
        return ["0", "–", "none", f"{cfg.federation.min_replies:g}"]
    count = {len(hostile_partitions(faults, n, s)) for s in seeds}.pop()
    acts = [("send their update × " + f"{faults.scale_factor:g}" if kind == "scale" else FAULT_WORDS[kind])
            + ("" if getattr(faults, kind) == 1 else f" (p = {getattr(faults, kind):g})")
            for kind in ("crash", "straggle", "nan", "inf", "wrong_shape", "scale", "sign_flip", "label_flip")
            if getattr(faults, kind) > 0]
    rule = cfg.strategy.robust
    robust = rule.name.replace("_", " ") + (f", trim {rule.trim:g}" if rule.name == "trimmed_mean" else
                                            f" to the median direction, drops at most {rule.min_cosine:g}"
                                            if rule.name == "cosine" else
                                            f", f = {rule.byzantine}" if rule.name in KRUM_RULES else "")
    if rule.directions and rule.name in KRUM_RULES:
        robust += ", scored on directions"
    if rule.exclude_after:
        robust += f", leaves out a client dropped in most of ≥ {rule.exclude_after} rounds"
    return [f"{count} of {n}", ", ".join(acts) + " in every round", robust, f"{cfg.federation.min_replies:g}"]


def hostile_text(cfgs: list[ExperimentConfig], seeds: list[int]) -> str:
    """The hostile partitions of each seed, per number of hostile clients."""
    per_seed = []
    for seed in seeds:
        drawn = {}
        for cfg in (c for c in cfgs if c.faults.enabled()):
            partitions = sorted(hostile_partitions(cfg.faults, cfg.federation.num_clients, seed))
            drawn.setdefault(len(partitions), partitions)
        per_seed.append(f"seed {seed}: " + ", ".join(f"{k} → {p}" for k, p in sorted(drawn.items())))
    return "; ".join(per_seed)


def results_rows(cells: dict[str, dict[int, dict]], labels: list[str]) -> list[list[str]]:
    """One row per cell: seeds, metrics (mean ± std), paired Δ to clean, failures per run, stopped runs."""
    rows = []
    for label in labels:
        method, case = label.split("_", 1)
        runs, base = cells[label], cells.get(f"{method}_clean", {})
        done = [r for r in runs.values() if r["stopped"] is None]
        cell = [method, case, f"{len(runs)} ({', '.join(map(str, sorted(runs)))})"]
        for metric in ("balanced_accuracy", "tail_recall"):
            values = np.array([r[metric] for r in done])
            seeds, diffs = delta(runs, base, metric)
            cell += [(f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}")
                     if len(values) else "–", paired_text(diffs) if case != "clean" else ""]
            if metric == "balanced_accuracy":
                cell.append(" / ".join(f"{d:+.2f}" for d in diffs) if case != "clean" else "")
        reasons: dict[str, int] = {}
        for run in runs.values():
            for reason, count in run["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        per_run = sum(reasons.values()) / len(runs)
        cell.append(f"{per_run:g}" + (f" ({', '.join(sorted(reasons))})" if reasons else ""))
        stops = sorted((s, r["stopped"]) for s, r in runs.items() if r["stopped"] is not None)
        cell.append(", ".join(f"s{s}: round {rnd}" for s, rnd in stops) or "–")
        cell.append(dropped_cell(runs))
        rows.append(cell)
    return rows


def dropped_cell(runs: dict[int, dict]) -> str:
    """Per seed, the hostile replies a selection rule dropped of those sent, and the honest ones it dropped."""
    parts = []
    for seed, run in sorted(runs.items()):
        if run["dropped"] is not None:
            bad, sent, honest = run["dropped"]
            parts.append(f"s{seed}: {bad}/{sent}, {honest}")
    recorded = sum(run["dropped"] is not None for run in runs.values())
    return "; ".join(parts) + ("" if recorded == len(runs) or not parts else "; others not recorded") if parts else "–"


def floor_checks(cells: dict[str, dict[int, dict]], methods: list[str],
                 configs: dict[str, ExperimentConfig]) -> tuple[str, bool]:
    """The floors per method: crash30 and the robust cells against clean; the NaN cell's two checks."""
    signed, unsigned, missing = [], [], []
    for method in methods:
        base = cells.get(f"{method}_clean", {})
        for case, what in [("crash30", "30% crashing"), *[(c, f"{c} ({rule})") for c, rule in ROBUST_CASES.items()]]:
            runs = cells.get(f"{method}_{case}", {})
            seeds, diffs = delta(runs, base, "balanced_accuracy")
            if not seeds:
                missing.append(f"{method}_{case}")
                continue
            stops = sum(r["stopped"] is not None for r in runs.values())
            measured = float("nan") if stops else float(diffs.mean())
            name = f"{what}: Δ balanced accuracy to clean (n = {len(seeds)}{f', {stops} stopped' if stops else ''})"
            signed.append(([method, name], measured, ">=", -MAX_COST))
        nan, crash = cells.get(f"{method}_nan", {}), cells.get(f"{method}_crash10", {})
        if not nan or not crash:
            missing.append(f"{method}_nan / {method}_crash10")
            continue
        entered, gap = nan_checks(nan, crash, configs[f"{method}_nan"])
        both = len(set(nan) & set(crash))
        unsigned += [([method, f"NaN replies averaged (n = {len(nan)})"], float(entered), "<=", 0),
                     ([method, f"NaN run against its crash run: largest absolute Δ of any metric in any round "
                               f"(n = {both})"], gap, "<=", EQUAL)]
    parts, ok = [], not missing
    for checks, unit, sign in ((signed, "measured (points)", True), (unsigned, "measured", False)):
        if checks:
            text, holds = floors_table(["method", "floor", unit, "needed", "holds"], checks, signed=sign)
            parts.append(text)
            ok &= holds
    if missing:
        parts.append(f"Not checked yet (no finished runs): {', '.join(missing)}.")
    return "\n\n".join(parts), ok


def plot_curves(cells: dict[str, dict[int, dict]], methods: list[str], path: Path) -> Path:
    """Balanced accuracy per round, mean over the seeds that logged the round, one panel per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(methods), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True))
    for ax, method in zip(axes, methods):
        for label in (k for k in cells if k.startswith(f"{method}_")):
            curves: dict[int, list[float]] = {}
            for run in cells[label].values():
                for row in run["rounds"]:
                    curves.setdefault(int(row["round"]), []).append(100 * row.get("balanced_accuracy", np.nan))
            x = sorted(curves)
            ax.plot(x, [np.nanmean(curves[r]) for r in x], label=f"{label.split('_', 1)[1]} (n={len(cells[label])})",
                    linewidth=2.5 if label.endswith("_clean") else 1.2)
        ax.set(title=method, xlabel="round", ylabel="balanced accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cells and seeds (unless --table-only / --from-records), then write the page."""
    parser = bench_parser("faults", __doc__, DOC)
    parser.add_argument("--cells", nargs="+", help="cell labels METHOD_CASE of the suite (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--suite", default="experiments/suites/faults_fmnist.yaml")
    parser.add_argument("--out", default="runs/sweeps/faults_fmnist")
    parser.add_argument("--last-rounds", type=int, default=5, metavar="K",
                        help="average each run's last K rounds (0: final round only)")
    parser.add_argument("--table-only", action="store_true", help="train nothing: the page from the finished runs")
    add_option(parser)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args, header, page = parse(parser, sys.argv[1:] if argv is None else argv)

    failed, total = [], 0
    if not args.from_records:
        run_dirs, failed, total = run_cells(args)
        if not run_dirs:
            raise failure(failed, total, None) if failed else ConfigError(
                "runs", f"none of the {total} chosen runs has finished; {page.doc} is left as it is")
        save_records(page, header, [record_of(d) for d in run_dirs], add=args.add)
    header, records = read_records(page.records)
    runs = page_runs(records, page.records)
    labels = list(dict.fromkeys(r.label for r in runs))
    methods = list(dict.fromkeys(label.split("_", 1)[0] for label in labels))
    cells: dict[str, dict[int, dict]] = {label: {} for label in labels}
    configs: dict[str, ExperimentConfig] = {}
    for run, record in zip(runs, records, strict=True):
        cells[run.label][run.seed] = figures(run, record["failures"], args.last_rounds, record.get("dropped"))
        configs.setdefault(run.label, run.cfg)
    seeds = sorted({r.seed for r in runs})
    cases = list(dict.fromkeys(label.split("_", 1)[1] for label in labels))
    case_cfg = {case: next(configs[label] for label in labels if label.endswith(f"_{case}")) for case in cases}
    cell_table = table(["case", "hostile clients", "each round they", "robust rule", "min_replies"],
                       [[case, *describe(case_cfg[case], seeds)] for case in cases])
    hostile = hostile_text([case_cfg[c] for c in cases], seeds)
    results = table(["method", "case", "seeds", "balanced acc.", "Δ bal. acc. to clean", "Δ per seed",
                     "tail recall", "Δ tail recall to clean", "failures per run", "stopped",
                     "dropped by the rule: hostile/sent, honest"],
                    results_rows(cells, labels))
    floor_text, ok = floor_checks(cells, methods, configs)
    plot_curves(cells, methods, page.folder / "curves.png")
    first = runs[0].cfg
    fed, train = first.federation, first.train
    window = f"mean of each run's last {args.last_rounds} rounds" if args.last_rounds > 0 else "final round"
    print(results)
    print(floor_text)
    page.write(
        "# Failing and hostile clients on FMNIST-LT\n\n"
        f"{command_line(header)}  \nMachine: {header['machine']}; written {header['written']}.  \n"
        f"Setting: `experiments/quickstart.yaml` ({DATASETS.get(first.data.dataset, first.data.dataset)}, exp long tail rho = {first.imbalance.factor:g}, "
        f"Dirichlet({first.partition.alpha:g}) over {fed.num_clients} clients, all sampled, {first.model.name}) for "
        f"{fed.rounds} rounds × {train.local_epochs} local epoch (SGD lr {train.lr:g}, momentum {train.momentum:g}, "
        f"batch {train.batch_size}); fedavg, and cafedcl with its defaults (head inference; the imbalance "
        "page's tuned knobs were chosen for rho = 100 over 50 rounds). Suite: `experiments/suites/faults_fmnist.yaml`, "
        "all cells of a seed before the next seed.  \n"
        f"Seeds: {', '.join(map(str, seeds))}; each row says which seeds it has. Metrics: {window}, test set, "
        "percent; tail recall = mean recall of the rarest third of classes by training count. Δ to clean: per "
        "seed, the cell minus the clean run of the same method and seed; mean ± std (population) of those "
        "differences, *within noise* where |mean| < std. Failures: what `failures.csv` (and the `failures` "
        "column of `rounds.csv`) recorded, per run, with the reasons. Stopped: a round got fewer valid replies "
        "than min_replies (every reply non-finite once the model diverged) and the federation stopped; such a "
        "run has no metrics here.\n\n"
        f"## Cells\n\n{cell_table}\n\n"
        f"Hostile partitions, drawn from the seed (the first k of one permutation, so the crash10, nan and x100 "
        f"client is one partition and the NaN run can be set against the run where it crashes): {hostile}.\n\n"
        f"## Results ({window}, %)\n\n{results}\n\n{floors_section(floor_text, ok)}"
        f"## The robust rule\n\n{WHY_RULE}\n\n"
        f"{page.notes() + chr(10) if page.notes() else ''}"
        f"![balanced accuracy over rounds]({page.folder.name}/curves.png)\n")
    print(f"wrote {page.doc}")
    if failed:
        raise failure(failed, total, page.doc, "the page")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
